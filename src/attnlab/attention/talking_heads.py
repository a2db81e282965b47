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

from typing import Any

import torch
from torch import Tensor, nn

from attnlab.attention.base import QKVAttention


class TalkingHeadsAttention(QKVAttention):
    """Multi-head attention with talking heads. Arguments as :class:`SoftmaxAttention`
    (``dropout`` acts on the mixed weights ``W'``, the ones applied to V).

    :meth:`scores` mixes the logits with ``P_l``; :meth:`normalize` masks, applies the
    softmax and mixes with ``P_w``; forward, :meth:`attention_weights` and the KV-cache
    step all go through both.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, **kw: Any) -> None:
        super().__init__(d_model, n_heads, head_dim, **kw)
        self.mix_logits = nn.Parameter(torch.eye(n_heads))
        self.mix_weights = nn.Parameter(torch.eye(n_heads))

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Mixed logits ``L' (b, h, n, m)``: ``q kᵀ / sqrt(d)`` mixed across heads by ``P_l``."""
        logits = super().scores(q, k)  # (b, h, n, m)
        return torch.einsum("bimn,ij->bjmn", logits, self.mix_logits.to(logits.dtype))

    def normalize(self, logits: Tensor, mask: Tensor | None) -> Tensor:
        """``W' = P_w``-mixed ``softmax(mask(L'))`` ``(b, h, n, m)``, float32. Masked entries
        are 0 in every head, so the mixed weights keep the masks."""
        weights = super().normalize(logits, mask)
        return torch.einsum("bimn,ij->bjmn", weights, self.mix_weights.float())
