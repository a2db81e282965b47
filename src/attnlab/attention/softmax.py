"""Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1).

``softmax(Q Kᵀ / sqrt(d)) V`` per head, computed by
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where
available). With ``head_dim`` set independently of ``n_heads`` this is the
fixed-head-size attention of Bhojanapalli et al. 2020 ("Low-Rank Bottleneck in
Multi-head Attention Models", section 4: d_p = n), selected by
``attention=fixed_head``.

The output comes from the fused kernel only while :meth:`scores`, :meth:`normalize`
and :meth:`weights` are the base class's (plain scaled dot-product softmax); a
subclass that overrides any of them (e.g. cosine-similarity scores) runs the
materialised path ``normalize(scores(q, k)) @ v`` instead, so its outputs and its
maps both follow the override. ``return_weights=True`` always runs the
materialised path (the fused kernels do not return weights); tests/test_contract.py
checks that it reproduces the fused output.

Legend: b batch, n queries, m keys, h heads, d head_dim, D d_model.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from attnlab.attention import causal_chunks
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
        bias: bias terms in the q/k/v and output projections.
        rope_theta: RoPE base θ.
        cpu_causal_chunks: on the CPU, compute the backward of causal attention of 256 to
            ``chunk_max_len`` tokens in 4 query chunks that skip the masked triangle
            (:mod:`attnlab.attention.causal_chunks`; the forward is SDPA's own kernel call, the
            gradients equal SDPA's to float rounding). ``False``: always
            ``F.scaled_dot_product_attention``.
        chunk_max_len: longest sequence chunked (512: torch 2.13's CPU kernel was measured
            slower than the chunks at 256 and 512 tokens, and about even from 768).

    Raises ValueError for a ``chunk_max_len`` that is not a positive integer.
    """

    #: fewest queries per chunk of :mod:`~attnlab.attention.causal_chunks`
    chunk_min: int = 64

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        cpu_causal_chunks: bool = True,
        chunk_max_len: int = 512,
        **kw: Any,
    ) -> None:
        super().__init__(d_model, n_heads, head_dim, **kw)
        if not isinstance(chunk_max_len, int) or chunk_max_len <= 0:
            raise ValueError(
                f"attention.chunk_max_len must be a positive integer, got {chunk_max_len!r}."
            )
        self.cpu_causal_chunks, self.chunk_max_len = bool(cpu_causal_chunks), chunk_max_len

    def causal_chunk(self, n: int) -> int:
        """Queries per backward chunk for a causal sequence of ``n`` tokens: ``ceil(n / 4)``,
        or 0 (SDPA's backward in one call) when chunking is off or ``n`` is not in
        ``[4 * chunk_min, chunk_max_len]`` (shorter sequences measured no faster in chunks)."""
        if not self.cpu_causal_chunks or not 4 * self.chunk_min <= n <= self.chunk_max_len:
            return 0
        return -(-n // 4)

    @property
    def fused(self) -> bool:
        """True when the scores and normalisation are the plain softmax ones, so the
        fused ``F.scaled_dot_product_attention`` computes exactly :meth:`weights` @ v."""
        cls = type(self)
        return (
            cls.scores is QKVAttention.scores
            and cls.normalize is QKVAttention.normalize
            and cls.weights is QKVAttention.weights
        )

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        causal: bool,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As :meth:`QKVAttention.attend`; fused kernel when :attr:`fused` and no weights are asked."""
        if need_weights or not self.fused:
            return super().attend(q, k, v, mask, causal, need_weights)
        if causal and mask is None and q.shape[-2] != k.shape[-2]:
            return super().attend(q, k, v, mask, causal, need_weights)  # SDPA aligns to the start
        p = self.dropout if self.training else 0.0
        if causal and mask is None:
            chunk = self.causal_chunk(q.shape[-2])
            if chunk and causal_chunks.applies(q, k, chunk, p):
                return causal_chunks.causal_attention(q, k, v, chunk), None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return out, None
