#!/usr/bin/env bash
# One-GPU I-JEPA run under a wall-clock budget: a short probe measures img/s, then the recipe runs with
# trainer.max_steps set so that training fits the budget (schedules end exactly at the last step).
#   BUDGET=480 bash benchmarks/ijepa_gpu_run.sh configs/ijepa/vit_s16_imagenette.yaml runs/s16 [key=value ...]
set -euo pipefail
CFG=$1; RUN=$2; shift 2
BUDGET=${BUDGET:-480}
mkdir -p "$(dirname "$RUN")"
export PYTHONUNBUFFERED=1
python3 train.py --config "$CFG" trainer.max_steps=120 trainer.output_dir="$RUN.probe" trainer.log_every=40 \
  trainer.progress_bar=false monitor.bank_per_class=5 monitor.query_per_class=5 "$@" > "$RUN.probe.log" 2>&1
IPS=$(grep -oP 'samples/s \K[0-9]+' "$RUN.probe.log" | tail -1)
BATCH=$(python3 -c "from jepa.config import load_config; import sys; c=load_config('$CFG', sys.argv[1:]); print(c.data.batch_size*c.trainer.grad_accum_steps)" "$@")
STEPS=$(( BUDGET * IPS / BATCH ))
echo "probe: ${IPS} img/s -> trainer.max_steps=${STEPS} for ${BUDGET}s"
python3 train.py --config "$CFG" trainer.max_steps=$STEPS trainer.output_dir="$RUN" trainer.progress_bar=false "$@"
