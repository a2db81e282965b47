#!/usr/bin/env bash
# Everything run on the lent GPU machine in one call (its python3 has torch, lightning,
# torchmetrics, tokenizers, triton; the rest travels as wheels in .whl/). Writes into $OUT.
# Figures from it: benchmarks/README.md (CUDA rows) and experiments/mqar_gpu/README.md.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 WANDB_MODE=offline
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/work && mkdir -p $W
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
echo "== blocks (issue 12)"; t=$(date +%s)
timeout ${BENCH_S:-150} python3 -m attnlab.cli bench 'bench.parts=[blocks]' bench.device=cuda \
  bench.out_dir=$W/bench_blocks 2>&1 | tail -25
echo "blocks: $(( $(date +%s) - t )) s"
echo "== fla (issue 12)"; t=$(date +%s)
timeout ${FLA_S:-100} python3 benchmarks/fla_linear.py 2>&1 | tail -25
echo "fla: $(( $(date +%s) - t )) s"
echo "== MQAR grids (issue 11)"
ATTNLAB="python3 -m attnlab.cli" EPOCHS=${EPOCHS:-3} JOBS=${JOBS:-16} \
  timeout ${MQAR_S:-330} experiments/mqar_gpu/run.sh $W/mqar
tar czf $OUT/results.tgz -C $W --exclude='*.ckpt' --exclude='wandb' . 2>/dev/null
ls -la $OUT
