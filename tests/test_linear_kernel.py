"""The ``attention.kernel`` dispatch of causal linear attention (attnlab's chunked torch form,
or flash-linear-attention's chunked Triton kernel on CUDA).

On a CPU the glue around fla's kernel is checked against a stand-in that follows the contract
fla documents for ``chunk_linear_attn(q, k, v, scale, normalize=False)`` (numerator only,
``(B, T, H, K)`` layout, returns ``(o, final_state)``); the real kernel is compared on CUDA when
``fla`` is installed (``pip install 'attnlab[fla]'``), skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.attention import LinearAttention
from attnlab.attention import linear as lin


def _standin_chunk_linear_attn(q, k, v, scale=None, normalize=True, **_):
    """fla's documented numerator, computed quadratically: ``o_t = scale · sum_{j<=t}
    (q_t·k_j) v_j`` on ``(B, T, H, K)`` inputs."""
    assert not normalize and q.dim() == 4
    scores = torch.einsum("bthk,bshk->bhts", q, k).tril() * scale
    return torch.einsum("bhts,bshv->bthv", scores, v), None


def _features(b=2, h=3, n=37, d=8, e=5, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k = (F.elu(torch.randn(b, h, n, d, generator=g, dtype=dtype, device=device)) + 1
            for _ in range(2))  # fmt: skip
    v = torch.randn(b, h, n, e, generator=g, dtype=dtype, device=device)
    return q, k, v


def test_fla_glue_matches_chunked_torch_form():
    """Layout, numerator and denominator of :func:`fla_causal_linear_attention` give the
    chunked torch form's output (float64, so any disagreement is a formula error)."""
    q, k, v = _features()
    k[:, :, 30:] = 0  # padded keys (zeroed features) add nothing to either sum
    got = lin.fla_causal_linear_attention(q, k, v, 1e-6, kernel=_standin_chunk_linear_attn)
    want = lin.causal_linear_attention(q, k, v, chunk_size=8, eps=1e-6)
    assert got.shape == want.shape == (2, 3, 37, 5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fla_glue_is_causal():
    """Changing the last token changes no earlier output."""
    q, k, v = _features()
    out = lin.fla_causal_linear_attention(q, k, v, kernel=_standin_chunk_linear_attn)
    v2 = v.clone()
    v2[:, :, -1] += 10.0
    k2 = k.clone()
    k2[:, :, -1] *= 3.0
    out2 = lin.fla_causal_linear_attention(q, k2, v2, kernel=_standin_chunk_linear_attn)
    torch.testing.assert_close(out[:, :, :-1], out2[:, :, :-1], rtol=0, atol=0)
    assert not torch.allclose(out[:, :, -1], out2[:, :, -1])


def test_kernel_validated_at_build_time(monkeypatch):
    with pytest.raises(
        ValueError, match="attention.kernel='triton' is not one of auto, torch, fla"
    ):
        LinearAttention(16, 2, causal=True, kernel="triton")
    with pytest.raises(ValueError, match="causal linear attention only"):
        LinearAttention(16, 2, causal=False, kernel="fla")
    monkeypatch.setattr(lin, "fla_kernel", lambda: None)
    with pytest.raises(ValueError, match=r"pip install 'attnlab\[fla\]'"):
        LinearAttention(16, 2, causal=True, kernel="fla")


def test_fla_kernel_refuses_cpu_input(monkeypatch):
    monkeypatch.setattr(lin, "fla_kernel", lambda: _standin_chunk_linear_attn)
    attn = LinearAttention(16, 2, causal=True, kernel="fla")
    assert "kernel=fla" in repr(attn)
    with pytest.raises(RuntimeError, match="CUDA only, but the input is on cpu"):
        attn(torch.randn(1, 5, 16))


def test_auto_runs_torch_off_cuda(monkeypatch):
    """``auto`` never calls fla on a CPU input, even where fla is importable."""

    def must_not_run(*a, **k):
        raise AssertionError("fla called for a CPU input")

    monkeypatch.setattr(lin, "fla_kernel", lambda: must_not_run)
    torch.manual_seed(0)
    auto = LinearAttention(16, 2, causal=True, kernel="auto")
    ref = LinearAttention(16, 2, causal=True, kernel="torch")
    ref.load_state_dict(auto.state_dict())
    x = torch.randn(2, 9, 16)
    assert not auto.uses_fla(x)
    torch.testing.assert_close(auto(x), ref(x), rtol=0, atol=0)


def test_default_kernel_is_torch():
    """fla is opt-in (``attention.kernel=auto`` or ``fla``), in the config and the class."""
    from tests.conftest import build_attention

    assert build_attention("linear", causal=True).kernel == "torch"
    assert LinearAttention(16, 2, causal=True).kernel == "torch"


needs_fla = pytest.mark.skipif(
    not torch.cuda.is_available() or lin.fla_kernel() is None,
    reason="needs CUDA and flash-linear-attention (pip install 'attnlab[fla]')",
)


@needs_fla
@pytest.mark.parametrize("n", [64, 200])
def test_fla_module_matches_torch_on_cuda(n):
    """The same module on fla's kernel and on attnlab's chunked form, with padding: outputs and
    all gradients agree to TF32 precision (fla's ``tl.dot`` runs float32 inputs as TF32)."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    fla = LinearAttention(512, 8, causal=True, kernel="fla").to(dev)
    ref = LinearAttention(512, 8, causal=True, kernel="torch").to(dev)
    ref.load_state_dict(fla.state_dict())
    x = torch.randn(2, n, 512, device=dev)
    mask = torch.ones(2, n, dtype=torch.bool, device=dev)
    mask[1, n - 17 :] = False
    outs, grads = [], []
    for m in (fla, ref):
        xi = x.clone().requires_grad_(True)
        out = m(xi, padding_mask=mask)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert fla.uses_fla(x) and not ref.uses_fla(x)
    scale = outs[1].abs().max()
    assert (outs[0] - outs[1]).abs().max() <= 2e-3 * scale
    for g_fla, g_ref in zip(grads[0], grads[1]):
        assert (g_fla - g_ref).abs().max() <= 5e-3 * g_ref.abs().max()


@needs_fla
def test_fla_function_matches_float64_on_cuda():
    """:func:`fla_causal_linear_attention` in float32 against the chunked form in float64."""
    q, k, v = _features(b=2, h=8, n=1000, d=64, e=64, dtype=torch.float64, device="cuda")
    want = lin.causal_linear_attention(q, k, v, 64, 1e-6)
    got = lin.fla_causal_linear_attention(q.float(), k.float(), v.float(), 1e-6)
    assert (got.double() - want).abs().max() <= 2e-3 * want.abs().max()
