"""Shared fixtures: attention variants enrol themselves from conf/attention/*.yaml."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate

from attnlab.config import available, compose

VARIANTS = available("attention")


@functools.cache
def _attention_cfg(name: str):
    return compose(f"attention/{name}").attention


def attention_partial(name: str, **overrides):
    """The partial that ``conf/attention/<name>.yaml`` instantiates to (with overrides)."""
    return functools.partial(instantiate(_attention_cfg(name)), **overrides)


def build_attention(name: str, d_model=32, n_heads=4, causal=False, max_len=64, rope=None, **kw):
    """Build variant ``name``; ``rope=None`` turns RoPE on where the variant has q·k."""
    part = attention_partial(name, **kw)
    if rope is None:
        probe = part(d_model=d_model, n_heads=n_heads, causal=causal, max_len=max_len)
        rope = probe.uses_qk
    torch.manual_seed(0)
    return part(d_model=d_model, n_heads=n_heads, causal=causal, max_len=max_len, rope=rope).eval()


def positions_for(name: str) -> str:
    """The positions a variant can use with the modern block: rope if it has q·k, else learned."""
    return "rope" if build_attention(name).uses_qk else "learned"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
