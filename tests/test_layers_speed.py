"""The fast CPU paths of layers.py (RMSNorm, RoPE rotation, SwiGLU gate) against the formulas
they replaced, to 1e-6 in fp32 (outputs and gradients); RoPE theta; FFN bias; inference mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attnlab.attention.softmax import SoftmaxAttention
from attnlab.layers import (
    FEEDFORWARDS,
    FeedForward,
    GELUFeedForward,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    swiglu_gate,
)

TOL = {"atol": 1e-6, "rtol": 1e-6}


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in inputs]


# ---------------------------------------------------------------- the formulas before (reference)
def old_rms_norm(x, w, eps):
    """nn.RMSNorm's composite: x * rsqrt(mean(x², -1) + eps) * w."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def old_rope(x, inv_freq, offset=0):
    """The former RotaryEmbedding.forward: x * cos + cat([-x2, x1]) * sin on (n, d) tables."""
    n = x.shape[-2]
    t = torch.arange(offset + n, dtype=torch.float32)
    emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)[offset:]
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def old_swiglu(ab):
    gate, up = ab.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------- equivalence
@pytest.mark.parametrize("shape", [(2, 7, 32), (3, 64), (1, 5, 2, 48)])
def test_rmsnorm_matches_composite_and_nn_rmsnorm(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    x = torch.randn(shape) * 3
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(shape)
    out = norm(xa)
    out.backward(g)
    gw, norm.weight.grad = norm.weight.grad, None
    w = norm.weight.detach().clone().requires_grad_(True)
    ref = old_rms_norm(xb, w, norm.eps)
    ref.backward(g)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    torch.testing.assert_close(gw, w.grad, **TOL)
    ref_nn = nn.RMSNorm(shape[-1], eps=norm.eps)
    with torch.no_grad():
        ref_nn.weight.copy_(norm.weight)
    torch.testing.assert_close(norm(x), ref_nn(x), **TOL)


def test_rmsnorm_other_dtypes_and_no_grad_fall_back_or_agree():
    norm = RMSNorm(16)
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(norm.double()(x), old_rms_norm(x, norm.weight, norm.eps))
    with torch.inference_mode():
        y = RMSNorm(16)(torch.randn(2, 16))
    assert y.shape == (2, 16)


@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_rotate_half_formula(offset, theta):
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, theta=theta)
    qkv = torch.randn(2, 9, 3 * 4 * 16)  # q, k as the non-contiguous views the attention passes
    q = qkv[..., :64].view(2, 9, 4, 16).transpose(1, 2)
    out, (g,) = _grads(lambda a: rope(a, offset), q)
    ref, (rg,) = _grads(lambda a: old_rope(a, rope.inv_freq, offset), q)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(g, rg, **TOL)


def test_rope_theta_and_former_base_name():
    assert RotaryEmbedding(8).theta == 10000.0
    assert RotaryEmbedding(8, 500000.0).theta == 500000.0
    old = RotaryEmbedding(8, base=1000.0)
    assert old.theta == old.base == 1000.0
    torch.testing.assert_close(old.inv_freq, 1000.0 ** (-torch.arange(0, 8, 2) / 8))
    with pytest.raises(ValueError, match="theta"):
        RotaryEmbedding(8, theta=0.0)
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)


def test_rope_cache_grows_and_follows_dtype():
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 2, 300, 8, dtype=torch.float64)
    torch.testing.assert_close(rope(x), old_rope(x.float(), rope.inv_freq).double(), **TOL)
    assert rope.cos_sin(300, x.device, torch.float64)[0].shape[0] >= 300


@pytest.mark.parametrize("shape", [(2, 5, 48), (3, 4, 7, 40)])
def test_swiglu_gate_matches_composite(shape):
    torch.manual_seed(0)
    ab = torch.randn(shape) * 2
    out, (g,) = _grads(swiglu_gate, ab)
    ref, (rg,) = _grads(old_swiglu, ab)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(g, rg, **TOL)


def test_swiglu_module_output_and_grads_unchanged():
    torch.manual_seed(0)
    ffn = SwiGLU(32)
    x = torch.randn(2, 6, 32)
    out = ffn(x)
    ref = ffn.down(old_swiglu(ffn.gate_up(x)))
    torch.testing.assert_close(out, ref, **TOL)
    out.sum().backward()
    fast = [p.grad.clone() for p in ffn.parameters()]
    ffn.zero_grad()
    ffn.down(old_swiglu(ffn.gate_up(x))).sum().backward()
    for a, b in zip(fast, [p.grad for p in ffn.parameters()]):
        torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------- API: bias, activation
def test_ffn_bias_option_and_defaults():
    assert FeedForward(8).up.bias is not None  # default as before: biases
    assert FeedForward(8, bias=False).up.bias is None
    assert SwiGLU(8).gate_up.bias is None  # default as before: no biases
    assert SwiGLU(8, bias=True).down.bias is not None
    gelu = GELUFeedForward(8, bias=False)
    assert gelu.act is F.gelu and gelu.down.bias is None
    assert FEEDFORWARDS["gelu"] is GELUFeedForward
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, activation="tanh")
    assert RMSNorm(8, eps=1e-5).eps == 1e-5


# ---------------------------------------------------------------- inference mode, then training
def test_training_after_inference_mode_forward():
    """The RoPE tables built under inference_mode must not be inference tensors."""
    m = SoftmaxAttention(64, 4, causal=True, rope=True)
    with torch.inference_mode():
        m(torch.randn(1, 8, 64))
    m(torch.randn(1, 8, 64)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    with torch.inference_mode():  # a longer inference input grows the tables, still fine
        m(torch.randn(1, 300, 64))
    m(torch.randn(1, 300, 64)).sum().backward()


def test_rope_module_to_dtype_rebuilds_tables():
    m = SoftmaxAttention(32, 2, causal=True, rope=True)
    m(torch.randn(1, 4, 32))
    m.double()
    assert m(torch.randn(1, 4, 32, dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------- fused q/k/v + RoPE, SwiGLU projection
def _attention_grads(attn, x, mask=None):
    x = x.detach().clone().requires_grad_(True)
    out = attn(x, mask)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    grads = torch.autograd.grad(out, [x, *attn.parameters()], g)
    return out.detach(), grads


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", ["softmax", "talking_heads"])
def test_rope_pair_path_matches_half_layout(monkeypatch, name, bias, causal):
    """project() on the pair path (permuted rows + complex rotation) gives the outputs and
    gradients (input and every parameter) of the half-layout rotation, padded or not."""
    from tests.conftest import build_attention

    torch.manual_seed(0)
    attn = build_attention(name, 64, 4, causal=causal, rope=True, bias=bias)
    x = torch.randn(3, 11, 64)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False
    assert attn._pair_path(x)
    for m in (None, mask):
        fast, fast_g = _attention_grads(attn, x, m)
        monkeypatch.setattr(type(attn), "_pair_path", staticmethod(lambda x: False))
        ref, ref_g = _attention_grads(attn, x, m)
        monkeypatch.undo()
        torch.testing.assert_close(fast, ref, **TOL)
        for a, b in zip(fast_g, ref_g):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)  # sums over 33 rows


def test_rope_pair_path_permutes_q_and_k_alike(monkeypatch):
    """q and k come out in pair order: every q·k (and v) equals the half layout's."""
    torch.manual_seed(0)
    attn = SoftmaxAttention(32, 2, causal=True, rope=True)
    x = torch.randn(2, 9, 32)
    q, k, v = attn.project(x, offset=4)
    monkeypatch.setattr(SoftmaxAttention, "_pair_path", staticmethod(lambda x: False))
    q0, k0, v0 = attn.project(x, offset=4)
    torch.testing.assert_close(q @ k.transpose(-2, -1), q0 @ k0.transpose(-2, -1), **TOL)
    torch.testing.assert_close(v, v0, atol=0, rtol=0)
    assert not torch.allclose(q, q0)  # the coordinates themselves are permuted


def test_rope_pair_order_puts_pairs_side_by_side():
    from attnlab.layers import rope_pair_order

    order = rope_pair_order(n_heads=2, head_dim=4)
    assert order.tolist() == [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15, *range(16, 24)]


def test_rope_pair_path_decodes_like_the_forward():
    torch.manual_seed(0)
    attn = SoftmaxAttention(32, 4, causal=True, rope=True).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        full = attn(x)
        state, outs = attn.init_state(2, x.device, x.dtype), []
        for t in range(7):
            out, state = attn.step(x[:, t : t + 1], state, t)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)


def test_rope_pair_path_off_under_autocast_and_float16():
    x = torch.randn(1, 4, 32)
    assert SoftmaxAttention._pair_path(x) and SoftmaxAttention._pair_path(x.double())
    assert not SoftmaxAttention._pair_path(x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not SoftmaxAttention._pair_path(x)
        out = SoftmaxAttention(32, 2, causal=True, rope=True)(x)
    assert out.shape == (1, 4, 32)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 32), (5, 32)])
def test_swiglu_projection_matches_linear_then_gate(bias, shape):
    torch.manual_seed(0)
    ffn = SwiGLU(32, bias=bias)
    if bias:
        with torch.no_grad():
            ffn.gate_up.bias.normal_()
    x = torch.randn(shape)
    out, grads = _grads(lambda a: ffn(a), x)
    pgrads = [p.grad.clone() for p in ffn.parameters()]
    ffn.zero_grad()
    ref, rgrads = _grads(lambda a: ffn.down(old_swiglu(ffn.gate_up(a))), x)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(grads[0], rgrads[0], **TOL)
    for a, b in zip(pgrads, [p.grad for p in ffn.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


def test_swiglu_second_backward_is_refused_not_wrong():
    """The backward writes over its saved buffers; a second pass through the same graph
    (retain_graph=True) must raise, not return wrong gradients."""
    ffn = SwiGLU(16)
    loss = ffn(torch.randn(2, 3, 16)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_head_mask_multiply_skipped_only_while_all_ones():
    torch.manual_seed(0)
    attn = SoftmaxAttention(32, 4).eval()
    x = torch.randn(2, 5, 32)
    full = attn(x)
    assert attn.all_heads_on()
    attn.head_mask[2] = 0.0  # an in-place edit (as analyze does) is seen
    assert not attn.all_heads_on()
    heads = attn.attend(*attn.project(x), None, False)[0]
    heads = heads * torch.tensor([1.0, 1.0, 0.0, 1.0])[None, :, None, None]
    ref = attn.out(heads.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), ref, **TOL)
    attn.head_mask.fill_(1.0)
    assert attn.all_heads_on()
    torch.testing.assert_close(attn(x), full, atol=0, rtol=0)
    attn.head_mask = torch.tensor([1.0, 0.5, 1.0, 1.0])  # a replaced buffer is seen too
    assert not attn.all_heads_on()
