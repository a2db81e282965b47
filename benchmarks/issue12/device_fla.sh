#!/usr/bin/env bash
# Issue 12, item 4, on the lent GPU in one call: attnlab's causal linear attention against
# flash-linear-attention's chunked kernel (benchmarks/fla_linear.py) and the attention.kernel=fla
# tests (tests/test_linear_kernel.py). Needs .whl/ carried (fla-core, hydra-core, omegaconf,
# antlr4 wheels; the machine's python3 has torch, triton, einops, pytest). Logs go to $OUT.
#
# Triton compiles ~120 kernel configurations per dtype on fla's first call; two processes fill
# Triton's disk cache for bf16 and fp32 in parallel first (their autotuning results are not
# cached: FLA_CACHE_RESULTS=0), so the tests and the timed run then only autotune.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/fla_core-*.whl .whl/hydra_core-*.whl .whl/omegaconf-*.whl \
  .whl/antlr4_python3_runtime-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
start=$(date +%s); el() { echo "[$(( $(date +%s) - start )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)" || exit 1
el "warm-up (bf16 and fp32 in parallel)"
FLA_CACHE_RESULTS=0 timeout "${WARM_S:-270}" python3 benchmarks/fla_linear.py --warmup-only \
  --dtypes bf16 >"$OUT/warm_bf16.txt" 2>&1 &
FLA_CACHE_RESULTS=0 timeout "${WARM_S:-270}" python3 benchmarks/fla_linear.py --warmup-only \
  --dtypes fp32 >"$OUT/warm_fp32.txt" 2>&1 &
wait
tail -n 5 "$OUT"/warm_*.txt
el "tests"
timeout "${TEST_S:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_linear_kernel.py 2>&1 |
  tee "$OUT/pytest.txt" | tail -n 15
el "bench"
timeout "${BENCH_S:-180}" python3 benchmarks/fla_linear.py 2>&1 | tee "$OUT/fla.txt"
el "done"
