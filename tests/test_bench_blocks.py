"""The block comparison of ``attnlab bench`` (bench/blocks.py) and the memory probe process."""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

from attnlab.bench import blocks, kernels

SHAPE = {"layers": 2, "heads": 2, "d_model": 32, "context": 16, "batch": 2}


def test_reference_is_nanogpt_shaped_and_sizes_match():
    ref = blocks.build("reference", SHAPE, 64)
    assert all(not isinstance(m, torch.nn.Linear) or m.bias is None for m in ref.modules())
    assert ref.lm_head.weight is ref.wte.weight
    c, layers = SHAPE["d_model"], SHAPE["layers"]
    # N without wpe: wte (tied head) + per layer 12 C² + 2 C (LayerNorm weights) + ln_f
    assert blocks.count_params(ref) == 64 * c + layers * (12 * c * c + 2 * c) + c
    n = {row: blocks.count_params(blocks.build(row, SHAPE, 64)) for row in blocks.ROWS}
    assert abs(n["modern"] / n["reference"] - 1) < 0.05  # SwiGLU 8/3 width ~ a 4x MLP (+biases)
    assert blocks.flops_per_token(1000, SHAPE) == 6000 + 12 * layers * c * SHAPE["context"]


def test_compare_rows_ratios_and_table():
    s = {"vocab_size": 64, "rows": ["modern", "nanogpt_like", "reference_control"], "steps": 2,
         "warmup": 1, "rounds": 3}  # fmt: skip
    lines = []
    res = blocks.compare(SHAPE, s, torch.device("cpu"), torch.float32, log=lines.append)
    assert list(res["rows"]) == ["reference", "modern", "nanogpt_like", "reference_control"]
    assert res["ratios"]["reference"] == {"tokens": 1.0, "flops": 1.0, "tokens_ci": [1.0, 1.0]}
    for name, row in res["rows"].items():
        assert len(row["rounds_tokens_per_s"]) == 3 and row["tokens_per_s"] > 0
        assert torch.isfinite(torch.tensor(row["loss"]))
        lo, hi = res["ratios"][name]["tokens_ci"]
        assert lo <= res["ratios"][name]["tokens"] <= hi
    control, ref = res["rows"]["reference_control"], res["rows"]["reference"]
    assert control["params"] == ref["params"]  # the same model, trained on the same batches
    assert control["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert "| L2 H2 C32 T16 B2 | modern |" in lines[0]
    assert " – " in lines[0].splitlines()[3]  # the interval column is filled
    with pytest.raises(ValueError, match="rows"):
        blocks.build("gpt5", SHAPE, 64)


def test_memory_probe_runs_in_another_process():
    with kernels.MemoryProbe(timeout=60) as probe:
        assert probe._proc.pid != os.getpid()
        big = probe(partial(torch.ones, 64, 2**20))  # 256 MiB
        small = probe(partial(torch.ones, 8))
        assert isinstance(big, float) and isinstance(small, float)
        assert big > 200 and small < 50
        assert "not measured" in probe(lambda: None)  # a lambda cannot be pickled


def test_median_interval_covers_the_median_and_shrinks_with_rounds():
    g = torch.Generator().manual_seed(1)
    few = (1.0 + 0.05 * torch.randn(10, generator=g)).tolist()
    many = (1.0 + 0.05 * torch.randn(400, generator=g)).tolist()
    lo_f, hi_f = blocks.median_interval(few)
    lo_m, hi_m = blocks.median_interval(many)
    import statistics

    assert lo_f <= statistics.median(few) <= hi_f and lo_m <= statistics.median(many) <= hi_m
    assert lo_m < 1.0 < hi_m  # the true median of N(1, 0.05)
    assert hi_m - lo_m < (hi_f - lo_f) / 2  # 40x the rounds: a much narrower interval
    assert blocks.median_interval(few) == (lo_f, hi_f)  # seeded: reproducible from bench.json
    assert blocks.median_interval([0.97] * 5) == (0.97, 0.97)
    assert blocks.median_interval([1.2]) == (1.2, 1.2)
    with pytest.raises(ValueError, match="at least one"):
        blocks.median_interval([])
    with pytest.raises(ValueError, match="level"):
        blocks.median_interval(few, level=1.5)
