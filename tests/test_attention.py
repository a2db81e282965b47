"""Contract tests, parametrised over every conf/attention/*.yaml (DESIGN.md, convention 8).

What applies to a variant is decided by its capability flags (``supports_causal``,
``supports_padding_mask``, ``uses_qk``...), never by its name; tests/test_contract.py has
the weights, step and max_len parts of the contract.
"""

from __future__ import annotations

import pytest
import torch

from attnlab.attention import Attention, LinearAttention, SoftmaxAttention, SynthesizerAttention
from attnlab.models import Backbone
from attnlab.paths import CONF_DIR
from tests.conftest import VARIANTS, attention_partial, build_attention

D, H, N = 32, 4, 24


def test_every_variant_is_registered():
    """Every conf/attention/*.yaml is enrolled and builds an :class:`Attention`."""
    files = sorted(p.stem for p in (CONF_DIR / "attention").glob("*.yaml"))
    assert files and VARIANTS == files
    for name in VARIANTS:
        assert isinstance(build_attention(name), Attention)


def _skip_unless_capable(attn, causal=False, padded=False):
    if causal and not attn.supports_causal:
        pytest.skip(f"{type(attn).__name__}: supports_causal=False")
    if padded and not attn.supports_padding_mask:
        pytest.skip(f"{type(attn).__name__}: supports_padding_mask=False")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_output_shape(name, causal):
    attn = build_attention(name, D, H, causal=causal)
    _skip_unless_capable(attn, causal)
    x = torch.randn(3, N, D)
    assert attn(x).shape == (3, N, D)
    if attn.supports_padding_mask:
        assert attn(x, torch.ones(3, N, dtype=torch.bool)).shape == (3, N, D)


@pytest.mark.parametrize("name", VARIANTS)
def test_causality(name):
    """Changing tokens after position t leaves the outputs up to t unchanged."""
    attn = build_attention(name, D, H, causal=True)
    _skip_unless_capable(attn, causal=True)
    x = torch.randn(2, N, D)
    for t in (0, 7, N - 2):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
        y, y2 = attn(x), attn(x2)
        torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_padding_invariance(name, causal):
    """Padding content and amount never change the outputs at real positions."""
    attn = build_attention(name, D, H, causal=causal)
    _skip_unless_capable(attn, causal, padded=True)
    real = [N - 10, N - 4]
    x = torch.randn(2, N, D)
    mask = torch.arange(N)[None] < torch.tensor(real)[:, None]
    y = attn(x, mask)
    # 1) different padding content
    x2 = torch.where(mask[..., None], x, torch.randn_like(x) * 5)
    y2 = attn(x2, mask)
    # 2) more padding (longer sequence)
    extra = 8
    x3 = torch.cat([x2, torch.randn(2, extra, D)], dim=1)
    mask3 = torch.cat([mask, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
    y3 = attn(x3, mask3)[:, :N]
    for b, n in enumerate(real):
        torch.testing.assert_close(y[b, :n], y2[b, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y[b, :n], y3[b, :n], atol=1e-5, rtol=1e-5)
    # 3) a padded batch row equals the same sequence run alone, unpadded
    alone = attn(x[:1, : real[0]])
    torch.testing.assert_close(y[0, : real[0]], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_reach_every_parameter(name, causal):
    attn = build_attention(name, D, H, causal=causal).train()
    _skip_unless_capable(attn, causal)
    x = torch.randn(2, N, D, requires_grad=True)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, -5:] = False
    if not attn.supports_padding_mask:
        mask = None
    (attn(x, mask) * torch.randn(2, N, D)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in attn.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient in {pname}"


def test_frozen_random_synthesizer_has_no_trainable_matrix():
    attn = build_attention("synthesizer_random", trainable=False)
    assert not attn.random.requires_grad


# ------------------------------------------------------------- refused combinations
def _backbone(name, **kw):
    kw = {"d_model": D, "n_heads": H, "n_layers": 1, "max_len": 32, **kw}
    return Backbone(100, attention_partial(name), **kw)


@pytest.mark.parametrize("name", VARIANTS)
def test_rope_refused_exactly_without_qk(name):
    if build_attention(name, rope=False).uses_qk:
        _backbone(name, positions="rope")
    else:
        with pytest.raises(ValueError, match=r"positions=rope.*no q·k.*positions=learned"):
            _backbone(name, positions="rope")
    _backbone(name, positions="learned")  # the fix works


def test_n_heads_must_divide_d_model():
    with pytest.raises(ValueError, match=r"n_heads=5 does not divide d_model=32.*head_dim"):
        SoftmaxAttention(d_model=32, n_heads=5)
    assert SoftmaxAttention(d_model=32, n_heads=5, head_dim=8).inner_dim == 40


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"d_model": 0, "n_heads": 4}, "d_model must be a positive integer"),
        ({"d_model": 32, "n_heads": -1}, "n_heads must be a positive integer"),
        ({"d_model": 32, "n_heads": 4, "head_dim": 0}, "head_dim must be a positive integer"),
        ({"d_model": 32, "n_heads": 4, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_sizes_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SoftmaxAttention(**kw)


def test_synthesizer_needs_max_len_and_refuses_longer_inputs():
    with pytest.raises(ValueError, match="needs max_len"):
        SynthesizerAttention(d_model=D, n_heads=H)
    with pytest.raises(ValueError, match=r"mode='dens' is not one of"):
        SynthesizerAttention(d_model=D, n_heads=H, max_len=16, mode="dens")
    attn = SynthesizerAttention(d_model=D, n_heads=H, max_len=16)
    with pytest.raises(ValueError, match=r"max_len=16 but got a sequence of length 20"):
        attn(torch.randn(1, 20, D))


def test_backbone_refuses_inputs_longer_than_learned_positions():
    bb = _backbone("softmax", positions="learned", max_len=16)
    with pytest.raises(ValueError, match=r"longer than max_len=16"):
        bb(torch.zeros(1, 17, dtype=torch.long))
    bb = _backbone("softmax", positions="rope", max_len=16)
    assert bb(torch.zeros(1, 17, dtype=torch.long)).shape == (1, 17, D)  # RoPE extrapolates


def test_bad_model_options_list_the_choices():
    with pytest.raises(ValueError, match=r"model.norm='batchnorm' is not one of"):
        _backbone("softmax", norm="batchnorm")
    with pytest.raises(ValueError, match=r"model.dropout must be in \[0, 1\)"):
        _backbone("softmax", dropout=-0.1)


def test_linear_chunk_size_validated():
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        LinearAttention(d_model=D, n_heads=H, chunk_size=0)
