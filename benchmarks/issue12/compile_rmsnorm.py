# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, second session); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2. Kept as it was run."""

import time, torch, statistics

torch.set_num_threads(2)
C = 128


def rms(x, w, eps: float = 1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


t0 = time.perf_counter()
f = torch.compile(rms, dynamic=True)
x = torch.randn(64, 256, C, requires_grad=True)
w = torch.ones(C, requires_grad=True)
g = torch.randn(64, 256, C)
y = f(x, w)
y.backward(g)
print("compile+first", time.perf_counter() - t0)
x2 = torch.randn(32, 100, C, requires_grad=True)
t0 = time.perf_counter()
f(x2, w).backward(torch.randn(32, 100, C))
print("new shape", time.perf_counter() - t0)
from attnlab.layers import RMSNorm

n = RMSNorm(C)
ln = torch.nn.LayerNorm(C, bias=False)
fns = {"compiled": lambda x: f(x, w), "ours": n, "ln": ln}
ts = {k: [] for k in fns}
for i in range(21):
    for k, fn in fns.items():
        x.grad = None
        t0 = time.perf_counter()
        fn(x).backward(g)
        ts[k].append(time.perf_counter() - t0)
for k in fns:
    print(k, statistics.median(ts[k]) * 1e3)
