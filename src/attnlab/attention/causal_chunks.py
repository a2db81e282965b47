"""Causal softmax attention on the CPU whose backward runs in query chunks, skipping the masked
triangle.

``softmax(Q Kᵀ / sqrt(d) + causal mask) V`` (Vaswani et al. 2017, eq. 1). The forward is one call
of the CPU flash kernel that ``F.scaled_dot_product_attention(..., is_causal=True)`` runs
(``aten::_scaled_dot_product_flash_attention_for_cpu``), so outputs are SDPA's, bit for bit. The
backward cuts the queries into chunks of ``chunk`` rows: chunk ``i`` (queries
``[i c, (i+1) c)``) goes through the kernel's backward with only the keys ``[0, (i+1) c)`` it can
see, its diagonal block masked, and the forward's output and log-sum-exp rows of the chunk (a
row's log-sum-exp already covers all of its keys, so nothing is renormalised). The key and value
gradients of the chunks are summed. Gradients equal SDPA's to float rounding
(tests/test_causal_chunks.py).

Why: torch 2.13's CPU backward at a few hundred tokens computes much of the upper triangle that
the causal mask discards (its forward skips it). With 4 chunks ``(n + c) / 2n = 0.625`` of the
score blocks are left. Measured on a 2-core AMD EPYC run as AVX2, fp32, 2 threads, 16,384 tokens
per call (``benchmarks/README.md``, issue 12, "1d"): the backward of one layer at 256 tokens takes
0.77-0.89x SDPA's time, at 512 tokens 0.71-0.74x; a whole 2-layer d128 model trains 1.095x as
fast at 512 tokens and 1.00-1.02x at 256.

Used by :class:`~attnlab.attention.SoftmaxAttention` only where :func:`applies` holds: CPU,
float32 or bfloat16 without autocast, eager (not under ``torch.compile``), no dropout, square
causal attention (queries = keys) without any other mask, and a sequence longer than one chunk.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from attnlab.attention.base import causal_mask

_ops = torch.ops.aten
_HAVE_KERNEL = hasattr(_ops, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    _ops, "_scaled_dot_product_flash_attention_for_cpu_backward"
)
_MASKS: dict[tuple[int, int, torch.dtype], Tensor] = {}


def applies(q: Tensor, k: Tensor, chunk: int, dropout_p: float) -> bool:
    """Whether :func:`causal_attention` should run for q ``(b, h, n, d)``, k ``(b, h, m, d)``:
    a CPU float32/bfloat16 tensor in eager mode without autocast, ``n == m > chunk > 0`` and no
    dropout. Otherwise callers use ``F.scaled_dot_product_attention(..., is_causal=True)``."""
    return (
        _HAVE_KERNEL
        and chunk > 0
        and dropout_p == 0.0
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.shape[-2] == k.shape[-2] > chunk
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _diagonal_mask(start: int, stop: int, dtype: torch.dtype) -> Tensor:
    """Additive mask ``(stop - start, stop)`` of the queries ``[start, stop)`` over the keys
    ``[0, stop)``: 0 where :func:`~attnlab.attention.base.causal_mask` (queries aligned to the end
    of the keys) lets a query attend, ``-inf`` elsewhere (cached; a constant)."""
    key = (start, stop, dtype)
    mask = _MASKS.get(key)
    if mask is None:
        with torch.inference_mode(False), torch.no_grad():
            mask = torch.zeros(stop - start, stop, dtype=dtype)
            mask.masked_fill_(~causal_mask(stop - start, stop), float("-inf"))
        if len(_MASKS) > 256:
            _MASKS.clear()
        _MASKS[key] = mask
    return mask


def _bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


class _ChunkedCausal(torch.autograd.Function):
    """q, k, v ``(b, h, n, d)`` -> out ``(b, h, n, d)`` (memory laid out ``(b, n, h, d)``, the
    flash kernel's own output, so merging the heads is a view).

    Forward: one causal call of the flash kernel (its forward already skips the masked blocks).
    Backward: the kernel's backward per query chunk, with the forward's output and log-sum-exp
    rows of that chunk (a row's log-sum-exp is over all of its keys, which the chunk sees)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, chunk: int) -> Tensor:
        out, lse = _ops._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, None]:
        q, k, v, out, lse = ctx.saved_tensors
        b, h, n, d = q.shape
        layout = (b, n, h, d)  # (b, h, n, d) views of (b, n, h, d) buffers, as SDPA's grads
        dq = torch.empty(layout, dtype=q.dtype, device=q.device).transpose(1, 2)
        dk = dv = None
        bounds = _bounds(n, ctx.chunk)
        for i in reversed(range(len(bounds))):  # the last chunk sees every key: it writes first
            start, stop = bounds[i]
            first = start == 0
            mask = None if first else _diagonal_mask(start, stop, q.dtype)
            gq, gk, gv = _ops._scaled_dot_product_flash_attention_for_cpu_backward(
                grad[:, :, start:stop], q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop],
                out[:, :, start:stop], lse[:, :, start:stop], 0.0, first, attn_mask=mask,
            )  # fmt: skip
            dq[:, :, start:stop] = gq
            if dk is None:  # the last chunk's gradients cover every key: they are dk, dv
                dk, dv = gk, gv
            else:
                dk[:, :, :stop] += gk
                dv[:, :, :stop] += gv
        return dq, dk, dv, None


def causal_attention(q: Tensor, k: Tensor, v: Tensor, chunk: int = 64) -> Tensor:
    """Causal ``softmax(q kᵀ / sqrt(d)) v`` with its backward in query chunks of ``chunk`` rows.

    q, k ``(b, h, n, d)``, v ``(b, h, n, d_v)`` on the CPU -> ``(b, h, n, d_v)``: the output of
    ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``, and its gradients to float
    rounding.
    Raises ValueError when :func:`applies` does not hold (check it first).
    """
    if not applies(q, k, chunk, 0.0):
        raise ValueError(
            "causal_attention needs CPU float32/bfloat16 q, k of equal length > chunk > 0, in "
            "eager mode without autocast; use F.scaled_dot_product_attention(is_causal=True)."
        )
    return _ChunkedCausal.apply(q, k, v, int(chunk))
