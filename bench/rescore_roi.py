"""Score a finished `sats ablation` study again with prediction limited to the ROI.

The studies of BENCHMARKS.md (A, B, C) predicted over the whole body, as `sats predict`
did before the ROI (issue 12). This re-predicts every finished run's test cases with the
run's weights unchanged and the ROI of `sats.predict.roi` (a localiser fitted per seed on the
study's training cache, as `sats train` now fits one), and writes the same tables:
``OUT/cases.csv``, ``summary.md``, ``summary.json``, ``ablation.png``. Resumable: each
(run, case) row is kept in ``OUT/rows.csv`` as it is scored.

    python bench/rescore_roi.py --study STUDY_DIR --dataset DATASET --out OUT_DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from pathlib import Path

COLUMNS = ("variant", "seed", "case", "dsc", "hd95", "asd", "nsd", "roi_source", "roi_miss")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from sats.data.dataset import list_cases
    from sats.data.io import read_image
    from sats.evaluation.ablation import AblationSettings, write_outputs
    from sats.evaluation.metrics import compute_metrics
    from sats.geometry.preprocessing import preprocess
    from sats.geometry.symmetry import Plane
    from sats.model.cache import prepare_cases
    from sats.predict.inference import load_run, predict_case
    from sats.predict.roi import find_roi, fit_localiser, load_localiser, save_localiser

    settings = AblationSettings(**json.loads((args.study / "ablation.json").read_text()))
    planes = json.loads((args.study / "test_planes.json").read_text())
    runs = sorted(r for r in (args.study / "runs").iterdir() if (r / "metrics.csv").exists())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(settings.__dict__, indent=2))
    loaded = {r.name: load_run(r) for r in runs}
    first = next(iter(loaded.values()))

    localisers = {}
    for seed in sorted({lr.config.train.seed for lr in loaded.values()}):
        path = args.out / f"localiser-s{seed}.pt"
        if not path.exists():
            cfg = replace(first.config.train, spacing=tuple(first.config.spacing))
            cases, _, spacing = prepare_cases(args.dataset, args.study / "cache", cfg, None)
            t0 = time.time()
            save_localiser(fit_localiser(cases, spacing, seed=seed), path)
            print(f"localiser seed {seed}: {time.time() - t0:.0f} s", flush=True)
        localisers[seed] = load_localiser(path)

    rows_file = args.out / "rows.csv"
    done = {(r["variant"], r["seed"], r["case"]) for r in csv.DictReader(open(rows_file))} if rows_file.exists() else set()
    new = not rows_file.exists()
    with open(rows_file, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for case in list_cases(args.dataset, "Ts"):
            todo = [n for n, lr in loaded.items()
                    if (n.rsplit("-s", 1)[0], str(lr.config.train.seed), case.case_id) not in done]
            if not todo:
                continue
            t0 = time.time()
            ct, label = read_image(case.image), read_image(case.label)
            plane = planes.get(case.case_id)
            pre = preprocess(ct, first.spacing, first.stats, label=label, plane=Plane.from_dict(plane) if plane else None)
            rois = {s: find_roi(ct, pre, first.patch_size, loc) for s, loc in localisers.items()}
            for name in todo:
                run = loaded[name]
                seed = run.config.train.seed
                mask = predict_case(run, ct, pre, region=rois[seed], precision="fp32", quality=False).mask
                m = compute_metrics(mask.array, label.array, ct.spacing, case=case.case_id)
                writer.writerow({"variant": name.rsplit("-s", 1)[0], "seed": seed, "case": case.case_id, "dsc": m.dsc,
                                 "hd95": m.hd95, "asd": m.asd, "nsd": m.nsd, "roi_source": rois[seed].source,
                                 "roi_miss": rois[seed].miss_fraction(pre.label)})
            fh.flush()
            print(f"{case.case_id}: {len(todo)} runs in {time.time() - t0:.0f} s", flush=True)

    rows = [{k: r[k] for k in ("variant", "seed", "case", "dsc", "hd95", "asd", "nsd")} for r in csv.DictReader(open(rows_file))]
    write_outputs(args.out, settings, rows)
    misses = [float(r["roi_miss"]) for r in csv.DictReader(open(rows_file))]
    print(f"{len(rows)} predictions; ROI misses on {sum(m > 0 for m in misses)}; summary in {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
