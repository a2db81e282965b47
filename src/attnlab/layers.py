"""Layers around attention: norms, feed-forwards, positions and the block.

Shapes: ``b`` batch, ``n`` seq, ``D`` d_model, ``h`` heads, ``d`` head_dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class RMSNorm(nn.RMSNorm):
    """Root-mean-square norm (Zhang & Sennrich 2019, eq. 4): ``x / rms(x) * g``."""

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__(d_model, eps=eps)


class FeedForward(nn.Module):
    """Position-wise ReLU MLP ``D -> hidden -> D`` (Vaswani et al. 2017, eq. 2); hidden = 4·D."""

    def __init__(
        self, d_model: int, hidden: int | None = None, dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        hidden = hidden or 4 * d_model
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(b, n, D) -> (b, n, D)``."""
        return self.down(self.drop(F.relu(self.up(x))))


class SwiGLU(nn.Module):
    """Gated MLP ``W2 (silu(W1 x) * W3 x)`` (Shazeer 2020, "GLU Variants", eq. 5).

    ``hidden`` defaults to 8/3·D rounded up to a multiple of 8, which keeps the
    parameter count equal to a 4·D ReLU MLP.
    """

    def __init__(self, d_model: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = hidden or 8 * ((8 * d_model // 3 + 7) // 8)
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(b, n, D) -> (b, n, D)``."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.drop(F.silu(gate) * up))


#: Enum-like choices for ``model.norm`` and ``model.ffn``.
NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": RMSNorm}
FEEDFORWARDS: dict[str, type[nn.Module]] = {"relu": FeedForward, "swiglu": SwiGLU}
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


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer, eq. 34), applied to q and k.

    Rotates pairs ``(x[..., i], x[..., i + d/2])`` by angle ``pos * base^(-2i/d)``
    (the "rotate half" layout of GPT-NeoX/LLaMA). Works at any length.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; change head_dim.")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def _cos_sin(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._cache is None or self._cache[0] < length or self._cache[1] != device:
            t = torch.arange(max(length, 256), device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))  # (n, d/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (n, d)
            self._cache = (emb.shape[0], device, emb.cos(), emb.sin())
        return self._cache[2], self._cache[3]

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x: (b, h, n, d)`` at positions ``offset .. offset+n-1`` -> rotated ``(b, h, n, d)``."""
        n = x.shape[-2]
        cos, sin = self._cos_sin(offset + n, x.device)
        cos, sin = cos[offset : offset + n].to(x.dtype), sin[offset : offset + n].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


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
