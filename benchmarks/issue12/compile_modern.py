# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12); run from the repo root
with .venv/bin/python. Kept as it was run."""

import time, torch, statistics
from attnlab.bench import blocks

torch.set_num_threads(2)
shape = dict(layers=4, heads=4, d_model=256, context=256, batch=32)
x = torch.randint(0, 256, (32, 256))
y = torch.randint(0, 256, (32, 256))
steps = {}
for row in ["reference", "modern"]:
    torch.manual_seed(0)
    m = blocks.build(row, shape, 256).train()
    if row == "modern":
        m.compile()
    steps[row] = blocks.make_step(m, torch.device("cpu"), torch.float32)
    t0 = time.perf_counter()
    steps[row](x, y)
    steps[row](x, y)
    print(row, "first 2 steps", time.perf_counter() - t0, flush=True)
ts = {r: [] for r in steps}
for r in range(4):
    for row in steps:
        t0 = time.perf_counter()
        steps[row](x, y)
        steps[row](x, y)
        ts[row].append(time.perf_counter() - t0)
print(
    {r: statistics.median(v) for r, v in ts.items()},
    [a / b for a, b in zip(ts["reference"], ts["modern"])],
)
