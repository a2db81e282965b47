"""Synthesizer attention (Tay, Bahri, Metzler, Juan, Zhao, Zheng 2020,
"Synthesizer: Rethinking Self-Attention in Transformer Models").

Attention weights are *synthesised* instead of computed from query-key
dot products. Per head, logits ``B`` of shape ``(n, n)`` come from:

- ``dense`` (section 3.1, eq. 1): a per-token two-layer MLP
  ``B_i = W2 relu(W1 x_i + b1) + b2`` with ``max_len`` outputs per head;
- ``random`` (section 3.2): a learned (or, with ``trainable: false``, frozen)
  ``max_len x max_len`` matrix ``R`` per head, independent of the input;
- ``factorized_random`` (section 3.3): ``R = R1 R2ᵀ`` with ``R1, R2`` of shape
  ``max_len x rank``.

Scores come from ``max_len`` and are sliced to the current length ``n``;
causal and padding masks are then applied as in any attention. With ``mix:
true`` the logits are mixed with dot-product logits through a learned gate
per head (section 3.4, "Random + Vanilla"):

    logits = (1 - sigmoid(alpha)) · Q Kᵀ / sqrt(d) + sigmoid(alpha) · B,  alpha initialised to 0.

``out = softmax(mask(logits)) V`` and an output projection ``h*d -> D``. The forward
computes ``weights = normalize(logits(x), mask)`` once and applies them to V; with
``return_weights=True`` it also returns them, so the maps are the forward's.

Legend: b batch, n seq, L max_len, h heads, d head_dim, D d_model, r rank.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.attention.base import Attention, attention_mask, split_heads


class SynthesizerMode(StrEnum):
    """How the synthesised logits are produced (Tay et al. 2020, section 3)."""

    dense = "dense"
    random = "random"
    factorized_random = "factorized_random"


class SynthesizerAttention(Attention):
    """Multi-head Synthesizer attention.

    Args:
        d_model, n_heads, head_dim, causal, dropout, bias, rope_theta: the common
            contract (``dropout`` applies to the attention weights; ``bias`` to the v,
            q/k (mix) and output projections; the dense synthesising MLP keeps the
            biases of eq. 1).
        max_len: required; the synthesised logits cover ``max_len`` positions and
            longer inputs raise ValueError.
        mode: ``dense | random | factorized_random``.
        trainable: for the random modes, learn ``R`` (True) or keep it fixed (False).
        rank: rank of the factorised random matrix.
        mix: mix with dot-product logits through a learned gate (then RoPE applies).
        rope: rotary positions for the dot-product part; refused unless ``mix``.

    Raises:
        ValueError: unknown ``mode``, or ``max_len`` missing.
    """

    needs_max_len = True
    supports_step = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        mode: str = "dense",
        trainable: bool = True,
        rank: int = 8,
        mix: bool = False,
        max_len: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(d_model, n_heads, head_dim, max_len=max_len, **kw)
        valid = [m.value for m in SynthesizerMode]
        if mode not in valid:
            raise ValueError(f"attention.mode={mode!r} is not one of {valid}.")
        if max_len is None:
            raise ValueError("SynthesizerAttention needs max_len (the task's max_len/context).")
        self.mode, self.mix, self.uses_qk = SynthesizerMode(mode), bool(mix), bool(mix)
        h, L = n_heads, max_len
        if self.mode is SynthesizerMode.dense:
            self.dense = nn.Sequential(
                nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, h * L)
            )
        elif self.mode is SynthesizerMode.random:
            self.random = nn.Parameter(torch.randn(h, L, L) / math.sqrt(L), requires_grad=trainable)
        else:
            if rank <= 0:
                raise ValueError(f"attention.rank must be positive, got {rank}.")
            self.factors = nn.Parameter(
                torch.randn(2, h, L, rank) / rank**0.5, requires_grad=trainable
            )
        self.v = nn.Linear(d_model, self.inner_dim, bias=self.bias)
        if self.mix:
            self.qk = nn.Linear(d_model, 2 * self.inner_dim, bias=self.bias)
            self.alpha = nn.Parameter(torch.zeros(h, 1, 1))
        self.out = nn.Linear(self.inner_dim, d_model, bias=self.bias)

    def synthesized_logits(self, x: Tensor) -> Tensor:
        """Synthesised logits for ``x: (b, n, D)``: ``(b, h, n, n)`` or ``(1, h, n, n)``."""
        b, n, _ = x.shape
        if self.mode is SynthesizerMode.dense:
            logits = self.dense(x).view(b, n, self.n_heads, self.max_len)[..., :n]  # (b, n, h, n)
            return logits.transpose(1, 2)
        if self.mode is SynthesizerMode.random:
            return self.random[None, :, :n, :n]
        r1, r2 = self.factors[:, :, :n]  # (h, n, r) each
        return (r1 @ r2.transpose(-2, -1))[None]

    def logits(self, x: Tensor) -> Tensor:
        """Pre-mask logits ``(b|1, h, n, n)``, mixed with q·k when ``mix`` is set."""
        logits = self.synthesized_logits(x)
        if not self.mix:
            return logits
        q, k = (split_heads(t, self.n_heads) for t in self.qk(x).chunk(2, dim=-1))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        dot = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (b, h, n, n)
        gate = torch.sigmoid(self.alpha)
        return (1 - gate) * dot + gate * logits

    def values(self, x: Tensor) -> Tensor:
        """``x: (b, n, D)`` -> v ``(b, h, n, d)``."""
        return split_heads(self.v(x), self.n_heads)

    def forward(
        self, x: Tensor, padding_mask: Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x: (b, n, D)``, ``padding_mask: (b, n)`` bool (True = real) -> ``(b, n, D)``;
        with ``return_weights``, ``((b, n, D), weights (b, h, n, n))`` (the weights applied
        to V: after causal and padding masks, and dropout in training)."""
        b, n, _ = x.shape
        self.check_length(n)
        mask = attention_mask(padding_mask, self.causal, n, x.device)
        weights = self.normalize(self.logits(x), mask).to(x.dtype).expand(b, -1, -1, -1)
        weights = self.attn_drop(weights)
        out = self.combine(weights @ self.values(x))  # (b, n, D)
        return (out, weights) if return_weights else out
