"""Linear attention (Katharopoulos, Vyas, Pappas, Fleuret 2020, "Transformers are RNNs").

With feature map ``phi(x) = elu(x) + 1`` (section 3.2.1, eq. 7), attention
becomes (eq. 5-6)::

    out_i = phi(q_i)ᵀ S / (phi(q_i)ᵀ z + eps),   S = sum_j phi(k_j) v_jᵀ,  z = sum_j phi(k_j)

over all keys j (non-causal, O(n)) or keys j <= i (causal, eq. 10-12; the
recurrent form S_i = S_{i-1} + phi(k_i) v_iᵀ, z_i = z_{i-1} + phi(k_i) of
eq. 18-20 is :func:`linear_attention_step`, used by :meth:`LinearAttention.step`).

Attention weights: linear attention never forms them, but they exist implicitly
(eq. 4 with sim(q, k) = phi(q)ᵀ phi(k))::

    A_ij = phi(q_i)ᵀ phi(k_j) / (sum_j' phi(q_i)ᵀ phi(k_j') + eps)   (j, j' over allowed keys)

and ``out_i = sum_j A_ij v_j`` exactly (eps included). So ``has_weights`` is True:
``forward(..., return_weights=True)`` materialises ``A`` (O(n²), for inspection) from
the same features (same feature map, same key masking, same eps) as the O(n) output.
Rows sum to slightly less than 1 (by ``eps``); they are not a softmax.

Dropout: ``attention.dropout`` means dropout on the attention weights in every
variant. Here the weights are never materialised, and dropping entries of A cannot
be done in O(n) (dropping terms of the state ``S`` would drop whole keys for all
later queries at once, which is a different regulariser). Katharopoulos et al.'s
own implementation (fast-transformers) has no attention dropout for linear
attention either, so ``LinearAttention`` refuses ``dropout > 0`` (use
``model.dropout`` for residual dropout).

Implementation notes (pitfalls recorded in DESIGN.md):

- padded keys are removed by zeroing phi(k) *after* the feature map
  (elu(0) + 1 = 1, so zeroing the input would not remove them);
- ``eps`` is added to the denominator only;
- all sums run in float32, with autocast disabled, since sums over the
  sequence overflow half precision;
- the causal form is computed in chunks of ``chunk_size``: exact attention
  inside a chunk, plus the running state ``S`` from earlier chunks. Peak
  memory is ``O(n·C + (n/C)·d²)`` per head instead of ``O(n·d²)``.

Kernels for the causal form (``attention.kernel``):

- ``torch`` (default): :func:`causal_linear_attention`, the chunked form above, on any device;
- ``fla``: the numerator from flash-linear-attention's chunked Triton kernel
  (``fla.ops.linear_attn.chunk_linear_attn``, Yang et al., fla-org; ``pip install
  'attnlab[fla]'``), CUDA only, :func:`fla_causal_linear_attention`. Its ``tl.dot`` runs
  float32 inputs as TF32 on NVIDIA GPUs, so it can agree with ``torch`` only to TF32
  precision (10 mantissa bits, unit roundoff 2^-11 ≈ 4.9e-4), not to float32's;
- ``auto``: ``fla`` when the input is on CUDA and fla is importable, else ``torch``.

The non-causal form is two matrix products and always runs in torch.

Legend: b batch, n seq, c chunks, C chunk_size, h heads, d head_dim, D d_model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention.base import Attention, split_heads


def elu_feature_map(x: Tensor) -> Tensor:
    """``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020, eq. 7); positive everywhere."""
    return F.elu(x) + 1.0


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Non-causal linear attention (eq. 5-6) on features: q, k ``(b, h, n, d)`` (phi already
    applied), v ``(b, h, n, e)`` -> ``(b, h, n, e)``."""
    kv = k.transpose(-2, -1) @ v  # (b, h, d, e)
    z = k.sum(dim=-2)  # (b, h, d)
    den = (q @ z.unsqueeze(-1)) + eps  # (b, h, n, 1)
    return (q @ kv) / den


def causal_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, chunk_size: int = 64, eps: float = 1e-6
) -> Tensor:
    """Causal linear attention (eq. 10-12), chunked prefix sums: q, k ``(b, h, n, d)`` (phi
    already applied), v ``(b, h, n, e)`` -> ``(b, h, n, e)``.

    Equal (up to float error) to ``out_i = sum_{j<=i} (q_i·k_j) v_j / (sum_{j<=i} q_i·k_j + eps)``.
    """
    b, h, n, d = q.shape
    e = v.shape[-1]
    size = min(chunk_size, n)
    pad = (-n) % size
    # A ones column on v carries the normaliser: k_jᵀ [v_j, 1] = [k_j v_jᵀ, k_j], so one
    # product gives both S and z, and one product per term gives numerator and denominator.
    v = torch.cat([v, v.new_ones(b, h, n, 1)], dim=-1)  # (b, h, n, e+1)
    if pad:  # zero-padded keys add nothing to the sums; padded queries are dropped
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    c = (n + pad) // size
    qc, kc, vc = (t.reshape(b, h, c, size, t.shape[-1]) for t in (q, k, v))  # (b, h, c, C, .)
    # State [S | z] entering each chunk: exclusive prefix sum over chunks.
    kv = kc.transpose(-2, -1) @ vc  # (b, h, c, d, e+1)
    s = torch.cumsum(kv, dim=2) - kv
    # Exact causal attention inside each chunk, plus the earlier chunks' state.
    scores = (qc @ kc.transpose(-2, -1)).tril()  # (b, h, c, C, C)
    numden = scores @ vc + qc @ s  # (b, h, c, C, e+1)
    out = numden[..., :e] / (numden[..., e:] + eps)  # (b, h, c, C, e)
    return out.reshape(b, h, c * size, e)[:, :, :n]


#: the values of ``attention.kernel`` (module docstring)
KERNELS = ("auto", "torch", "fla")


@functools.cache
def fla_kernel() -> Callable[..., Any] | None:
    """flash-linear-attention's ``chunk_linear_attn``, or None when it cannot be imported
    (not installed, or Triton failing to initialise, e.g. on a machine without CUDA)."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # ImportError, or Triton/driver errors raised at import
        return None
    return chunk_linear_attn


def fla_causal_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6, kernel: Callable[..., Any] | None = None
) -> Tensor:
    """Causal linear attention (eq. 10-12) with the numerator from flash-linear-attention's
    chunked kernel: q, k ``(b, h, n, d)`` (phi already applied), v ``(b, h, n, e)`` ->
    ``(b, h, n, e)``, the same quantity as :func:`causal_linear_attention`.

    ``chunk_linear_attn(q, k, v, scale=1.0, normalize=False)`` gives the numerator
    ``sum_{j<=i} (q_i·k_j) v_j`` in its ``(b, n, h, d)`` layout; the denominator
    ``q_i · sum_{j<=i} k_j + eps`` is one cumulative sum here, in float32 (float64 for float64
    inputs) whatever the inputs' dtype, since a sum over the sequence loses its precision in
    bf16/fp16; the result has that dtype too. fla's own ``normalize=True`` would use its ``eps``
    of 1e-5 rather than ``eps``.

    Args:
        kernel: the ``chunk_linear_attn`` to call; default :func:`fla_kernel`.

    Raises:
        RuntimeError: flash-linear-attention is not importable.
    """
    fn = kernel or fla_kernel()
    if fn is None:
        raise RuntimeError(
            "flash-linear-attention is not importable: pip install 'attnlab[fla]' (needs CUDA "
            "and Triton), or set attention.kernel=torch."
        )
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (b, n, h, .)
    num, _ = fn(qt, kt, vt, scale=1.0, normalize=False)
    acc = torch.promote_types(qt.dtype, torch.float32)  # float64 stays float64
    den = (qt.to(acc) * kt.to(acc).cumsum(dim=1)).sum(-1, keepdim=True) + eps  # (b, n, h, 1)
    return (num.to(acc) / den).transpose(1, 2)


def linear_attention_step(
    q: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor] | None = None, eps: float = 1e-6
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One step of causal linear attention, the recurrent form (Katharopoulos et al. 2020,
    eq. 18-20)::

        S_i = S_{i-1} + phi(k_i) v_iᵀ,   z_i = z_{i-1} + phi(k_i),
        out_i = phi(q_i)ᵀ S_i / (phi(q_i)ᵀ z_i + eps)

    Args:
        q, k: ``(b, h, d_k)``, **already feature-mapped** (``phi(q_i)``, ``phi(k_i)``), like
            the other functions here; apply the feature map (and any key masking) first.
        v: ``(b, h, d_v)``; ``d_v`` may differ from ``d_k``.
        state: ``(S: (b, h, d_k, d_v), z: (b, h, d_k))`` after the previous tokens, or None
            for the first token (zeros).
        eps: added to the denominator only.

    Returns:
        ``(out: (b, h, d_v), (S_i, z_i))``. Sums run in the inputs' dtype: pass float32.
    """
    if state is None:
        b, h, d_k = k.shape
        s = k.new_zeros(b, h, d_k, v.shape[-1])
        z = k.new_zeros(b, h, d_k)
    else:
        s, z = state
    s = s + k.unsqueeze(-1) * v.unsqueeze(-2)  # (b, h, d_k, d_v)
    z = z + k  # (b, h, d_k)
    num = (q.unsqueeze(-2) @ s).squeeze(-2)  # (b, h, d_v)
    den = (q * z).sum(-1, keepdim=True) + eps  # (b, h, 1)
    return num / den, (s, z)


class LinearAttention(Attention):
    """Multi-head linear attention with the elu+1 feature map.

    Args:
        d_model, n_heads, head_dim, causal, max_len, bias: the common contract
            (``max_len`` is unused; ``bias`` applies to the q/k/v and output projections).
        dropout: must be 0 (ValueError otherwise): there are no materialised attention
            weights to drop (module docstring).
        rope, rope_theta: RoPE is refused (``uses_qk = False``): similarity is
            phi(q)·phi(k), not q·k.
        chunk_size: chunk length C of the causal prefix sums (``torch`` kernel).
        eps: added to the denominator.
        kernel: ``auto``, ``torch`` or ``fla``: what computes the causal form (module
            docstring). ValueError at build time for another value, for ``fla`` without
            ``causal``, and for ``fla`` when flash-linear-attention is not importable;
            RuntimeError at the first forward for ``fla`` on an input not on CUDA.

    ``has_weights`` is True: the implicit weights ``A`` of the module docstring.
    Override :meth:`feature_map` to change phi; the output, the weights and the
    recurrent step all use it.
    """

    uses_qk = False
    supports_step = True
    recurrent = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        chunk_size: int = 64,
        eps: float = 1e-6,
        kernel: str = "torch",
        **kw: Any,
    ) -> None:
        super().__init__(d_model, n_heads, head_dim, **kw)
        if chunk_size <= 0:
            raise ValueError(f"attention.chunk_size must be positive, got {chunk_size}.")
        if kernel not in KERNELS:
            raise ValueError(
                f"attention.kernel={kernel!r} is not one of {', '.join(KERNELS)} (auto: "
                "flash-linear-attention on CUDA when installed, else torch)."
            )
        if kernel == "fla" and not self.causal:
            raise ValueError(
                "attention.kernel=fla applies to causal linear attention only (the non-causal "
                "form is two matrix products in torch); use attention.kernel=auto or torch."
            )
        if kernel == "fla" and fla_kernel() is None:
            raise ValueError(
                "attention.kernel=fla, but flash-linear-attention is not importable: "
                "pip install 'attnlab[fla]' (needs CUDA and Triton), or use attention.kernel="
                "auto (fla where it can run) or torch."
            )
        if self.dropout > 0:
            raise ValueError(
                f"attention.dropout={self.dropout} is not available for linear attention: "
                "attention.dropout drops attention weights, which linear attention never "
                "forms. Set attention.dropout=0 (use model.dropout for residual dropout)."
            )
        self.chunk_size, self.eps, self.kernel = chunk_size, eps, kernel
        self.qkv = nn.Linear(d_model, 3 * self.inner_dim, bias=self.bias)
        self.out = nn.Linear(self.inner_dim, d_model, bias=self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel}"

    def uses_fla(self, x: Tensor) -> bool:
        """Whether the causal form of this input runs on flash-linear-attention's kernel.

        Raises:
            RuntimeError: ``kernel='fla'`` and ``x`` is not on CUDA.
        """
        if not self.causal or self.kernel == "torch":
            return False
        if self.kernel == "fla":
            if x.device.type != "cuda":
                raise RuntimeError(
                    f"attention.kernel=fla runs on CUDA only, but the input is on {x.device}; "
                    "use attention.kernel=auto (torch off CUDA) or torch."
                )
            return True
        return x.device.type == "cuda" and fla_kernel() is not None

    def feature_map(self, x: Tensor) -> Tensor:
        """phi, applied to q and k ``(b, h, n, d)``: :func:`elu_feature_map` (eq. 7)."""
        return elu_feature_map(x)

    def features(
        self, x: Tensor, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``x: (b, n, D)`` -> phi(q), phi(k), v in float32, each ``(b, h, n, d)``; with
        ``padding_mask: (b, n)`` phi(k) is zeroed at padded keys (after the feature map)."""
        q, k, v = (split_heads(t, self.n_heads).float() for t in self.qkv(x).chunk(3, dim=-1))
        q, k = self.feature_map(q), self.feature_map(k)
        if padding_mask is not None:
            k = k * padding_mask[:, None, :, None].to(k.dtype)
        return q, k, v

    def values(self, x: Tensor) -> Tensor:
        """``x: (b, n, D)`` -> v ``(b, h, n, d)`` in float32."""
        return self.features(x)[2]

    def combine(self, heads: Tensor) -> Tensor:
        """``(b, h, n, d)`` -> ``(b, n, D)`` in the projection's dtype."""
        return self.out(self.merge(heads.to(self.out.weight.dtype)))

    def implicit_weights(self, q: Tensor, k: Tensor) -> Tensor:
        """The implicit weights ``A (b, h, n, n)`` (module docstring) from features q, k
        ``(b, h, n, d)`` (keys already masked); lower-triangular when causal. float32."""
        scores = q @ k.transpose(-2, -1)
        if self.causal:
            scores = scores.tril()
        return scores / (scores.sum(-1, keepdim=True) + self.eps)

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x: (b, n, D)``, ``padding_mask: (b, n)`` bool (True = real) -> ``(b, n, D)``;
        with ``return_weights``, ``((b, n, D), A (b, h, n, n))``, both from one set of features."""
        q, k, v = self.features(x, padding_mask)
        weights = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.uses_fla(x):
                out = fla_causal_linear_attention(q, k, v, self.eps)
            elif self.causal:
                out = causal_linear_attention(q, k, v, self.chunk_size, self.eps)
            else:
                out = linear_attention(q, k, v, self.eps)
            if return_weights:
                weights = self.implicit_weights(q, k)
        out = self.combine(out.to(x.dtype))
        return (out, weights) if return_weights else out

    def init_state(
        self, batch: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Empty recurrent state ``(S: (b, h, d, d), z: (b, h, d))`` in float32."""
        h, d = self.n_heads, self.head_dim
        return (
            torch.zeros(batch, h, d, d, device=device, dtype=torch.float32),
            torch.zeros(batch, h, d, device=device, dtype=torch.float32),
        )

    def step(
        self, x: Tensor, state: tuple[Tensor, Tensor], pos: int
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Recurrent form (eq. 18-20, :func:`linear_attention_step`): ``x: (b, 1, D)`` ->
        ``((b, 1, D), state)``, O(1) in ``pos``."""
        q, k, v = self.features(x)  # (b, h, 1, d)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out, state = linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, self.eps)
        return self.combine(out[:, :, None].to(x.dtype)), state
