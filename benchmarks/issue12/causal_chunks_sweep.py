# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fourth session, "1d"); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
usage: causal_chunks_sweep.py HEAD_DIM ROUNDS LENGTHS CHUNKS (SDPA is_causal fwd+bwd vs causal_attention, B = 16384 / T, 4 heads)"""

import os, ctypes, sys, time, statistics

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 1 << 30)
libc.mallopt(-1, (1 << 31) - 1)
import torch
import torch.nn.functional as F
from attnlab.attention.causal_chunks import causal_attention

torch.set_num_threads(2)
H, d, rounds = 4, int(sys.argv[1]), int(sys.argv[2])
Ts = [int(t) for t in sys.argv[3].split(",")]
cs = [int(c) for c in sys.argv[4].split(",")]
for T in Ts:
    B = max(1, 16384 // T)
    qkv0 = torch.randn(B, T, 3 * H * d)
    g = torch.randn(B, T, H, d).transpose(1, 2)

    def run(c):
        qkv = qkv0.detach().requires_grad_()
        q, k, v = (t.view(B, T, H, d).transpose(1, 2) for t in qkv.split(H * d, -1))
        y = (
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if c == 0
            else causal_attention(q, k, v, c)
        )
        y.backward(g)
        return y, qkv.grad

    ref = run(0)
    cases = [0] + [c for c in cs if c < T]
    for c in cases[1:]:
        y, gr = run(c)
        assert (y - ref[0]).abs().max() < 1e-5 and (gr - ref[1]).abs().max() < 1e-4, c
    Tm = {c: [] for c in cases}
    for r in range(rounds):
        for c in cases if r % 2 else cases[::-1]:
            t0 = time.perf_counter()
            run(c)
            Tm[c].append(time.perf_counter() - t0)
    base = statistics.median(Tm[0])
    print(
        f"T={T} B={B} d={d} sdpa {base * 1e3:.1f} ms | "
        + " ".join(
            f"c{c}: {statistics.median(a / b for a, b in zip(Tm[c], Tm[0])):.3f}" for c in cases[1:]
        ),
        flush=True,
    )
