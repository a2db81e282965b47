# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, second session); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2. Kept as it was run."""

import sys, time, statistics, torch
import torch.nn.functional as F

torch.set_num_threads(2)
M, C = (16384, 128) if (len(sys.argv) < 2 or sys.argv[1] == "small") else (8192, 256)
H = 8 * ((8 * C // 3 + 7) // 8)
ab = torch.randn(M, 2 * H)
a, b = ab.chunk(2, -1)
g = torch.randn(M, H)
y = F.silu(a)
out = torch.empty_like(ab)
ga, gb = out.chunk(2, -1)
ac = a.contiguous()
bc = b.contiguous()
x4 = torch.randn(M, 4 * C)
g4 = torch.randn(M, 4 * C)
w = torch.randn(C)
gC = torch.randn(M, C)
o4 = torch.empty(M, 4 * C)
ops = {
    "silu(a) strided": lambda: F.silu(a),
    "silu(a) contig": lambda: F.silu(ac),
    "y*b": lambda: y * b,
    "mul(g,y,out=gb)": lambda: torch.mul(g, y, out=gb),
    "mul(g,b,out=ga)": lambda: torch.mul(g, b, out=ga),
    "silu_bwd inplace": lambda: torch.ops.aten.silu_backward.grad_input(ga, a, grad_input=ga),
    "silu_bwd new": lambda: torch.ops.aten.silu_backward(g, a),
    "empty_like(ab)": lambda: torch.empty_like(ab),
    "gelu(x4)": lambda: F.gelu(x4),
    "gelu(x4,out)": lambda: torch.ops.aten.gelu.out(x4, out=o4),
    "gelu_bwd": lambda: torch.ops.aten.gelu_backward(g4, x4),
    "mv gC@w": lambda: gC @ w,
    "mm gC@w[:,None]": lambda: gC @ w[:, None],
    "(gC*w).sum": lambda: (gC * w).sum(-1),
}
ts = {k: [] for k in ops}
for r in range(21):
    for k, f in ops.items():
        t0 = time.perf_counter()
        f()
        ts[k].append(time.perf_counter() - t0)
for k in ops:
    print(f"{k:18} {statistics.median(ts[k]) * 1e3:6.2f} ms")
