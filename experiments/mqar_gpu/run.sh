#!/usr/bin/env bash
# The GPU grid of the MQAR studies, as run on the lent H200 (one command, all jobs in parallel
# on one GPU through Hydra's joblib launcher). Usage: experiments/mqar_gpu/run.sh <out dir>
# Environment: TRAINER (gpu), EPOCHS (4: 2,000 steps), JOBS (parallel jobs), EXTRA (overrides).
set -uo pipefail
OUT=${1:-multirun/mqar_gpu}
TRAINER=${TRAINER:-gpu}
EPOCHS=${EPOCHS:-4}
JOBS=${JOBS:-16}
EXTRA=${EXTRA:-}
ATTNLAB=${ATTNLAB:-attnlab}
mkdir -p "$OUT"
for study in mqar_heads mqar_variants; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  $ATTNLAB train -m +experiment=$study trainer=$TRAINER logger=csv \
    trainer.max_epochs=$EPOCHS trainer.enable_progress_bar=false \
    hydra/launcher=joblib hydra.launcher.n_jobs=$JOBS \
    hydra.sweep.dir="$OUT/$study" $EXTRA > "$OUT/$study.log" 2>&1
  echo "$study: exit $? in $(( $(date +%s) - start )) s"
  $ATTNLAB report "$OUT/$study" --out "$OUT/$study/report" --reach 0.9 > "$OUT/$study.report.txt" 2>&1
  tail -40 "$OUT/$study.report.txt"
done
