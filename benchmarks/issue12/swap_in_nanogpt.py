# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, second session); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2. Kept as it was run."""

import os, ctypes

if os.environ.get("MALLOPT"):  # third session: glibc mmap/trim thresholds raised (no page faults)
    libc = ctypes.CDLL("libc.so.6")
    print("mallopt", libc.mallopt(-3, 1 << 30), libc.mallopt(-1, (1 << 31) - 1))
import sys, time, statistics, torch, math
import torch.nn.functional as F
from torch import nn
import attnlab.bench.blocks as B
from attnlab.layers import RMSNorm, SwiGLU
from attnlab.attention import SoftmaxAttention

torch.set_num_threads(2)
shape = (
    dict(layers=4, heads=4, d_model=256, context=256, batch=32)
    if sys.argv[1] == "big"
    else dict(layers=2, heads=4, d_model=128, context=256, batch=64)
)
C, H, L, T = shape["d_model"], shape["heads"], shape["layers"], shape["context"]


class Gelu(nn.Module):
    def __init__(s):
        super().__init__()
        s.c_fc = nn.Linear(C, 4 * C, bias=False)
        s.c_proj = nn.Linear(4 * C, C, bias=False)

    def forward(s, x):
        return s.c_proj(F.gelu(s.c_fc(x)))


def variant(norm, ffn, attn):
    torch.manual_seed(0)
    m = B.NanoGPT(256, C, L, H, T)
    for blk in m.h:
        if norm == "rms":
            blk.ln_1, blk.ln_2 = RMSNorm(C), RMSNorm(C)
        if attn == "attnlab":
            a = SoftmaxAttention(C, H, causal=True, rope=True, bias=False)
            blk.attn = a
        if ffn == "swiglu":
            blk.ffn = SwiGLU(C)
        else:
            blk.ffn = Gelu()
        blk.forward = (
            lambda blk: lambda x: (lambda x1: x1 + blk.ffn(blk.ln_2(x1)))(x + blk.attn(blk.ln_1(x)))
        )(blk)
    if norm == "rms":
        m.ln_f = RMSNorm(C)
    return m


rows = {f"{r}#{i}": variant(*r.split("/")) for i, r in enumerate(sys.argv[2].split(","))}
x = torch.randint(0, 256, (shape["batch"], T))
y = torch.randint(0, 256, x.shape)
steps = {r: B.make_step(m, torch.device("cpu"), torch.float32) for r, m in rows.items()}
for r in rows:
    for _ in range(2):
        steps[r](x, y)
T_ = {r: [] for r in rows}
names = list(rows)
import itertools, os

perms = list(itertools.permutations(names)) if len(names) <= 4 else [names]
if os.environ.get("ORDER") == "cyclic":  # the former bench order: rotations, so b always follows a
    perms = [tuple(names[i:] + names[:i]) for i in range(len(names))]
WARM = int(os.environ.get("WARM", "1"))
for i in range(int(sys.argv[3])):
    for r in perms[i % len(perms)]:
        for _ in range(WARM):
            steps[r](x, y)
        t0 = time.perf_counter()
        steps[r](x, y)
        T_[r].append(time.perf_counter() - t0)
base = T_[names[0]]
for r in names:
    ratios = [b / a for a, b in zip(T_[r], base)]
    print(
        f"{sys.argv[1]} {r:24} {statistics.median(T_[r]) * 1e3:7.1f} ms  speed vs first: median {statistics.median(ratios):.3f}"
    )
