#!/bin/bash
# GPU checks for issue 12, one prepared script (under 8 minutes on an H100/H200):
#   1. paper-preset training steps: before (--plain) and now, fp32 and bf16, and compiled bf16;
#   2. a short real `sats train --preset paper` on phantoms (prints the projected schedule);
#   3. `sats predict --device cuda` on a 512 x 512 x 150 phantom, both precisions (--no-qa), and with the quality check.
#   4. where a GPU prediction's time goes, stage by stage (bench/predict_stages.py).
#   5. every backbone at the paper's scale (issue 25): s/step and peak memory, bf16 (STEPS=5 alone: ~4 min).
#   RESULTS=/tmp/gpu [STEPS=1234] bash bench/gpu.sh
# Expects monai and SimpleITK importable (on a bare GPU image: carried wheels on PYTHONPATH).
set -u
RESULTS=${RESULTS:-${OUT:-/tmp/sats_gpu}}; WORK=${WORK:-/tmp/sats_gpu_work}
mkdir -p "$RESULTS" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD/src
log() { tee -a "$RESULTS/gpu.txt"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | log
python3 -c "import torch; print('torch', torch.__version__)" | log
step() { echo "== $*" | log; }
STEPS=${STEPS:-12345}
want() { [[ $STEPS == *$1* ]]; }

if want 1; then
step "1. train speed, paper preset (synthetic batches)"
for flags in "--plain" "--plain --amp" "" "--amp"; do
  timeout 120 python3 bench/train_speed.py --preset paper --device cuda --iters 15 --warmup 5 $flags 2>&1 | grep -v Warning | log
done
timeout 150 python3 bench/train_speed.py --preset paper --device cuda --iters 15 --warmup 8 --amp --compile 2>&1 | grep -v -i warn | tail -4 | log
fi

python3 -m sats phantom "$WORK/data" --cases 10 --test-cases 2 --seed 0 > /dev/null 2>&1
if want 2; then
step "2. sats train --preset paper on 10 phantoms: plain, then --compile (epoch 1 waits for compilation)"
for c in "" "--compile"; do
  ( time timeout 200 python3 -m sats train "$WORK/data" --out "$WORK/run$c" --preset paper --epochs $([ -n "$c" ] && echo 3 || echo 2) --iters-per-epoch 60 --fold 0 --device cuda $c ) 2>&1 \
    | tr '\r' '\n' | grep -E "epoch [0-9]+:|projected|done|real|rror" | sed "s/^/train $c: /" | log
done
fi
python3 bench/make_big_ct.py "$WORK/big/big_0000.nii.gz" > /dev/null
cp "$WORK/big/big_0000.nii.gz" "$WORK/big/big2_0000.nii.gz"
[ -d "$WORK/run" ] || python3 bench/make_random_run.py --preset paper --out "$WORK/run" > /dev/null
if want 3; then
step "3. sats predict --device cuda, 512 x 512 x 150 phantom; then a folder of two (the second case warm)"
for p in fp32 bf16; do
  ( time python3 -m sats predict -i "$WORK/big/big_0000.nii.gz" -o "$WORK/pred_$p.nii.gz" -m "$WORK/run" --device cuda --precision $p --no-qa ) 2>&1 \
    | grep -E "ml GTV|real|rror" | sed "s/^/$p: /" | log
done
# The quality check (issue 26: the mirrored pass, the nasopharynx check, the review sheet) where matplotlib is there.
if python3 -c "import matplotlib, PIL" 2>/dev/null; then
  ( time python3 -m sats predict -i "$WORK/big/big_0000.nii.gz" -o "$WORK/pred_qa.nii.gz" -m "$WORK/run" --device cuda ) 2>&1 \
    | grep -E "ml GTV|real|rror" | sed "s/^/with QA: /" | log
else
  echo "with QA: skipped (matplotlib or Pillow not importable here)" | log
fi
( time python3 -m sats predict -i "$WORK/big" -o "$WORK/pred_dir" -m "$WORK/run" --device cuda --no-qa ) 2>&1 | tr '\r' '\n' | grep -E "ml GTV|real|rror|s/case| s$" | tail -5 | log
fi
if want 4; then
step "4. stages of one GPU prediction (reading excluded)"
python3 bench/predict_stages.py "$WORK/run" "$WORK/big/big_0000.nii.gz" --device cuda 2>&1 | grep -v -i warn | log
fi
if want 5; then
step "5. paper-scale training steps of every backbone (bf16, synthetic batches)"
for a in nnunet swinunetr swinunetr-v2 unetr mednext stunet-s stunet-b stunet-l resenc-m resenc-l umamba-bot transunet; do
  timeout 90 python3 bench/train_speed.py --preset paper --device cuda --iters 5 --warmup 2 --amp --arch $a 2>&1 | grep -v -i warn | tail -4 | sed "s/^/$a: /" | log
done
fi
true
