"""attnlab's causal linear attention against flash-linear-attention's chunked Triton kernel (GPU).

    python benchmarks/fla_linear.py                       # n = 2k..16k, bf16 and fp32
    python benchmarks/fla_linear.py --lengths 2048 4096 --dtypes bf16 --batch 1
    python benchmarks/fla_linear.py --warmup-only --dtypes fp32   # compile + autotune only

Triton compiles and autotunes fla's kernels on their first call for each dtype (about 120
configurations for forward + backward); the time of that first call is printed per dtype
(``compile s``) and is not in the timings. ``--warmup-only`` makes only that first call, to fill
Triton's on-disk cache from parallel processes before the timed run.

Needs CUDA and ``pip install flash-linear-attention`` (or ``fla-core``; brings Triton). On a
machine without CUDA or without fla it prints why and exits with status 1.

What is compared (both on the same features, forward + backward, median of ``--repeats``):

- attnlab: :func:`attnlab.attention.linear.causal_linear_attention` (chunked prefix sums,
  ``chunk_size`` 64) on ``phi(q), phi(k), v`` in float32, as ``LinearAttention`` runs it under
  bf16 autocast (its sums stay float32): ``out_i = sum_{j<=i} (phi_i·phi_j) v_j /
  (sum_{j<=i} phi_i·phi_j + eps)``, eps 1e-6 (Katharopoulos et al. 2020, eq. 9);
- fla: :func:`attnlab.attention.linear.fla_causal_linear_attention` (what ``attention.kernel=fla``
  runs): ``fla.ops.linear_attn.chunk_linear_attn(q, k, v, scale=1.0, normalize=False)`` on the
  same ``phi(q), phi(k), v`` in ``--dtypes`` (fla applies no feature map of its own) gives the
  *numerator* ``sum_{j<=i} (phi_i·phi_j) v_j``; the denominator ``phi_i · cumsum_j phi_j + eps``
  is one cumsum in float32. ``LinearAttention`` calls it with float32 features (the
  ``fp32`` rows); fla's ``tl.dot`` runs float32 as TF32. Layout ``[B, T, H, K]``.

max |diff| is against a float64 evaluation of the same formula (attnlab's chunked function in
float64) on the forward output, for both implementations; the table also gives fla vs attnlab.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from attnlab.attention.linear import causal_linear_attention, fla_causal_linear_attention


def _fla():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as err:  # ImportError, or Triton failing to initialise
        sys.exit(
            f"flash-linear-attention is not importable ({type(err).__name__}: {err}); "
            "pip install 'attnlab[fla]' (fla-core; CUDA + Triton) and rerun."
        )
    return chunk_linear_attn


def fla_causal(fn, q, k, v, eps: float = 1e-6):
    """attnlab's fla path on ``(B, T, H, K)`` inputs (transposed to ``(B, H, T, K)``)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return fla_causal_linear_attention(q, k, v, eps, kernel=fn).transpose(1, 2)


def attnlab_causal(q, k, v, eps: float = 1e-6):
    """attnlab's chunked form on ``(B, T, H, K)`` inputs (transposed to ``(B, H, T, K)``)."""
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    return causal_linear_attention(q, k, v, 64, eps).transpose(1, 2)


def timed(fn, *inputs, repeats: int) -> float:
    grad = None
    times = []
    for i in range(repeats + 1):
        for t in inputs:
            t.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*inputs)
        grad = torch.ones_like(out) if grad is None else grad
        out.backward(grad)
        torch.cuda.synchronize()
        if i:  # the first call compiles/autotunes
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup-only", action="store_true", help="compile + autotune, no timings")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/fla_linear.py needs a CUDA GPU (fla's kernels are Triton); none here.")
    t0 = time.perf_counter()
    fla = _fla()
    dev = torch.device("cuda")
    print(f"import fla: {time.perf_counter() - t0:.1f} s", flush=True)
    for name in args.dtypes:  # first call per dtype: Triton compiles and autotunes
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        shape = (args.batch, 256, args.heads, args.head_dim)
        q, k, v = (torch.rand(shape, device=dev, dtype=dtype, requires_grad=True) for _ in "qkv")
        t0 = time.perf_counter()
        fla_causal(fla, q, k, v).sum().backward()
        torch.cuda.synchronize()
        print(f"compile s ({name}, fwd+bwd first call): {time.perf_counter() - t0:.1f}", flush=True)
    if args.warmup_only:
        return
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"B={args.batch} H={args.heads} d={args.head_dim}, fwd+bwd, median of {args.repeats}")  # fmt: skip
    print(
        "| n | dtype | attnlab ms | fla ms | attnlab/fla | max|diff| attnlab vs fp64 "
        "| max|diff| fla vs fp64 | max|diff| fla vs attnlab |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in args.lengths:
        g = torch.Generator(device=dev).manual_seed(0)
        shape = (args.batch, n, args.heads, args.head_dim)
        raw = [torch.randn(shape, device=dev, generator=g) for _ in range(3)]
        q64, k64 = (F.elu(t.double()) + 1 for t in raw[:2])
        ref = attnlab_causal(q64, k64, raw[2].double()).double()
        for name in args.dtypes:
            dtype = torch.bfloat16 if name == "bf16" else torch.float32
            q, k = ((F.elu(t) + 1).to(dtype) for t in raw[:2])
            v = raw[2].to(dtype)
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
            try:
                t_a = timed(attnlab_causal, q, k, v, repeats=args.repeats)
                out_a = attnlab_causal(q, k, v).detach().double()
            except torch.OutOfMemoryError:
                t_a, out_a = float("nan"), None
            torch.cuda.empty_cache()
            t_f = timed(lambda *x: fla_causal(fla, *x), q, k, v, repeats=args.repeats)
            out_f = fla_causal(fla, q, k, v).detach().double()
            d_a = f"{(out_a - ref).abs().max().item():.2e}" if out_a is not None else "oom"
            d_f = f"{(out_f - ref).abs().max().item():.2e}"
            d_fa = f"{(out_f - out_a).abs().max().item():.2e}" if out_a is not None else "-"
            print(f"| {n} | {name} | {t_a * 1e3:.2f} | {t_f * 1e3:.2f} | {t_a / t_f:.2f} | "
                  f"{d_a} | {d_f} | {d_fa} |", flush=True)  # fmt: skip
            del q, k, v, out_a, out_f
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
