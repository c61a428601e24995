#!/usr/bin/env bash
# Frozen evaluations on Imagenette of a random-init ViT-S/16 and of a ViT-S/16 pretrained by
# configs/ijepa/vit_s16_imagenette.yaml under a wall-clock budget (benchmarks/ijepa_gpu_run.sh), one table.
#   BUDGET=300 bash benchmarks/eval_gpu.sh <data root> <work dir> <results dir>
set -euo pipefail
DATA=$1; WORK=$2; RESULTS=$3
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-300} bash benchmarks/ijepa_gpu_run.sh configs/ijepa/vit_s16_imagenette.yaml "$WORK/s16" \
  data.root="$DATA" | grep -E "^probe|^step [0-9]+: knn|^kNN"
for ENCODER in timm:vit_small_patch16_224 "$WORK/s16"; do
  for TASK in knn linear attentive lowshot; do
    python3 -m jepa.cli eval "$TASK" --encoder "$ENCODER" --data "$DATA" --out "$RESULTS" \
      features.img_size=128 features.num_workers=12 features.batch_size=512
  done
done
