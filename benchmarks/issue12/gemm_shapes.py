# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, second session); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2. Kept as it was run."""

import time, statistics, torch, ctypes

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 1 << 30)
libc.mallopt(-1, (1 << 31) - 1)
torch.set_num_threads(2)
import sys

M, C = (16384, 128) if sys.argv[1] == "small" else (8192, 256)
H = 8 * ((8 * C // 3 + 7) // 8)
x = torch.randn(M, C)
W = torch.randn(2 * H, C)
Wd = torch.randn(C, H)
g = torch.randn(M, C)
hT = torch.randn(H, M)
h = torch.randn(M, H)
gabT = torch.randn(2 * H, M)
ga = torch.randn(M, H)
gb = torch.randn(M, H)
W4 = torch.randn(4 * C, C)
Wp = torch.randn(C, 4 * C)
h4 = torch.randn(M, 4 * C)
cases = {
    "fwd gate: 2x mm(x,w.t) N=H": lambda: (torch.mm(x, W[:H].t()), torch.mm(x, W[H:].t())),
    "fwd gate: mm(W,x.t) (2H,M)": lambda: torch.mm(W, x.t()),
    "fwd gate: mm(x,W.t) N=2H": lambda: torch.mm(x, W.t()),
    "ref fc: mm(x,W4.t)": lambda: torch.mm(x, W4.t()),
    "down fwd: mm(h,Wd.t)": lambda: torch.mm(h, Wd.t()),
    "down fwd: mm(hT.t,Wd.t)": lambda: torch.mm(hT.t(), Wd.t()),
    "ref proj fwd mm(h4,Wp.t)": lambda: torch.mm(h4, Wp.t()),
    "bwd gradhT: mm(Wd.t,g.t)": lambda: torch.mm(Wd.t(), g.t()),
    "bwd gradh: mm(g,Wd)": lambda: torch.mm(g, Wd),
    "bwd gx: mm(gabT.t,W) K=2H": lambda: torch.mm(gabT.t(), W),
    "bwd gx: mm+addmm K=H": lambda: torch.mm(ga, W[:H]).addmm_(gb, W[H:]),
    "bwd gW: mm(gabT,x)": lambda: torch.mm(gabT, x),
    "bwd gW: 2x mm(ga.t,x)": lambda: (torch.mm(ga.t(), x), torch.mm(gb.t(), x)),
    "bwd gWd: mm(g.t,hT.t)": lambda: torch.mm(g.t(), hT.t()),
    "bwd gWd: mm(g.t,h)": lambda: torch.mm(g.t(), h),
}
ts = {k: [] for k in cases}
for r in range(15):
    for k, f in cases.items():
        t0 = time.perf_counter()
        f()
        ts[k].append(time.perf_counter() - t0)
for k in cases:
    print(f"{k:30} {statistics.median(ts[k]) * 1e3:7.2f}")
