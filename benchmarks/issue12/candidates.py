# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fifth session, "1e"); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
Candidate changes measured by candidates_ab.py and not adopted: RMSNorm backward with a mat-vec in place of vecdot,
q/k rotated in place in the qkv projection output, SwiGLU without a saved silu(a)."""
import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from attnlab import layers as L
from attnlab.attention import base as AB

class RMSmv(L._RMSNormFunction):  # the committed forward; only the backward differs
    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        nx, nw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gw, _ = torch.ops.aten.native_layer_norm_backward(grad, x, [d], torch.zeros_like(rstd), rstd, weight, None, [nx, nw, False])
        if nx:
            dots = torch.mv(grad.reshape(-1, d), weight).view(rstd.shape)
            gx.add_(dots.mul_(rstd).div_(d))
        return gx, gw, None

class ProjRot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, table, table_conj, n_heads):
        b, n, D = x.shape
        c = weight.shape[0] // 3
        x2 = x.reshape(-1, D)
        qkv = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        qkv = qkv.view(b, n, 3 * c)
        L._as_complex(qkv[..., : 2 * c]).mul_(table)
        ctx.save_for_backward(x2, weight)
        ctx.table_conj, ctx.has_bias, ctx.x_shape = table_conj, bias is not None, x.shape
        q, k, v = (t.view(b, n, n_heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        return q, k, v
    @staticmethod
    @once_differentiable
    def backward(ctx, gq, gk, gv):
        x2, weight = ctx.saved_tensors
        ref = next(g for g in (gq, gk, gv) if g is not None)
        b, h, n, d = ref.shape; c = h * d
        out = torch.empty(b, n, 3 * c, dtype=ref.dtype)
        table = ctx.table_conj.view(n, 2, c // 2)
        for i, g in enumerate((gq, gk)):
            dst = out[..., i * c:(i + 1) * c]
            if g is None: dst.zero_()
            else:
                src = L._as_complex(g.transpose(1, 2).reshape(b, n, c))
                torch.mul(src, table[:, i], out=torch.view_as_complex(dst.unflatten(-1, (-1, 2))))
        dv = out[..., 2 * c:].view(b, n, h, d)
        if gv is None: dv.zero_()
        else: dv.copy_(gv.transpose(1, 2))
        g2 = out.view(-1, 3 * c)
        gx = torch.mm(g2, weight).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        gw = torch.mm(g2.t(), x2) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None

def project_inplace(self, x, offset=0):
    if self.rotary is not None and self._pair_path(x):
        order = self.rope_order
        weight = self.qkv.weight.index_select(0, order)
        bias = None if self.qkv.bias is None else self.qkv.bias.index_select(0, order)
        n = x.shape[1]
        table, conj = self.rotary.pair_tables(offset + n, 2 * self.n_heads, x.device, x.dtype)
        return ProjRot.apply(x, weight, bias, table[offset:offset + n], conj[offset:offset + n], self.n_heads)
    return AB.QKVAttention.project(self, x, offset)

class SwiNoSave(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        hidden = weight.shape[0] // 2
        x2 = x.reshape(-1, x.shape[-1])
        a, b = torch.mm(x2, weight[:hidden].t()), torch.mm(x2, weight[hidden:].t())
        gate = F.silu(a).mul_(b)
        ctx.save_for_backward(x2, weight, a, b)
        ctx.x_shape = x.shape
        return gate.view(*x.shape[:-1], hidden)
    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x2, weight, a, b = ctx.saved_tensors
        hidden = weight.shape[0] // 2
        g = grad.reshape(-1, hidden)
        grad_a = b.mul_(g)
        torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)
        grad_b = F.silu(a, inplace=True).mul_(g)
        gx = torch.mm(grad_a, weight[:hidden]).addmm_(grad_b, weight[hidden:]).view(ctx.x_shape)
        gw = torch.empty_like(weight)
        torch.mm(grad_a.t(), x2, out=gw[:hidden]); torch.mm(grad_b.t(), x2, out=gw[hidden:])
        return gx, gw, None

def apply(model, which):
    import types
    for mod in model.modules():
        if "rms" in which and isinstance(mod, L.RMSNorm):
            mod.forward = (lambda s: (lambda x: RMSmv.apply(x, s.weight, s.eps)))(mod)
        if "rope" in which and isinstance(mod, AB.QKVAttention):
            mod.project = types.MethodType(project_inplace, mod)
        if "swi" in which and isinstance(mod, L.SwiGLU):
            mod.forward = (lambda s: (lambda x: s.down(SwiNoSave.apply(x, s.gate_up.weight, None))))(mod)
