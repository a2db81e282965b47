# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, third session); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
MALLOPT=1 raises glibc's mmap and trim thresholds first (no page faults in the timed steps)."""

import os, ctypes, sys

if os.environ.get("MALLOPT"):
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30), libc.mallopt(-1, (1 << 31) - 1)
# usage: clean_ratio.py small|big ROUNDS   (reference vs modern, alternating order, 1 untimed + 1 timed step)
import sys, torch, time, statistics, resource
import attnlab.bench.blocks as B

torch.set_num_threads(2)
shape = (
    dict(layers=2, heads=4, d_model=128, context=256, batch=64)
    if sys.argv[1] == "small"
    else dict(layers=4, heads=4, d_model=256, context=256, batch=32)
)
x = torch.randint(0, 256, (shape["batch"], shape["context"]))
y = torch.randint(0, 256, x.shape)
steps = {}
for row in ("reference", "modern"):
    torch.manual_seed(0)
    m = B.build(row, shape, 256)
    steps[row] = B.make_step(m, torch.device("cpu"), torch.float32)
    for _ in range(3):
        steps[row](x, y)
T = {r: [] for r in steps}
PF = {r: [] for r in steps}
CPU = {r: [] for r in steps}
for i in range(int(sys.argv[2])):
    for r in list(steps) if i % 2 else list(steps)[::-1]:
        steps[r](x, y)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        steps[r](x, y)
        t1 = time.perf_counter()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        T[r].append(t1 - t0)
        PF[r].append(ru1.ru_minflt - ru0.ru_minflt)
        CPU[r].append((ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime))
for r in steps:
    print(
        r,
        "median ms",
        round(statistics.median(T[r]) * 1e3, 1),
        "minflt",
        statistics.median(PF[r]),
        "user/sys ms",
        [round(statistics.median(c[j] for c in CPU[r]) * 1e3, 1) for j in (0, 1)],
    )
print("ratio ref/mod time", statistics.median(a / b for a, b in zip(T["reference"], T["modern"])))
import statistics as S

for r in T:
    q = S.quantiles(T[r], n=4)
    print(r, "IQR/median %.3f" % ((q[2] - q[0]) / S.median(T[r])))
rat = [a / b for a, b in zip(T["reference"], T["modern"])]
q = S.quantiles(rat, n=4)
print("ratio quartiles", [round(v, 3) for v in q])
