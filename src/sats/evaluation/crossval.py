"""Cross-validation: train the folds of one RUN, predict each fold's held-out cases, and fit
the quality model on those out-of-fold predictions (``sats train --folds 0,1,2,3,4``).

Layout of the RUN folder::

    fold_K/                      a RUN of its own (``sats train --fold K``), resumable
    fold_K/validation/           its held-out cases predicted from their CT files, as `sats
                                 predict` would: {case}.nii.gz, evidence.json (each case's
                                 evidence, DSC and true volume), calibration.npz (ROI voxels)
    cache/                       the preprocessed cases, shared by the folds
    quality.json                 the quality model and temperature (sats.predict.quality)
    crossval.csv                 every out-of-fold case: DSC, evidence, score, flag
    calibration.png              reliability diagram of the out-of-fold voxels, before and after

``sats predict -m RUN`` then averages every fold (an ensemble) and judges each case with
``quality.json``. Nothing here reads a test split.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from sats.data.io import atomic_path, write_text_atomic
from sats.geometry.volume import SatsError
from sats.model.config import TrainConfig
from sats.predict.quality import (FAILURE_DSC, QUALITY_FILE, Evidence, QualityModel, assess, calibrate,
                                  expected_calibration_error, fit_quality)

__all__ = ["auroc", "fit_run_quality", "train_folds", "validate_fold"]

#: ROI voxels kept per case for the temperature and the reliability diagram.
VOXELS_PER_CASE = 100_000


def train_folds(dataset: Path, out: Path, cfg: TrainConfig, folds: list[int], cache: Path | None = None,
                device: str | None = None, console=None) -> QualityModel | None:
    """Train each fold into ``out/fold_K`` (a finished fold is kept, an interrupted one
    resumed), predict its validation cases, and with two or more folds validated fit the
    quality model (:func:`fit_run_quality`). Returns it, or None."""
    from sats.model.training import train

    out = Path(out)
    if not folds or len(set(folds)) != len(folds) or any(not 0 <= k < cfg.folds for k in folds):
        raise SatsError(f"--folds must list distinct folds between 0 and {cfg.folds - 1}, not {folds}")
    for k in folds:
        fold_dir = out / f"fold_{k}"
        if console is not None:
            console.rule(f"fold {k} ({folds.index(k) + 1} of {len(folds)})")
        if not (fold_dir / "model.pt").exists():
            train(dataset, fold_dir, replace(cfg, fold=k), resume=(fold_dir / "checkpoint.pt").exists(),
                  cache=cache or out / "cache", device=device, console=console)
        validate_fold(fold_dir, Path(dataset), device or "cpu", console)
    if len(folds) < 2:
        return None
    return fit_run_quality(out, console)


def validate_fold(fold_dir: Path, dataset: Path, device: str = "cpu", console=None) -> list[dict]:
    """Predict the fold's validation cases from their CT files (its own model, the full
    prediction path with the quality evidence) into ``fold_dir/validation``; kept when there."""
    from sats.data.dataset import list_cases
    from sats.data.io import read_image, write_image
    from sats.evaluation.metrics import dice
    from sats.predict.inference import load_run, native_box, predict_case
    from sats.progress import progress_bar

    folder = Path(fold_dir) / "validation"
    done = folder / "evidence.json"
    if done.exists():
        return json.loads(done.read_text())
    run = load_run(fold_dir, device)
    cases = {c.case_id: c for c in list_cases(dataset, "Tr")}
    rng = np.random.default_rng(0)
    rows, probs, labels = [], [], []
    with progress_bar(console) as progress:
        task = progress.add_task(f"out-of-fold cases of {Path(fold_dir).name}", total=len(run.config.val_ids))
        for cid in run.config.val_ids:
            case = cases.get(cid)
            if case is None or case.label is None:
                raise SatsError(f"{dataset}: validation case {cid} of {fold_dir} is missing or has no label")
            ct, label = read_image(case.image), read_image(case.label)
            pred = predict_case(run, ct, device=device)
            truth = label.array > 0
            write_image(pred.mask, folder / f"{cid}.nii.gz")
            rows.append({"case": cid, "fold": int(run.config.train.fold), "dsc": dice(pred.mask.array > 0, truth) / 100.0,
                         "true_ml": float(truth.sum()) * ct.voxel_volume_ml, **pred.qa["parts"]})
            box = native_box(pred.roi, pred.grid, ct)
            p, y = pred.probabilities.array[box].ravel(), truth[box].ravel()
            keep = rng.choice(p.size, size=min(p.size, VOXELS_PER_CASE), replace=False)
            probs.append(p[keep].astype(np.float32))
            labels.append(y[keep].astype(np.uint8))
            progress.advance(task)
    with atomic_path(folder / "calibration.npz", suffix=".npz") as tmp:
        np.savez_compressed(tmp, prob=np.concatenate(probs), label=np.concatenate(labels))
    write_text_atomic(done, json.dumps(rows, indent=2))
    return rows


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` ranking the ``positive`` cases first (higher
    score = more likely positive); ties count half. NaN without both classes."""
    s, pos = np.asarray(scores, float), np.asarray(positive, bool)
    if pos.all() or not pos.any():
        return float("nan")
    diff = s[pos][:, None] - s[~pos][None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def fit_run_quality(out: Path, console=None) -> QualityModel:
    """Fit ``out/quality.json`` on every validated fold of ``out``; write ``crossval.csv``
    and ``calibration.png``, and print the out-of-fold summary."""
    out = Path(out)
    folds = sorted(out.glob("fold_*/validation/evidence.json"))
    if len(folds) < 2:
        raise SatsError(f"{out}: fitting the quality model needs two or more validated folds (found {len(folds)})")
    rows = [r for f in folds for r in json.loads(f.read_text())]
    samples = [np.load(f.parent / "calibration.npz") for f in folds]
    prob = np.concatenate([s["prob"] for s in samples])
    label = np.concatenate([s["label"] for s in samples])
    model = fit_quality(rows, prob, label, sorted({int(r["fold"]) for r in rows}))
    model.save(out / QUALITY_FILE)
    verdicts = [assess(Evidence(**{k: r[k] for k in Evidence.__dataclass_fields__}), model) for r in rows]
    table = [{"case": r["case"], "fold": r["fold"], "dsc": round(r["dsc"], 4), "score": v["score"], "flag": v["flag"],
              **{k: r[k] for k in Evidence.__dataclass_fields__}} for r, v in zip(rows, verdicts)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    write_text_atomic(out / "crossval.csv", buf.getvalue())
    ece = (expected_calibration_error(prob, label), expected_calibration_error(calibrate(prob, model.temperature), label))
    reliability_plot(prob, label, model.temperature, out / "calibration.png")
    if console is not None:
        failed = np.array([r["dsc"] < FAILURE_DSC for r in rows])
        flagged = np.array([v["flag"] == "review" for v in verdicts])
        console.print(f"out of fold: {len(rows)} cases, mean DSC {100 * np.mean([r['dsc'] for r in rows]):.1f}, "
                      f"{int(failed.sum())} below {FAILURE_DSC:.0%}; flagged {int(flagged.sum())} "
                      f"(of the failures {int((flagged & failed).sum())}); temperature {model.temperature:.2f}, "
                      f"ECE {ece[0]:.4f} -> {ece[1]:.4f}; {out / QUALITY_FILE}")
    return model


def reliability_plot(prob: np.ndarray, label: np.ndarray, temperature: float, path: Path, bins: int = 15,
                     title: str = "out-of-fold ROI voxels", curves: list[tuple[np.ndarray, str]] | None = None) -> Path:
    """The reliability diagram (observed foreground frequency against predicted probability,
    equal-width bins) of ``prob`` before and after the temperature, or of the given
    ``curves`` (probabilities, name) on the same ``label`` voxels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = curves or [(prob, "uncalibrated"), (calibrate(prob, temperature), f"T = {temperature:.2f}")]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for p, name in curves:
        idx = np.minimum((p * bins).astype(int), bins - 1)
        n = np.bincount(idx, minlength=bins)
        ok = n > 0
        conf = np.bincount(idx, p, bins)[ok] / n[ok]
        freq = np.bincount(idx, label.astype(float), bins)[ok] / n[ok]
        ax.plot(conf, freq, marker="o", ms=3, label=f"{name}: ECE {expected_calibration_error(p, label, bins):.4f}")
    ax.set_xlabel("predicted GTV probability")
    ax.set_ylabel("observed GTV frequency")
    ax.set_title(f"{title} ({len(label):,})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
