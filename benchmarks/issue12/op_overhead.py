# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fourth session, "1d"). usage: op_overhead.py TOKENS"""

import ctypes, sys, time, statistics, torch

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 1 << 30)
libc.mallopt(-1, (1 << 31) - 1)
import attnlab.bench.blocks as B
from torch.profiler import profile, ProfilerActivity

torch.set_num_threads(2)
for L, C in [(2, 128), (4, 256)]:
    shape = dict(layers=L, heads=4, d_model=C, context=int(sys.argv[1]), batch=1)
    x = torch.randint(0, 256, (1, shape["context"]))
    y = torch.randint(0, 256, x.shape)
    st = {}
    for row in ["reference", "modern", "nanogpt_like"]:
        torch.manual_seed(0)
        m = B.build(row, shape, 256)
        st[row] = B.make_step(m, torch.device("cpu"), torch.float32)
        for _ in range(3):
            st[row](x, y)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            st[row](x, y)
        n_ops = sum(e.count for e in p.key_averages() if e.key.startswith("aten::"))
        print(row, "aten ops/step", n_ops)
    T = {r: [] for r in st}
    for i in range(40):
        for r in st:
            t0 = time.perf_counter()
            st[r](x, y)
            T[r].append(time.perf_counter() - t0)
    print(L, C, {r: round(statistics.median(v) * 1e3, 2) for r, v in T.items()})
