"""Does asymmetry help? ``sats ablation``: a plain U-Net, the paper's method and the designs
that give the network the mirror at inference, trained at equal budget, evaluated on the
test split, with statistics over seeds and cases.

Every variant uses the same encoder-decoder, preprocessing (one shared cache: the same
alignment, spacing and normalisation), augmentation (including the left-right flip of
whole samples), optimiser, number of optimiser steps and, unless its name says otherwise,
one schedule (a single polynomial decay); only the branches, the inputs, the head, the
margin loss and the schedule differ (:data:`sats.model.config.VARIANTS`).

Layout of ``DIR`` (every file is written atomically, so the study can be killed at any
point and started again with the same command; finished runs are not retrained; two
processes started on the same ``DIR`` share the runs between them)::

    ablation.json            the settings (a restart with other settings is refused; the
                             archs, variants and seeds may grow)
    cache/                   preprocessed training cases, shared by every run
    test_planes.json         the mid-sagittal plane of each test CT, found once
    test_mirrors/            fusion-reg: each test CT's registered mirror, found once
    runs/{arm}-s{seed}/      a RUN folder (sats predict -m), test/ predictions, metrics.csv;
                             an arm is a variant (on nnunet) or variant@arch (--archs),
                             .ablation.lock (held by the process working on the run)
    cases.csv                variant,seed,case,dsc,hd95,asd,nsd
    summary.md, summary.json per-variant means and paired differences
    subgroups.json, .png     paired ΔDSC by lesion contrast, volume, midline, side (lesions.json)
    ablation.png             paired per-case differences
    cross/                   with --test-dataset OTHER: OTHER's test planes, mirrors and these
                             summaries (each run's test_cross/ and metrics_cross.csv)

**Statistics.** Per variant: metrics averaged over its seeds per case, then mean ± sd
(ddof 1) over cases. Paired against ``unet`` and ``siamese`` where present (and the
baselines of :data:`OWN_BASELINE`), over the seeds both arms have finished:

* the mean difference (variant minus baseline) of the seed-averaged cases;
* the **two-level** 95 % interval (:func:`two_level_interval`: 10,000 draws of seeds, then
  cases, with replacement, ``numpy.random.default_rng(0)``) and the mean difference of each
  seed (``per_seed``): the seed noise is several DSC points a run, so this is the interval
  to read;
* the case-level 95 % interval (10,000 resamples of the seed-averaged cases) and the
  two-sided Wilcoxon signed-rank p (``scipy.stats.wilcoxon``, zero differences dropped; 1.0
  when every difference is zero). Both treat the seeds as fixed, and overstate what a few
  seeds can say.

A case whose HD95 is infinite (an empty prediction) in either arm is left out of that HD95
comparison; ``n`` says how many cases each comparison used.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sats.data.io import atomic_path, write_text_atomic
from sats.geometry.volume import SatsError
from sats.model.backbones import BACKBONES, backbone
from sats.model.config import SEMI_VARIANTS, VARIANTS, build, parse_fold
from sats.model.run import CHECKPOINT_FILE, MODEL_FILE, claim

#: The study's default arms: the plain U-Net, the mirror at inference (early fusion, plain and
#: registered; feature fusion), the margin loss from the first step with the union region,
#: and the paper's two-stage method as the reference.
DEFAULT_VARIANTS = ("unet", "fusion", "fusion-reg", "feature-fusion", "sats-joint-union", "sats")
BASELINES = ("unet", "siamese")
#: Variants also paired against a baseline of their own: that is their question.
OWN_BASELINE = {"sats-unsup": ("sats",), "sats-semi": ("sats",), "sats-semi-joint": ("sats-joint",),
                "siamese-2stage": ("unet-2stage",), "margin-no-head-2stage": ("unet-2stage", "siamese-2stage"),
                "sats": ("unet-2stage", "siamese-2stage")}


def baselines_of(arm: str) -> tuple[str, ...]:
    """What ``arm`` is paired against where present: ``unet`` and ``siamese`` (on nnunet),
    and those of :data:`OWN_BASELINE` on the arm's own backbone."""
    variant, arch = parse_arm(arm)
    return BASELINES + tuple(arm_name(b, arch) for b in OWN_BASELINE.get(variant, ()))


ALL_BASELINES = BASELINES + tuple(sorted({b for bs in OWN_BASELINE.values() for b in bs}))
METRICS = ("dsc", "hd95", "asd", "nsd")
PAIRED = ("dsc", "hd95", "nsd")
BOOTSTRAP = 10_000


@dataclass
class AblationSettings:
    """What defines a study; stored in ``DIR/ablation.json``."""

    dataset: str
    preset: str = "cpu"
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    fold: str = "0"
    epochs: int | None = None
    iters_per_epoch: int | None = None
    spacing: list[float] | None = None
    patch_size: list[int] | None = None
    align: bool = True
    unlabelled: str | None = None  # unlabelled CTs for sats-semi
    archs: list[str] = field(default_factory=lambda: ["nnunet"])  # backbones (sats.model.backbones)
    test_dataset: str | None = None  # also scored on this dataset's test split (cross-domain, cross/)

    def __post_init__(self) -> None:
        for a in self.archs:
            backbone(a)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise SatsError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        if not self.variants or not self.seeds or not self.archs:
            raise SatsError("an ablation needs at least one arch, one variant and one seed")
        semi = [v for v in self.variants if v in SEMI_VARIANTS]
        if semi and not self.unlabelled:
            raise SatsError(f"the {', '.join(semi)} variant(s) need --unlabelled DIR (unlabelled CTs)")


def arm_name(variant: str, arch: str = "nnunet") -> str:
    """A study's name for a variant on a backbone: the variant alone on ``nnunet`` (the
    studies before backbones were options), else ``variant@arch``; ``unet`` is the baseline."""
    return variant if arch == "nnunet" else f"{variant}@{arch}"


def parse_arm(arm: str) -> tuple[str, str]:
    """(variant, arch) of an :func:`arm_name`."""
    variant, _, arch = arm.partition("@")
    return variant, arch or "nnunet"


def ordered_arms(names) -> list[str]:
    """The known arms among ``names`` in table order: each backbone's variants in
    :data:`~sats.model.config.VARIANTS` order, nnunet's first."""
    archs, variants = {a: i for i, a in enumerate(BACKBONES)}, {v: i for i, v in enumerate(VARIANTS)}
    known = [n for n in names if parse_arm(n)[0] in variants and parse_arm(n)[1] in archs]
    return sorted(known, key=lambda n: (archs[parse_arm(n)[1]], variants[parse_arm(n)[0]]))


def study_arms(settings: AblationSettings) -> list[str]:
    """Every arm of the study, backbone by backbone."""
    return [arm_name(v, a) for a in settings.archs for v in settings.variants]


def variant_config(settings: AblationSettings, arm: str, seed: int):
    """The TrainConfig of one run (:func:`sats.model.config.build`); ``arm`` is a variant,
    or ``variant@arch`` (:func:`arm_name`)."""
    variant, arch = parse_arm(arm)
    given = {"arch": arch if arch != "nnunet" else None,"iters_per_epoch": settings.iters_per_epoch,
             "patch_size": tuple(settings.patch_size) if settings.patch_size else None,
             "unlabelled": settings.unlabelled if variant in SEMI_VARIANTS else None,
             **({"spacing": tuple(settings.spacing), "follow_data": False} if settings.spacing else {})}
    return build(settings.preset, variant=variant, epochs=settings.epochs, fold=parse_fold(settings.fold), seed=seed,
                 align=settings.align, **{k: v for k, v in given.items() if v is not None})


# --- statistics -----------------------------------------------------------------------------


def per_case_means(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: {case: {metric: mean over seeds}}} from cases.csv rows."""
    acc: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in rows:
        case = acc.setdefault(r["variant"], {}).setdefault(r["case"], {m: [] for m in METRICS})
        for m in METRICS:
            case[m].append(float(r[m]))
    return {v: {c: {m: float(np.mean(vals)) for m, vals in ms.items()} for c, ms in cases.items()} for v, cases in acc.items()}


def paired(variant: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]], metric: str) -> dict:
    """Mean difference (variant - baseline), bootstrap 95 % interval and Wilcoxon p over
    the cases both arms have, finite values only."""
    from scipy.stats import wilcoxon

    cases = sorted(set(variant) & set(baseline))
    d = np.array([variant[c][metric] - baseline[c][metric] for c in cases
                  if math.isfinite(variant[c][metric]) and math.isfinite(baseline[c][metric])])
    if len(d) == 0:
        return {"mean_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_wilcoxon": math.nan, "n": 0}
    rng = np.random.default_rng(0)
    means = d[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))].mean(axis=1)
    p = 1.0 if np.all(d == 0) else float(wilcoxon(d).pvalue)
    return {"mean_diff": float(d.mean()), "ci_low": float(np.percentile(means, 2.5)),
            "ci_high": float(np.percentile(means, 97.5)), "p_wilcoxon": p, "n": int(len(d))}


def per_seed_table(rows: list[dict]) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """{variant: {seed: {case: {metric: value}}}} from cases.csv rows (seeds as integers)."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["variant"], {}).setdefault(int(r["seed"]), {})[r["case"]] = {m: float(r[m]) for m in METRICS}
    return out


def seed_case_differences(variant: dict, baseline: dict, metric: str, cases: list[str] | None = None) -> tuple[list[int], np.ndarray]:
    """The seeds both arms ran and the (seeds, cases) matrix of paired differences
    (variant minus baseline, seed s against seed s, case against case); NaN where either
    value is not finite (an empty prediction's HD95). ``cases``: only these (a subgroup)."""
    seeds = sorted(set(variant) & set(baseline))
    common = set.intersection(*[set(variant[s]) & set(baseline[s]) for s in seeds]) if seeds else set()
    cases = sorted(common if cases is None else common & set(cases))
    d = np.array([[variant[s][c][metric] - baseline[s][c][metric] for c in cases] for s in seeds], float).reshape(len(seeds), len(cases))
    d[~np.isfinite(d)] = np.nan
    return seeds, d


def two_level_interval(d: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean paired difference over a (seeds, cases) matrix,
    resampling seeds and then cases: each of ``resamples`` draws takes the seeds with
    replacement and the cases with replacement (the same cases for every seed drawn: the
    cases are crossed with the seeds, not nested in them) and averages the drawn grid,
    NaN pairs left out. ``numpy.random.default_rng(seed)``."""
    finite = np.isfinite(d)
    if not finite.any():
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    n_seeds, n_cases = d.shape
    # Draw counts per seed and per case; the mean of the drawn grid is then a weighted mean.
    ws = np.stack([np.bincount(rng.integers(0, n_seeds, n_seeds), minlength=n_seeds) for _ in range(resamples)]).astype(float)
    wc = np.stack([np.bincount(rng.integers(0, n_cases, n_cases), minlength=n_cases) for _ in range(resamples)]).astype(float)
    num = np.einsum("bs,sc,bc->b", ws, np.where(finite, d, 0.0), wc)
    den = np.einsum("bs,sc,bc->b", ws, finite.astype(float), wc)
    means = num[den > 0] / den[den > 0]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def seed_level(variant: dict, baseline: dict, metric: str) -> dict:
    """The seed-level view of a comparison: the two-level interval and the mean paired
    difference of each seed (``per_seed``, in the order of ``seeds``)."""
    seeds, d = seed_case_differences(variant, baseline, metric)
    lo, hi = two_level_interval(d)
    per_seed = [float(np.nanmean(row)) if np.isfinite(row).any() else math.nan for row in d]
    return {"ci_low_2level": lo, "ci_high_2level": hi, "per_seed": per_seed, "seeds": seeds}


def summarize_rows(rows: list[dict]) -> dict:
    """``{"variants": {variant: {metric: {mean, sd, n, empty}}}, "paired": {variant: {baseline: {metric: {...}}}}}``.
    Each paired entry holds the case-level statistics of :func:`paired` (cases averaged over
    seeds) and the seed-level ones of :func:`seed_level` (two-level interval, per-seed means)."""
    means = per_case_means(rows)
    out: dict = {"variants": {}, "paired": {}}
    for v, cases in means.items():
        out["variants"][v] = {}
        for m in METRICS:
            vals = np.array([c[m] for c in cases.values()])
            finite = vals[np.isfinite(vals)]
            out["variants"][v][m] = {
                "mean": float(finite.mean()) if len(finite) else math.nan,
                "sd": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
                "n": int(len(finite)), "empty": int((~np.isfinite(vals)).sum()),
            }
    table = per_seed_table(rows)
    for v in means:
        for b in baselines_of(v):
            if b in means and b != v:
                # Pair the seeds both arms have finished (a headline pair may run more seeds than the rest).
                common = {str(s) for s in set(table[v]) & set(table[b])}
                both = per_case_means([r for r in rows if r["variant"] in (v, b) and str(r["seed"]) in common])
                out["paired"].setdefault(v, {})[b] = {m: {**paired(both[v], both[b], m), **seed_level(table[v], table[b], m)}
                                                      for m in PAIRED} if common else {}
    return out


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "n/a" if not math.isfinite(x) else (f"{x:.4f}" if x >= 1e-4 else f"{x:.1e}")


def summary_markdown(summary: dict, settings: AblationSettings, n_runs: dict[str, int], test_dataset: str | None = None) -> str:
    units = {"dsc": "DSC (%)", "hd95": "HD95 (mm)", "asd": "ASD (mm)", "nsd": "NSD 1 mm (%)"}
    title = f"{settings.dataset}, tested on {test_dataset} (cross-domain)" if test_dataset else settings.dataset
    lines = [f"# sats ablation: {title}", "",
             f"Preset `{settings.preset}`, fold {settings.fold}; metrics averaged over each variant's seeds ('runs') per case, "
             "then mean ± sd over test cases.", "",
             "| variant | runs | cases | " + " | ".join(units[m] for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for v in ordered_arms(summary["variants"]):
        s = summary["variants"][v]
        cells = []
        for m in METRICS:
            cell = f"{_fmt(s[m]['mean'])} ± {_fmt(s[m]['sd'])}"
            cells.append(cell + (f" ({s[m]['empty']} empty)" if s[m]["empty"] else ""))
        lines.append(f"| {v} | {n_runs.get(v, 0)} | {max(s[m]['n'] + s[m]['empty'] for m in METRICS)} | " + " | ".join(cells) + " |")
    for b in ALL_BASELINES:
        rows = [(v, summary["paired"][v][b]) for v in ordered_arms(summary["paired"]) if summary["paired"][v].get(b)]
        if not rows:
            continue
        lines += ["", f"## Paired against `{b}` (variant minus {b})", "",
                  "Case CI: 95 % bootstrap over cases, seeds averaged per case first (treats the seeds as fixed). "
                  "2-level CI: seeds resampled, then cases (the interval to read). p: Wilcoxon signed-rank on the "
                  "seed-averaged cases, which also treats the seeds as fixed.", "",
                  "| variant | ΔDSC (pp) | case CI | 2-level CI | p | ΔDSC per seed | ΔHD95 (mm) | 2-level CI | ΔNSD (pp) | 2-level CI | seeds | n |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for v, st in rows:
            d, h, n = st["dsc"], st["hd95"], st["nsd"]
            per_seed = ", ".join(f"{x:+.1f}" for x in d["per_seed"])
            cells = [_fmt(d["mean_diff"]), _ci(d, ""), _ci(d, "_2level"), _p(d["p_wilcoxon"]), per_seed,
                     _fmt(h["mean_diff"]), _ci(h, "_2level"), _fmt(n["mean_diff"]), _ci(n, "_2level"), str(len(d["seeds"])), str(d["n"])]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ci(stats: dict, kind: str) -> str:
    return f"[{_fmt(stats['ci_low' + kind])}, {_fmt(stats['ci_high' + kind])}]"


# --- subgroups of the lesion test bed ------------------------------------------------------------

#: Contrast bands (HU above the surrounding muscle) of the subgroup table.
CONTRAST_BANDS = ((0.0, 5.0), (5.0, 10.0), (10.0, math.inf))


def lesion_groups(lesions: dict, cases: list[str]) -> dict[str, list[str]]:
    """Test cases by what ``lesions.json`` (``sats phantom --background``) says of their GTV:
    contrast (0-5, 5-10, 10+ HU), volume (tertiles of these cases), whether it crosses the
    midline (any of it on the other side), and side. Asymmetry should matter most for
    small, faint, one-sided lesions."""
    known = [c for c in cases if c in lesions]
    groups: dict[str, list[str]] = {}
    if not known:
        return groups
    t1, t2 = np.percentile([lesions[c]["volume_ml"] for c in known], [100 / 3, 200 / 3])
    for c in known:
        lesion = lesions[c]
        lo, hi = next(b for b in CONTRAST_BANDS if b[0] <= lesion["contrast_hu"] < b[1] or b[1] == math.inf)
        volume = lesion["volume_ml"]
        size = f"volume <= {t1:.0f} ml" if volume <= t1 else (f"volume {t1:.0f}-{t2:.0f} ml" if volume <= t2 else f"volume > {t2:.0f} ml")
        for name in (f"contrast {lo:.0f}-{hi:.0f} HU" if hi < math.inf else f"contrast >= {lo:.0f} HU", size,
                     "crosses the midline" if lesion.get("contralateral_fraction", 0.0) > 0 else "one side only",
                     f"{lesion['side']} side"):
            groups.setdefault(name, []).append(c)
    return groups


def lesion_subgroups(rows: list[dict], lesions_file: Path, baseline: str = "unet") -> list[dict]:
    """Paired ΔDSC (variant minus ``baseline``) within each subgroup of :func:`lesion_groups`:
    ``[{"group", "variant", "n", "mean_diff", "ci_low_2level", "ci_high_2level"}]``; empty
    without a ``lesions.json`` or a baseline."""
    if not lesions_file.exists():
        return []
    lesions = json.loads(lesions_file.read_text())
    table = per_seed_table(rows)
    if baseline not in table:
        return []
    out = []
    groups = lesion_groups(lesions, sorted({r["case"] for r in rows}))
    for v in [v for v in ordered_arms(table) if v != baseline]:
        for name, cases in groups.items():
            _, d = seed_case_differences(table[v], table[baseline], "dsc", cases)
            if d.size == 0:
                continue
            lo, hi = two_level_interval(d)
            out.append({"group": name, "variant": v, "n": int(d.shape[1]), "mean_diff": float(np.nanmean(np.nanmean(d, axis=0))),
                        "ci_low_2level": lo, "ci_high_2level": hi, "baseline": baseline})
    return out


def subgroups_markdown(subgroups: list[dict]) -> str:
    if not subgroups:
        return ""
    variants = list(dict.fromkeys(r["variant"] for r in subgroups))
    groups = list(dict.fromkeys(r["group"] for r in subgroups))
    cell = {(r["group"], r["variant"]): r for r in subgroups}
    lines = ["", f"## Subgroups (ΔDSC against `{subgroups[0]['baseline']}`, pp, with the 2-level 95 % CI; from lesions.json)", "",
             "| subgroup | cases | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for g in groups:
        n = next(cell[(g, v)]["n"] for v in variants if (g, v) in cell)
        cells = [f"{_fmt(cell[(g, v)]['mean_diff'])} {_ci(cell[(g, v)], '_2level')}" if (g, v) in cell else "" for v in variants]
        lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_subgroups(subgroups: list[dict], path: Path) -> Path:
    """A forest plot: one row per subgroup, one marker (mean ΔDSC, 2-level CI) per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in subgroups))
    groups = list(dict.fromkeys(r["group"] for r in subgroups))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(groups) * max(1, len(variants)) ** 0.5 + 1.5))
    for k, v in enumerate(variants):
        for i, g in enumerate(groups):
            r = next((r for r in subgroups if r["group"] == g and r["variant"] == v), None)
            if r is None or not math.isfinite(r["mean_diff"]):
                continue
            y = i + (k - (len(variants) - 1) / 2) * 0.8 / max(len(variants), 1)
            ax.errorbar(r["mean_diff"], y, xerr=[[r["mean_diff"] - r["ci_low_2level"]], [r["ci_high_2level"] - r["mean_diff"]]],
                        fmt="o", color=f"C{k}", capsize=2, label=v if i == 0 else None)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(groups)), [f"{g} ({next(r['n'] for r in subgroups if r['group'] == g)})" for g in groups])
    ax.invert_yaxis()
    ax.set_xlabel(f"DSC difference vs {subgroups[0]['baseline']} (percentage points; 2-level 95 % CI)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def plot_paired(summary_rows: list[dict], path: Path) -> Path:
    """Per-case paired DSC differences against each baseline, one panel per baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = per_case_means(summary_rows)
    baselines = [b for b in ALL_BASELINES if b in means and any(b in baselines_of(v) for v in means if v != b)]
    fig, axes = plt.subplots(1, max(1, len(baselines)), figsize=(6 * max(1, len(baselines)), 4.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, b in zip(axes[0], baselines):
        others = [v for v in ordered_arms(means) if v != b and b in baselines_of(v)]
        for i, v in enumerate(others):
            cases = sorted(set(means[v]) & set(means[b]))
            d = np.array([means[v][c]["dsc"] - means[b][c]["dsc"] for c in cases])
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=10, alpha=0.6)
            if len(d):
                st = paired(means[v], means[b], "dsc")
                ax.errorbar(i + 0.3, st["mean_diff"], yerr=[[st["mean_diff"] - st["ci_low"]], [st["ci_high"] - st["mean_diff"]]],
                            fmt="D", color="black", capsize=4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(others)), others, rotation=20)
        ax.set_ylabel(f"DSC difference vs {b} (percentage points)")
        ax.set_title(f"paired per case, against {b} (diamond: mean, 95 % CI)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


# --- the study ------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in columns})


def _run_done(run: Path) -> bool:
    return (run / MODEL_FILE).exists()


def _test_planes(dataset: Path, out: Path, align: bool, console) -> dict:
    """The mid-sagittal plane of each test CT (an :class:`~sats.geometry.alignment.Alignment`),
    found once for the whole study and kept in ``test_planes.json``. Every test case is
    scored: leaving out one whose plane cannot be trusted would flatter every variant alike
    but hide the failure, so it is mirrored about its grid centre instead, said aloud."""
    from sats.data.dataset import list_cases
    from sats.data.io import read_image
    from sats.geometry.alignment import Alignment
    from sats.geometry.preprocessing import PlaneSettings, estimate_plane

    settings = PlaneSettings.of(align, None, on_unreliable="grid-centre")
    path = out / "test_planes.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    planes = {cid: Alignment.from_dict(d) for cid, d in stored.items() if d is not None}  # None: an older study's grid centre
    todo = [c for c in list_cases(dataset, "Ts") if c.case_id not in planes]
    for i, case in enumerate(todo, 1):
        planes[case.case_id] = found = estimate_plane(read_image(case.image), settings)
        if align and found.reason:
            console.print(f"[yellow]{case.image}: {found.reason}; mirrored about the grid centre instead[/]", highlight=False)
        if i % 10 == 0 or i == len(todo):
            write_text_atomic(path, json.dumps({cid: a.to_dict() for cid, a in planes.items()}, indent=1))
            console.print(f"  test planes: {len(planes)} found", highlight=False)
    return planes


def _predict_and_score(run: Path, dataset: Path, planes: dict, console, device: str | None = None,
                       tag: str = "") -> list[dict]:
    """Predict every test CT of ``dataset`` into ``run/test`` (cases already there are kept),
    then score into ``run/metrics.csv``; ``tag`` "cross": another dataset's test split, into
    ``run/test_cross`` and ``run/metrics_cross.csv``."""
    from sats.data.dataset import list_cases
    from sats.data.io import read_image, write_image
    from sats.evaluation.metrics import compute_metrics
    from sats.predict.inference import load_run, predict_case

    scores = run / scores_name(tag)
    if scores.exists():
        return _read_rows(scores)
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_run(run, device)
    rows = []
    for case in list_cases(dataset, "Ts"):
        target = run / ("test_" + tag if tag else "test") / f"{case.case_id}.nii.gz"
        ct = read_image(case.image)
        if target.exists():
            mask = read_image(target)
        else:
            study = run.parent.parent / tag if tag else run.parent.parent
            mirror = _test_mirror(study, case.case_id, ct, loaded, planes.get(case.case_id))
            pre = loaded.preprocessor(ct, alignment=planes.get(case.case_id), mirror_hu=mirror)
            mask = predict_case(loaded, ct, pre, device=device, quality=False).mask  # a study scores the contours only
            write_image(mask, target)
        m = compute_metrics(mask.array, read_image(case.label).array, ct.spacing, case=case.case_id)  # type: ignore[arg-type]
        rows.append({"case": case.case_id, "dsc": m.dsc, "hd95": m.hd95, "asd": m.asd, "nsd": m.nsd})
    _write_rows(scores, rows, ("case", *METRICS))
    return _read_rows(scores)


def scores_name(tag: str = "") -> str:
    """A run's per-case scores on the study's test split (``metrics.csv``) or on ``tag``'s."""
    return f"metrics_{tag}.csv" if tag else "metrics.csv"


def _test_mirror(study: Path, case_id: str, ct, loaded, alignment) -> np.ndarray | None:
    """A fusion-reg run's registered mirror of a test CT, in HU, registered once for the whole
    study (``test_mirrors/``: every run of a study shares the grid and the planes)."""
    if loaded.config.train.fusion != "registered":
        return None
    path = study / "test_mirrors" / f"{case_id}.npy"
    if not path.exists():
        from dataclasses import replace

        hu = replace(loaded.preprocessor, stats=None)(ct, alignment=alignment).mirror_reg
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, hu)
    return np.load(path, allow_pickle=False)


def write_outputs(out: Path, settings: AblationSettings, rows: list[dict], test_dataset: str | None = None) -> dict:
    """cases.csv, summary.md, summary.json and ablation.png from the rows so far (scored on
    ``test_dataset``'s test split where given, else on the study's own)."""
    _write_rows(out / "cases.csv", rows, ("variant", "seed", "case", *METRICS))
    rows = _read_rows(out / "cases.csv")  # the statistics use exactly what the CSV holds
    # Each variant's row uses every seed it has finished; each comparison pairs the seeds
    # both of its arms have finished (the "seeds" column), so a study in progress, or one
    # whose headline pair runs more seeds, compares like with like.
    summary = summarize_rows(rows)
    n_runs = {v: len({r["seed"] for r in rows if r["variant"] == v}) for v in sorted({r["variant"] for r in rows})}
    subgroups = lesion_subgroups(rows, Path(test_dataset or settings.dataset) / "lesions.json")
    md = summary_markdown(summary, settings, n_runs, test_dataset)
    write_text_atomic(out / "summary.md", md + subgroups_markdown(subgroups))
    if subgroups:
        write_text_atomic(out / "subgroups.json", json.dumps(subgroups, indent=2))
        plot_subgroups(subgroups, out / "subgroups.png")
    write_text_atomic(out / "summary.json", json.dumps(summary["paired"], indent=2))
    plot_paired(rows, out / "ablation.png")
    return summary


def _check_test_split(dataset: Path) -> None:
    """The study scores on ``dataset``'s imagesTs: it needs labelsTs and a clean `sats check`."""
    from sats.data.dataset import check_dataset, list_cases

    test = list_cases(dataset, "Ts")
    if not test or any(c.label is None for c in test):
        raise SatsError(f"{dataset}: the ablation evaluates on imagesTs, which needs labelsTs for every case")
    report = check_dataset(dataset)
    if report.problems:
        raise SatsError(f"{dataset}: fails `sats check` ({len(report.problems)} problem(s)); first: {report.problems[0]}")


def _open_study(settings: AblationSettings, out: Path) -> None:
    """Create the study folder, or check that the one there was made with these settings."""
    stored = out / "ablation.json"
    if stored.exists():
        # Runs are independent per (arm, seed), so a study may grow or shrink its archs,
        # variants and seeds; every other setting must match what its runs were trained with.
        before, now = json.loads(stored.read_text()), asdict(settings)
        changed = [k for k in before if k not in ("variants", "seeds", "archs") and before.get(k) != now.get(k)]
        if changed:
            raise SatsError(f"{out}: a study with other settings ({', '.join(changed)}) is there; use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stored, json.dumps(asdict(settings), indent=2))


def _test_sets(settings: AblationSettings, out: Path) -> dict[str, tuple[Path, Path]]:
    """{tag: (dataset, folder)}: the study's own test split ("") and, with ``test_dataset``,
    the other dataset's ("cross", in ``out/cross``: its planes, mirrors and summary)."""
    sets = {"": (Path(settings.dataset), out)}
    if settings.test_dataset:
        sets["cross"] = (Path(settings.test_dataset), out / "cross")
    return sets


def run_dir(out: Path, arm: str, seed: int) -> Path:
    """The RUN folder of one (arm, seed) of the study in ``out``."""
    return Path(out) / "runs" / f"{arm}-s{seed}"


def train_and_score(settings: AblationSettings, out: Path, arm: str, seed: int, console, device: str | None = None,
                    planes: dict | None = None) -> None:
    """One run of the study, end to end and resumable: train it (from its checkpoint where one
    is there; not at all when its model is), then predict and score each test split (cases
    already predicted, and splits already scored, are kept). The caller holds the run's claim."""
    from sats.model.training import train

    run = run_dir(out, arm, seed)
    run.mkdir(parents=True, exist_ok=True)
    cfg = variant_config(settings, arm, seed)
    if not _run_done(run):
        train(Path(settings.dataset), run, cfg, resume=(run / CHECKPOINT_FILE).exists(), cache=out / "cache", device=device,
              console=console)
    planes = planes if planes is not None else {}
    for tag, (test_data, folder) in _test_sets(settings, out).items():
        if tag not in planes:
            planes[tag] = _test_planes(test_data, folder, cfg.align, console)
        _predict_and_score(run, test_data, planes[tag], console, device, tag)


def open_study(settings: AblationSettings, out: Path) -> list[tuple[str, int]]:
    """Check the test splits, create or check the study folder; the (arm, seed) runs, seed-major
    (early results cover every arm)."""
    for test_data, _ in _test_sets(settings, out).values():
        _check_test_split(test_data)
    _open_study(settings, out)
    return [(v, s) for s in settings.seeds for v in study_arms(settings)]


def write_study_outputs(settings: AblationSettings, out: Path) -> dict:
    """The study's summaries from every scored run (and the cross-domain ones with a test dataset)."""
    summary = write_outputs(out, settings, study_rows(out))
    if settings.test_dataset:
        write_outputs(out / "cross", settings, study_rows(out, "cross"), settings.test_dataset)
    return summary


def run_ablation(settings: AblationSettings, out: Path, console=None, device: str | None = None) -> dict:
    """Train, predict and evaluate every (arm, seed); resumable at any point."""
    from rich.console import Console

    console = console or Console()
    out = Path(out)
    runs = open_study(settings, out)
    planes: dict[str, dict] = {}
    spent: list[float] = []
    # Several `sats ablation` processes (or machines sharing the folder) may work on one
    # study: each claims a run while it trains, predicts and scores it, and leaves runs
    # that another holds for later, when it waits for them and reads their scores.
    todo, busy = list(enumerate(runs, 1)), []
    for wait in (False, True):
        for i, (variant, seed) in todo:
            run = run_dir(out, variant, seed)
            run.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with claim(run / ".ablation.lock", wait) as held:
                if not held:
                    console.print(f"{variant}-s{seed}: taken by another `sats ablation` on {out}; coming back to it",
                                  highlight=False)
                    busy.append((i, (variant, seed)))
                    continue
                if not _run_done(run):
                    console.rule(f"run {i}/{len(runs)}: {variant}, seed {seed}")
                train_and_score(settings, out, variant, seed, console, device, planes)
            summary = write_study_outputs(settings, out)
            took = time.time() - t0
            if took > 60:
                spent.append(took)
            left = (len(runs) - i) * (float(np.mean(spent)) if spent else 0.0)
            dsc = summary["variants"][variant]["dsc"]["mean"]
            console.print(f"[bold]run {i}/{len(runs)}[/] {variant}-s{seed}: test DSC {dsc:.2f} (seed-averaged so far); "
                          f"{took / 60:.1f} min" + (f", about {left / 60:.0f} min left" if spent and i < len(runs) else ""),
                          highlight=False)
        todo, busy = busy, []
    return summarize_rows(study_rows(out))


def study_rows(out: Path, tag: str = "") -> list[dict]:
    """Every scored run of the study folder (``runs/{variant}-s{seed}/metrics.csv``), whichever
    invocation ran it: a study may grow its variants and seeds, and its summary covers them all."""
    rows = []
    for scores in sorted(Path(out).glob(f"runs/*/{scores_name(tag)}")):
        variant, seed = scores.parent.name.rsplit("-s", 1)
        rows += [{"variant": variant, "seed": int(seed), **{k: r[k] for k in ("case", *METRICS)}} for r in _read_rows(scores)]
    return rows
