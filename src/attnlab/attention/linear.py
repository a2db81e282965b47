"""Linear attention (Katharopoulos, Vyas, Pappas, Fleuret 2020, "Transformers are RNNs").

With feature map ``phi(x) = elu(x) + 1`` (section 3.2.1, eq. 7), attention
becomes (eq. 5-6)::

    out_i = phi(q_i)ᵀ S / (phi(q_i)ᵀ z + eps),   S = sum_j phi(k_j) v_jᵀ,  z = sum_j phi(k_j)

over all keys j (non-causal, O(n)) or keys j <= i (causal, eq. 10-12; the
recurrent form S_i = S_{i-1} + phi(k_i) v_iᵀ, z_i = z_{i-1} + phi(k_i) of
eq. 18-20 is :meth:`LinearAttention.step`).

Implementation notes (pitfalls recorded in DESIGN.md):

- padded keys are removed by zeroing phi(k) *after* the feature map
  (elu(0) + 1 = 1, so zeroing the input would not remove them);
- ``eps`` is added to the denominator only;
- all sums run in float32, with autocast disabled, since sums over the
  sequence overflow half precision;
- the causal form is computed in chunks of ``chunk_size``: exact attention
  inside a chunk, plus the running state ``S`` from earlier chunks. Peak
  memory is ``O(n·C + (n/C)·d²)`` per head instead of ``O(n·d²)``.

Legend: b batch, n seq, c chunks, C chunk_size, h heads, d head_dim, D d_model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.attention.base import Attention, split_heads


def elu_feature_map(x: Tensor) -> Tensor:
    """``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020, eq. 7); positive everywhere."""
    return F.elu(x) + 1.0


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Non-causal linear attention on features: q, k ``(b, h, n, d)``, v ``(b, h, n, e)``."""
    kv = k.transpose(-2, -1) @ v  # (b, h, d, e)
    z = k.sum(dim=-2)  # (b, h, d)
    den = (q @ z.unsqueeze(-1)) + eps  # (b, h, n, 1)
    return (q @ kv) / den


def causal_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, chunk_size: int = 64, eps: float = 1e-6
) -> Tensor:
    """Causal linear attention, chunked prefix sums: q, k ``(b, h, n, d)``, v ``(b, h, n, e)``.

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


class LinearAttention(Attention):
    """Multi-head linear attention with the elu+1 feature map.

    Args:
        d_model, n_heads, head_dim, causal, dropout, max_len: the common contract
            (``dropout`` applies to the output; ``max_len`` is unused).
        rope: refused (``uses_qk = False``): similarity is phi(q)·phi(k), not q·k.
        chunk_size: chunk length C of the causal prefix sums.
        eps: added to the denominator.
    """

    uses_qk = False
    supports_step = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int | None = None,
        chunk_size: int = 64,
        eps: float = 1e-6,
        **kw: Any,
    ) -> None:
        super().__init__(d_model, n_heads, head_dim, **kw)
        if chunk_size <= 0:
            raise ValueError(f"attention.chunk_size must be positive, got {chunk_size}.")
        self.chunk_size, self.eps = chunk_size, eps
        self.qkv = nn.Linear(d_model, 3 * self.inner_dim)
        self.out = nn.Linear(self.inner_dim, d_model)
        self.drop = nn.Dropout(self.dropout)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x: (b, n, D)`` -> phi(q), phi(k), v in float32, each ``(b, h, n, d)``."""
        q, k, v = (split_heads(t, self.n_heads).float() for t in self.qkv(x).chunk(3, dim=-1))
        return elu_feature_map(q), elu_feature_map(k), v

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``x: (b, n, D)``, ``padding_mask: (b, n)`` bool (True = real) -> ``(b, n, D)``."""
        q, k, v = self.features(x)
        if padding_mask is not None:  # mask keys after the feature map
            k = k * padding_mask[:, None, :, None].to(k.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.causal:
                out = causal_linear_attention(q, k, v, self.chunk_size, self.eps)
            else:
                out = linear_attention(q, k, v, self.eps)
        return self.drop(self.out(self.merge(out).to(x.dtype)))

    def attention_weights(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Materialised normalised weights ``(b, h, n, n)`` (for inspection of short inputs)."""
        q, k, _ = self.features(x)
        scores = q @ k.transpose(-2, -1)
        if padding_mask is not None:
            scores = scores * padding_mask[:, None, None, :]
        if self.causal:
            scores = scores.tril()
        return scores / (scores.sum(-1, keepdim=True) + self.eps)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        h, d = self.n_heads, self.head_dim
        return {
            "s": torch.zeros(batch, h, d, d, device=device, dtype=torch.float32),
            "z": torch.zeros(batch, h, d, device=device, dtype=torch.float32),
        }

    def step(self, x: Tensor, state: dict, pos: int) -> tuple[Tensor, dict]:
        """Recurrent form (eq. 18-20): ``x: (b, 1, D)`` -> ``((b, 1, D), state)``, O(1) in ``pos``."""
        q, k, v = self.features(x)  # (b, h, 1, d)
        with torch.autocast(device_type=x.device.type, enabled=False):
            s = state["s"] + k.transpose(-2, -1) @ v  # (b, h, d, d)
            z = state["z"] + k.squeeze(-2)  # (b, h, d)
            out = (q @ s) / (q @ z.unsqueeze(-1) + self.eps)  # (b, h, 1, d)
        return self.drop(self.out(self.merge(out).to(x.dtype))), {"s": s, "z": z}
