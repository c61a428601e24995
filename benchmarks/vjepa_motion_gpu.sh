#!/usr/bin/env bash
# One-GPU V-JEPA run on the generated camera-motion set under a wall-clock budget, then frozen attentive probes
# (motion and object labels) of the trained and of a random-init encoder of the same shape.
#   BUDGET=300 bash benchmarks/vjepa_motion_gpu.sh runs/vjepa_motion [key=value ...]
# PROBE_LAYERS="1 4": one probe per count of last blocks whose tokens are concatenated (features.layers);
# PROBE_ARGS: more eval overrides (e.g. "attentive.lrs=[0.0003,0.001,0.003]").
# Expects .gpu_data/motion.zip (jepa data make-motion --out motion_gpu ...; zipped) and .whl/decord-*.whl.
set -euo pipefail
RUN=$1; shift
BUDGET=${BUDGET:-300}
CFG=configs/vjepa/vit_s8_motion.yaml
export PYTHONUNBUFFERED=1
mkdir -p "$(dirname "$RUN")"
python3 -c "import decord" 2>/dev/null || python3 -m pip install -q --no-deps .whl/decord-*.whl
if [ ! -f .gpu_data/motion/train.csv ]; then
  (cd .gpu_data && rm -rf motion motion_gpu && python3 -m zipfile -e motion.zip . && mv motion_gpu motion)
fi
python3 train.py --config "$CFG" trainer.max_steps=60 trainer.output_dir="$RUN.probe" trainer.log_every=30 \
  trainer.progress_bar=false monitor.knn_every=0 monitor.bank_per_class=2 monitor.query_per_class=2 "$@" \
  > "$RUN.probe.log" 2>&1
SPS=$(grep -oP 'samples/s \K[0-9]+' "$RUN.probe.log" | tail -1)
BATCH=$(python3 -c "from jepa.config import load_config; import sys; c=load_config('$CFG', sys.argv[1:]); print(c.data.batch_size*c.trainer.grad_accum_steps)" "$@")
STEPS=$(( BUDGET * SPS / BATCH ))
echo "probe: ${SPS} clips/s -> trainer.max_steps=${STEPS} for ${BUDGET}s"
python3 train.py --config "$CFG" trainer.max_steps=$STEPS trainer.output_dir="$RUN" trainer.progress_bar=false \
  optim.warmup_steps=$(( STEPS / 10 )) trainer.checkpoint_every=$STEPS monitor.knn_every=0 "$@"
# a random-init encoder of the same shape: one step at learning rate 0 changes no weight (and the EMA copy neither)
python3 train.py --config "$CFG" trainer.max_steps=1 optim.lr=0 optim.start_lr=0 optim.final_lr=0 \
  trainer.output_dir="$RUN.random" trainer.progress_bar=false monitor.knn_every=0 "$@" > "$RUN.random.log" 2>&1
for LAYERS in ${PROBE_LAYERS:-1}; do
  for ENC in "$RUN" "$RUN.random"; do
    python3 -m jepa.cli eval attentive --encoder "$ENC" --data .gpu_data/motion --out "$RUN.eval" \
      "features.label_columns=[motion,object]" features.num_workers=12 features.progress_bar=false \
      features.layers=$LAYERS attentive.epochs=${PROBE_EPOCHS:-10} ${PROBE_ARGS:-}
  done
done
grep -h "kNN accuracy" "$RUN.random.log" || true
