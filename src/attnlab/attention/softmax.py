"""Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1).

``softmax(Q Kᵀ / sqrt(d)) V`` per head, computed by
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where
available). With ``head_dim`` set independently of ``n_heads`` this is the
fixed-head-size attention of Bhojanapalli et al. 2020 ("Low-Rank Bottleneck in
Multi-head Attention Models", section 4: d_p = n), selected by
``attention=fixed_head``.

Legend: b batch, n queries, m keys, h heads, d head_dim, D d_model.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from attnlab.attention.base import QKVAttention


class SoftmaxAttention(QKVAttention):
    """Multi-head softmax attention.

    Args:
        d_model: model width D.
        n_heads: number of heads h.
        head_dim: per-head size d; default ``d_model // n_heads`` (ValueError if
            ``n_heads`` does not divide ``d_model``). Setting it gives the
            fixed-head-size variant: q/k/v project ``D -> h*d``, output ``h*d -> D``.
        causal: mask future keys.
        dropout: dropout on the attention weights (training only).
        max_len: unused (accepted for the common contract).
        rope: apply rotary position embeddings to q and k.
    """

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal
        )
