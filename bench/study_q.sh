#!/bin/bash
# Issue 26's study, resumable (run it again to continue): five folds of the default method
# (the cpu preset's SATs, 40 epochs x 50 iterations a fold) on the lesion test bed's 60
# training cases, each fold's held-out cases predicted and the quality model fitted on them;
# then the five-fold ensemble against its single folds, the quality flag and the calibration
# on the 40 test cases, and the flag again on the shifted test bed of bench/study_e.sh.
# Needs testbed/ and testbed_shift/ (bench/study_e.sh builds them). About 40 min on 2 cores.
set -eu
BENCH=$(cd "$(dirname "$0")" && pwd)
sats train testbed --out Q --preset cpu --folds 0,1,2,3,4 --epochs 40 --iters-per-epoch 50
[ -f Q/eval/summary.md ] || python3 "$BENCH/qa_eval.py" Q testbed Q/eval
[ -f Q/eval/shift_summary.md ] || python3 "$BENCH/qa_eval.py" Q testbed_shift Q/eval --tag shift_
