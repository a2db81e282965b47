# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, second session); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2. Kept as it was run."""

import sys, time, statistics, torch, resource
from torch import nn
import torch.nn.functional as F
from attnlab.layers import SwiGLU

torch.set_num_threads(2)
import os, ctypes

if os.environ.get("MALLOPT"):
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)
    libc.mallopt(-1, (1 << 31) - 1)
b, n, C = (64, 256, 128)


class Gelu(nn.Module):
    def __init__(s):
        super().__init__()
        s.c_fc = nn.Linear(C, 4 * C, bias=False)
        s.c_proj = nn.Linear(4 * C, C, bias=False)

    def forward(s, x):
        return s.c_proj(F.gelu(s.c_fc(x)))


x = torch.randn(b, n, C, requires_grad=True)
g = torch.randn(b, n, C)
mods = {"gelu": Gelu(), "swiglu": SwiGLU(C)}
stats = {k: [0, 0, 0, 0] for k in mods}
for i in range(30):
    for k, m in mods.items():
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        m(x).backward(g)
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if i >= 3:
            s = stats[k]
            s[0] += t1 - t0
            s[1] += r1.ru_utime - r0.ru_utime
            s[2] += r1.ru_stime - r0.ru_stime
            s[3] += r1.ru_minflt - r0.ru_minflt
for k, s in stats.items():
    print(
        f"{k:8} wall {s[0] / 27 * 1e3:7.2f} user {s[1] / 27 * 1e3:7.2f} sys {s[2] / 27 * 1e3:7.2f} faults {s[3] / 27:8.0f}"
    )
