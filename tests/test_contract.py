"""The attention contract, enrolled for every conf/attention/*.yaml (``VARIANTS`` globs the
folder), with expectations taken from each variant's capability flags, never its name.

1. Maps come from the forward: ``combine(attention_weights(x) @ values(x)) == forward(x)``
   and the weights respect the causal and padding masks; or ``has_weights = False`` and
   ``attention_weights`` raises ``AttentionWeightsUnavailable``.
2. ``supports_step``: token-by-token ``step`` reproduces the causal forward.
3. ``needs_max_len``: longer inputs are refused, otherwise accepted.
4. ``bias`` and ``rope_theta`` reach every variant.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.attention import Attention, SoftmaxAttention
from attnlab.attention.base import AttentionWeightsUnavailable, QKVAttention
from attnlab.attention.linear import (
    LinearAttention,
    causal_linear_attention,
    elu_feature_map,
    linear_attention_step,
)
from tests.conftest import VARIANTS, build_attention

D, H, N = 32, 4, 12


def _inputs(b=2, n=N):
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, n - 4 :] = False
    return torch.randn(b, n, D), mask


def check_weights_contract(attn: Attention, x, padding_mask, atol=1e-5) -> None:
    """The weights ``attn`` reports, applied to its values and combined, give its forward
    output (the fused/linear-time one), and are 0 where the masks forbid attending."""
    b, n, _ = x.shape
    y = attn(x, padding_mask)
    weights = attn.attention_weights(x, padding_mask)
    assert weights.shape == (b, attn.n_heads, n, n)
    again = attn.combine(weights.to(attn.values(x).dtype) @ attn.values(x))
    torch.testing.assert_close(again.to(y.dtype), y, atol=atol, rtol=1e-5)
    if attn.causal:
        assert (weights.triu(1) == 0).all(), "weights on future keys"
    if padding_mask is not None:
        for row in range(b):
            real = padding_mask[row]
            assert (weights[row][:, real][..., ~real] == 0).all(), "weights on padded keys"


def _capable(attn: Attention, causal: bool, padded: bool) -> None:
    if causal and not attn.supports_causal:
        pytest.skip(f"{type(attn).__name__}: supports_causal=False")
    if padded and not attn.supports_padding_mask:
        pytest.skip(f"{type(attn).__name__}: supports_padding_mask=False")


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_weights_come_from_the_forward(name, causal, padded):
    attn = build_attention(name, D, H, causal=causal)
    _capable(attn, causal, padded)
    x, mask = _inputs()
    if not attn.has_weights:
        with pytest.raises(AttentionWeightsUnavailable, match="has_weights=False"):
            attn.attention_weights(x)
        return
    with torch.no_grad():  # random non-identity mixing / gates, so nothing is trivially equal
        for p in attn.parameters():
            if p.ndim == 2 and p.shape[0] == p.shape[1] == attn.n_heads:
                p.add_(0.3 * torch.randn_like(p))
    check_weights_contract(attn, x, mask if padded else None)


@pytest.mark.parametrize("name", VARIANTS)
def test_weights_include_the_dropout_the_forward_applies(name):
    """In training, ``return_weights`` gives the (dropped-out) weights the output used."""
    try:
        attn = build_attention(name, D, H, dropout=0.5).train()
    except ValueError as err:  # a variant without weights to drop refuses attention.dropout
        assert "attention.dropout" in str(err)
        return
    if not attn.has_weights:
        pytest.skip("has_weights=False")
    x, mask = _inputs()
    torch.manual_seed(1)
    out, weights = attn(x, mask, return_weights=True)
    assert (weights == 0).any()
    torch.testing.assert_close(out, attn.combine(weights @ attn.values(x)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_step_reproduces_the_causal_forward(name):
    attn = build_attention(name, D, H, causal=True)
    if not attn.supports_step:
        pytest.skip(f"{type(attn).__name__}: supports_step=False")
    x = torch.randn(2, N, D)
    state = attn.init_state(2, x.device, x.dtype)
    steps = []
    for t in range(N):
        y, state = attn.step(x[:, t : t + 1], state, t)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), attn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_max_len_refused_exactly_when_needed(name):
    attn = build_attention(name, D, H, max_len=16)
    long = torch.randn(1, 20, D)
    if attn.needs_max_len:
        with pytest.raises(ValueError, match=r"max_len=16 but got a sequence of length 20"):
            attn(long)
    else:
        assert attn(long).shape == (1, 20, D)


@pytest.mark.parametrize("name", VARIANTS)
def test_bias_and_rope_theta_reach_every_variant(name):
    without = build_attention(name, D, H, bias=False)
    with_bias = build_attention(name, D, H, bias=True)
    assert without.bias is False and with_bias.bias is True
    # only the synthesising MLP of the dense Synthesizer keeps biases (its eq. 1)
    names = [n for n, _ in without.named_parameters() if n.endswith("bias")]
    assert all(n.startswith("dense.") for n in names), names
    assert len(names) < sum(n.endswith("bias") for n, _ in with_bias.named_parameters())
    x = torch.randn(1, 6, D)
    assert without(x).shape == (1, 6, D)
    if without.uses_qk:
        attn = build_attention(name, D, H, rope=True, rope_theta=500.0)
        ref = 500.0 ** (-torch.arange(0, attn.head_dim, 2).float() / attn.head_dim)
        torch.testing.assert_close(attn.rotary.inv_freq, ref)


def test_bad_rope_theta_refused():
    with pytest.raises(ValueError, match="rope_theta must be positive"):
        SoftmaxAttention(d_model=D, n_heads=H, rope=True, rope_theta=0.0)


# ------------------------------------------------- the hole is closed: overrides reach both paths
class CosineAttention(SoftmaxAttention):
    """A variant written the tempting way: override only the score function."""

    def scores(self, q, k):
        return 10.0 * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)


class SharpSoftmax(SoftmaxAttention):
    """Override only the normalisation."""

    def normalize(self, logits, mask):
        return super().normalize(3.0 * logits, mask)


@pytest.mark.parametrize("cls", [CosineAttention, SharpSoftmax])
@pytest.mark.parametrize("causal", [False, True])
def test_overriding_scores_or_normalize_changes_forward_and_maps_alike(cls, causal):
    torch.manual_seed(0)
    plain = SoftmaxAttention(d_model=D, n_heads=H, causal=causal, rope=True).eval()
    odd = cls(d_model=D, n_heads=H, causal=causal, rope=True).eval()
    odd.load_state_dict(plain.state_dict())
    x, mask = _inputs()
    assert plain.fused and not odd.fused
    assert not torch.allclose(odd(x, mask), plain(x, mask), atol=1e-3)  # the forward changed
    assert not torch.allclose(odd.attention_weights(x, mask), plain.attention_weights(x, mask))
    check_weights_contract(odd, x, mask)  # ... and the maps with it
    check_weights_contract(plain, x, mask)  # the fused kernel equals its materialised weights
    # the decoding step follows the override too
    odd.causal = True
    state, steps = odd.init_state(2, x.device, x.dtype), []
    for t in range(N):
        y, state = odd.step(x[:, t : t + 1], state, t)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), odd(x), atol=1e-5, rtol=1e-5)


class ReluLinear(LinearAttention):
    """Linear attention with another feature map (as in e.g. Qin et al. 2022's ReLU kernels)."""

    def feature_map(self, x):
        return F.relu(x) + 0.1


@pytest.mark.parametrize("causal", [False, True])
def test_linear_feature_map_override_reaches_forward_maps_and_step(causal):
    torch.manual_seed(0)
    plain = LinearAttention(d_model=D, n_heads=H, causal=causal).eval()
    odd = ReluLinear(d_model=D, n_heads=H, causal=causal).eval()
    odd.load_state_dict(plain.state_dict())
    x, mask = _inputs()
    assert not torch.allclose(odd(x, mask), plain(x, mask), atol=1e-3)
    check_weights_contract(odd, x, mask)
    if causal:
        state, steps = odd.init_state(2, x.device, x.dtype), []
        for t in range(N):
            y, state = odd.step(x[:, t : t + 1], state, t)
            steps.append(y)
        torch.testing.assert_close(torch.cat(steps, 1), odd(x), atol=1e-5, rtol=1e-5)


class MisreportedAttention(SoftmaxAttention):
    """The old hole: an ``attend`` that computes the output one way and reports weights
    from another path. The contract check must catch it."""

    def attend(self, q, k, v, mask, causal, need_weights=False):
        _, weights = super().attend(q, k, v, mask, causal, need_weights)
        cosine = CosineAttention.scores(self, q, k)  # the output uses cosine scores...
        if causal and mask is None:
            mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        return self.normalize(cosine, mask) @ v, weights  # ... the reported weights do not


def test_contract_check_catches_maps_that_do_not_match_the_forward():
    attn = MisreportedAttention(d_model=D, n_heads=H).eval()
    x, mask = _inputs()
    with pytest.raises(AssertionError):
        check_weights_contract(attn, x, mask)


class NoWeights(QKVAttention):
    """A variant declaring it has no weights (e.g. a kernel that never forms them)."""

    has_weights = False

    def attend(self, q, k, v, mask, causal, need_weights=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal), None


def test_variant_without_weights_raises_a_user_error():
    attn = NoWeights(d_model=D, n_heads=H).eval()
    x, _ = _inputs()
    assert attn(x).shape == x.shape
    with pytest.raises(AttentionWeightsUnavailable, match=r"NoWeights has no attention weights"):
        attn.attention_weights(x)
    assert issubclass(AttentionWeightsUnavailable, ValueError)  # printed as one line by the CLI


# ----------------------------------------------------------------- linear attention step
@pytest.mark.parametrize("d_k, d_v", [(8, 8), (6, 10), (12, 3)])
def test_linear_attention_step_matches_chunked_parallel_form(d_k, d_v):
    b, h, n = 2, 3, 19
    q, k = (elu_feature_map(torch.randn(b, h, n, d_k, dtype=torch.float64)) for _ in range(2))
    v = torch.randn(b, h, n, d_v, dtype=torch.float64)
    parallel = causal_linear_attention(q, k, v, chunk_size=4, eps=1e-6)
    state, outs = None, []
    for t in range(n):
        out, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, eps=1e-6)
        outs.append(out)
    assert outs[0].shape == (b, h, d_v)
    assert state[0].shape == (b, h, d_k, d_v) and state[1].shape == (b, h, d_k)
    torch.testing.assert_close(torch.stack(outs, 2), parallel, atol=1e-10, rtol=1e-10)
    # the state is the sums of eq. 10-11
    torch.testing.assert_close(state[0], k.transpose(-2, -1) @ v)
    torch.testing.assert_close(state[1], k.sum(2))


def test_linear_attention_refuses_dropout():
    with pytest.raises(ValueError, match=r"attention.dropout=0.1 is not available for linear"):
        LinearAttention(d_model=D, n_heads=H, dropout=0.1)
