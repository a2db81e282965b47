# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fifth session, "1e"); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
usage: candidates_ab.py small|big ROUNDS rms|rope|swi[,...] -- the modern model as committed (base), an identical
second one (base2: the A/A control) and one with candidates.py applied (cand), every order in turn; MALLOPT=1 raises
glibc's mmap and trim thresholds first."""
import os, ctypes, sys, itertools
if os.environ.get("MALLOPT"):
    libc = ctypes.CDLL("libc.so.6"); libc.mallopt(-3, 1 << 30), libc.mallopt(-1, (1 << 31) - 1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, time, statistics, resource
import attnlab.bench.blocks as B
import candidates as cands
torch.set_num_threads(2)
shape = dict(layers=2, heads=4, d_model=128, context=256, batch=64) if sys.argv[1]=="small" else dict(layers=4, heads=4, d_model=256, context=256, batch=32)
which = sys.argv[3]
x = torch.randint(0, 256, (shape["batch"], shape["context"])); y = torch.randint(0, 256, x.shape)
steps, models = {}, {}
for row in ("base", "base2", "cand"):
    torch.manual_seed(0); m = B.build("modern", shape, 256)
    if row == "cand": cands.apply(m, which)
    models[row] = m
    steps[row] = B.make_step(m, torch.device("cpu"), torch.float32)
    for _ in range(3): steps[row](x, y)
for (n1, p1), (n2, p2) in zip(models["base"].named_parameters(), models["cand"].named_parameters()):
    assert torch.allclose(p1, p2, atol=1e-4), n1
T = {r: [] for r in steps}; PF = {r: [] for r in steps}
orders = list(itertools.permutations(steps))
for i in range(int(sys.argv[2])):
    for r in orders[i % len(orders)]:
        steps[r](x, y); f0 = resource.getrusage(0).ru_minflt; t0 = time.perf_counter(); steps[r](x, y); T[r].append(time.perf_counter() - t0); PF[r].append(resource.getrusage(0).ru_minflt - f0)
for r in T: print(r, "ms", round(statistics.median(T[r])*1e3, 1), "faults", statistics.median(PF[r]))
for r in ("base2", "cand"):
    rat = [a / b for a, b in zip(T["base"], T[r])]
    print(which, r, "speed vs base", round(statistics.median(rat), 4), [round(v, 3) for v in statistics.quantiles(rat, n=4)])
