"""Causal attention in query chunks (attnlab.attention.causal_chunks) against SDPA and a float64
materialised softmax: outputs, gradients, causality, when it runs, and its errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from attnlab.attention import causal_chunks
from attnlab.attention.softmax import SoftmaxAttention


def _qkv(b, h, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=g, dtype=dtype)  # strided views, as in a model
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


def _materialised(q, k, v):
    """float64 ``softmax(q kᵀ / sqrt(d) + causal) v``."""
    q, k, v = (t.double() for t in (q, k, v))
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    n = q.shape[-2]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def _run(fn, q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("n,chunk", [(65, 64), (100, 64), (256, 64), (300, 128), (512, 128)])
def test_matches_sdpa_and_float64_reference(n, chunk):
    q, k, v = _qkv(2, 3, n, 16)
    grad = torch.randn(2, 3, n, 16, generator=torch.Generator().manual_seed(1))
    out, grads = _run(lambda *t: causal_chunks.causal_attention(*t, chunk), q, k, v, grad)
    ref, ref_grads = _run(
        lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), q, k, v, grad
    )
    exact, exact_grads = _run(_materialised, q, k, v, grad.double())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)
    for g, r, e in zip(grads, ref_grads, exact_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)  # float64 inside


def test_bfloat16_close_to_float64_reference():
    q, k, v = _qkv(2, 2, 200, 32, dtype=torch.bfloat16)
    grad = torch.randn(2, 2, 200, 32, generator=torch.Generator().manual_seed(1))
    out, grads = _run(lambda *t: causal_chunks.causal_attention(*t, 64), q, k, v, grad.bfloat16())
    ref, ref_grads = _run(_materialised, q, k, v, grad.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):  # the chunked backward in bf16; float64 math inside ref
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.double(), r.double(), atol=5e-2, rtol=5e-2)


def test_causal_gradients_reach_no_future_key():
    """The chunked backward: a loss on the first 150 outputs gives exactly zero gradient to the
    keys and values after them, and nonzero to those before."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in _qkv(1, 2, 256, 8))
    causal_chunks.causal_attention(q, k, v, 64)[:, :, :150].square().sum().backward()
    for g in (k.grad, v.grad):
        assert torch.count_nonzero(g[:, :, 150:]) == 0
        assert torch.count_nonzero(g[:, :, :150]) > 0
    assert torch.count_nonzero(q.grad[:, :, 150:]) == 0


def test_module_same_outputs_and_grads_with_and_without_chunks():
    torch.manual_seed(0)
    on = SoftmaxAttention(64, 4, causal=True, rope=True, bias=False)
    off = SoftmaxAttention(64, 4, causal=True, rope=True, bias=False, cpu_causal_chunks=False)
    off.load_state_dict(on.state_dict())
    x = torch.randn(3, 256, 64)
    grad = torch.randn(3, 256, 64)
    results = []
    for m in (on, off):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.backward(grad)
        results.append((out.detach(), xi.grad, m.qkv.weight.grad, m.out.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_module_takes_the_chunked_path_only_where_it_applies(monkeypatch):
    calls = []
    real = causal_chunks.causal_attention
    monkeypatch.setattr(
        causal_chunks, "causal_attention", lambda *a: calls.append(a[3]) or real(*a)
    )
    m = SoftmaxAttention(32, 2, causal=True)
    m(torch.randn(2, 256, 32))
    assert calls == [64]  # 4 chunks of 64
    m(torch.randn(2, 128, 32))  # shorter than 4 chunks of 64: SDPA
    m(torch.randn(2, 1024, 32))  # above chunk_max_len: SDPA
    m(torch.randn(2, 256, 32), padding_mask=torch.ones(2, 256, dtype=torch.bool))  # a mask
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(2, 256, 32))
    SoftmaxAttention(32, 2, causal=False)(torch.randn(2, 256, 32))
    SoftmaxAttention(32, 2, causal=True, cpu_causal_chunks=False)(torch.randn(2, 256, 32))
    dropped = SoftmaxAttention(32, 2, causal=True, dropout=0.1).train()
    dropped(torch.randn(2, 256, 32))
    assert calls == [64]
    dropped.eval()(torch.randn(2, 256, 32))  # no dropout in eval: chunked
    assert calls == [64, 64]


def test_chunk_policy():
    m = SoftmaxAttention(32, 2, causal=True)
    assert [m.causal_chunk(n) for n in (64, 255, 256, 300, 512, 513)] == [0, 0, 64, 75, 128, 0]
    assert SoftmaxAttention(32, 2, causal=True, chunk_max_len=2048).causal_chunk(2048) == 512
    assert SoftmaxAttention(32, 2, causal=True, cpu_causal_chunks=False).causal_chunk(256) == 0


def test_applies_and_errors():
    q, k, _ = _qkv(1, 1, 128, 8)
    assert causal_chunks.applies(q, k, 64, 0.0)
    assert not causal_chunks.applies(q, k, 64, 0.1)
    assert not causal_chunks.applies(q, k[:, :, :100], 64, 0.0)
    assert not causal_chunks.applies(q, k, 128, 0.0)
    assert not causal_chunks.applies(q.double(), k.double(), 64, 0.0)
    with pytest.raises(ValueError, match="is_causal=True"):
        causal_chunks.causal_attention(q.double(), k.double(), k.double(), 64)
    with pytest.raises(ValueError, match="chunk_max_len"):
        SoftmaxAttention(32, 2, causal=True, chunk_max_len=0)
