# ruff: noqa
"""Shared set-up of causal_chunks_fwd_bwd.py and causal_chunks_keys.py (argv B H T D CHUNK ...): glibc's mmap and
trim thresholds raised, 2 threads, the CPU flash kernel's forward/backward ops, q/k/v/g of that shape and the
forward's output o and log-sum-exp l."""

import ctypes, sys, torch

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 1 << 30)
libc.mallopt(-1, (1 << 31) - 1)

torch.set_num_threads(2)
fa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
fb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
B, H, T, d = map(int, sys.argv[1:5])
c = int(sys.argv[5])
qkv = torch.randn(B, T, 3, H, d)
q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
g = torch.randn(B, T, H, d).transpose(1, 2)
o, l = fa(q, k, v, 0.0, True)
