#!/bin/bash
# Study D (issue 10): the paper preset on the lesion test bed, on one GPU, as many variants
# as fit. Also times paper-preset training steps (bench/train_speed.py).
#   DATA=.dev/testbed OUTDIR=.dev/D RESULTS=/tmp/d BUDGET_S=330 EPOCHS=8 ITERS=50 [SKIP_SPEED=1] bash bench/study_d.sh
# Expects monai and SimpleITK importable (on a bare GPU image: carried wheels on PYTHONPATH).
set -u
DATA=${DATA:-.dev/testbed}; OUTDIR=${OUTDIR:-.dev/D}; RESULTS=${RESULTS:-${OUT:-/tmp/study_d}}
BUDGET_S=${BUDGET_S:-330}; EPOCHS=${EPOCHS:-8}; ITERS=${ITERS:-50}; VARIANTS=${VARIANTS:-unet,sats}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RESULTS/gpu.txt"
for amp in $([ -n "${SKIP_SPEED:-}" ] || echo fp32 amp); do
  [ "$amp" = amp ] && amp=--amp || amp=""
  python3 bench/train_speed.py --preset paper --device cuda --iters 10 --warmup 3 $amp 2>&1 | tee -a "$RESULTS/train_speed.txt"
done
# Patch 48x128x128 covers the whole 4.7 mm in-plane field of these CTs; the rest is the paper preset.
timeout "$BUDGET_S" python3 -m sats ablation "$DATA" --out "$OUTDIR" --preset paper --variants "$VARIANTS" --seeds 0 \
  --fold all --epochs "$EPOCHS" --iters-per-epoch "$ITERS" --patch-size 48 128 128 --device cuda > "$RESULTS/ablation.log" 2>&1
echo "ablation exit $?" | tee -a "$RESULTS/ablation.log"
tail -c 3000 "$RESULTS/ablation.log" | tr '\r' '\n' | grep -v "━" | tail -25
for f in summary.md summary.json cases.csv; do cp "$OUTDIR/$f" "$RESULTS/" 2>/dev/null; done
for r in "$OUTDIR"/runs/*/; do cp "$r/log.csv" "$RESULTS/$(basename "$r")_log.csv" 2>/dev/null; done
true
