"""Shared pieces of every attention variant: the contract, capability flags,
head split/merge, mask builders and the KV-cache decoding step.

Shape legend used in every attention file::

    b  batch          n  query length      m  key length
    h  heads          d  head_dim          D  d_model

The contract (DESIGN.md, convention 1): every variant is an ``nn.Module`` with
``forward(x: (b, n, D), padding_mask: (b, n) bool | None) -> (b, n, D)`` where
``padding_mask`` is True at real tokens, and owns its projections. The backbone
fills in ``d_model``, ``n_heads``, ``causal``, ``max_len``, ``rope``, ``bias`` and
``rope_theta``; the variant's YAML file (``conf/attention/<name>.yaml``) sets the rest.

Attention weights come from the forward path (tests/test_contract.py checks it for
every file in ``conf/attention``): ``forward(x, padding_mask, return_weights=True)``
returns ``(out, weights)`` with ``weights: (b, h, n, n)`` computed by the same score
and normalise functions the plain forward uses, and
``combine(weights @ values(x)) == forward(x)``. :meth:`Attention.attention_weights`
is that second output. A variant with no per-(query, key) weights sets
``has_weights = False``; its ``attention_weights`` raises
:class:`AttentionWeightsUnavailable`.

``attention.dropout`` has one meaning everywhere: dropout on the attention weights
(training only). A variant without explicit weights refuses ``dropout > 0``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnlab.layers import RotaryEmbedding, rope_pair_order


def resolve_head_dim(d_model: int, n_heads: int, head_dim: int | None) -> int:
    """Return ``head_dim``, defaulting to ``d_model // n_heads``.

    Raises:
        ValueError: if a size is not positive, or ``head_dim`` is unset and
            ``n_heads`` does not divide ``d_model``.
    """
    for name, value in (("d_model", d_model), ("n_heads", n_heads)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if head_dim is None:
        if d_model % n_heads:
            divisors = [h for h in range(1, d_model + 1) if d_model % h == 0 and h <= 64]
            raise ValueError(
                f"n_heads={n_heads} does not divide d_model={d_model}, and head_dim is unset. "
                f"Pick n_heads from {divisors}, or set attention.head_dim explicitly "
                f"(e.g. attention=fixed_head)."
            )
        return d_model // n_heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive integer or null, got {head_dim!r}.")
    return head_dim


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """``(b, n, h*d) -> (b, h, n, d)``."""
    b, n, _ = x.shape
    return x.view(b, n, n_heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(b, h, n, d) -> (b, n, h*d)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def causal_mask(n: int, m: int | None = None, device: torch.device | None = None) -> Tensor:
    """Boolean ``(n, m)`` mask, True where query ``i`` may attend key ``j``.

    Queries are aligned to the *end* of the keys (query ``i`` sits at key
    position ``m - n + i``), which is what a KV cache needs.
    """
    m = n if m is None else m
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(diagonal=m - n)


class AttentionWeightsUnavailable(ValueError):
    """Raised by :meth:`Attention.attention_weights` on a variant with ``has_weights = False``.

    A ``ValueError``, so ``attnlab <command>`` prints its message as one line.
    """


def masked_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last axis in float32 after setting ``~mask`` logits to -inf.

    ``logits: (b|1, h, n, m)``; ``mask`` boolean, broadcastable to it, True = may
    attend, or None. Returns float32 weights of the logits' shape.
    """
    logits = logits.float()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def attention_mask(
    padding_mask: Tensor | None, causal: bool, n: int, device: torch.device
) -> Tensor | None:
    """Boolean mask broadcastable to ``(b, h, n, n)``, True = may attend; None if no mask.

    Padded keys are masked. With causal masking a padded *query* row might
    have no allowed key (left padding); such rows are allowed their own
    position so the softmax never sees an empty row (their outputs are
    ignored downstream; real rows are unaffected since their own key is real).
    """
    if padding_mask is None:
        return causal_mask(n, device=device)[None, None] if causal else None
    keys = padding_mask[:, None, None, :]  # (b, 1, 1, n)
    if not causal:
        return keys
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return (keys | eye) & causal_mask(n, device=device)  # (b, 1, n, n)


class Attention(nn.Module):
    """Base class of every attention variant.

    Capability flags (class attributes, overridden per instance where they
    depend on the configuration) let the backbone refuse an impossible
    combination when the model is built (DESIGN.md, convention 2), and decide
    which contract tests apply (tests/test_contract.py):

    - ``supports_causal``: can run with ``causal=True`` (language modelling).
    - ``supports_padding_mask``: honours ``padding_mask``.
    - ``needs_max_len``: parameters depend on ``max_len``; longer inputs are refused.
    - ``uses_qk``: scores come from q·k, so rotary positions (RoPE) apply.
    - ``supports_step``: has an incremental ``init_state``/``step`` API
      (a KV cache or a recurrent state) for O(1)-per-token generation.
    - ``has_weights``: has a ``(b, h, n, n)`` matrix of attention weights that,
      applied to :meth:`values` and passed through :meth:`combine`, gives the
      forward output; ``forward(..., return_weights=True)`` returns it. Without it
      :meth:`attention_weights` raises :class:`AttentionWeightsUnavailable`.

    Args:
        d_model: model width D.
        n_heads: number of heads h.
        head_dim: per-head size d; default ``d_model // n_heads``.
        causal: mask future keys.
        dropout: dropout probability on the attention weights (training only).
        max_len: longest input the backbone will pass (used by ``needs_max_len`` variants).
        rope: rotary position embeddings on q and k (Su et al. 2021).
        bias: bias terms in the q/k/v and output projections (``False`` as in
            nanoGPT's ``bias=False``, PaLM, LLaMA).
        rope_theta: RoPE base θ: pair ``i`` rotates by ``pos · θ^(-2i/d)``
            (Su et al. 2021, eq. 15); 10000 in the paper.

    ``head_mask`` (a ``(h,)`` buffer of ones) scales each head's output before
    the heads are merged; set an entry to 0 to ablate a head (Michel et al. 2019).
    """

    supports_causal: ClassVar[bool] = True
    supports_padding_mask: ClassVar[bool] = True
    needs_max_len: bool = False
    uses_qk: bool = True
    supports_step: ClassVar[bool] = False
    #: the decoding state has a fixed size (a recurrent state, O(1) per token) rather than a
    #: KV cache that grows with the position; read by ``attnlab bench`` to pick its targets
    recurrent: ClassVar[bool] = False
    has_weights: ClassVar[bool] = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        max_len: int | None = None,
        rope: bool = False,
        bias: bool = True,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        self.head_dim = resolve_head_dim(d_model, n_heads, head_dim)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"attention dropout must be in [0, 1), got {dropout!r}.")
        if max_len is not None and (not isinstance(max_len, int) or max_len <= 0):
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}.")
        if not float(rope_theta) > 0:
            raise ValueError(f"rope_theta must be positive, got {rope_theta!r}.")
        self.d_model, self.n_heads, self.causal = d_model, n_heads, bool(causal)
        self.dropout, self.max_len = float(dropout), max_len
        self.bias, self.rope_theta = bool(bias), float(rope_theta)
        self.inner_dim = n_heads * self.head_dim
        self.rotary = RotaryEmbedding(self.head_dim, theta=self.rope_theta) if rope else None
        self.attn_drop = nn.Dropout(self.dropout)
        self.register_buffer("head_mask", torch.ones(n_heads), persistent=False)

    # ------------------------------------------------------------------ helpers
    def check_length(self, n: int) -> None:
        """Raise ValueError if ``n`` exceeds ``max_len`` for a variant that needs it."""
        if self.needs_max_len and self.max_len is not None and n > self.max_len:
            raise ValueError(
                f"{type(self).__name__} was built for max_len={self.max_len} but got a "
                f"sequence of length {n}; raise the task's max_len/context or truncate inputs."
            )

    def merge(self, out: Tensor) -> Tensor:
        """Apply ``head_mask`` and merge heads: ``(b, h, n, d) -> (b, n, h*d)``.

        The multiplication is skipped while every entry of ``head_mask`` is 1 (the product
        would be ``out`` itself); see :meth:`all_heads_on`."""
        if self.all_heads_on():
            return merge_heads(out)
        return merge_heads(out * self.head_mask.to(out.dtype)[None, :, None, None])

    def all_heads_on(self) -> bool:
        """True when every entry of ``head_mask`` is 1. Checked again only after the buffer is
        written to (its version counter moves) or replaced, so the check does not read the
        tensor (or synchronise a GPU) on every forward. False under ``torch.compile`` and for
        tensors without a version counter (made under ``torch.inference_mode``)."""
        mask = self.head_mask
        if torch.compiler.is_compiling() or mask.is_inference():
            return False
        seen = self.__dict__.get("_heads_on_seen")
        if seen is None or seen[0] is not mask or seen[1] != mask._version:
            seen = (mask, mask._version, bool((mask == 1).all()))
            self.__dict__["_heads_on_seen"] = seen
        return seen[2]

    def combine(self, heads: Tensor) -> Tensor:
        """Per-head outputs ``(b, h, n, d)`` -> ``(b, n, D)``: ``head_mask``, head merge and
        the output projection (Vaswani et al. 2017, eq. "MultiHead": ``Concat(heads) W^O``)."""
        return self.out(self.merge(heads))

    def values(self, x: Tensor) -> Tensor:
        """The values the weights are applied to: ``x: (b, n, D)`` -> ``(b, h, n, d)``."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its values.")

    def normalize(self, logits: Tensor, mask: Tensor | None) -> Tensor:
        """Logits ``(b|1, h, n, m)`` -> weights: :func:`masked_softmax` (float32).
        Override to change how every path of the variant normalises."""
        return masked_softmax(logits, mask)

    def attention_weights(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The weights ``(b, h, n, n)`` the forward applies to ``x: (b, n, D)`` with
        ``padding_mask: (b, n)``: ``forward(x, padding_mask, return_weights=True)[1]``.
        Dropout is included in training mode (call it on an ``eval()`` module for maps).
        O(n²) memory: for inspecting short inputs.

        Raises:
            AttentionWeightsUnavailable: the variant has ``has_weights = False``.
        """
        if not self.has_weights:
            raise AttentionWeightsUnavailable(
                f"{type(self).__name__} has no attention weights (has_weights=False): "
                "there are no maps to draw for this variant."
            )
        return self.forward(x, padding_mask, return_weights=True)[1]

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
            f"causal={self.causal}, bias={self.bias}"
        )

    # ------------------------------------------------------- incremental decoding
    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        """Empty decoding state for :meth:`step` (variants with ``supports_step``)."""
        raise NotImplementedError(f"{type(self).__name__} has no incremental step.")

    def step(self, x: Tensor, state: Any, pos: int) -> tuple[Tensor, Any]:
        """Process one token ``x: (b, 1, D)`` at position ``pos``; return ``((b, 1, D), state)``."""
        raise NotImplementedError(f"{type(self).__name__} has no incremental step.")


class QKVAttention(Attention):
    """Multi-head attention with q, k, v projections ``D -> h*d`` and an output
    projection ``h*d -> D`` (Vaswani et al. 2017, eq. 1 and section 3.2.2).

    One path computes outputs, maps and decoding steps:
    ``forward -> project -> attend -> weights = normalize(scores(q, k), mask) -> combine``.
    Subclasses change :meth:`scores` (the logits) and/or :meth:`normalize` (masking
    and normalisation); both the output and :meth:`attention_weights` follow.
    :meth:`attend` may be overridden for a faster kernel (as :class:`SoftmaxAttention`
    does with ``F.scaled_dot_product_attention``) but must give the same output as
    the weights it returns with ``need_weights=True`` (tests/test_contract.py).
    """

    supports_step = True

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, **kw: Any) -> None:
        super().__init__(d_model, n_heads, head_dim, **kw)
        self.qkv = nn.Linear(d_model, 3 * self.inner_dim, bias=self.bias)
        self.out = nn.Linear(self.inner_dim, d_model, bias=self.bias)
        if self.rotary is not None:  # the qkv rows in RoPE pair order (see project)
            order = rope_pair_order(n_heads, self.head_dim)
            self.register_buffer("rope_order", order, persistent=False)

    def project(self, x: Tensor, offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``x: (b, n, D)`` -> q, k, v each ``(b, h, n, d)``, RoPE applied to q and k.

        With RoPE on float32/float64 CPU/CUDA inputs in eager mode (no autocast, not
        compiling; :meth:`_pair_path`) the projection's q and k rows are taken in
        :func:`~attnlab.layers.rope_pair_order` (``qkv.weight`` itself is unchanged; the
        ``qkv`` module's forward and its hooks are not called) and rotated by one complex
        multiplication
        (:meth:`~attnlab.layers.RotaryEmbedding.rotate_qkv`): q and k then come out with their
        coordinates permuted within each head, ``(0, d/2, 1, d/2+1, ...)``, the same
        permutation for both, so every ``q · k`` (and every output) is that of the half layout.
        Otherwise: ``qkv(x)``, split, and :meth:`RotaryEmbedding.forward` on q and k.
        """
        if self.rotary is not None and self._pair_path(x):
            order = self.rope_order
            weight = self.qkv.weight.index_select(0, order)
            bias = None if self.qkv.bias is None else self.qkv.bias.index_select(0, order)
            return self.rotary.rotate_qkv(F.linear(x, weight, bias), self.n_heads, offset)
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        return q, k, v

    @staticmethod
    def _pair_path(x: Tensor) -> bool:
        """Whether :meth:`project` rotates by complex multiplication: a float32/float64 input on
        the CPU or CUDA, eager mode, no autocast on its device (complex views need
        float32/float64; other backends' complex support varies)."""
        return (
            x.device.type in ("cpu", "cuda")
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
            and not torch.compiler.is_compiling()
        )

    def values(self, x: Tensor) -> Tensor:
        """``x: (b, n, D)`` -> v ``(b, h, n, d)``."""
        return self.project(x)[2]

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Logits ``q kᵀ / sqrt(d)`` (Vaswani et al. 2017, eq. 1): q ``(b, h, n, d)``,
        k ``(b, h, m, d)`` -> ``(b, h, n, m)``."""
        return q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)

    def weights(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        """``normalize(scores(q, k), mask)``: weights ``(b, h, n, m)`` in float32 from
        q ``(b, h, n, d)``, k ``(b, h, m, d)`` and a boolean mask broadcastable to
        ``(b, h, n, m)`` (True = attend) or None."""
        return self.normalize(self.scores(q, k), mask)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        causal: bool,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention on heads: q ``(b, h, n, d)``, k/v ``(b, h, m, d)`` ->
        ``(out (b, h, n, d), weights (b, h, n, m) or None)``.

        ``mask`` is a boolean mask broadcastable to ``(b, h, n, m)`` (True = attend)
        or None; ``causal`` asks for causal masking (queries aligned to the end of
        the keys) when ``mask`` is None. ``weights`` are the (dropped-out, in
        training) weights applied to ``v``, returned when ``need_weights``.
        """
        if causal and mask is None:
            mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
        weights = self.attn_drop(self.weights(q, k, mask).to(v.dtype))
        return weights @ v, (weights if need_weights else None)

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x: (b, n, D)``, ``padding_mask: (b, n)`` bool (True = real) -> ``(b, n, D)``;
        with ``return_weights``, ``((b, n, D), weights (b, h, n, n))``."""
        self.check_length(x.shape[1])
        q, k, v = self.project(x)
        if padding_mask is None:
            out, weights = self.attend(q, k, v, None, self.causal, return_weights)
        else:
            mask = attention_mask(padding_mask, self.causal, x.shape[1], x.device)
            out, weights = self.attend(q, k, v, mask, False, return_weights)
        out = self.combine(out)
        return (out, weights) if return_weights else out

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        empty = torch.zeros(batch, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone()}

    def step(self, x: Tensor, state: dict, pos: int) -> tuple[Tensor, dict]:
        """KV-cache step: ``x: (b, 1, D)`` at position ``pos`` attends to all cached keys."""
        q, k, v = self.project(x, offset=pos)
        state = {"k": torch.cat([state["k"], k], dim=2), "v": torch.cat([state["v"], v], dim=2)}
        out, _ = self.attend(q, state["k"], state["v"], None, False)
        return self.combine(out), state
