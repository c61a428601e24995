#!/usr/bin/env bash
# The VL-JEPA benchmark's X-encoder: I-JEPA ViT-Ti/16 on Imagenette under a time budget, exported (safetensors) to
# $OUT/x_vit_t16 in bf16 (ViT-S/16 weights do not fit beside MiniLM in the device tool's 64 MiB; BENCHMARKS.md).
#   device: carry [".gpu_data/imagenette.zip"]; BUDGET=240 bash benchmarks/vljepa_x_gpu.sh
set -euo pipefail
BUDGET=${BUDGET:-240}
OUT=${OUT:-outputs/vl_gpu}
(cd .gpu_data && rm -rf imagenette && python3 -m zipfile -e imagenette.zip .)
BUDGET=$BUDGET bash benchmarks/ijepa_gpu_run.sh configs/ijepa/vit_t16_imagenette.yaml runs/x_vit_t16 "$@" \
  | grep -v "^train" | tail -40
python3 -m jepa.cli export --ckpt runs/x_vit_t16 --to safetensors --out "$OUT/x_vit_t16"
# files come back from the device at most 16 MiB each: the weights travel in bf16 (loading casts them back to fp32)
python3 -c "
import sys, torch; from safetensors.torch import load_file, save_file
path = sys.argv[1]; save_file({k: v.to(torch.bfloat16) for k, v in load_file(path).items()}, path)" \
  "$OUT/x_vit_t16/encoder.safetensors"
cp runs/x_vit_t16.probe.log "$OUT/" 2>/dev/null || true
