"""Know when a contour is wrong: the per-case quality score, its flag, and calibration.

Every prediction gets a verdict, ``ok`` or ``review``, written beside the mask
(``{case}_qa.json``) and into the DICOM objects (ROI / segment ``GTVp (review)``).

**Evidence** (:class:`Evidence`), computed at prediction with no label:

* ``mirror_dice``: Dice of the masks from the CT pass and from the mirrored-CT pass (flipped
  back). A model that is sure of a lesion finds it in either orientation.
* ``mean_prob`` and ``entropy``: the mean probability and binary entropy (bits) inside the mask.
* ``volume_z``: how far the GTV volume is from the training GTVs', ``|log v - mean| / sd``.
* ``outside_fraction``: the share of the voxels at p >= 0.5 that the largest-component
  rule removed (a second candidate region elsewhere).
* ``member_dice``: the mean pairwise Dice of the ensemble members' masks (1 for one model).
* ``nasopharynx``: None when the aligned CT shows a nasopharynx, else why not
  (:func:`sats.geometry.landmarks.nasopharynx_in_view`).

**The verdict** (:func:`assess`): ``review`` when any rule fires, in this order: no
nasopharynx in view; no GTV found; ensemble members disagree (``member_dice`` below
:data:`MIN_MEMBER_DICE`); the fitted score below its threshold. Otherwise ``ok``.

**The fitted score** (:class:`QualityModel`): a logistic regression of "DSC below 50 %" on
:data:`FEATURES`, fitted on the training folds' out-of-fold predictions (never a test
split; :mod:`sats.evaluation.crossval`); ``score`` is the estimated probability that DSC is
50 % or more. Its threshold flags 90 % of the out-of-fold failures (:data:`TARGET_SENSITIVITY`).
Out-of-fold predictions come from one model each, so an ensemble is scored member by
member, each on its own probabilities, and the scores averaged: the ensemble's mean
probabilities are smoother than any member's and would read as less sure (on the test bed
that alone flagged every case).

**Calibration**: the same file holds a temperature T, fitted on the out-of-fold voxels of
the prediction ROI by minimising the negative log-likelihood; every member's logits are
divided by T before the sigmoid (so the 0.5 threshold of one model does not move).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sats.data.io import write_text_atomic
from sats.geometry.volume import SatsError

__all__ = ["Evidence", "QualityModel", "assess", "evidence", "expected_calibration_error", "fit_quality",
           "fit_temperature", "load_quality"]

#: The fitted model's inputs (names of :class:`Evidence` fields, ``volume_z`` derived).
FEATURES = ("mirror_dice", "mean_prob", "entropy", "volume_z", "outside_fraction")
#: A case is a failure below this DSC (the issue's "DSC below 50 %").
FAILURE_DSC = 0.5
#: The threshold flags at least this share of the out-of-fold failures.
TARGET_SENSITIVITY = 0.9
#: Below this mean pairwise Dice the ensemble members disagree: review, whatever the score.
MIN_MEMBER_DICE = 0.5
#: File of the fitted model in a RUN folder.
QUALITY_FILE = "quality.json"
QUALITY_FORMAT = 1


@dataclass
class Evidence:
    """What one prediction says about itself (see the module docstring)."""

    mirror_dice: float
    mean_prob: float
    entropy: float
    volume_ml: float
    outside_fraction: float
    member_dice: float = 1.0
    nasopharynx: str | None = None
    roi_source: str = ""

    def features(self, log_volume: tuple[float, float]) -> np.ndarray:
        """:data:`FEATURES` as a vector; ``log_volume`` (mean, sd) of the training GTVs' log ml."""
        z = abs(math.log(max(self.volume_ml, 1e-3)) - log_volume[0]) / max(log_volume[1], 1e-3)
        values = {**asdict(self), "volume_z": z}
        return np.array([float(values[f]) for f in FEATURES])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def evidence(prob: np.ndarray, prob_mirror: np.ndarray, mask: np.ndarray, volume_ml: float,
             member_masks: list[np.ndarray] | None = None, nasopharynx: str | None = None, roi_source: str = "") -> Evidence:
    """The :class:`Evidence` of one prediction on its ROI grid (z, y, x; any grid, the same for all).

    Args:
        prob: the ensemble's probabilities of the CT pass (with TTA where it was asked for).
        prob_mirror: those of the mirrored CT's pass, flipped back onto the CT.
        mask: the final mask (after the largest-component rule), bool.
        volume_ml: the final mask's volume on the input grid, ml.
        member_masks: each member's own mask (p >= 0.5), for the members' agreement.
    """
    above = prob >= 0.5
    inside = prob[mask] if mask.any() else np.zeros(0, np.float32)
    p = np.clip(inside.astype(np.float64), 1e-6, 1 - 1e-6)
    entropy = float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))) if p.size else 1.0
    members = member_masks or []
    pairs = [_dice(members[i], members[j]) for i in range(len(members)) for j in range(i + 1, len(members))]
    return Evidence(
        mirror_dice=_dice(above, prob_mirror >= 0.5),
        mean_prob=float(inside.mean()) if inside.size else 0.0,
        entropy=entropy,
        volume_ml=float(volume_ml),
        outside_fraction=float(1.0 - mask.sum() / above.sum()) if above.any() else 0.0,
        member_dice=float(np.mean(pairs)) if pairs else 1.0,
        nasopharynx=nasopharynx,
        roi_source=roi_source,
    )


@dataclass
class QualityModel:
    """The fitted score, its threshold and the calibration temperature (``RUN/quality.json``).

    Attributes:
        temperature: logits are divided by it before the sigmoid (1: uncalibrated).
        log_volume: (mean, sd) of the training GTVs' log volume (ml).
        mean, scale, coef, intercept: the logistic regression of failure on standardised
            :data:`FEATURES`; None when too few failures were seen out of fold to fit one.
        threshold: a score below it is ``review``.
        fitted_on: where the fit came from (cases, failures, folds), for the JSON and README.
    """

    temperature: float = 1.0
    log_volume: tuple[float, float] = (math.log(20.0), 1.0)
    mean: list[float] | None = None
    scale: list[float] | None = None
    coef: list[float] | None = None
    intercept: float = 0.0
    threshold: float = 0.5
    fitted_on: dict = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return self.coef is not None

    def score(self, ev: Evidence) -> float | None:
        """Estimated probability that the case's DSC is 50 % or more; None without a fit."""
        if not self.fitted:
            return None
        x = (ev.features(self.log_volume) - np.array(self.mean)) / np.array(self.scale)
        logit_fail = float(x @ np.array(self.coef) + self.intercept)
        return float(0.5 * (1.0 - math.tanh(0.5 * logit_fail)))  # 1 / (1 + e^z) without overflow

    def save(self, path: Path) -> Path:
        return write_text_atomic(path, json.dumps({"format": QUALITY_FORMAT, **asdict(self)}, indent=2))


def load_quality(path: Path) -> QualityModel | None:
    """The quality model in ``path`` (JSON, never pickled), or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        if d.pop("format", None) != QUALITY_FORMAT:
            raise ValueError("unknown format")
        d["log_volume"] = tuple(d["log_volume"])
        return QualityModel(**d)
    except (ValueError, TypeError, KeyError) as exc:
        raise SatsError(f"{path}: not a sats quality model ({exc})") from None


def assess(ev: Evidence, model: QualityModel | None, members: list[Evidence] | None = None) -> dict:
    """The verdict of one case: ``{"score", "parts", "flag", "reason", "threshold", ...}`` (the QA JSON).

    ``ev``: the evidence of the contour written (an ensemble's, from its mean probabilities),
    which the rules read. ``members``: for an ensemble, each member's own evidence (its own
    probabilities, mask and volume): the score is the mean of the members' scores, since the
    score was fitted on one model's out-of-fold predictions and an ensemble's smoother
    probabilities would read as less sure than any of its members is.
    """
    scored = members if members and len(members) > 1 else [ev]
    scores = [model.score(m) for m in scored] if model is not None and model.fitted else None
    score = float(np.mean(scores)) if scores is not None else None
    threshold = model.threshold if model is not None and model.fitted else None
    reasons = []
    if ev.nasopharynx is not None:
        reasons.append(f"no nasopharynx found in the field of view ({ev.nasopharynx})")
    if ev.volume_ml <= 0:
        reasons.append("no GTV found")
    if ev.member_dice < MIN_MEMBER_DICE:
        reasons.append(f"the ensemble members disagree (mean pairwise Dice {ev.member_dice:.2f} < {MIN_MEMBER_DICE})")
    if score is not None and score < threshold:
        reasons.append(f"quality score {score:.2f} below {threshold:.2f}")
    parts = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(ev).items()}
    if model is not None:
        parts["volume_z"] = round(float(ev.features(model.log_volume)[FEATURES.index("volume_z")]), 4)
    extra = {}
    if members and len(members) > 1:
        extra["members"] = [{**{f: round(getattr(m, f), 4) for f in ("mirror_dice", "mean_prob", "entropy", "volume_ml",
                                                                   "outside_fraction")},
                             "score": None if scores is None else round(scores[i], 4)} for i, m in enumerate(members)]
    if reasons:
        reason = "; ".join(reasons)
    elif score is None:
        reason = "no rule fired; no fitted quality score (train folds with `sats train --folds` to fit one)"
    else:
        reason = f"quality score {score:.2f} at or above {threshold:.2f}"
    return {"score": None if score is None else round(score, 4), "parts": parts, "flag": "review" if reasons else "ok",
            "reason": reason, "threshold": threshold, "temperature": model.temperature if model is not None else 1.0, **extra}


# --- fitting, on out-of-fold predictions ------------------------------------------------------


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression (coefficients, intercept) by L-BFGS; ``x`` standardised."""
    from scipy.optimize import minimize

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ w[:-1] + w[-1]
        p = 1.0 / (1.0 + np.exp(-z))
        nll = np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * np.sum(w[:-1] ** 2)
        g = p - y
        return nll, np.concatenate([x.T @ g + l2 * w[:-1], [g.sum()]])

    w = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x
    return w[:-1], float(w[-1])


def fit_temperature(prob: np.ndarray, label: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of ``label`` (0/1) under
    ``sigmoid(logit(prob) / T)``; ``prob`` are uncalibrated probabilities (any shape)."""
    from scipy.optimize import minimize_scalar

    p = np.clip(np.asarray(prob, np.float64).ravel(), 1e-6, 1 - 1e-6)
    y = np.asarray(label, np.float64).ravel()
    z = np.log(p) - np.log1p(-p)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    return float(math.exp(minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded").x))


def calibrate(prob: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid(logit(prob) / T)``: probabilities through a temperature."""
    p = np.clip(np.asarray(prob, np.float64), 1e-7, 1 - 1e-7)
    return (1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p)) / temperature))).astype(np.float32)


def expected_calibration_error(prob: np.ndarray, label: np.ndarray, bins: int = 15) -> float:
    """ECE: the voxel-weighted mean |accuracy - confidence| of the foreground probability over
    ``bins`` equal-width bins of [0, 1]."""
    p, y = np.asarray(prob, np.float64).ravel(), np.asarray(label, np.float64).ravel()
    idx = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(idx, minlength=bins)
    gap = np.abs(np.bincount(idx, y, bins) - np.bincount(idx, p, bins))
    return float(gap.sum() / max(n.sum(), 1))


def _threshold_for(scores: np.ndarray, failed: np.ndarray) -> float:
    """The smallest score threshold under which :data:`TARGET_SENSITIVITY` of the failures fall."""
    s = np.sort(scores[failed])
    k = int(math.ceil(TARGET_SENSITIVITY * len(s))) - 1
    above = scores[scores > s[k]]
    return float((s[k] + above.min()) / 2) if above.size else float(s[k] + 1e-6)


def fit_quality(rows: list[dict], prob: np.ndarray, label: np.ndarray, folds: list[int]) -> QualityModel:
    """Fit the quality model on out-of-fold cases.

    Args:
        rows: one dict per case: the :class:`Evidence` fields, ``dsc`` (0-1) and
            ``true_ml`` (the label's volume).
        prob, label: out-of-fold ROI voxels (uncalibrated probability, 0/1 label) for the temperature.
        folds: the folds the rows come from (recorded).
    """
    temperature = fit_temperature(prob, label) if len(prob) else 1.0
    true_ml = np.array([r["true_ml"] for r in rows if r["true_ml"] > 0])
    logs = np.log(true_ml) if true_ml.size else np.array([math.log(20.0)])
    model = QualityModel(temperature=temperature, log_volume=(float(logs.mean()), float(max(logs.std(), 0.1))))
    # The rules flag some cases whatever the score: the score is fitted on the others.
    usable = [r for r in rows if r["nasopharynx"] is None and r["volume_ml"] > 0]
    failed = np.array([r["dsc"] < FAILURE_DSC for r in usable])
    model.fitted_on = {"cases": len(rows), "scored": len(usable), "failures": int(failed.sum()), "folds": folds,
                       "failure": f"DSC < {FAILURE_DSC:.0%}", "target_sensitivity": TARGET_SENSITIVITY}
    if failed.sum() < 3 or (~failed).sum() < 3:
        model.fitted_on["note"] = "too few failures or successes out of fold to fit a score; the rules alone flag"
        return model
    evs = [Evidence(**{k: r[k] for k in Evidence.__dataclass_fields__}) for r in usable]
    x = np.stack([e.features(model.log_volume) for e in evs])
    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    coef, intercept = _logistic((x - mean) / scale, failed.astype(float))
    model.mean, model.scale, model.coef, model.intercept = mean.tolist(), scale.tolist(), coef.tolist(), intercept
    scores = np.array([model.score(e) for e in evs])
    model.threshold = _threshold_for(scores, failed)
    return model
