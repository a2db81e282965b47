"""AdamW with decoupled weight decay on matrices only, and linear warmup + cosine decay."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.RMSNorm)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on weight matrices; none on norms, biases, embeddings.

    A parameter shared between modules (tied embeddings) is placed once; if any
    owner is an embedding or norm, it is not decayed.
    """
    no_decay: set[int] = set()
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            params.setdefault(id(p), p)
            if isinstance(module, NO_DECAY_MODULES) or p.ndim < 2:
                no_decay.add(id(p))
    trainable = [(i, p) for i, p in params.items() if p.requires_grad]
    return [
        {"params": [p for i, p in trainable if i not in no_decay], "weight_decay": weight_decay},
        {"params": [p for i, p in trainable if i in no_decay], "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module,
    total_steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    betas: Sequence[float] = (0.9, 0.98),
    warmup_steps: int = 100,
    min_lr_ratio: float = 0.0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (Loshchilov & Hutter 2019) plus a per-step warmup/cosine ``LambdaLR``.

    Raises:
        ValueError: non-positive ``lr`` or negative ``weight_decay``/``warmup_steps``.
    """
    if lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {lr}.")
    if weight_decay < 0 or warmup_steps < 0:
        raise ValueError("optim.weight_decay and optim.warmup_steps must be >= 0.")
    opt = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=tuple(betas))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_steps, total_steps, min_lr_ratio)
    )
    return opt, sched
