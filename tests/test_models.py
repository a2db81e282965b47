"""Models: generation with cache/recurrence, pooling, parameter counts, overfitting one batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.models import Backbone, LanguageModel, SequenceClassifier, count_parameters
from tests.conftest import VARIANTS, attention_partial, positions_for

V = 50


def tiny(name, task, max_len=32, pooling="mean", tie_embeddings=True, **kw):
    """A small model: ``task`` is ``classification`` (pooled head) or ``lm`` (LM head)."""
    kw = {
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "dropout": 0.0,
        "positions": positions_for(name),
        **kw,
    }
    torch.manual_seed(0)
    bb = Backbone(V, attention_partial(name), max_len=max_len, causal=task == "lm", **kw)
    if task == "classification":
        return SequenceClassifier(bb, 2, pooling)
    return LanguageModel(bb, V, tie_embeddings)


@pytest.mark.parametrize("name", VARIANTS)
def test_generation_with_cache_equals_recomputation(name):
    lm = tiny(name, "lm").eval()
    prompt = torch.randint(0, V, (2, 5))
    fast = lm.generate(prompt, 12, temperature=0)
    slow = lm.generate(prompt, 12, temperature=0, use_cache=False)
    assert fast.shape == (2, 17)
    assert torch.equal(fast, slow)
    # the incremental path is really used where the variant supports it
    assert lm.backbone.supports_step == (
        name
        not in {"synthesizer", "synthesizer_random", "synthesizer_factorized", "synthesizer_mix"}
    )


@pytest.mark.parametrize("name", ["softmax", "linear"])
def test_step_logits_equal_full_forward(name):
    lm = tiny(name, "lm").eval()
    ids = torch.randint(0, V, (2, 10))
    full = lm(ids)
    states = lm.backbone.init_state(2, ids.device, torch.float32)
    for t in range(10):
        h, states = lm.backbone.step(ids[:, t], states, t)
        torch.testing.assert_close(lm.head(h), full[:, t], atol=1e-5, rtol=1e-5)


def test_generation_beyond_max_len_slides_the_window():
    lm = tiny("softmax", "lm", max_len=16, positions="learned").eval()
    out = lm.generate(torch.randint(0, V, (1, 10)), 20, temperature=0.7, top_k=5)
    assert out.shape == (1, 30)


def test_generation_rejects_bad_arguments():
    lm = tiny("softmax", "lm")
    p = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        lm.generate(p, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        lm.generate(p, 2, top_k=0)
    with pytest.raises(ValueError, match="at least one token"):
        lm.generate(p[:, :0], 2)


def test_top_k_one_is_greedy():
    lm = tiny("softmax", "lm").eval()
    p = torch.randint(0, V, (2, 4))
    assert torch.equal(
        lm.generate(p, 6, temperature=1.0, top_k=1), lm.generate(p, 6, temperature=0)
    )


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_pooling_ignores_padding(pooling):
    clf = tiny("softmax", "classification", pooling=pooling).eval()
    ids = torch.randint(3, V, (1, 12))
    mask = torch.ones(1, 12, dtype=torch.bool)
    padded = torch.cat([ids, torch.randint(0, V, (1, 6))], 1)
    pmask = torch.cat([mask, torch.zeros(1, 6, dtype=torch.bool)], 1)
    torch.testing.assert_close(clf(ids, mask), clf(padded, pmask), atol=1e-5, rtol=1e-5)


def test_parameter_counts_add_up_and_count_tied_weights_once():
    lm = tiny("softmax", "lm", tie_embeddings=True)
    counts = count_parameters(lm)
    assert counts["total"] == sum(p.numel() for p in lm.parameters())  # parameters() dedups
    assert counts["embedding"] == V * 32 and counts["attention"] > 0 and counts["ffn"] > 0
    untied = count_parameters(tiny("softmax", "lm", tie_embeddings=False))
    assert untied["total"] - counts["total"] == V * 32


@pytest.mark.parametrize("task", ["classification", "lm"])
@pytest.mark.parametrize("name", VARIANTS)
def test_tiny_model_overfits_one_batch(name, task):
    model = tiny(name, task)
    torch.manual_seed(1)
    ids = torch.randint(3, V, (8, 24))
    mask = torch.ones(8, 24, dtype=torch.bool)
    mask[::2, 18:] = False
    labels = torch.randint(0, 2, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_fn():
        if task == "classification":
            return F.cross_entropy(model(ids, mask), labels)
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))

    first = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < first / 2, f"{name}/{task}: loss {first:.3f} -> {loss.item():.3f}"
