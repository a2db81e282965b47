# ruff: noqa
"""Scratch measurement behind a figure in benchmarks/README.md (issue 12, fifth session, "1e"); run from
the repo root with .venv/bin/python, as AVX2: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.
usage: train_allocator.py train OVERRIDES... -- attnlab train, with glibc's mmap and trim thresholds raised first when MALLOPT=1"""
import os, ctypes, sys
if os.environ.get("MALLOPT"):
    libc = ctypes.CDLL("libc.so.6"); print("mallopt", libc.mallopt(-3, 1 << 30), libc.mallopt(-1, (1 << 31) - 1))
from attnlab.cli import main
sys.exit(main())
