#!/usr/bin/env bash
# VL-JEPA on the GPU machine: unpack .gpu_vl (benchmarks/pack_vl_gpu.py pack), then every predictor variant on
# easy-VQA and Flickr8k-1k with the X-encoder of benchmarks/vljepa_x_gpu.sh (.gpu_vl/x_vit_t16).
#   device: carry [".gpu_vl"]; STEPS_VQA=1500 STEPS_FLICKR=600 bash benchmarks/vljepa_gpu.sh [--variants a,b] [k=v ...]
set -euo pipefail
OUT=${OUT:-outputs/vl_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu_vl/easy_vqa-*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 benchmarks/pack_vl_gpu.py unpack --dir .gpu_vl
export OPENJEPA_MINILM_DIR=$PWD/.gpu_vl/minilm_fp32
python3 benchmarks/vljepa_gpu.py --x-encoder .gpu_vl/x_vit_t16 --flickr .gpu_vl/data/flickr8k-1k \
  --imagenette .gpu_vl/data/imagenette --out "$OUT" --steps-vqa "${STEPS_VQA:-1500}" \
  --steps-flickr "${STEPS_FLICKR:-600}" "$@"
