"""fp32 vs bf16 matmul throughput on this CPU: why ``trainer.precision=auto`` asks the hardware.

    .venv/bin/python benchmarks/matmul_dtype.py              # what this CPU does
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/matmul_dtype.py
                                                             # as a CPU without AVX-512/bf16 would

Prints the CPU model, torch's CPU capability, oneDNN bf16 support, what ``precision=auto`` picks,
and GFLOP/s (2 n^3 flops per product, median of 5 timed products after 2 warm-ups) of an
n x n @ n x n matmul in float32 and bfloat16, with all of this process's torch threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnlab.hardware import cpu_capability, cpu_model, resolve_precision


def gflops(n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median GFLOP/s of ``a @ b`` for ``(n, n)`` matrices of ``dtype``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1024, help="matrix size (default 1024)")
    args = p.parse_args()
    choice = resolve_precision("auto", "cpu")
    print(
        f"cpu: {cpu_model()}; torch {torch.__version__}; capability {cpu_capability()}; "
        f"oneDNN bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; "
        f"threads {torch.get_num_threads()}"
    )
    print(f"precision=auto -> {choice.value} ({choice.reason})")
    fp32 = gflops(args.n, torch.float32)
    bf16 = gflops(args.n, torch.bfloat16)
    print(
        f"matmul {args.n}x{args.n}: float32 {fp32:.1f} GFLOP/s, bfloat16 {bf16:.1f} GFLOP/s "
        f"(bf16/fp32 = {bf16 / fp32:.3g})"
    )


if __name__ == "__main__":
    main()
