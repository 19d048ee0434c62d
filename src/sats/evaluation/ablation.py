"""Does asymmetry help? ``sats ablation``: the paper's Table 3 and a plain U-Net baseline
trained at equal budget, evaluated on the test split, with paired statistics.

Every variant uses the same encoder-decoder, preprocessing (one shared cache: the same
alignment, spacing and normalisation), augmentation (including the left-right flip of
whole samples), optimiser and number of optimiser steps; only the branches, the head,
the margin loss and the schedule differ (:data:`sats.model.config.VARIANTS`).

Layout of ``DIR`` (every file is written atomically, so the study can be killed at any
point and started again with the same command; finished runs are not retrained; two
processes started on the same ``DIR`` share the runs between them)::

    ablation.json            the settings (a restart with other settings is refused)
    cache/                   preprocessed training cases, shared by every run
    test_planes.json         the mid-sagittal plane of each test CT, found once
    runs/{variant}-s{seed}/  a RUN folder (sats predict -m), test/ predictions, metrics.csv,
                             .ablation.lock (held by the process working on the run)
    cases.csv                variant,seed,case,dsc,hd95,asd,nsd
    summary.md, summary.json per-variant means and paired differences
    ablation.png             paired per-case differences

**Statistics.** Metrics are averaged over seeds per case first. Per variant: mean ± sd
(ddof 1) over cases. Paired by case against ``unet`` and ``siamese`` (and ``sats-unsup``,
``sats-semi`` against ``sats``, ``sats-semi-joint`` against ``sats-joint``,
:data:`OWN_BASELINE`): the mean difference
(variant minus baseline), its 95 % percentile bootstrap interval (10,000 resamples of
cases, ``numpy.random.default_rng(0)``), and the two-sided Wilcoxon signed-rank p-value
(``scipy.stats.wilcoxon``, zero differences dropped; 1.0 when every difference is zero).
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
from sats.model.config import SEMI_VARIANTS, VARIANTS, build, parse_fold
from sats.model.run import CHECKPOINT_FILE, MODEL_FILE, claim

#: The study's default: the paper's Table 3 and the two baselines.
PAPER_VARIANTS = ("unet", "siamese", "margin-no-head", "sats", "sats-joint")
BASELINES = ("unet", "siamese")
#: The variants that change only where the margin loss's region or data come from are
#: also paired against the paper's method itself: that is their question.
OWN_BASELINE = {"sats-unsup": "sats", "sats-semi": "sats", "sats-semi-joint": "sats-joint"}


def baselines_of(variant: str) -> tuple[str, ...]:
    """What ``variant`` is paired against (where present): the two baselines, and ``sats``
    for the variants of :data:`OWN_BASELINE`."""
    return BASELINES + ((OWN_BASELINE[variant],) if variant in OWN_BASELINE else ())


ALL_BASELINES = BASELINES + tuple(sorted(set(OWN_BASELINE.values())))
METRICS = ("dsc", "hd95", "asd", "nsd")
PAIRED = ("dsc", "hd95", "nsd")
BOOTSTRAP = 10_000


@dataclass
class AblationSettings:
    """What defines a study; stored in ``DIR/ablation.json``."""

    dataset: str
    preset: str = "cpu"
    variants: list[str] = field(default_factory=lambda: list(PAPER_VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    fold: str = "0"
    epochs: int | None = None
    iters_per_epoch: int | None = None
    spacing: list[float] | None = None
    patch_size: list[int] | None = None
    align: bool = True
    unlabelled: str | None = None  # unlabelled CTs for sats-semi

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise SatsError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        if not self.variants or not self.seeds:
            raise SatsError("an ablation needs at least one variant and one seed")
        semi = [v for v in self.variants if v in SEMI_VARIANTS]
        if semi and not self.unlabelled:
            raise SatsError(f"the {', '.join(semi)} variant(s) need --unlabelled DIR (unlabelled CTs)")


def variant_config(settings: AblationSettings, variant: str, seed: int):
    """The TrainConfig of one run (:func:`sats.model.config.build`)."""
    given = {"iters_per_epoch": settings.iters_per_epoch,
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


def summarize_rows(rows: list[dict]) -> dict:
    """``{"variants": {variant: {metric: {mean, sd, n, empty}}}, "paired": {variant: {baseline: {metric: {...}}}}}``."""
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
    for v in means:
        for b in baselines_of(v):
            if b in means and b != v:
                out["paired"].setdefault(v, {})[b] = {m: paired(means[v], means[b], m) for m in PAIRED}
    return out


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "n/a" if not math.isfinite(x) else (f"{x:.4f}" if x >= 1e-4 else f"{x:.1e}")


def summary_markdown(summary: dict, settings: AblationSettings, n_runs: dict[str, int], note: str = "") -> str:
    units = {"dsc": "DSC (%)", "hd95": "HD95 (mm)", "asd": "ASD (mm)", "nsd": "NSD 1 mm (%)"}
    lines = [f"# sats ablation: {settings.dataset}", "",
             f"Preset `{settings.preset}`, fold {settings.fold}, seeds {','.join(map(str, settings.seeds))}; "
             "metrics averaged over seeds per case, then mean ± sd over test cases." + (f" {note}" if note else ""), "",
             "| variant | runs | cases | " + " | ".join(units[m] for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for v in [v for v in VARIANTS if v in summary["variants"]]:
        s = summary["variants"][v]
        cells = []
        for m in METRICS:
            cell = f"{_fmt(s[m]['mean'])} ± {_fmt(s[m]['sd'])}"
            cells.append(cell + (f" ({s[m]['empty']} empty)" if s[m]["empty"] else ""))
        lines.append(f"| {v} | {n_runs.get(v, 0)} | {max(s[m]['n'] + s[m]['empty'] for m in METRICS)} | " + " | ".join(cells) + " |")
    for b in ALL_BASELINES:
        rows = [(v, summary["paired"][v][b]) for v in VARIANTS if b in summary["paired"].get(v, {})]
        if not rows:
            continue
        lines += ["", f"## Paired against `{b}` (variant minus {b}; 95 % bootstrap CI; Wilcoxon signed-rank p)", "",
                  "| variant | ΔDSC (pp) | 95 % CI | p | ΔHD95 (mm) | 95 % CI | p | ΔNSD (pp) | 95 % CI | p | n |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for v, st in rows:
            cells = []
            for m in PAIRED:
                cells += [_fmt(st[m]["mean_diff"]), f"[{_fmt(st[m]['ci_low'])}, {_fmt(st[m]['ci_high'])}]", _p(st[m]["p_wilcoxon"])]
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {st['dsc']['n']} |")
    return "\n".join(lines) + "\n"


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
        others = [v for v in VARIANTS if v in means and v != b and b in baselines_of(v)]
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


def _predict_and_score(run: Path, dataset: Path, planes: dict, console, device: str | None = None) -> list[dict]:
    """Predict every test CT into ``run/test`` (cases already there are kept), then score."""
    from sats.data.dataset import list_cases
    from sats.data.io import read_image, write_image
    from sats.evaluation.metrics import compute_metrics
    from sats.predict.inference import load_run, predict_case

    scores = run / "metrics.csv"
    if scores.exists():
        return _read_rows(scores)
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_run(run, device)
    rows = []
    for case in list_cases(dataset, "Ts"):
        target = run / "test" / f"{case.case_id}.nii.gz"
        ct = read_image(case.image)
        if target.exists():
            mask = read_image(target)
        else:
            pre = loaded.preprocessor(ct, alignment=planes.get(case.case_id))
            mask = predict_case(loaded, ct, pre, device=device).mask
            write_image(mask, target)
        m = compute_metrics(mask.array, read_image(case.label).array, ct.spacing, case=case.case_id)  # type: ignore[arg-type]
        rows.append({"case": case.case_id, "dsc": m.dsc, "hd95": m.hd95, "asd": m.asd, "nsd": m.nsd})
    _write_rows(scores, rows, ("case", *METRICS))
    return _read_rows(scores)


def write_outputs(out: Path, settings: AblationSettings, rows: list[dict]) -> dict:
    """cases.csv, summary.md, summary.json and ablation.png from the rows so far."""
    _write_rows(out / "cases.csv", rows, ("variant", "seed", "case", *METRICS))
    rows = _read_rows(out / "cases.csv")  # the statistics use exactly what the CSV holds
    # While a study runs, the tables use the seeds every variant has finished, so that
    # each comparison pairs the same seeds; until one has, whatever has finished.
    variants = {r["variant"] for r in rows}
    complete = [s for s in sorted({r["seed"] for r in rows}) if {r["variant"] for r in rows if r["seed"] == s} == variants]
    pending = sorted({(r["variant"], r["seed"]) for r in rows if r["seed"] not in complete}) if complete else []
    if pending:
        rows = [r for r in rows if r["seed"] in complete]
    summary = summarize_rows(rows)
    n_runs = {v: len({r["seed"] for r in rows if r["variant"] == v}) for v in settings.variants}
    note = (f"Left out until every variant has finished their seed: {', '.join(f'{v}-s{s}' for v, s in pending)} "
            "(in cases.csv).") if pending else ""
    write_text_atomic(out / "summary.md", summary_markdown(summary, settings, n_runs, note))
    write_text_atomic(out / "summary.json", json.dumps(summary["paired"], indent=2))
    plot_paired(rows, out / "ablation.png")
    return summary


def run_ablation(settings: AblationSettings, out: Path, console=None, device: str | None = None) -> dict:
    """Train, predict and evaluate every (variant, seed); resumable at any point."""
    from rich.console import Console

    from sats.data.dataset import check_dataset, list_cases
    from sats.model.training import train

    console = console or Console()
    dataset, out = Path(settings.dataset), Path(out)
    test = list_cases(dataset, "Ts")
    if not test or any(c.label is None for c in test):
        raise SatsError(f"{dataset}: the ablation evaluates on imagesTs, which needs labelsTs for every case")
    report = check_dataset(dataset)
    if report.problems:
        raise SatsError(f"{dataset}: fails `sats check` ({len(report.problems)} problem(s)); first: {report.problems[0]}")
    stored = out / "ablation.json"
    if stored.exists():
        # Runs are independent per (variant, seed), so a study may grow or shrink its
        # variants and seeds; every other setting must match what its runs were trained with.
        before, now = json.loads(stored.read_text()), asdict(settings)
        changed = [k for k in before if k not in ("variants", "seeds") and before.get(k) != now.get(k)]
        if changed:
            raise SatsError(f"{out}: a study with other settings ({', '.join(changed)}) is there; use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stored, json.dumps(asdict(settings), indent=2))

    runs = [(v, s) for s in settings.seeds for v in settings.variants]  # seed-major: early results cover every variant
    rows: list[dict] = []
    planes = None
    spent: list[float] = []
    # Several `sats ablation` processes (or machines sharing the folder) may work on one
    # study: each claims a run while it trains, predicts and scores it, and leaves runs
    # that another holds for later, when it waits for them and reads their scores.
    todo, busy = list(enumerate(runs, 1)), []
    for wait in (False, True):
        for i, (variant, seed) in todo:
            run = out / "runs" / f"{variant}-s{seed}"
            run.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with claim(run / ".ablation.lock", wait) as held:
                if not held:
                    console.print(f"{variant}-s{seed}: taken by another `sats ablation` on {out}; coming back to it",
                                  highlight=False)
                    busy.append((i, (variant, seed)))
                    continue
                if not _run_done(run):
                    cfg = variant_config(settings, variant, seed)
                    console.rule(f"run {i}/{len(runs)}: {variant}, seed {seed}")
                    train(dataset, run, cfg, resume=(run / CHECKPOINT_FILE).exists(), cache=out / "cache", device=device,
                          console=console)
                if planes is None:
                    planes = _test_planes(dataset, out, variant_config(settings, variant, seed).align, console)
                for r in _predict_and_score(run, dataset, planes, console, device):
                    rows.append({"variant": variant, "seed": seed, **{k: r[k] for k in ("case", *METRICS)}})
            summary = write_outputs(out, settings, rows)
            took = time.time() - t0
            if took > 60:
                spent.append(took)
            left = (len(runs) - i) * (float(np.mean(spent)) if spent else 0.0)
            dsc = summary["variants"][variant]["dsc"]["mean"]
            console.print(f"[bold]run {i}/{len(runs)}[/] {variant}-s{seed}: test DSC {dsc:.2f} (seed-averaged so far); "
                          f"{took / 60:.1f} min" + (f", about {left / 60:.0f} min left" if spent and i < len(runs) else ""),
                          highlight=False)
        todo, busy = busy, []
    return summarize_rows(rows)
