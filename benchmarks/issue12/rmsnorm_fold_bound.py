# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fifth session, "1e"); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
usage: rmsnorm_fold_bound.py -- fwd+bwd of attnlab's RMSNorm, of the same norm without its weight (what folding the
weight into the next Linear would leave; not the same function) and of nn.LayerNorm, (8192, 256), median of 35."""
import torch, time, statistics
from torch import nn
from torch.autograd.function import once_differentiable
from attnlab import layers as L


class NoWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        d = x.shape[-1]
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d).add_(eps).rsqrt_()
        ctx.save_for_backward(x, r)
        return x * r

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, r = ctx.saved_tensors
        d = x.shape[-1]
        gx, _, _ = torch.ops.aten.native_layer_norm_backward(g, x, [d], torch.zeros_like(r), r, None, None, [True, False, False])
        gx.add_(g.sum(-1, keepdim=True).mul_(r).div_(d))
        return gx, None


torch.set_num_threads(2)
M, D = 8192, 256
x = torch.randn(M, D, requires_grad=True)
g = torch.randn(M, D)
rms, ln = L.RMSNorm(D), nn.LayerNorm(D, bias=False)
fns = {"RMSNorm": lambda: rms(x), "RMSNorm without weight": lambda: NoWeight.apply(x, 1e-6), "LayerNorm": lambda: ln(x)}
T = {k: [] for k in fns}
for i in range(40):
    for k, f in fns.items():
        t0 = time.perf_counter()
        f().backward(g)
        T[k].append(time.perf_counter() - t0)
for k in T:
    print(k, "fwd+bwd ms", round(statistics.median(T[k][5:]) * 1e3, 2))
