"""AdamW parameter groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.optim import build_optimizer, parameter_groups, warmup_cosine
from tests.test_models import tiny


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = tiny("softmax", "lm", tie_embeddings=True, norm="layernorm", ffn="relu")
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "backbone.embed.weight" in skipped  # tied with the LM head: counted once, no decay
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    assert any("qkv.weight" in n for n in decayed) and any("ffn.up.weight" in n for n in decayed)
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_warmup_then_cosine_to_min_ratio():
    f = [warmup_cosine(s, 10, 110, 0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then monotone decay
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[110] == pytest.approx(0.1)


def test_scheduler_drives_the_learning_rate():
    model = torch.nn.Linear(4, 4)
    opt, sched = build_optimizer(model, total_steps=20, lr=1e-2, warmup_steps=5)
    lrs = []
    for _ in range(20):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] < 1e-3
    with pytest.raises(ValueError, match="optim.lr must be a positive number"):
        build_optimizer(model, total_steps=10, lr=0)
