#!/bin/bash
# Copy what a study leaves into the repository's results/ (no weights, caches or predictions):
#   bash bench/collect_results.sh ablation STUDY_DIR results/ablation/NAME [CROSS_NAME]
#       (the runs scored on the other test split, STUDY_DIR/cross, go to CROSS_NAME, else NAME/cross)
#   bash bench/collect_results.sh folds RUN_DIR results/quality/NAME
set -eu
kind=$1 src=$2 dst=$3 cross=${4:-$3/cross}
mkdir -p "$dst"
if [ "$kind" = ablation ]; then
    for f in ablation.json ablation.png cases.csv summary.json summary.md subgroups.json subgroups.png; do
        [ -f "$src/$f" ] && cp "$src/$f" "$dst/"
    done
    if [ -d "$src/cross" ]; then
        mkdir -p "$cross"
        for f in ablation.png cases.csv summary.json summary.md subgroups.json subgroups.png; do
            [ -f "$src/cross/$f" ] && cp "$src/cross/$f" "$cross/"
        done
    fi
    for run in "$src"/runs/*/; do
        [ -f "$run/metrics.csv" ] || continue
        r="$dst/runs/$(basename "$run")"
        mkdir -p "$r"
        for f in config.json log.csv metrics.csv metrics_cross.csv ray_attempts.jsonl; do
            [ -f "$run/$f" ] && cp "$run/$f" "$r/"
        done
    done
else
    for f in quality.json crossval.csv calibration.png; do cp "$src/$f" "$dst/"; done
    for fold in "$src"/fold_*/; do
        r="$dst/$(basename "$fold")"
        mkdir -p "$r"
        cp "$fold/config.json" "$fold/log.csv" "$fold/validation/evidence.json" "$r/"
    done
    [ -d "$src/eval" ] && mkdir -p "$dst/eval" && cp "$src"/eval/*.md "$src"/eval/*.csv "$src"/eval/*.png "$dst/eval/"
fi
echo "$dst: $(du -sh "$dst" | cut -f1)"
