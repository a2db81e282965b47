"""Generation cost: seconds per generated token against its position.

A small :class:`~attnlab.models.LanguageModel` (``max_len`` = the largest position + 1,
eval mode, greedy) is decoded three ways:

- ``<variant>_step``: ``Backbone.step`` per token, as ``LanguageModel.generate`` does with
  ``use_cache=True`` -- a KV cache for softmax (cost grows with the position), the
  recurrent state ``(S, z)`` for linear attention (Katharopoulos et al. 2020, eq. 18-20;
  constant cost);
- ``<variant>_recompute``: ``generate(..., use_cache=False)``, which re-runs the backbone
  on the whole prefix for every token (the naive loop).

The time at position ``p`` is the token predicted from ``p`` tokens of context: for the
step modes the median over the ``window`` steps ending at ``p``; for recompute the median
over ``recompute_repeats`` calls with a ``p``-token prompt and one new token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from attnlab.models import Backbone, LanguageModel, sample


def build_lm(
    partial: Callable[..., nn.Module], g: dict, max_len: int, uses_qk: bool
) -> LanguageModel:
    """The benchmark LM: modern block, RoPE where the variant has q·k, else learned positions."""
    torch.manual_seed(0)
    backbone = Backbone(
        g["vocab_size"],
        partial,
        max_len=max_len,
        causal=True,
        d_model=g["d_model"],
        n_layers=g["n_layers"],
        n_heads=g["n_heads"],
        positions="rope" if uses_qk else "learned",
        dropout=0.0,
    )
    return LanguageModel(backbone, g["vocab_size"]).eval()


@torch.no_grad()
def step_times(model: LanguageModel, n_tokens: int) -> list[float]:
    """Seconds per decoded token for positions ``1 .. n_tokens`` (step + head + argmax)."""
    bb = model.backbone
    states = bb.init_state(1, bb.embed.weight.device, bb.embed.weight.dtype)
    tok = torch.zeros(1, dtype=torch.long, device=bb.embed.weight.device)
    times = []
    for pos in range(n_tokens):
        t0 = time.perf_counter()
        hidden, states = bb.step(tok, states, pos)
        tok = sample(model.head(hidden), 0.0, None)
        times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def recompute_time(model: LanguageModel, p: int, repeats: int) -> float:
    """Median seconds of ``generate(prompt of p tokens, 1 new token, use_cache=False)``."""
    ids = torch.randint(0, model.head.out_features, (1, p))
    model.generate(ids, 1, temperature=0.0, use_cache=False)  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(ids, 1, temperature=0.0, use_cache=False)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def generation(
    partials: dict[str, Callable[..., nn.Module]], g: dict, log: Callable[[str], None] = print
) -> dict[str, dict[int, float]]:
    """``{mode: {position: seconds per token}}`` for every variant in ``partials``."""
    positions = sorted(int(p) for p in g["positions"])
    top, out = max(positions), {}
    for name, part in partials.items():
        probe = part(d_model=g["d_model"], n_heads=g["n_heads"], causal=True, max_len=top + 1)
        model = build_lm(part, g, top + 1, probe.uses_qk)
        if model.backbone.supports_step:
            step_times(model, min(top, 16))  # warm-up: lazy initialisation off the clock
            times = step_times(model, top)
            w = int(g["window"])
            out[f"{name}_step"] = {
                p: statistics.median(times[max(0, p - w) : p]) for p in positions
            }
        out[f"{name}_recompute"] = {
            p: recompute_time(model, p, int(g["recompute_repeats"])) for p in positions
        }
        for mode in (f"{name}_step", f"{name}_recompute"):
            if mode in out:
                cells = "  ".join(f"p={p}: {t * 1e3:.3f} ms" for p, t in out[mode].items())
                log(f"  {mode:22} {cells}")
    return out
