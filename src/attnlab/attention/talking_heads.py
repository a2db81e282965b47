"""Talking-heads attention (Shazeer, Lan, Cheng, Ding, Hou 2020, arXiv:2003.02436, eq. in §4).

Logits ``L = Q Kᵀ / sqrt(d)`` of shape ``(b, h, n, m)`` are mixed across heads
by a learned ``h x h`` matrix before the softmax, and the attention weights are
mixed by a second ``h x h`` matrix after it:

    L'[b, j, n, m] = sum_i P_l[i, j] L[b, i, n, m]
    W  = softmax(mask(L'))
    W'[b, j, n, m] = sum_i P_w[i, j] W[b, i, n, m]
    out = W' V

Both mixing matrices start as the identity, so at initialisation this is plain
multi-head attention. Mixing acts across heads at a fixed (query, key) pair, so
causal and padding masks are preserved (masked weights are 0 in every head).

Legend: b batch, n queries, m keys, h heads, d head_dim, D d_model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.attention.base import QKVAttention, causal_mask


class TalkingHeadsAttention(QKVAttention):
    """Multi-head attention with talking heads. Arguments as :class:`SoftmaxAttention`."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, **kw: Any) -> None:
        super().__init__(d_model, n_heads, head_dim, **kw)
        self.mix_logits = nn.Parameter(torch.eye(n_heads))
        self.mix_weights = nn.Parameter(torch.eye(n_heads))
        self.attn_drop = nn.Dropout(self.dropout)

    def weights(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        """Talking-heads weights ``W' (b, h, n, m)``: logits mixed by ``P_l``, masked, softmax,
        then mixed by ``P_w`` (the equations above); float32."""
        logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (b, h, n, m)
        logits = torch.einsum("bimn,ij->bjmn", logits, self.mix_logits.to(logits.dtype))
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits.float(), dim=-1)
        return torch.einsum("bimn,ij->bjmn", weights, self.mix_weights.float())

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        if causal:
            mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
        weights = self.weights(q, k, mask).to(q.dtype)
        return self.attn_drop(weights) @ v  # (b, h, n, d)
