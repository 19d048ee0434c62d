"""Issue 26's experiments: the fold ensemble against its single folds, the quality flag on
test cases, and the calibration before and after.

    python bench/qa_eval.py RUN TESTBED OUT [--tag NAME]

RUN: a RUN of folds with ``quality.json`` (``sats train TESTBED --folds 0,1,2,3,4``).
Every test CT of TESTBED (imagesTs/labelsTs) is prepared once (plane, ROI of the ensemble)
and predicted by each fold alone, by the ensemble with its quality model, and by the
ensemble without its temperature. Writes OUT/{tag}cases.csv (per case: DSC of each fold and
of the ensemble, the verdict and its parts), OUT/{tag}summary.md and OUT/{tag}reliability.png
(the test ROI voxels with T = 1 and with the fitted T), and prints the summary:

* ensemble minus each fold and minus the folds' mean, DSC points, with a 95 % bootstrap
  interval over cases (10,000 resamples);
* AUROC of the quality score for "DSC < 50 %" and for misses ("DSC < 10 %") against
  baselines (mean probability alone, volume alone, mirror agreement alone), and the flag's
  sensitivity and specificity;
* the expected calibration error of the ROI voxels' probabilities with T = 1 and with the
  fitted T.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from sats.data.dataset import list_cases
from sats.data.io import read_image
from sats.evaluation.crossval import auroc, reliability_plot
from sats.evaluation.metrics import dice
from sats.predict.inference import Ensemble, load_model, native_box, predict_case, roi_for, PredictOptions
from sats.predict.quality import FEATURES, Evidence, expected_calibration_error

RNG = np.random.default_rng(0)


def interval(d: np.ndarray, n: int = 10_000) -> tuple[float, float]:
    means = d[RNG.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("testbed", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    ens = load_model(args.run)
    plain = Ensemble(ens.members, None)  # the same members, T = 1
    assert ens.quality is not None, f"{args.run}: no quality.json"
    rows, cal, uncal, labels = [], [], [], []
    cases = list_cases(args.testbed, "Ts")
    for i, case in enumerate(cases):
        ct, label = read_image(case.image), read_image(case.label)
        truth = label.array > 0
        pre = ens.preprocessor(ct)
        roi = roi_for(ens, ct, pre, PredictOptions())
        row = {"case": case.case_id, "true_ml": float(truth.sum()) * ct.voxel_volume_ml}
        for k, m in enumerate(ens.members):
            row[f"dsc_fold{k}"] = dice(predict_case(m, ct, pre, region=roi, quality=False).mask.array > 0, truth)
        pred = predict_case(ens, ct, pre, region=roi)
        row["dsc_ensemble"] = dice(pred.mask.array > 0, truth)
        row.update({"score": pred.qa["score"], "flag": pred.qa["flag"], "reason": pred.qa["reason"], **pred.qa["parts"]})
        rows.append(row)
        box = native_box(roi, pre.grid, ct)
        cal.append(pred.probabilities.array[box].ravel())
        uncal.append(predict_case(plain, ct, pre, region=roi, quality=False).probabilities.array[box].ravel())
        labels.append(truth[box].ravel())
        print(f"{i + 1}/{len(cases)} {case.case_id}: ensemble {row['dsc_ensemble']:.1f}, folds "
              + " ".join(f"{row[f'dsc_fold{k}']:.1f}" for k in range(len(ens.members))) + f", {row['flag']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{args.tag}cases.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cal, uncal, labels = np.concatenate(cal), np.concatenate(uncal), np.concatenate(labels)
    reliability_plot(uncal, labels, ens.quality.temperature, args.out / f"{args.tag}reliability.png",
                     title=f"test ROI voxels, {args.testbed.name}",
                     curves=[(uncal, "ensemble, T = 1"), (cal, f"ensemble, T = {ens.quality.temperature:.2f}")])
    text = summary(rows, len(ens.members), ens.quality, cal, uncal, labels)
    (args.out / f"{args.tag}summary.md").write_text(text)
    print(text)


def summary(rows: list[dict], n_folds: int, quality, cal: np.ndarray, uncal: np.ndarray, labels: np.ndarray) -> str:
    ens = np.array([r["dsc_ensemble"] for r in rows])
    folds = np.array([[r[f"dsc_fold{k}"] for r in rows] for k in range(n_folds)])
    out = [f"{len(rows)} test cases, {n_folds} folds\n", "| model | DSC (%) | ensemble minus it (pp, 95 % CI over cases) |",
           "|---|---|---|", f"| ensemble | {ens.mean():.2f} ± {ens.std():.2f} | |"]
    for k in range(n_folds):
        d = ens - folds[k]
        lo, hi = interval(d)
        out.append(f"| fold {k} | {folds[k].mean():.2f} ± {folds[k].std():.2f} | {d.mean():+.2f} ({lo:+.2f} to {hi:+.2f}) |")
    d = ens - folds.mean(axis=0)
    lo, hi = interval(d)
    out.append(f"| mean of the folds | {folds.mean():.2f} | {d.mean():+.2f} ({lo:+.2f} to {hi:+.2f}) |\n")
    log_volume = quality.log_volume
    evs = [Evidence(**{k: r[k] for k in Evidence.__dataclass_fields__}) for r in rows]
    x = np.stack([e.features(log_volume) for e in evs])
    risk = {"quality score (1 - score)": np.array([1 - r["score"] if r["score"] is not None else 1.0 for r in rows]),
            "flag (review = 1)": np.array([r["flag"] == "review" for r in rows], float),
            "mean probability alone (1 - p)": 1 - x[:, FEATURES.index("mean_prob")],
            "volume alone (|z| of log volume)": x[:, FEATURES.index("volume_z")],
            "mirror agreement alone (1 - Dice)": 1 - x[:, FEATURES.index("mirror_dice")]}
    flagged = risk["flag (review = 1)"] > 0
    out += ["| predictor | AUROC, DSC < 50 % | AUROC, miss (DSC < 10 %) |", "|---|---|---|"]
    for name, r in risk.items():
        out.append(f"| {name} | {auroc(r, ens < 50):.3f} | {auroc(r, ens < 10):.3f} |")
    for what, bad in (("DSC < 50 %", ens < 50), ("miss (DSC < 10 %)", ens < 10)):
        sens = flagged[bad].mean() if bad.any() else float("nan")
        spec = (~flagged[~bad]).mean() if (~bad).any() else float("nan")
        out.append(f"\nflag for {what}: {int(bad.sum())} such cases; sensitivity {sens:.2f} ({int((flagged & bad).sum())}/"
                   f"{int(bad.sum())}), specificity {spec:.2f} ({int((~flagged & ~bad).sum())}/{int((~bad).sum())})")
    rules = {"no nasopharynx in view": "no nasopharynx found", "no GTV found": "no GTV found",
             "members disagree": "members disagree", "score below threshold": "quality score"}
    reasons = {name: sum(r["flag"] == "review" and text in r["reason"] for r in rows) for name, text in rules.items()}
    out.append(f"\nflagged: {int(flagged.sum())} of {len(rows)}; reasons: {json.dumps(reasons)}")
    out.append(f"\ncalibration over {len(labels):,} ROI voxels: ECE {expected_calibration_error(uncal, labels):.4f} with T = 1, "
               f"{expected_calibration_error(cal, labels):.4f} with T = {quality.temperature:.2f}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
