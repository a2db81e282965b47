"""Backbone and task heads. Model code never imports Lightning (DESIGN.md, convention 6).

Shapes: ``b`` batch, ``n`` seq, ``D`` d_model, ``V`` vocab size, ``C`` classes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.attention.base import Attention
from attnlab.layers import (
    FEEDFORWARDS,
    NORMS,
    POSITIONS,
    Block,
    LearnedPositions,
    choose,
)

AttentionFactory = Callable[..., Attention]


#: Attention arguments the backbone fills in, and the setting that controls each.
BACKBONE_OWNED = {
    "d_model": "model.d_model",
    "n_heads": "model.n_heads",
    "causal": "the task (language modelling is causal)",
    "max_len": "task.max_len",
    "rope": "model.positions",
    "rope_theta": "model.rope_theta",
    "bias": "model.bias",
}


def _check_backbone_owned(attention: AttentionFactory) -> None:
    """A value set in the attention config for an argument the backbone fills in would be
    silently replaced: raise ``ValueError`` naming the setting to use instead."""
    keywords = getattr(attention, "keywords", None) or {}
    for key, owner in BACKBONE_OWNED.items():
        if key in keywords:
            raise ValueError(
                f"attention.{key}={keywords[key]!r} would be ignored: the backbone sets it from "
                f"{owner}. Remove attention.{key} and set {owner} instead."
            )


class Backbone(nn.Module):
    """Token embedding, positions, ``n_layers`` blocks and (pre-norm) a final norm.

    Args:
        vocab_size: number of token ids V.
        attention: a partial (``conf/attention/*.yaml`` with ``_partial_: true``);
            the backbone fills in ``d_model``, ``n_heads``, ``causal``, ``max_len``, ``rope``.
        d_model, n_layers, n_heads: sizes.
        max_len: longest sequence (context) the model is built for.
        causal: language modelling (True) or bidirectional encoding (False).
        norm: ``layernorm | rmsnorm``, or a factory ``norm(d_model, eps=...) -> nn.Module`` (a
            ``_target_`` partial in the model config). ffn: ``relu | swiglu``, or a factory
            ``ffn(d_model, hidden, dropout) -> nn.Module``; ``ffn_hidden`` overrides its width.
        positions: ``learned | rope | none``. prenorm: pre-norm (modern) or post-norm (classic).
        dropout: on embeddings and residual branches (and in the FFN).
        bias: biases in the attention projections and the FFN: ``False`` as nanoGPT's
            ``bias=False``, ``True`` everywhere, ``None`` each component's default (attention
            projections and the ReLU/GELU MLP with biases, SwiGLU without, as in Shazeer 2020).
        norm_eps: the norms' epsilon (null: each norm's default, LayerNorm 1e-5, RMSNorm 1e-6). rope_theta: RoPE's base (Su et al. 2021, eq. 15: 10,000).

    Raises:
        ValueError: non-positive sizes, dropout outside [0, 1), an unknown
            norm/ffn/positions value, or a variant that cannot honour the request
            (causal, RoPE without q·k, missing max_len) -- all at build time.
    """

    def __init__(
        self,
        vocab_size: int,
        attention: AttentionFactory,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = 256,
        causal: bool = False,
        norm: str | Callable[..., nn.Module] = "rmsnorm",
        ffn: str | Callable[..., nn.Module] = "swiglu",
        ffn_hidden: int | None = None,
        positions: str = "rope",
        prenorm: bool = True,
        dropout: float = 0.1,
        bias: bool | None = None,
        norm_eps: float | None = None,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
            ("max_len", max_len),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}.")
        if not isinstance(dropout, int | float) or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout!r}.")
        if ffn_hidden is not None and (not isinstance(ffn_hidden, int) or ffn_hidden <= 0):
            raise ValueError(
                f"model.ffn_hidden must be a positive integer, or null for the default width, "
                f"got {ffn_hidden!r}."
            )
        if norm_eps is not None and (not isinstance(norm_eps, int | float) or not norm_eps > 0):
            raise ValueError(f"model.norm_eps must be a positive number or null, got {norm_eps!r}.")
        _check_backbone_owned(attention)
        base_norm = choose("norm", norm, NORMS) if isinstance(norm, str) else norm
        base_ffn = choose("ffn", ffn, FEEDFORWARDS) if isinstance(ffn, str) else ffn

        norm_kw = {} if norm_eps is None else {"eps": norm_eps}
        takes_bias = "bias" in inspect.signature(base_ffn).parameters
        ffn_kw = {"bias": bias} if bias is not None and takes_bias else {}
        attn_kw = {"bias": bias} if bias is not None else {}

        def norm_cls(dim: int) -> nn.Module:
            return base_norm(dim, **norm_kw)

        def ffn_cls(dim: int, hidden: int | None, p: float) -> nn.Module:
            return base_ffn(dim, hidden, p, **ffn_kw)

        self.positions = choose("positions", positions, POSITIONS)
        self.d_model, self.max_len, self.causal = d_model, max_len, causal
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = LearnedPositions(max_len, d_model) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        rope = positions == "rope"
        blocks = []
        for _ in range(n_layers):
            attn = attention(
                d_model=d_model,
                n_heads=n_heads,
                causal=causal,
                max_len=max_len,
                rope=rope,
                rope_theta=rope_theta,
                **attn_kw,
            )
            self._check_capabilities(attn, causal, rope)
            blocks.append(
                Block(
                    attn,
                    ffn_cls(d_model, ffn_hidden, dropout),
                    norm_cls(d_model),
                    norm_cls(d_model),
                    prenorm=prenorm,
                    dropout=dropout,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm_cls(d_model) if prenorm else nn.Identity()
        self.apply(_init_weights)

    @staticmethod
    def _check_capabilities(attn: Attention, causal: bool, rope: bool) -> None:
        name = type(attn).__name__
        if causal and not attn.supports_causal:
            raise ValueError(
                f"{name} cannot be causal, but this task is language modelling; "
                f"choose another attention variant."
            )
        if rope and not attn.uses_qk:
            raise ValueError(
                f"model.positions=rope rotates queries and keys, but {name} has no "
                f"q·k scores (uses_qk=False); use model.positions=learned with this variant."
            )

    @property
    def attentions(self) -> list[Attention]:
        """The attention module of each block, in order."""
        return [block.attention for block in self.blocks]

    def check_length(self, n: int) -> None:
        """Raise ValueError if ``n`` tokens exceed what the positions/variant support."""
        if n > self.max_len and (self.pos is not None or self.attentions[0].needs_max_len):
            raise ValueError(
                f"input of {n} tokens is longer than max_len={self.max_len} of this model "
                f"(learned positions / {type(self.attentions[0]).__name__}); truncate the input "
                f"or rebuild with a larger max_len."
            )

    def embed_tokens(self, input_ids: Tensor, offset: int = 0) -> Tensor:
        """``input_ids: (b, n)`` -> ``(b, n, D)`` token (+ learned position) embeddings."""
        x = self.embed(input_ids)
        if self.pos is not None:
            x = self.pos(x, offset)
        return self.drop(x)

    def forward(self, input_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``input_ids: (b, n)`` long, ``padding_mask: (b, n)`` bool (True = real) -> ``(b, n, D)``."""
        self.check_length(input_ids.shape[1])
        x = self.embed_tokens(input_ids)
        for block in self.blocks:
            x = block(x, padding_mask)
        return self.norm(x)

    @property
    def supports_step(self) -> bool:
        """True when every block can decode incrementally (KV cache or recurrent state)."""
        return all(a.supports_step for a in self.attentions)

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[Any]:
        """Per-block decoding states for :meth:`step`."""
        return [a.init_state(batch, device, dtype) for a in self.attentions]

    def step(self, token: Tensor, states: list[Any], pos: int) -> tuple[Tensor, list[Any]]:
        """Decode one token ``token: (b,)`` at position ``pos`` -> ``((b, D), states)``."""
        x = self.embed_tokens(token[:, None], offset=pos)
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block.step(x, state, pos)
            new_states.append(state)
        return self.norm(x)[:, 0], new_states


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation (Radford et al. 2019): N(0, 0.02) for linear and embedding
    weights, zero biases; applied to the backbone and to every head (classifier, untied LM)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


POOLINGS = ("mean", "max", "cls")


class SequenceClassifier(nn.Module):
    """Backbone, pooling over real tokens (``mean | max | cls``), then a linear head.

    ``forward(input_ids: (b, n), padding_mask: (b, n) | None) -> logits (b, C)``.
    ``cls`` pools position 0 (the data modules put ``<cls>`` there).
    """

    def __init__(self, backbone: Backbone, num_classes: int = 2, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling={pooling!r} is not one of {list(POOLINGS)}.")
        self.backbone, self.pooling = backbone, pooling
        self.head = nn.Linear(backbone.d_model, num_classes)
        self.head.apply(_init_weights)  # the same documented init as the backbone

    def pool(self, h: Tensor, padding_mask: Tensor | None) -> Tensor:
        """``h: (b, n, D)`` -> ``(b, D)``, ignoring padded positions."""
        if self.pooling == "cls":
            return h[:, 0]
        if padding_mask is None:
            return h.mean(1) if self.pooling == "mean" else h.amax(1)
        keep = padding_mask[..., None]
        if self.pooling == "mean":
            return (h * keep).sum(1) / keep.sum(1).clamp_min(1)
        return h.masked_fill(~keep, float("-inf")).amax(1)

    def forward(self, input_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.head(self.pool(self.backbone(input_ids, padding_mask), padding_mask))


class LanguageModel(nn.Module):
    """Causal backbone plus an LM head (optionally tied to the token embedding).

    ``forward(input_ids: (b, n)) -> logits (b, n, V)``: logits at position i
    predict token i + 1.
    """

    def __init__(self, backbone: Backbone, vocab_size: int, tie_embeddings: bool = True) -> None:
        super().__init__()
        if not backbone.causal:
            raise ValueError("LanguageModel needs a causal backbone (Backbone(causal=True)).")
        self.backbone = backbone
        self.head = nn.Linear(backbone.d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = backbone.embed.weight
        else:  # an untied head gets the same documented init as the rest (not nn.Linear's)
            self.head.apply(_init_weights)

    def forward(self, input_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.head(self.backbone(input_ids, padding_mask))

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt_ids: (b, n)``, n >= 1; returns ``(b, n + new)``.

        ``temperature`` scales logits (0 = greedy argmax); ``top_k`` keeps the k
        most likely tokens. With ``use_cache`` and a backbone whose variants
        support it, decoding is incremental: a KV cache for softmax-family
        attention, the recurrent state (S, z) for linear attention -- O(1) per
        token for the latter. Otherwise, or once the sequence would pass
        ``max_len``, each token recomputes the last ``max_len`` tokens.

        Raises:
            ValueError: empty prompt, temperature < 0, or top_k < 1.
        """
        if prompt_ids.shape[1] < 1:
            raise ValueError("generate needs a prompt of at least one token.")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}.")
        was_training = self.training
        self.eval()
        bb, out = self.backbone, prompt_ids
        total = prompt_ids.shape[1] + max_new_tokens
        incremental = use_cache and bb.supports_step and total <= bb.max_len
        if incremental:
            states = bb.init_state(out.shape[0], out.device, bb.embed.weight.dtype)
            for pos in range(out.shape[1]):
                hidden, states = bb.step(out[:, pos], states, pos)
        for _ in range(max_new_tokens):
            if not incremental:
                hidden = bb(out[:, -bb.max_len :])[:, -1]
            nxt = sample(self.head(hidden), temperature, top_k, generator)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if incremental and out.shape[1] < total:
                hidden, states = bb.step(nxt, states, out.shape[1] - 1)
        self.train(was_training)
        return out


def sample(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None = None
) -> Tensor:
    """Draw token ids ``(b,)`` from ``logits: (b, V)``; temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts per component: embedding, positions, attention, ffn, norm, head, total.

    Tied weights are counted once (under ``embedding``).
    """
    counts = dict.fromkeys(["embedding", "positions", "attention", "ffn", "norm", "head"], 0)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ".embed." in f".{name}":
            key = "embedding"
        elif ".pos." in f".{name}":
            key = "positions"
        elif ".attention." in name:
            key = "attention"
        elif ".ffn." in name:
            key = "ffn"
        elif "norm" in name:
            key = "norm"
        else:
            key = "head"
        counts[key] += p.numel()
    counts["total"] = sum(counts.values())
    return counts
