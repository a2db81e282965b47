# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, third session); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
MALLOPT=1 raises glibc's mmap and trim thresholds first (no page faults in the timed steps)."""

# usage: ffn_layouts.py D (128 or 256): SwiGLU as built (current) vs a prototype whose a, b, gate
# are (H, M) "feature-major" (fused-T) vs nanoGPT's GELU MLP, fwd+bwd, interleaved; median ms and
# median ratio current/x. glibc thresholds raised unless MALLOPT=0.
import ctypes, os

if os.environ.get("MALLOPT", "1") == "1":
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)
    libc.mallopt(-1, (1 << 31) - 1)
import torch, time, statistics, sys
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from attnlab.layers import SwiGLU

torch.set_num_threads(2)


class FusedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ab, w_down):
        H = w_down.shape[1]
        x2 = x.reshape(-1, x.shape[-1])  # (M, D)
        abT = torch.mm(w_ab, x2.t())  # (2H, M)
        aT, bT = abT[:H], abT[H:]
        sT = F.silu(aT)
        gT = sT * bT  # (H, M)
        out = torch.mm(gT.t(), w_down.t())  # (M, D)
        ctx.save_for_backward(x2, w_ab, w_down, abT, sT, gT)
        ctx.x_shape = x.shape
        return out.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        x2, w_ab, w_down, abT, sT, gateT = ctx.saved_tensors
        H = w_down.shape[1]
        go2 = go.reshape(-1, go.shape[-1])  # (M, D)
        gW_down = torch.mm(go2.t(), gateT.t())  # (D, H)
        gT = torch.mm(w_down.t(), go2.t())  # (H, M)
        aT, bT = abT[:H], abT[H:]
        u = torch.mul(gT, bT, out=gateT)  # g*b
        torch.mul(sT, gT, out=bT)  # grad_b
        torch.ops.aten.silu_backward.grad_input(u, aT, grad_input=aT)  # grad_a
        gx = torch.mm(abT.t(), w_ab)  # (M, D)
        gW_ab = torch.mm(abT, x2)  # (2H, D)
        return gx.view(ctx.x_shape), gW_ab, gW_down


D = int(sys.argv[1])
b, n = (64, 256) if D == 128 else (32, 256)
torch.manual_seed(0)
m = SwiGLU(D)
H = m.down.in_features
x = torch.randn(b, n, D, requires_grad=True)
go = torch.randn(b, n, D)


def cur():
    x.grad = None
    m.zero_grad(set_to_none=True)
    m(x).backward(go)


def fused():
    x.grad = None
    m.zero_grad(set_to_none=True)
    FusedFFN.apply(x, m.gate_up.weight, m.down.weight).backward(go)


# equivalence
cur()
ref = [x.grad.clone(), m.gate_up.weight.grad.clone(), m.down.weight.grad.clone()]
o1 = m(x)
fused()
got = [x.grad.clone(), m.gate_up.weight.grad.clone(), m.down.weight.grad.clone()]
o2 = FusedFFN.apply(x, m.gate_up.weight, m.down.weight)
print(
    "max diff out",
    (o1 - o2).abs().max().item(),
    "grads",
    [(r - g).abs().max().item() for r, g in zip(ref, got)],
)


def ab(fs, r=int(os.environ.get("R", 21))):
    for f in fs:
        f()
    T = [[] for _ in fs]
    for i in range(r):
        order = range(len(fs)) if i % 2 else reversed(range(len(fs)))
        for j in order:
            t = time.perf_counter()
            fs[j]()
            T[j].append(time.perf_counter() - t)
    med = [statistics.median(t) * 1e3 for t in T]
    rat = [statistics.median(a / b for a, b in zip(T[0], t)) for t in T]
    return med, rat


fc = torch.nn.Linear(D, 4 * D, bias=False)
pr = torch.nn.Linear(4 * D, D, bias=False)


def gelu():
    x.grad = None
    fc.zero_grad(set_to_none=True)
    pr.zero_grad(set_to_none=True)
    pr(F.gelu(fc(x))).backward(go)


print("median ms and median ratio (current/x):", ab([cur, fused, gelu]))
