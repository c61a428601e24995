#!/usr/bin/env bash
# One GPU vs DDP vs FSDP2 on a two-GPU machine (configs/accelerate/), I-JEPA on Imagenette (.gpu_data/imagenette):
#   curve       ViT-S/16 at 128 px, 200 steps at global batch 256: 1 GPU x 256 | DDP 2 x 128 | FSDP 2 x 128
#               (loss per 20-step window; the three see different crops, masks and shards: statistically equal)
#   scaling     ViT-B/16 at 224 px, batch 128 per GPU: 1 GPU vs DDP on 2 (img/s, scaling efficiency)
#   sharding    ViT-H/14 at 224 px, batch 128 per GPU: DDP vs FSDP on 2 (img/s, peak GiB of the main GPU)
# then exports the FSDP ViT-S checkpoint (pytorch_model_fsdp.bin + the sharded-then-gathered EMA teacher) with
# `jepa export`, and prints the tables (benchmarks/multi_gpu_report.py).
#   bash benchmarks/multi_gpu.sh [OUT]        (default OUT: outputs/multi_gpu; DATA=... for another image folder)
# About 15 minutes on 2 x H200 (three ViT-S runs of 200 steps, two ViT-B and two ViT-H runs of 60 / 40 steps, each
# start ~30 s); every log is kept in OUT/<run>.log.
set -euo pipefail
OUT=${1:-outputs/multi_gpu}
DATA=${DATA:-.gpu_data/imagenette}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

launch() {  # launch <run name> <accelerate config> <processes> <train.py arguments...>
  local name=$1 config=$2 processes=$3
  shift 3
  rm -rf "${OUT:?}/$name"
  echo "== $name: $config x $processes"
  accelerate launch --config_file "configs/accelerate/$config.yaml" --num_processes "$processes" train.py "$@" \
    data.root="$DATA" trainer.output_dir="$OUT/$name" trainer.progress_bar=false trainer.plot=false \
    monitor.knn_every=0 > "$OUT/$name.log" 2>&1 || { tail -40 "$OUT/$name.log"; exit 1; }
}

S16=(--config configs/ijepa/vit_s16_imagenette.yaml trainer.max_steps=200 optim.warmup_steps=40
     trainer.log_every=1 trainer.checkpoint_every=200)
launch curve_1gpu single_gpu 1 "${S16[@]}" data.batch_size=256
launch curve_ddp ddp 2 "${S16[@]}" data.batch_size=128
launch curve_fsdp fsdp 2 "${S16[@]}" data.batch_size=128

B16=(--config configs/ijepa/vit_b16_in1k.yaml trainer.max_steps=60 trainer.log_every=10 optim.warmup_steps=10
     data.batch_size=128 monitor.bank_per_class=5 monitor.query_per_class=5)
launch b16_1gpu single_gpu 1 "${B16[@]}"
launch b16_ddp ddp 2 "${B16[@]}"

H14=(--config configs/ijepa/vit_h14_in1k.yaml trainer.max_steps=40 trainer.log_every=10 optim.warmup_steps=10
     data.batch_size=128 monitor.bank_per_class=5 monitor.query_per_class=5)
launch h14_ddp ddp 2 "${H14[@]}"
launch h14_fsdp fsdp 2 "${H14[@]}"

# the FSDP checkpoint exports like any other (whole weights in pytorch_model_fsdp.bin / target_encoder.safetensors)
rm -rf "$OUT/curve_fsdp_export"
python3 -m jepa.cli export --ckpt "$OUT/curve_fsdp" --to timm --out "$OUT/curve_fsdp_export" \
  > "$OUT/curve_fsdp_export.log" 2>&1 && echo "export of the FSDP checkpoint: ok ($OUT/curve_fsdp_export)" \
  || { echo "export of the FSDP checkpoint FAILED:"; tail -20 "$OUT/curve_fsdp_export.log"; }

python3 benchmarks/multi_gpu_report.py "$OUT" | tee "$OUT/report.md"
