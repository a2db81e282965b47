"""Equivalence against reference implementations (DESIGN.md, convention 9)."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.attention.base import attention_mask, split_heads
from attnlab.attention.linear import causal_linear_attention, elu_feature_map
from tests.conftest import build_attention

D, H, N = 32, 4, 20


def naive_attention(q, k, v, mask=None, causal=False):
    """softmax(Q Kᵀ / sqrt(d)) V with materialised weights, as in "Transformers from scratch"."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores, -1) @ v


def _padded(b=2, n=N):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n - 6 :] = False
    return torch.randn(b, n, D), mask


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_matches_naive(causal, rope):
    attn = build_attention("softmax", D, H, causal=causal, rope=rope)
    x, mask = _padded()
    q, k, v = attn.project(x)
    for pm in (None, mask):
        m = attention_mask(pm, causal, N, x.device)
        ref = attn.out(attn.merge(naive_attention(q, k, v, m, causal and pm is None)))
        torch.testing.assert_close(attn(x, pm), ref, atol=1e-5, rtol=1e-5)


def test_softmax_matches_torch_multihead_attention():
    """Same weights in nn.MultiheadAttention give the same output (a second reference)."""
    attn = build_attention("softmax", D, H, rope=False)
    mha = torch.nn.MultiheadAttention(D, H, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.out.weight)
        mha.out_proj.bias.copy_(attn.out.bias)
    x, mask = _padded()
    ref, _ = mha(x, x, x, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(attn(x, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_fixed_head_at_d_over_h_equals_plain_multihead(causal):
    plain = build_attention("softmax", D, H, causal=causal)
    fixed = build_attention("fixed_head", D, H, causal=causal, head_dim=D // H)
    assert fixed.head_dim == plain.head_dim == D // H
    fixed.load_state_dict(plain.state_dict())
    x, mask = _padded()
    torch.testing.assert_close(fixed(x, mask), plain(x, mask), atol=0, rtol=0)


def test_fixed_head_size_is_independent_of_heads():
    for h in (1, 2, 8, 16):
        attn = build_attention("fixed_head", 32, h)
        assert attn.head_dim == 32 and attn.qkv.out_features == 3 * h * 32
        assert attn(torch.randn(1, 5, 32)).shape == (1, 5, 32)


@pytest.mark.parametrize("causal", [False, True])
def test_talking_heads_identity_init_equals_softmax(causal):
    th = build_attention("talking_heads", D, H, causal=causal)
    sm = build_attention("softmax", D, H, causal=causal)
    sm.load_state_dict({k: v for k, v in th.state_dict().items() if not k.startswith("mix_")})
    x, mask = _padded()
    torch.testing.assert_close(th(x, mask), sm(x, mask), atol=1e-5, rtol=1e-5)


def test_talking_heads_matches_reference_mixing():
    th = build_attention("talking_heads", D, H, causal=True)
    with torch.no_grad():
        th.mix_logits.copy_(torch.randn(H, H))
        th.mix_weights.copy_(torch.randn(H, H))
    x = torch.randn(2, N, D)
    q, k, v = th.project(x)
    logits = q @ k.transpose(-2, -1) / math.sqrt(th.head_dim)
    logits = torch.einsum("ij,bimn->bjmn", th.mix_logits, logits)
    logits = logits.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), -math.inf)
    weights = torch.einsum("ij,bimn->bjmn", th.mix_weights, torch.softmax(logits, -1))
    ref = th.out(th.merge(weights @ v))
    torch.testing.assert_close(th(x), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ linear attention
def naive_causal_linear(q, k, v, eps=1e-6):
    """Masked quadratic form: sum_{j<=i} (q_i·k_j) v_j / (sum_{j<=i} q_i·k_j + eps)."""
    scores = (q @ k.transpose(-2, -1)).tril()
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("n, chunk", [(20, 64), (37, 8), (64, 16), (5, 1)])
def test_causal_linear_parallel_vs_naive_vs_recurrent(n, chunk):
    attn = build_attention("linear", D, H, causal=True, chunk_size=chunk).double()
    x = torch.randn(2, n, D, dtype=torch.float64, requires_grad=True)
    # forward: chunked prefix sums == naive masked quadratic form
    q, k, v = attn.features(x)
    chunked = causal_linear_attention(q, k, v, chunk, attn.eps)
    naive = naive_causal_linear(q, k, v, attn.eps)
    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=1e-5)
    # gradients agree
    g = torch.randn_like(naive)
    gc = torch.autograd.grad((chunked * g).sum(), x, retain_graph=True)[0]
    gn = torch.autograd.grad((naive * g).sum(), x)[0]
    torch.testing.assert_close(gc, gn, atol=1e-5, rtol=1e-5)
    # recurrent step reproduces the module's causal output token by token
    attn = attn.float()
    xf = x.detach().float()
    full = attn(xf)
    state = attn.init_state(2, xf.device, xf.dtype)
    steps = []
    for t in range(n):
        y, state = attn.step(xf[:, t : t + 1], state, t)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_causal_linear_fp32_matches_naive_and_is_finite_at_4096():
    attn = build_attention("linear", 64, 4, causal=True)
    x = torch.randn(1, 4096, 64, requires_grad=True)
    y = attn(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    q, k, v = attn.features(x[:, :512].detach())
    torch.testing.assert_close(
        causal_linear_attention(q, k, v, 64, attn.eps),
        naive_causal_linear(q, k, v, attn.eps),
        atol=1e-5,
        rtol=1e-5,
    )


def test_linear_noncausal_matches_naive_and_masks_keys_after_feature_map():
    attn = build_attention("linear", D, H)
    x, mask = _padded()
    q, k, v = attn.features(x)
    k = k * mask[:, None, :, None]
    scores = q @ k.transpose(-2, -1)
    ref = (scores @ v) / (scores.sum(-1, keepdim=True) + attn.eps)
    ref = attn.out(attn.merge(ref))
    torch.testing.assert_close(attn(x, mask), ref, atol=1e-5, rtol=1e-5)
    assert (elu_feature_map(torch.zeros(3)) == 1).all()  # why zeroing inputs would not mask


def test_linear_attention_sums_in_float32_under_half_autocast():
    """Sequence-length sums overflow float16; the module keeps them in float32."""
    attn = build_attention("linear", D, H, causal=True)
    with torch.no_grad():
        attn.qkv.bias.fill_(8.0)  # large positive features and values
    x = torch.randn(1, 4096, D)
    q, k, v = attn.features(x)
    assert not torch.isfinite(k.half().transpose(-2, -1) @ v.half()).all()  # half overflows
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            y = attn(x)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.float(), attn(x), atol=0.05, rtol=0.05)


# ------------------------------------------------------------------------ synthesizer
@pytest.mark.parametrize("causal", [False, True])
def test_synthesizer_random_matches_reference(causal):
    attn = build_attention("synthesizer_random", D, H, causal=causal, max_len=32)
    x, mask = _padded()
    r = attn.random[:, :N, :N]
    m = attention_mask(mask, causal, N, x.device)
    w = torch.softmax(r[None].masked_fill(~m, -math.inf), -1)
    ref = attn.out(attn.merge(w @ split_heads(attn.v(x), H)))
    torch.testing.assert_close(attn(x, mask), ref, atol=1e-5, rtol=1e-5)


def test_synthesizer_dense_logits_come_from_each_token():
    attn = build_attention("synthesizer", D, H, causal=False, max_len=32)
    x = torch.randn(1, N, D)
    logits = attn.synthesized_logits(x)
    ref = attn.dense(x).view(1, N, H, 32)[..., :N].transpose(1, 2)
    torch.testing.assert_close(logits, ref)
    assert logits.shape == (1, H, N, N)


def test_synthesizer_mix_gate_starts_at_half():
    attn = build_attention("synthesizer_mix", D, H, max_len=32, rope=False)
    x = torch.randn(1, N, D)
    q, k = (split_heads(t, H) for t in attn.qk(x).chunk(2, -1))
    dot = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)
    ref = 0.5 * dot + 0.5 * attn.random[None, :, :N, :N]
    torch.testing.assert_close(attn.logits(x), ref, atol=1e-6, rtol=1e-6)
