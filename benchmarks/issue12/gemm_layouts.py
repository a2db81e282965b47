# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, third session); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
MALLOPT=1 raises glibc's mmap and trim thresholds first (no page faults in the timed steps)."""

# usage: gemm_layouts.py: the FFN GEMMs of the current SwiGLU path (two N=344 GEMMs), one (M, 2H) GEMM,
# and a transposed (2H, M) layout, interleaved, 15 rounds, median ms; glibc thresholds raised.
import ctypes

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 1 << 30)
libc.mallopt(-1, (1 << 31) - 1)
import torch, time, statistics, sys

torch.set_num_threads(2)
M, D, H = 16384, 128, 344
x = torch.randn(M, D)
W = torch.randn(2 * H, D)
Wd = torch.randn(D, H)
A = torch.randn(M, H)
A2 = torch.randn(M, 2 * H)
AT = torch.randn(H, M)
ABT = torch.randn(2 * H, M)
go = torch.randn(M, D)
cases = {
    "cur fwd a,b: 2x mm(x, W_h.t())": lambda: (torch.mm(x, W[:H].t()), torch.mm(x, W[H:].t())),
    "T   fwd: mm(W, x.t()) -> (2H,M)": lambda: torch.mm(W, x.t()),
    "one fwd: mm(x, W.t()) -> (M,2H)": lambda: torch.mm(x, W.t()),
    "cur down fwd: mm(A, Wd.t())": lambda: torch.mm(A, Wd.t()),
    "T   down fwd: mm(AT.t(), Wd.t())": lambda: torch.mm(AT.t(), Wd.t()),
    "cur down gx: mm(go, Wd) (M,H)": lambda: torch.mm(go, Wd),
    "T   down gx: mm(Wd.t(), go.t()) (H,M)": lambda: torch.mm(Wd.t(), go.t()),
    "cur down gw: mm(go.t(), A)": lambda: torch.mm(go.t(), A),
    "T   down gw: mm(go.t(), AT.t())": lambda: torch.mm(go.t(), AT.t()),
    "cur gx: mm(A,W1)+addmm_(A,W3)": lambda: torch.mm(A, W[:H]).addmm_(A, W[H:]),
    "T   gx: mm(ABT.t(), W)": lambda: torch.mm(ABT.t(), W),
    "one gx: mm(A2, W)": lambda: torch.mm(A2, W),
    "cur gw: 2x mm(A.t(), x)": lambda: (torch.mm(A.t(), x), torch.mm(A.t(), x)),
    "T   gw: mm(ABT, x)": lambda: torch.mm(ABT, x),
    "one gw: mm(A2.t(), x)": lambda: torch.mm(A2.t(), x),
}
names = list(cases)
T = {k: [] for k in names}
for f in cases.values():
    f()
for i in range(15):
    for k in names if i % 2 else names[::-1]:
        t = time.perf_counter()
        cases[k]()
        T[k].append(time.perf_counter() - t)
for k in names:
    print(f"{k:40s} {statistics.median(T[k]) * 1e3:7.2f} ms")
