# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fourth session, "1d"); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
usage: causal_chunks_keys.py B H T D CHUNK ROUNDS (the flash backward whole, in query chunks, and in key chunks)"""

import sys, time, statistics, torch

from _flash_setup import B, H, T, d, c, fa, fb, q, k, v, g, o, l
from attnlab.attention.causal_chunks import _diagonal_mask, _bounds


def full():
    return fb(g, q, k, v, o, l, 0.0, True)


def qchunk():
    dq = torch.empty(B, T, H, d).transpose(1, 2)
    dk = dv = None
    bounds = _bounds(T, c)
    for s, e in reversed(bounds):
        gq, gk, gv = fb(
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
        dq[:, :, s:e] = gq
        if dk is None:
            dk, dv = gk, gv
        else:
            dk[:, :, :e] += gk
            dv[:, :, :e] += gv
    return dq, dk, dv


def kchunk():
    dk = torch.empty(B, T, H, d).transpose(1, 2)
    dv = torch.empty(B, T, H, d).transpose(1, 2)
    dq = None
    for s, e in _bounds(T, c):
        gq, gk, gv = fb(
            g[:, :, s:],
            q[:, :, s:],
            k[:, :, s:e],
            v[:, :, s:e],
            o[:, :, s:],
            l[:, :, s:],
            0.0,
            True,
        )
        dk[:, :, s:e] = gk
        dv[:, :, s:e] = gv
        if dq is None:
            dq = gq
        else:
            dq[:, :, s:] += gq
    return dq, dk, dv


ref = full()
for f in (qchunk, kchunk):
    print(f.__name__, [round((a - b).abs().max().item(), 7) for a, b in zip(f(), ref)])
fs = dict(full=full, qchunk=qchunk, kchunk=kchunk)
Tm = {k_: [] for k_ in fs}
for r in range(int(sys.argv[6])):
    for k_ in list(fs) if r % 2 else list(fs)[::-1]:
        t0 = time.perf_counter()
        fs[k_]()
        Tm[k_].append(time.perf_counter() - t0)
print(sys.argv[1:6], {k_: round(statistics.median(v_) * 1e3, 2) for k_, v_ in Tm.items()})
