# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, second session); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2. Kept as it was run."""

import torch, time, statistics
from attnlab.layers import RotaryEmbedding

torch.set_num_threads(2)
for b, n, C, h in [(64, 256, 128, 4), (32, 256, 256, 4)]:
    d = C // h
    qkv = torch.randn(b, n, 3 * C)
    rope = RotaryEmbedding(d)
    cos, sin = rope.cos_sin(n, torch.device("cpu"), torch.float32)
    q = qkv[..., :C].view(b, n, h, d).transpose(1, 2)
    k = qkv[..., C : 2 * C].view(b, n, h, d).transpose(1, 2)
    tab = torch.polar(
        torch.ones(n, d // 2), torch.outer(torch.arange(n).float(), rope.inv_freq)
    )  # (n, d/2)
    tabE = tab[:, None, :].expand(n, 2 * h, d // 2).reshape(n, h * d)  # (n, 2h*d/2) complex
    out = torch.empty(b, n, 2 * C)

    def cur():
        return rope(q), rope(k)

    def cplx():
        xc = torch.view_as_complex(qkv[..., : 2 * C].unflatten(-1, (C, 2)))
        return torch.mul(xc, tabE, out=torch.view_as_complex(out.view(b, n, C, 2)))

    def cplx_alloc():
        xc = torch.view_as_complex(qkv[..., : 2 * C].unflatten(-1, (C, 2)))
        return xc * tabE

    def copy():
        return qkv[..., : 2 * C].clone()

    fns = dict(cur=cur, cplx=cplx, cplx_alloc=cplx_alloc, copy=copy)
    ts = {k: [] for k in fns}
    for _ in range(30):
        for kk, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[kk].append(time.perf_counter() - t0)
    print((b, n, C, h), {kk: round(statistics.median(v) * 1e3, 3) for kk, v in ts.items()})
