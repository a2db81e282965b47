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
