# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12); run from the repo root
with .venv/bin/python. Kept as it was run."""

import sys, resource, torch, functools, random
from attnlab.models import Backbone, SequenceClassifier
from attnlab.attention import SoftmaxAttention

prec, nshapes = sys.argv[1], int(sys.argv[2])
mult = int(sys.argv[3]) if len(sys.argv) > 3 else 1
torch.set_num_threads(2)


def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20


bb = Backbone(
    16000,
    functools.partial(SoftmaxAttention, dropout=0.0),
    d_model=64,
    n_layers=2,
    n_heads=4,
    max_len=512,
)
m = SequenceClassifier(bb, 2, "mean")
opt = torch.optim.AdamW(m.parameters())
ctx = (
    (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    if prec == "bf16"
    else (lambda: torch.autocast("cpu", enabled=False))
)
random.seed(0)
start = rss()
for i in range(nshapes):
    n = random.randint(100, 512)
    n = -(-n // mult) * mult
    ids = torch.randint(1, 16000, (32, n))
    mask = torch.ones(32, n, dtype=torch.bool)
    mask[:, n - 10 :] = False
    with ctx():
        out = m(ids, mask)
    out.float().sum().backward()
    opt.step()
    opt.zero_grad()
print(
    prec,
    nshapes,
    "mult",
    mult,
    f"start {start:.0f} MiB, now {rss():.0f}, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
)
