# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fifth session, "1e"); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
usage: faults_by_op.py small|big reference|modern -- minor page faults of one training step, by ATen op (a TorchDispatchMode)"""
import sys, resource, collections, torch
from torch.utils._python_dispatch import TorchDispatchMode
import attnlab.bench.blocks as B
torch.set_num_threads(2)
shape = dict(layers=2, heads=4, d_model=128, context=256, batch=64) if sys.argv[1]=="small" else dict(layers=4, heads=4, d_model=256, context=256, batch=32)
row = sys.argv[2]
x = torch.randint(0, 256, (shape["batch"], shape["context"])); y = torch.randint(0, 256, x.shape)
torch.manual_seed(0)
m = B.build(row, shape, 256)
step = B.make_step(m, torch.device("cpu"), torch.float32)
for _ in range(3): step(x, y)
agg = collections.Counter(); cnt = collections.Counter()
class M(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = func(*args, **(kwargs or {}))
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if f1 > f0:
            o = out[0] if isinstance(out, (tuple, list)) and out else out
            shp = tuple(o.shape) if isinstance(o, torch.Tensor) else None
            agg[(str(func), shp)] += f1 - f0; cnt[(str(func), shp)] += 1
        return out
for rep in range(3):
    agg.clear(); cnt.clear()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with M():
        step(x, y)
    tot = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
print(row, "total faults", tot)
for k, v in agg.most_common(15): print(v, cnt[k], k)
