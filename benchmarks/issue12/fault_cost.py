# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fifth session, "1e"); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
usage: fault_cost.py -- an (8192, 688) multiply into a new buffer (minor faults counted) and in place, 6 times,
with glibc's mmap and trim thresholds raised (the first calls still fault while the heap grows)."""
import ctypes, resource, torch, time
libc = ctypes.CDLL("libc.so.6")
print("mmap thr", libc.mallopt(-3, 1 << 30), "trim", libc.mallopt(-1, (1 << 31) - 1))
torch.set_num_threads(2)
a = torch.randn(8192, 688); b = torch.randn(8192, 688)
for i in range(6):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t0 = time.perf_counter()
    c = a * b
    t1 = time.perf_counter(); f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a.mul_(b); t2 = time.perf_counter()
    print("mul %.2f ms faults %d   mul_ %.2f ms" % ((t1-t0)*1e3, f1-f0, (t2-t1)*1e3)); del c
