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


OPTIM_KEYS = ("lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_optim(optim: dict) -> None:
    """Validate ``optim.*`` (types and ranges) before anything is built or read.

    Raises:
        ValueError: an unknown key, or a value of the wrong type or out of range; the message
            names the key, the value and what is allowed.
    """
    unknown = sorted(set(optim) - set(OPTIM_KEYS))
    if unknown:
        raise ValueError(
            f"unknown optim setting(s) {unknown}; the optimiser takes {list(OPTIM_KEYS)}."
        )
    lr = optim.get("lr", 1e-3)
    if not _number(lr) or lr <= 0:
        raise ValueError(f"optim.lr must be a positive number (e.g. 1e-3), got {lr!r}.")
    wd = optim.get("weight_decay", 0.0)
    if not _number(wd) or wd < 0:
        raise ValueError(f"optim.weight_decay must be a number >= 0, got {wd!r}.")
    betas = optim.get("betas", (0.9, 0.98))
    if (
        not isinstance(betas, list | tuple)
        or len(betas) != 2
        or not all(_number(b) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(
            f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.98], got {betas!r}."
        )
    warmup = optim.get("warmup_steps", 0)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"optim.warmup_steps must be an integer >= 0, got {warmup!r}.")
    ratio = optim.get("min_lr_ratio", 0.0)
    if not _number(ratio) or not 0 <= ratio <= 1:
        raise ValueError(f"optim.min_lr_ratio must be a number in [0, 1], got {ratio!r}.")


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
        ValueError: a bad setting (see :func:`check_optim`).
    """
    check_optim(
        {"lr": lr, "weight_decay": weight_decay, "betas": list(betas),
         "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio}
    )  # fmt: skip
    opt = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=tuple(betas))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_steps, total_steps, min_lr_ratio)
    )
    return opt, sched
