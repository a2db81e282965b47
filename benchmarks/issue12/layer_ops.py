# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12); run from the repo root
with .venv/bin/python. Kept as it was run."""

import time, statistics, torch, torch.nn.functional as F
from torch import nn
from attnlab.layers import RMSNorm, RotaryEmbedding, swiglu_gate

torch.set_num_threads(2)


def old_rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def bench(fns, make, reps=7):
    ts = {k: [] for k in fns}
    for r in range(reps):
        for k, f in fns.items():
            inp = make()
            t0 = time.perf_counter()
            out = f(*inp)
            out.backward(torch.ones_like(out))
            ts[k].append(time.perf_counter() - t0)
    base = None
    for k in fns:
        m = statistics.median(ts[k]) * 1e3
        print(f"  {k:22} {m:7.2f} ms")


C = 256
rms_nn, rms_new, ln = nn.RMSNorm(C, eps=1e-6), RMSNorm(C), nn.LayerNorm(C, bias=False)
print("norm (8192x256) fwd+bwd")
bench(
    {"nn.RMSNorm": rms_nn, "attnlab RMSNorm": rms_new, "LayerNorm(bias=False)": ln},
    lambda: (torch.randn(32, 256, C, requires_grad=True),),
)
rope = RotaryEmbedding(64)
cos, sin = rope.cos_sin(256, torch.device("cpu"), torch.float32)
cf, sf = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def qview():
    qkv = torch.randn(32, 256, 3 * C, requires_grad=True)
    return (qkv[..., :C].view(32, 256, 4, 64).transpose(1, 2),)


print("rope on q (32,4,256,64) view fwd+bwd")
bench({"old cat": lambda q: old_rope(q, cf[:256], sf[:256]), "new": lambda q: rope(q)}, qview)
print("gate (8192x1376 -> 688) vs gelu (8192x1024)")
bench(
    {
        "old silu*up": lambda ab: (lambda a, b: F.silu(a) * b)(*ab.chunk(2, -1)),
        "new swiglu_gate": swiglu_gate,
    },
    lambda: (torch.randn(32, 256, 1376, requires_grad=True),),
)
bench({"gelu 4x": F.gelu}, lambda: (torch.randn(32, 256, 1024, requires_grad=True),))
