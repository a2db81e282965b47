# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fourth session, "1d"); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
usage: causal_chunks_fwd_bwd.py B H T D CHUNK ROUNDS (the flash kernel's forward and backward, whole vs query-chunked)"""

import sys, time, statistics, torch

from _flash_setup import B, H, T, d, c, fa, fb, q, k, v, g, o, l
from attnlab.attention.causal_chunks import _diagonal_mask, _bounds


def fwd_full():
    fa(q, k, v, 0.0, True)


def bwd_full():
    fb(g, q, k, v, o, l, 0.0, True)


def fwd_chunk():
    for s, e in _bounds(T, c):
        fa(
            q[:, :, s:e],
            k[:, :, :e],
            v[:, :, :e],
            0.0,
            s == 0,
            attn_mask=None if s == 0 else _diagonal_mask(s, e, q.dtype),
        )


def bwd_chunk():
    for s, e in _bounds(T, c):
        fb(
            g[:, :, s:e],
            q[:, :, s:e],
            k[:, :, :e],
            v[:, :, :e],
            o[:, :, s:e],
            l[:, :, s:e],
            0.0,
            s == 0,
            attn_mask=None if s == 0 else _diagonal_mask(s, e, q.dtype),
        )


f = dict(fwd_full=fwd_full, fwd_chunk=fwd_chunk, bwd_full=bwd_full, bwd_chunk=bwd_chunk)
for x in f.values():
    x()
Tm = {k_: [] for k_ in f}
for r in range(int(sys.argv[6])):
    for k_ in f:
        t0 = time.perf_counter()
        f[k_]()
        Tm[k_].append(time.perf_counter() - t0)
print(sys.argv[1:6], {k_: round(statistics.median(v_) * 1e3, 2) for k_, v_ in Tm.items()})
