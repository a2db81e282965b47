"""Layers around attention: norms, feed-forwards, positions and the block.

Shapes: ``b`` batch, ``n`` seq, ``D`` d_model, ``h`` heads, ``d`` head_dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


class _RMSNormFunction(torch.autograd.Function):
    """``y = x * r * w`` with ``r = rsqrt(mean(x², -1) + eps)``, and a backward on LayerNorm's kernel.

    torch's CPU ``rms_norm`` is a composite of pow/mean/add/rsqrt/mul (and as many ops again in
    autograd's backward), each reading and writing a ``(..., D)`` tensor. Here the sum of squares
    is one reduction (``linalg.vector_norm``). The backward is ``native_layer_norm_backward``
    (one fused kernel) given mean 0 and ``rstd = r``: with ``x̂ = x r`` LayerNorm's gradient is
    ``r (g w - mean(g w) - x̂ mean(g w x̂))`` and RMSNorm's is the same without ``- mean(g w)``
    (there is no mean to differentiate), which is added back per row: ``+ r (g · w) / D``.
    ``dL/dw = sum_rows g x̂`` is LayerNorm's weight gradient unchanged.

    Saves ``x``, ``w`` and ``r`` (``(..., 1)``, float32).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        d = x.shape[-1]
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_()
        rstd = sq.div_(d).add_(eps).rsqrt_()  # (..., 1)
        out = x * rstd
        out.mul_(weight)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_w, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, [d], torch.zeros_like(rstd), rstd, weight, None, [need_x, need_w, False]
        )
        if need_x:  # put back the mean's share that LayerNorm's backward took out
            grad_x.add_(torch.linalg.vecdot(grad, weight).unsqueeze_(-1).mul_(rstd).div_(d))
        return grad_x, grad_w, None


class RMSNorm(nn.RMSNorm):
    """Root-mean-square norm (Zhang & Sennrich 2019, eq. 4): ``x / rms(x) * g``.

    ``(..., D) -> (..., D)``; ``rms(x) = sqrt(mean(x², -1) + eps)``. Same parameters and
    results (fp32, to ~1e-7) as ``nn.RMSNorm`` (which it subclasses, so weight-decay grouping
    sees it as a norm), computed by :class:`_RMSNormFunction` on the CPU in eager mode; under
    ``torch.compile``, on CUDA and under autocast it is ``nn.RMSNorm``'s own path (Inductor fuses
    it; CUDA has a fused kernel).
    """

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__(d_model, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type != "cpu"
            or self.weight is None
            or x.dtype != torch.float32
            or torch.compiler.is_compiling()
        ):
            return super().forward(x)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def _activation(name: str) -> Any:
    options = {"relu": F.relu, "gelu": F.gelu}
    if name not in options:
        raise ValueError(f"FFN activation {name!r} is not one of {sorted(options)}.")
    return options[name]


class FeedForward(nn.Module):
    """Position-wise MLP ``D -> hidden -> D`` (Vaswani et al. 2017, eq. 2); hidden = 4·D.

    ``activation``: ``relu`` (Vaswani) or ``gelu`` (GPT-2 / nanoGPT, exact erf form).
    ``bias``: biases on both linear layers (True, as before; nanoGPT uses False).
    """

    def __init__(
        self,
        d_model: int,
        hidden: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        hidden = hidden or 4 * d_model
        self.act = _activation(activation)
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(b, n, D) -> (b, n, D)``."""
        return self.down(self.drop(self.act(self.up(x))))


class GELUFeedForward(FeedForward):
    """:class:`FeedForward` with GELU (GPT-2, nanoGPT ``MLP``): ``model.ffn=gelu``."""

    def __init__(
        self, d_model: int, hidden: int | None = None, dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__(d_model, hidden, dropout, bias, activation="gelu")


class _SwiGLUGate(torch.autograd.Function):
    """``silu(a) * b`` for ``ab = [a | b]`` (``(..., 2H) -> (..., H)``), one autograd node.

    Autograd's version saves ``silu(a)`` besides ``a`` and ``b`` and ends its backward with a
    ``cat`` of the two halves' gradients (the backward of ``chunk``); this saves only ``ab`` and
    writes both gradients, in place, into one ``(..., 2H)`` buffer.
    """

    @staticmethod
    def forward(ctx: Any, ab: Tensor) -> Tensor:
        a, b = ab.chunk(2, dim=-1)
        ctx.save_for_backward(ab)
        return F.silu(a).mul_(b)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (ab,) = ctx.saved_tensors
        a, b = ab.chunk(2, dim=-1)
        out = torch.empty_like(ab)
        grad_a, grad_b = out.chunk(2, dim=-1)
        torch.mul(grad, b, out=grad_a)  # g * b, then d silu(a)/da in place: d/da
        torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)
        torch.ops.aten.silu.out(a, out=grad_b).mul_(grad)  # d/db = g * silu(a)
        return out


def swiglu_gate(ab: Tensor) -> Tensor:
    """``silu(a) * b`` where ``ab: (..., 2H) = [a | b]`` -> ``(..., H)`` (Shazeer 2020, eq. 5).

    On the CPU in eager mode a single autograd node (:class:`_SwiGLUGate`); elsewhere (CUDA,
    ``torch.compile``) the plain expression, which the compiler fuses.
    """
    if ab.device.type != "cpu" or torch.compiler.is_compiling():
        a, b = ab.chunk(2, dim=-1)
        return F.silu(a) * b
    return _SwiGLUGate.apply(ab)


def _eager_cpu_fp32(x: Tensor) -> bool:
    """The hand-fused CPU kernels' condition: float32 on the CPU, eager, no autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class _SwiGLUProject(torch.autograd.Function):
    """``silu(x W1ᵀ + c1) * (x W3ᵀ + c3)`` from the fused ``gate_up`` parameters
    ``weight = [W1; W3]: (2H, D)``, ``bias = [c1; c3]: (2H,)`` or None; ``(..., D) -> (..., H)``.

    The same numbers as ``swiglu_gate(F.linear(x, weight, bias))``, but ``a = x W1ᵀ + c1`` and
    ``b = x W3ᵀ + c3`` are two contiguous ``(M, H)`` tensors instead of the strided halves of
    one ``(M, 2H)`` output: on the CPU, elementwise kernels run about twice as fast on
    contiguous tensors as on strided halves, and two half-size buffers stay under glibc's
    mmap threshold (32 MiB) more often, so they are reused instead of page-faulted in anew.
    Saves ``x``, ``weight``, ``a``, ``b`` and ``silu(a)``. Backward: ``dL/db = g silu(a)``,
    ``dL/da = silu'(a) g b``, then ``dL/dx = da W1 + db W3``, ``dL/dW1 = daᵀ x``,
    ``dL/dW3 = dbᵀ x``, ``dL/dc = (sum da, sum db)``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        hidden = weight.shape[0] // 2
        x2 = x.reshape(-1, x.shape[-1])  # (M, D)
        w1, w3 = weight[:hidden].t(), weight[hidden:].t()
        if bias is None:
            a, b = torch.mm(x2, w1), torch.mm(x2, w3)
        else:
            a, b = torch.addmm(bias[:hidden], x2, w1), torch.addmm(bias[hidden:], x2, w3)
        silu_a = F.silu(a)
        ctx.save_for_backward(x2, weight, a, b, silu_a)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        return (silu_a * b).view(*x.shape[:-1], hidden)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x2, weight, a, b, silu_a = ctx.saved_tensors
        hidden = weight.shape[0] // 2
        g = grad.reshape(-1, hidden)  # (M, H)
        # a, b and silu(a) were made in forward and are held by nobody else: the gradients are
        # written over them (no new (M, H) buffers). A second backward through this node
        # (retain_graph=True) is refused by autograd's saved-tensor version check.
        grad_b = silu_a.mul_(g)
        grad_a = b.mul_(g)  # g * b, then times silu'(a), in place
        torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_a, weight[:hidden]).addmm_(grad_b, weight[hidden:])
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            torch.mm(grad_a.t(), x2, out=grad_w[:hidden])
            torch.mm(grad_b.t(), x2, out=grad_w[hidden:])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = torch.cat([grad_a.sum(0), grad_b.sum(0)])
        return grad_x, grad_w, grad_bias


class SwiGLU(nn.Module):
    """Gated MLP ``W2 (silu(W1 x) * W3 x)`` (Shazeer 2020, "GLU Variants", eq. 5).

    ``hidden`` defaults to 8/3·D rounded up to a multiple of 8, which keeps the
    parameter count equal to a 4·D ReLU MLP. ``bias``: biases on the linear layers (False, as
    in LLaMA and as before). ``W1`` and ``W3`` are one ``gate_up`` layer ``D -> 2·hidden``
    (first half gate, second half up).
    """

    def __init__(
        self, d_model: int, hidden: int | None = None, dropout: float = 0.0, bias: bool = False
    ) -> None:
        super().__init__()
        hidden = hidden or 8 * ((8 * d_model // 3 + 7) // 8)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(b, n, D) -> (b, n, D)``. On the CPU in float32 eager mode the up-projection and
        the gate are one autograd node (:class:`_SwiGLUProject`); elsewhere ``gate_up`` then
        :func:`swiglu_gate`."""
        if _eager_cpu_fp32(x):
            gate = _SwiGLUProject.apply(x, self.gate_up.weight, self.gate_up.bias)
        else:
            gate = swiglu_gate(self.gate_up(x))
        return self.down(self.drop(gate))


#: Enum-like choices for ``model.norm`` and ``model.ffn``.
NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm}
FEEDFORWARDS: dict[str, type[nn.Module]] = {
    "relu": FeedForward,
    "gelu": GELUFeedForward,
    "swiglu": SwiGLU,
}
POSITIONS = ("learned", "rope", "none")


def choose(kind: str, value: str, options: dict[str, Any] | tuple[str, ...]) -> Any:
    """Look up an enum-like config value, raising a ValueError that lists the options."""
    if value not in options:
        raise ValueError(f"model.{kind}={value!r} is not one of {sorted(options)}.")
    return options[value] if isinstance(options, dict) else value


class LearnedPositions(nn.Module):
    """Learned absolute position embeddings, added to token embeddings (Bloem; GPT-2)."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.emb = nn.Embedding(max_len, d_model)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x: (b, n, D)`` -> ``x + P[offset:offset+n]``. Raises ValueError past ``max_len``."""
        n = x.shape[1]
        if offset + n > self.max_len:
            raise ValueError(
                f"sequence position {offset + n} exceeds max_len={self.max_len} of the learned "
                f"position embeddings; raise max_len/context or use model.positions=rope."
            )
        return x + self.emb(torch.arange(offset, offset + n, device=x.device))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs ``(x1, x2) = (x[..., :d/2], x[..., d/2:])`` of ``x: (..., n, d)`` by the
    angles whose ``cos, sin: (n, d/2)`` are given: ``(x1 cos - x2 sin, x2 cos + x1 sin)``.

    The same numbers as the "rotate half" formula ``x * [cos, cos] + [-x2, x1] * [sin, sin]``
    (GPT-NeoX/LLaMA) without its ``neg``/``cat`` copies: in eager mode one autograd node
    (:class:`_Rotate`) writes both halves into one output, and its backward is the rotation by
    the opposite angles. Under ``torch.compile`` the plain expression, which Inductor fuses.
    """
    if torch.compiler.is_compiling():
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return _Rotate.apply(x, cos, sin)


def _rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """``out = rotation of x`` by angle ``sign * theta`` (half-layout pairs), in 4 half-size ops."""
    x1, x2 = x.chunk(2, dim=-1)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)  # x1 cos - sign x2 sin
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)  # x2 cos + sign x1 sin
    return out


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.cos_sin = (cos, sin)  # constants: not saved tensors, so no version checks
        return _rotate_into(torch.empty_like(x), x, cos, sin, 1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.cos_sin
        return _rotate_into(torch.empty_like(grad), grad, cos, sin, -1.0), None, None


def rope_pair_order(n_heads: int, head_dim: int, groups: int = 3, rotated: int = 2) -> Tensor:
    """Row order of a fused ``[q | k | v]`` projection (``groups`` blocks of ``h·d`` rows) that
    puts each RoPE pair next to each other in the first ``rotated`` blocks (q and k).

    Within every head of a rotated block the order is ``0, d/2, 1, d/2+1, ...``: the pair
    ``(x[i], x[i + d/2])`` that :func:`rotate` turns lands at ``(2i, 2i+1)``, so a complex view
    rotates it with one multiplication (:meth:`RotaryEmbedding.rotate_qkv`). The other blocks
    (v) keep their order. Returns a ``(groups·h·d,)`` int64 index.
    """
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    rows = torch.arange(rotated * n_heads)[:, None] * head_dim + within  # (rotated·h, d)
    rest = torch.arange(rotated * n_heads * head_dim, groups * n_heads * head_dim)
    return torch.cat([rows.flatten(), rest])


def _as_complex(x: Tensor) -> Tensor:
    """``(..., 2m)`` real -> ``(..., m)`` complex view of adjacent pairs (a copy if the strides
    do not allow a view)."""
    pairs = x.unflatten(-1, (-1, 2))
    try:
        return torch.view_as_complex(pairs)
    except RuntimeError:  # last stride != 1 or an odd stride/offset
        return torch.view_as_complex(pairs.contiguous())


class _RotateQKV(torch.autograd.Function):
    """``qkv: (b, n, 3·h·d)`` in pair order -> q, k rotated and v, each ``(b, h, n, d)``.

    Forward: one complex multiplication of the ``[q | k]`` part by ``table`` into a new
    ``(b, n, 2·h·d)`` buffer; q and k are ``(b, h, n, d)`` views of it, v a view of the input
    (the layout ``F.scaled_dot_product_attention`` gets from nanoGPT's ``split`` + ``view``).
    Backward: the gradient of q and k rotated back (times ``conj(table)``) and the gradient of v,
    written into one ``(b, n, 3·h·d)`` buffer (what the ``chunk`` backward's ``cat`` would do).
    """

    @staticmethod
    def forward(
        ctx: Any, qkv: Tensor, table: Tensor, table_conj: Tensor, n_heads: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, n, three_c = qkv.shape
        c = three_c // 3
        qk = torch.empty(b, n, 2 * c, dtype=qkv.dtype, device=qkv.device)
        torch.mul(
            _as_complex(qkv[..., : 2 * c]), table, out=torch.view_as_complex(qk.view(b, n, c, 2))
        )
        ctx.table_conj = table_conj  # constants: not saved tensors
        q, k = (t.view(b, n, n_heads, -1).transpose(1, 2) for t in qk.chunk(2, dim=-1))
        return q, k, qkv[..., 2 * c :].view(b, n, n_heads, -1).transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_q: Tensor | None, grad_k: Tensor | None, grad_v: Tensor | None
    ) -> tuple[Tensor, None, None, None]:
        ref = next(g for g in (grad_q, grad_k, grad_v) if g is not None)  # (b, h, n, d)
        b, h, n, d = ref.shape
        c = h * d
        out = torch.empty(b, n, 3 * c, dtype=ref.dtype, device=ref.device)
        table = ctx.table_conj.view(n, 2, c // 2)  # rotation by the opposite angles
        for i, g in enumerate((grad_q, grad_k)):
            dst = out[..., i * c : (i + 1) * c]
            if g is None:
                dst.zero_()
            else:
                src = _as_complex(g.transpose(1, 2).reshape(b, n, c))
                torch.mul(src, table[:, i], out=torch.view_as_complex(dst.unflatten(-1, (-1, 2))))
        dst_v = out[..., 2 * c :].view(b, n, h, d)
        if grad_v is None:
            dst_v.zero_()
        else:
            dst_v.copy_(grad_v.transpose(1, 2))
        return out, None, None, None


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer, eq. 34), applied to q and k.

    Rotates pairs ``(x[..., i], x[..., i + d/2])`` by angle ``pos * theta^(-2i/d)``
    (the "rotate half" layout of GPT-NeoX/LLaMA). Works at any length.

    Args:
        head_dim: d, even.
        theta: the base of the angle frequencies (``rope_theta``: 10000 in RoFormer and LLaMA 1/2,
            500000 in LLaMA 3).
        base: the former name of ``theta``, still accepted as a keyword.

    ``cos``/``sin`` tables ``(n, d/2)`` are cached per device and dtype, grown on demand, and built
    outside inference mode, so a forward under ``torch.inference_mode()`` does not leave
    inference tensors behind for a later training forward.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, *, base: float | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; change head_dim.")
        if base is not None:
            theta = base
        if not theta > 0:
            raise ValueError(f"RoPE theta must be positive, got {theta!r}.")
        self.head_dim, self.theta = head_dim, float(theta)
        inv_freq = self.theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        self._pair_cache: dict[tuple[torch.device, torch.dtype, int], tuple[Tensor, Tensor]] = {}

    @property
    def base(self) -> float:
        """The former name of :attr:`theta`."""
        return self.theta

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        self._cache, self._pair_cache = {}, {}  # .to()/.double()/...: rebuilt on demand
        return super()._apply(fn, recurse)

    def cos_sin(
        self, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """``cos, sin: (>= length, d/2)`` of the angles ``pos * inv_freq`` (computed in fp32)."""
        key = (torch.device(device), dtype)
        hit = self._cache.get(key)
        if hit is None or hit[0].shape[0] < length:
            with torch.inference_mode(False), torch.no_grad():
                t = torch.arange(max(length, 256), device=device, dtype=torch.float32)
                freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float32))
                hit = (freqs.cos().to(dtype), freqs.sin().to(dtype))  # (n, d/2) each
            self._cache[key] = hit
        return hit

    def pair_tables(
        self, length: int, copies: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """``exp(±i · pos · inv_freq)``, complex ``(>= length, copies · d/2)``, for the pair order
        of :func:`rope_pair_order` (the ``d/2`` angles repeated ``copies`` times along a row);
        cached like :meth:`cos_sin`. Returns ``(table, conj(table))``."""
        key = (torch.device(device), dtype, copies)
        hit = self._pair_cache.get(key)
        if hit is None or hit[0].shape[0] < length:
            cos, sin = self.cos_sin(length, device, dtype)
            with torch.inference_mode(False), torch.no_grad():
                table = torch.complex(cos, sin).repeat(1, copies)  # (n, copies·d/2)
                hit = (table, table.conj().resolve_conj())
            self._pair_cache[key] = hit
        return hit

    def rotate_qkv(
        self, qkv: Tensor, n_heads: int, offset: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q and k rotated, and v, from a fused projection ``qkv: (b, n, 3·h·d)`` whose rows are in
        :func:`rope_pair_order`: three ``(b, h, n, d)`` tensors at positions ``offset ..``.

        The same rotation as :meth:`forward` on every pair, with q and k coordinates in pair
        order ``(0, d/2, 1, d/2+1, ...)`` within each head, so every ``q · k`` is the one of the
        half layout. One autograd node (:class:`_RotateQKV`), one complex multiplication each
        way. ``qkv`` must be float32 or float64 (complex views); on other dtypes use
        :meth:`forward` on the half layout.
        """
        b, n, three_c = qkv.shape
        table, table_conj = self.pair_tables(offset + n, 2 * n_heads, qkv.device, qkv.dtype)
        return _RotateQKV.apply(
            qkv, table[offset : offset + n], table_conj[offset : offset + n], n_heads
        )

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x: (b, h, n, d)`` at positions ``offset .. offset+n-1`` -> rotated ``(b, h, n, d)``."""
        n = x.shape[-2]
        cos, sin = self.cos_sin(offset + n, x.device, x.dtype)
        return rotate(x, cos[offset : offset + n], sin[offset : offset + n])


class Block(nn.Module):
    """Transformer block built from injected modules (DESIGN.md, convention 4).

    ``prenorm=True`` (modern; Xiong et al. 2020): ``x + attn(norm1(x))`` then
    ``x + ffn(norm2(x))``. ``prenorm=False`` (Vaswani et al. 2017; Bloem's
    "Transformers from scratch"): ``norm1(x + attn(x))`` then ``norm2(x + ffn(x))``.
    Dropout is applied to each residual branch.
    """

    def __init__(
        self,
        attention: nn.Module,
        ffn: nn.Module,
        norm1: nn.Module,
        norm2: nn.Module,
        prenorm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.attention, self.ffn, self.norm1, self.norm2 = attention, ffn, norm1, norm2
        self.prenorm = prenorm
        self.drop = nn.Dropout(dropout)

    def _residual(self, x: Tensor, branch: Any, norm: nn.Module) -> Tensor:
        if self.prenorm:
            return x + self.drop(branch(norm(x)))
        return norm(x + self.drop(branch(x)))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``x: (b, n, D)``, ``padding_mask: (b, n)`` bool (True = real) -> ``(b, n, D)``."""
        x = self._residual(x, lambda y: self.attention(y, padding_mask), self.norm1)
        return self._residual(x, self.ffn, self.norm2)

    def step(self, x: Tensor, state: Any, pos: int) -> tuple[Tensor, Any]:
        """One decoding step ``x: (b, 1, D)`` through the attention's ``step``."""
        new_state = []

        def attn(y: Tensor) -> Tensor:
            out, s = self.attention.step(y, state, pos)
            new_state.append(s)
            return out

        x = self._residual(x, attn, self.norm1)
        return self._residual(x, self.ffn, self.norm2), new_state[0]
