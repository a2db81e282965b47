# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, third session); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
The default glibc allocator (no thresholds set)."""

# usage: compile_vs_eager.py small|big ROUNDS: first two steps (compile) and median speed vs reference
import time, torch, statistics, sys
from attnlab.bench import blocks

torch.set_num_threads(2)
shape = (
    dict(layers=2, heads=4, d_model=128, context=256, batch=64)
    if sys.argv[1] == "small"
    else dict(layers=4, heads=4, d_model=256, context=256, batch=32)
)
x = torch.randint(0, 256, (shape["batch"], 256))
y = torch.randint(0, 256, x.shape)
steps = {}
for row in ["reference", "modern", "modernc"]:
    torch.manual_seed(0)
    m = blocks.build(row.rstrip("c") if row == "modernc" else row, shape, 256).train()
    if row == "modernc":
        m.compile()
    steps[row] = blocks.make_step(m, torch.device("cpu"), torch.float32)
    t0 = time.perf_counter()
    steps[row](x, y)
    steps[row](x, y)
    print(row, "first 2 steps %.1f s" % (time.perf_counter() - t0), flush=True)
ts = {r: [] for r in steps}
names = list(steps)
for i in range(int(sys.argv[2])):
    for row in names if i % 2 else names[::-1]:
        steps[row](x, y)
        t0 = time.perf_counter()
        steps[row](x, y)
        ts[row].append(time.perf_counter() - t0)
print({r: round(statistics.median(v) * 1e3) for r, v in ts.items()})
for r in names[1:]:
    print(
        r,
        "speed vs reference (median of ratios)",
        round(statistics.median(a / b for a, b in zip(ts["reference"], ts[r])), 3),
    )
