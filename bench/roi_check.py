"""The ROI's misses and its effect on accuracy, case by case, for a trained RUN.

For every test case (imagesTs/labelsTs): the ROI's source and size, the fraction of GTV
voxels outside it (must be 0), the windows visited, and with --dsc the Dice of the
prediction over the ROI against the prediction over the whole body.

    python bench/roi_check.py --run RUN --dataset DATASET [--cache DIR] [--planes test_planes.json] [--dsc]

A RUN trained before the localiser existed gets one first (fitted on the training cache,
``--cache``, which is built when missing). Prints a table and a summary line.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def ensure_localiser(run_dir: Path, dataset: Path, cache: Path) -> None:
    from sats.model.cache import prepare_cases
    from sats.model.run import Run
    from sats.predict.roi import fit_localiser, save_localiser

    run = Run.open(run_dir)
    if run.localiser_file.exists():
        return
    cfg = replace(run.config.train, spacing=tuple(run.config.spacing))
    cases, _, spacing = prepare_cases(dataset, cache, cfg, None)
    t0 = time.time()
    save_localiser(fit_localiser(cases, spacing, seed=cfg.seed), run.localiser_file)
    print(f"localiser fitted on {len(cases)} cases in {time.time() - t0:.0f} s -> {run.localiser_file}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--cache", type=Path, help="training cache (default RUN/cache)")
    ap.add_argument("--planes", type=Path, help="test planes from `sats ablation` (test_planes.json)")
    ap.add_argument("--no-localiser", action="store_true", help="the landmark fallback alone")
    ap.add_argument("--dsc", action="store_true", help="also predict over the ROI and the whole body and compare Dice")
    args = ap.parse_args()

    from sats.data.dataset import list_cases
    from sats.data.io import read_image
    from sats.evaluation.metrics import dice
    from sats.geometry.alignment import Alignment
    from sats.predict.inference import count_windows, load_run, predict_case
    from sats.predict.roi import find_roi

    if not args.no_localiser:
        ensure_localiser(args.run, args.dataset, args.cache or args.run / "cache")
    run = load_run(args.run)
    if args.no_localiser:
        run.localiser = None
    planes = json.loads(args.planes.read_text()) if args.planes else {}
    rows = []
    print(f"{'case':<16} {'source':<10} {'roi (z,y,x)':<16} {'win':>4} {'all':>4} {'miss':>7} {'s':>5}"
          + (f" {'DSC roi':>8} {'DSC whole':>9}" if args.dsc else ""))
    for case in list_cases(args.dataset, "Ts"):
        ct, label = read_image(case.image), read_image(case.label)
        plane = planes.get(case.case_id)
        pre = run.preprocessor(ct, label=label, alignment=Alignment.from_dict(plane) if plane else None)
        t0 = time.time()
        roi = find_roi(ct, pre, run.patch_size, run.localiser)
        row = {"case": case.case_id, "source": roi.source, "shape": roi.shape, "seconds": time.time() - t0,
               "windows": count_windows(roi.shape, run.patch_size, 0.5),
               "all_windows": count_windows(pre.image.shape, run.patch_size, 0.5),
               "miss": roi.miss_fraction(pre.label)}
        line = (f"{case.case_id:<16} {roi.source:<10} {'x'.join(map(str, roi.shape)):<16} {row['windows']:>4} "
                f"{row['all_windows']:>4} {row['miss']:>7.4f} {row['seconds']:>5.1f}")
        if args.dsc:
            truth = label.array > 0
            row["dsc_roi"] = dice(predict_case(run, ct, pre, region=roi, precision="fp32", quality=False).mask.array > 0, truth)
            row["dsc_whole"] = dice(predict_case(run, ct, pre, roi="whole", precision="fp32", quality=False).mask.array > 0, truth)
            line += f" {row['dsc_roi']:>8.2f} {row['dsc_whole']:>9.2f}"
        print(line, flush=True)
        rows.append(row)
    misses = [r["miss"] for r in rows]
    sources = {s: sum(r["source"] == s for r in rows) for s in sorted({r["source"] for r in rows})}
    print(f"\n{len(rows)} cases; ROI sources {sources}; cases with misses: {sum(m > 0 for m in misses)}, "
          f"largest miss fraction {max(misses):.4f}; windows {np.mean([r['windows'] for r in rows]):.1f} "
          f"against {np.mean([r['all_windows'] for r in rows]):.1f} for the whole body (mean)")
    if args.dsc:
        d_roi, d_whole = np.array([r["dsc_roi"] for r in rows]), np.array([r["dsc_whole"] for r in rows])
        print(f"DSC over the ROI {d_roi.mean():.2f} ± {d_roi.std(ddof=1):.2f}, over the whole body "
              f"{d_whole.mean():.2f} ± {d_whole.std(ddof=1):.2f}; difference {np.mean(d_roi - d_whole):+.2f}")


if __name__ == "__main__":
    main()
