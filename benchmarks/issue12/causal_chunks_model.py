# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fourth session, "1d"); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
usage: causal_chunks_model.py small|small512|big ROUNDS (a bench-blocks model with attention.cpu_causal_chunks on vs off, alternating)"""

import ctypes, os, sys, time, statistics, torch

if os.environ.get("MALLOPT"):
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)
    libc.mallopt(-1, (1 << 31) - 1)
import attnlab.bench.blocks as B
from attnlab.attention import SoftmaxAttention

torch.set_num_threads(2)
shape = (
    dict(layers=2, heads=4, d_model=128, context=512, batch=32)
    if sys.argv[1] == "small512"
    else dict(layers=2, heads=4, d_model=128, context=256, batch=64)
    if sys.argv[1] == "small"
    else dict(layers=4, heads=4, d_model=256, context=256, batch=32)
)
x = torch.randint(0, 256, (shape["batch"], shape["context"]))
y = torch.randint(0, 256, x.shape)
st = {}
for name, on in [("chunks", True), ("sdpa", False)]:
    torch.manual_seed(0)
    m = B.build(sys.argv[3] if len(sys.argv) > 3 else "modern", shape, 256)
    for mod in m.modules():
        if isinstance(mod, SoftmaxAttention):
            mod.cpu_causal_chunks = on
    st[name] = B.make_step(m, torch.device("cpu"), torch.float32)
    for _ in range(2):
        st[name](x, y)
T = {k: [] for k in st}
for i in range(int(sys.argv[2])):
    for k in list(st) if i % 2 else list(st)[::-1]:
        st[k](x, y)
        t0 = time.perf_counter()
        st[k](x, y)
        T[k].append(time.perf_counter() - t0)
r = [b / a for a, b in zip(T["chunks"], T["sdpa"])]
q = statistics.quantiles(r, n=4)
print(
    sys.argv[1],
    {k: round(statistics.median(v) * 1e3, 1) for k, v in T.items()},
    "speed chunks/sdpa median %.3f quartiles %.3f-%.3f" % (statistics.median(r), q[0], q[2]),
)
