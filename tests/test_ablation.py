"""sats ablation: variants, paired statistics, and a study that survives SIGKILL."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sats.evaluation.ablation import METRICS, AblationSettings, variant_config, write_outputs
from sats.geometry.volume import SatsError
from sats.model.config import VARIANTS
from sats.model.training import train

from test_training import make_tiny_dataset, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _rows(seed: int = 0) -> list[dict]:
    """Made-up per-case metrics: sats better than unet on average, noisy, one empty prediction."""
    rng = np.random.default_rng(seed)
    rows = []
    base = rng.uniform(40, 80, 12)
    for variant, shift in (("unet", 0.0), ("siamese", 0.5), ("sats", 3.0)):
        for s in (0, 1):
            for i, b in enumerate(base):
                dsc = float(np.clip(b + shift + rng.normal(0, 4), 0, 100))
                hd = math.inf if (variant == "siamese" and s == 1 and i == 3) else float(rng.uniform(3, 15))
                rows.append({"variant": variant, "seed": s, "case": f"c{i:02d}", "dsc": dsc, "hd95": hd,
                             "asd": float(rng.uniform(1, 4)), "nsd": float(rng.uniform(30, 90))})
    return rows


def test_each_comparison_pairs_only_the_seeds_both_arms_have_finished(tmp_path):
    rows = [r for r in _rows() if not (r["variant"] != "unet" and r["seed"] == 1)]  # unet ahead by one seed
    settings = AblationSettings(dataset="x", variants=["unet", "siamese", "sats"], seeds=[0, 1])
    write_outputs(tmp_path, settings, rows)
    md = (tmp_path / "summary.md").read_text()
    assert "| unet | 2 | 12 |" in md and "| sats | 1 | 12 |" in md  # each variant's own row uses every seed it has
    only_seed0 = [r for r in rows if r["seed"] == 0]
    (tmp_path / "ref").mkdir()
    write_outputs(tmp_path / "ref", settings, only_seed0)
    # ... but sats against unet pairs seed 0 with seed 0 only: as if unet's seed 1 were not there.
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert len((tmp_path / "cases.csv").read_text().splitlines()) == len(rows) + 1  # every run stays in cases.csv


def _designed_rows(rng: np.random.Generator, base: dict[str, np.ndarray], shifts: dict[str, dict[str, np.ndarray]],
                   seeds: tuple[int, ...]) -> list[dict]:
    """cases.csv rows whose per-case means over seeds are ``base[metric]`` (unet) and
    ``base[metric] + shifts[variant][metric]``: the seeds of a case scatter around its mean
    (seed noise that sums to zero over the seeds), and each variant lists its cases in an
    order of its own. Every value has two decimals, well within what cases.csv keeps."""
    n = len(base["dsc"])
    rows = []
    for variant in ("unet", *shifts):
        means = {m: base[m] + (shifts[variant][m] if variant != "unet" else 0.0) for m in METRICS}
        noise = {m: rng.integers(-300, 301, (n, len(seeds))) for m in METRICS}  # in hundredths
        for m in METRICS:
            noise[m][:, -1] = -noise[m][:, :-1].sum(axis=1)  # the seeds of a case average to its mean
        for i in rng.permutation(n):
            for k, s in enumerate(seeds):
                rows.append({"variant": variant, "seed": s, "case": f"c{i:03d}",
                             **{m: round(float(means[m][i] + noise[m][i, k] / 100), 2) for m in METRICS}})
    return rows


def _exact_bootstrap_interval(d: np.ndarray) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of the mean of n cases drawn with replacement from ``d``,
    from the exact distribution: every multiset of n cases, weighted by its multinomial
    probability (no random numbers)."""
    n = len(d)
    draws = np.array(list(itertools.combinations_with_replacement(range(n), n)))
    counts = (draws[:, :, None] == np.arange(n)).sum(axis=1)  # how often each case was drawn
    factorial = np.array([math.factorial(k) for k in range(n + 1)], float)
    prob = math.factorial(n) / factorial[counts].prod(axis=1) / n**n
    means = d[draws].mean(axis=1)
    order = np.argsort(means)
    means, cdf = means[order], np.cumsum(prob[order])
    assert cdf[-1] == pytest.approx(1.0)
    return float(means[np.searchsorted(cdf, 0.025)]), float(means[np.searchsorted(cdf, 0.975)])


def _exact_wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided signed-rank p-value by enumerating all 2**n sign patterns (distinct |d|, no zeros)."""
    n = len(d)
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    w_plus = ranks[d > 0].sum()
    positive = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    w = positive @ ranks  # W+ of every sign pattern, each equally likely under the null
    return min(1.0, 2 * min(np.mean(w >= w_plus), np.mean(w <= w_plus)))


def _normal_wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided signed-rank p-value from the normal approximation (distinct |d|, no zeros)."""
    n = len(d)
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    z = (ranks[d > 0].sum() - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    return math.erfc(abs(z) / math.sqrt(2))


def _distinct_magnitudes(rng: np.random.Generator, n: int, top: int, positive: float) -> np.ndarray:
    """n differences in hundredths with distinct non-zero magnitudes, ``positive`` of them > 0."""
    magnitudes = rng.choice(np.arange(1, top + 1), size=n, replace=False) / 100
    return np.where(rng.random(n) < positive, magnitudes, -magnitudes)


def test_summary_pairs_cases_by_id_and_agrees_with_the_normal_approximation(tmp_path):
    """Many cases: the 95 % bootstrap interval of a mean difference is close to mean ± 1.96
    sd/sqrt(n); a difference that is the same for every case has a zero-width interval at
    that value, which pairing by anything but the case id (each variant lists its cases in
    its own order) would widen; the Wilcoxon p from the normal approximation."""
    rng = np.random.default_rng(7)
    n = 200
    base = {"dsc": rng.integers(4000, 8000, n) / 100, "hd95": rng.integers(2000, 4000, n) / 100,
            "asd": rng.integers(100, 400, n) / 100, "nsd": rng.integers(3000, 9000, n) / 100}
    constant = {"dsc": 2.5, "hd95": -1.25, "nsd": 0.75, "asd": 0.0}
    shifts = {"siamese": {m: np.full(n, c) for m, c in constant.items()},
              "sats": {"dsc": _distinct_magnitudes(rng, n, 1500, 0.75), "hd95": rng.integers(-500, 300, n) / 100,
                       "asd": np.zeros(n), "nsd": rng.integers(-800, 1200, n) / 100}}
    rows = _designed_rows(rng, base, shifts, seeds=(0, 1))
    empty = next(r for r in rows if r["variant"] == "siamese" and r["seed"] == 1 and r["case"] == "c003")
    empty["hd95"] = math.inf  # an empty prediction: case c003 leaves the HD95 comparisons of siamese only
    settings = AblationSettings(dataset="x", variants=["unet", "siamese", "sats"], seeds=[0, 1])
    write_outputs(tmp_path, settings, rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"siamese", "sats", "unet"}
    assert set(summary["sats"]) == {"unet", "siamese"} and set(summary["siamese"]) == {"unet"}
    assert set(summary["unet"]) == {"siamese"}
    keep = np.arange(n) != 3
    for metric in ("dsc", "hd95", "nsd"):
        for variant, baseline, sign in (("siamese", "unet", 1), ("unet", "siamese", -1)):
            ours = summary[variant][baseline][metric]
            assert ours["n"] == (n - 1 if metric == "hd95" else n)
            for key in ("mean_diff", "ci_low", "ci_high"):
                assert ours[key] == pytest.approx(sign * constant[metric], abs=1e-9), (variant, metric, key)
        for baseline, d in (("unet", shifts["sats"][metric]), ("siamese", shifts["sats"][metric] - constant[metric])):
            if metric == "hd95" and baseline == "siamese":
                d = d[keep]
            ours = summary["sats"][baseline][metric]
            se = d.std() / math.sqrt(len(d))  # of the mean; the bootstrap's spread (ddof 0)
            assert ours["n"] == len(d) and ours["mean_diff"] == pytest.approx(d.mean(), abs=1e-9), (baseline, metric)
            assert ours["ci_low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.2 * se), (baseline, metric)
            assert ours["ci_high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.2 * se), (baseline, metric)
    d = shifts["sats"]["dsc"]
    assert summary["sats"]["unet"]["dsc"]["p_wilcoxon"] == pytest.approx(_normal_wilcoxon_p(d), rel=1e-6)
    md = (tmp_path / "summary.md").read_text()
    for variant, baseline in (("sats", "unet"), ("sats", "siamese"), ("siamese", "unet")):
        assert f"| {variant} | {summary[variant][baseline]['dsc']['mean_diff']:.2f} |" in md
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_summary_of_a_few_cases_agrees_with_exact_bootstrap_and_wilcoxon(tmp_path):
    """Nine cases, three seeds: the bootstrap interval against the exact bootstrap
    distribution (all multisets of cases) and the Wilcoxon p against an enumeration of all
    sign patterns, for every comparison."""
    rng = np.random.default_rng(3)
    n = 9
    base = {"dsc": rng.integers(4000, 8000, n) / 100, "hd95": rng.integers(2000, 4000, n) / 100,
            "asd": rng.integers(100, 400, n) / 100, "nsd": rng.integers(3000, 9000, n) / 100}
    shifts = {v: {m: _distinct_magnitudes(rng, n, 1000, positive) for m in METRICS}
              for v, positive in (("siamese", 0.5), ("sats", 0.8))}
    settings = AblationSettings(dataset="x", variants=["unet", "siamese", "sats"], seeds=[0, 1, 2])
    write_outputs(tmp_path, settings, _designed_rows(rng, base, shifts, seeds=(0, 1, 2)))
    summary = json.loads((tmp_path / "summary.json").read_text())
    for variant, baseline in (("sats", "unet"), ("sats", "siamese"), ("siamese", "unet")):
        for metric in ("dsc", "hd95", "nsd"):
            d = shifts[variant][metric] - (shifts[baseline][metric] if baseline != "unet" else 0.0)
            d = d.round(2)  # the designed per-case differences, in hundredths
            assert len(set(np.abs(d))) == n and np.all(d != 0), "the design needs distinct non-zero differences"
            ours, where = summary[variant][baseline][metric], (variant, baseline, metric)
            se = d.std() / math.sqrt(n)
            low, high = _exact_bootstrap_interval(d)
            assert ours["n"] == n and ours["mean_diff"] == pytest.approx(d.mean(), abs=1e-9), where
            assert ours["ci_low"] == pytest.approx(low, abs=0.2 * se), where
            assert ours["ci_high"] == pytest.approx(high, abs=0.2 * se), where
            assert ours["p_wilcoxon"] == pytest.approx(_exact_wilcoxon_p(d), rel=1e-9), where


def test_variants_are_the_table_3_rows_and_the_baselines():
    s = AblationSettings(dataset="x", epochs=10, iters_per_epoch=3)
    cfgs = {v: variant_config(s, v, seed=7) for v in VARIANTS}
    assert not cfgs["unet"].siamese and not cfgs["unet"].margin_loss
    assert cfgs["siamese"].siamese and not cfgs["siamese"].projection_head and not cfgs["siamese"].margin_loss
    assert not cfgs["margin-no-head-2stage"].projection_head and cfgs["margin-no-head-2stage"].margin_loss
    # One schedule (a single decay) for every arm but the paper's two-stage rows, which say so.
    two_stage = {v for v, c in cfgs.items() if c.schedule == "two-stage"}
    assert two_stage == {"sats", "sats-unsup", "sats-semi"} | {v for v in VARIANTS if v.endswith("-2stage")}
    assert cfgs["fusion"].fusion == "mirror" and cfgs["fusion-reg"].fusion == "registered" and not cfgs["fusion"].siamese
    assert cfgs["feature-fusion"].feature_fusion and cfgs["sats-joint-union"].asym_region == "union"
    assert cfgs["sats"].projection_head and cfgs["sats"].margin_loss and cfgs["sats"].schedule == "two-stage"
    assert cfgs["sats-joint"].schedule == "joint" and cfgs["sats-joint"].stage(0) == "joint"
    semi = AblationSettings(dataset="x", variants=["sats-semi-joint"], unlabelled="u")
    assert variant_config(semi, "sats-semi-joint", 7).unlabelled == "u" and variant_config(semi, "sats-semi-joint", 7).schedule == "joint"
    assert cfgs["sats-semi-joint"].unlabelled is None  # only with --unlabelled
    with pytest.raises(SatsError, match="sats-semi-joint variant"):
        AblationSettings(dataset="x", variants=["sats-semi-joint"])
    # Equal budget: the same epochs, iterations, batch, patch and seed for every variant.
    budget = {(c.total_epochs, c.iters_per_epoch, c.batch_size, c.patch_size, c.seed) for c in cfgs.values()}
    assert budget == {(10, 3, 2, (24, 80, 80), 7)}
    with pytest.raises(SatsError, match="unknown variant"):
        AblationSettings(dataset="x", variants=["sats", "nnunet"])


@pytest.mark.parametrize("variant", ["unet", "sats-joint"])
def test_unet_and_joint_variants_train(tmp_path, variant):
    data = make_tiny_dataset(tmp_path / "data")
    cfg = tiny_config(stage1_epochs=2, stage2_epochs=0, fold="all", **VARIANTS[variant])
    result = train(data, tmp_path / "run", cfg, device="cpu")
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    rows = [dict(zip(log[0].split(","), line.split(","))) for line in log[1:]]
    assert len(rows) == 2
    if variant == "unet":
        assert result.model.head is None or all(float(r["margin"]) == 0.0 for r in rows)
        assert all(r["stage"] == "joint" for r in rows)  # one schedule: a single decay over both epochs
        assert float(rows[0]["lr"]) > float(rows[1]["lr"]) > 0.0
    else:  # the margin loss and the head from the first epoch, one stage
        assert all(r["stage"] == "joint" for r in rows)
        assert all(float(r["margin"]) > 0.0 and float(r["lr_head"]) > 0.0 for r in rows)


def test_the_margin_loss_needs_the_mirror_branch():
    from sats.model.config import TrainConfig

    with pytest.raises(SatsError, match="siamese"):
        TrainConfig(siamese=False, margin_loss=True)


def _tiny_with_test_split(root: Path, seed: int = 0) -> Path:
    data = make_tiny_dataset(root, n=6, seed=seed)
    for folder in ("imagesTs", "labelsTs"):
        (data / folder).mkdir()
    for i in (4, 5):
        (data / "imagesTr" / f"case_{i:03d}_0000.nii.gz").rename(data / "imagesTs" / f"case_{i:03d}_0000.nii.gz")
        (data / "labelsTr" / f"case_{i:03d}.nii.gz").rename(data / "labelsTs" / f"case_{i:03d}.nii.gz")
    meta = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**meta, "numTraining": 4}))
    return data


def test_ablation_survives_sigkill_and_does_not_retrain_finished_runs(tmp_path):
    data = _tiny_with_test_split(tmp_path / "tiny")
    out = tmp_path / "study"
    # The tiny cases are ellipsoids, not heads: no alignment, and a small patch.
    cmd = [sys.executable, "-m", "sats", "ablation", str(data), "--out", str(out), "--variants", "unet,sats",
           "--seeds", "0,1", "--epochs", "2", "--iters-per-epoch", "2", "--no-align", "--patch-size", "16", "32", "32",
           "--fold", "all"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    done = out / "runs" / "unet-s0" / "model.pt"
    deadline = time.time() + 300
    while not (out / "runs" / "sats-s0" / "config.json").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the study finished before it could be interrupted"
    os.killpg(first.pid, signal.SIGKILL)  # in the middle of the second run
    first.wait()
    assert done.exists() and not (out / "cases.csv").read_text().count("sats,")
    stamp = done.stat().st_mtime_ns
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert done.stat().st_mtime_ns == stamp  # the finished run was not trained again
    with open(out / "cases.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 * 2 and {r["variant"] for r in rows} == {"unet", "sats"}
    assert set(json.loads((out / "summary.json").read_text())["sats"]) == {"unet"}
    # A restart with other settings is refused rather than mixed in.
    other = subprocess.run([c if c != "2" else "3" for c in cmd], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and "other settings" in other.stderr


def test_a_test_ct_that_cannot_be_aligned_is_still_scored(tmp_path, monkeypatch):
    import sats.geometry.preprocessing as preprocessing
    from rich.console import Console

    from sats.evaluation.ablation import _test_planes
    from sats.geometry.alignment import Alignment
    from sats.geometry.grid import grid_centre_plane

    data = _tiny_with_test_split(tmp_path / "data")
    test_ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (data / "imagesTs").glob("*_0000.nii.gz"))
    assert len(test_ids) >= 2

    def flaky(ct, **kw):  # the plane search: the first test CT's best plane scores 0.20, under the threshold
        flaky.n += 1
        return Alignment(grid_centre_plane(ct), 0.9, 0.2 if flaky.n == 1 else 0.9, 0.0)  # the featureless toys score too low

    flaky.n = 0
    monkeypatch.setattr(preprocessing, "find_plane", flaky)
    console = Console(record=True, width=300)
    planes = _test_planes(data, tmp_path / "study", True, console)
    assert set(planes) == set(test_ids)  # every test case stays in the study
    assert planes[test_ids[0]].source == "grid-centre" and "unreliable" in planes[test_ids[0]].reason
    assert all(planes[c].source == "symmetry" for c in test_ids[1:]), console.export_text()
    assert "grid centre" in console.export_text()


def test_two_processes_share_a_study_by_claiming_runs(tmp_path, monkeypatch):
    """A run held by another `sats ablation` is skipped, then waited for and read, not retrained."""
    import threading

    import sats.evaluation.ablation as ablation
    import sats.model.training as training
    from rich.console import Console

    from sats.evaluation.ablation import run_ablation
    from sats.model.run import claim

    data = _tiny_with_test_split(tmp_path / "data")
    out = tmp_path / "study"
    trained = []

    def fake_train(dataset, run, cfg, **kw):
        trained.append(run.name)
        (run / "model.pt").write_bytes(b"")

    def fake_scores(run, dataset, planes, console, device, tag=""):
        rows = [{"case": "case_004", "dsc": 50.0 + len(run.name), "hd95": 3.0, "asd": 1.0, "nsd": 60.0}]
        ablation._write_rows(run / "metrics.csv", rows, ("case", *ablation.METRICS))
        return rows

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(ablation, "_predict_and_score", fake_scores)
    monkeypatch.setattr(ablation, "_test_planes", lambda *a: {})
    held = out / "runs" / "sats-s0"
    held.mkdir(parents=True)
    earlier = out / "runs" / "unet-s7"  # a run an earlier invocation (other seeds) finished
    earlier.mkdir()
    fake_scores(earlier, data, {}, None, None)
    got, release = threading.Event(), threading.Event()

    def other_process():  # flock conflicts between two opens, in one process too
        with claim(held / ".ablation.lock", wait=True):
            got.set()
            release.wait(30)
            (held / "model.pt").write_bytes(b"")  # it finished the run

    t = threading.Thread(target=other_process)
    t.start()
    got.wait(10)
    threading.Timer(1.0, release.set).start()
    console = Console(record=True, width=200)
    settings = AblationSettings(dataset=str(data), variants=["unet", "sats"], seeds=[0, 1], epochs=2, iters_per_epoch=2,
                                fold="all", align=False, patch_size=[16, 32, 32])
    run_ablation(settings, out, console=console)
    t.join()
    assert sorted(trained) == ["sats-s1", "unet-s0", "unet-s1"]  # not the run the other one held
    assert "sats-s0: taken by another" in console.export_text()
    with open(out / "cases.csv") as fh:
        got = {(r["variant"], r["seed"]) for r in csv.DictReader(fh)}
    assert got == {("unet", "0"), ("unet", "1"), ("sats", "0"), ("sats", "1"), ("unet", "7")}  # the study's every run


def test_semi_and_unsup_variants_are_also_paired_against_sats(tmp_path):
    rows = _rows()
    rows += [{**r, "variant": "sats-semi", "dsc": r["dsc"] + 1.0} for r in rows if r["variant"] == "sats"]
    settings = AblationSettings(dataset="x", variants=["unet", "siamese", "sats", "sats-semi"], seeds=[0, 1],
                                unlabelled="u")
    write_outputs(tmp_path, settings, rows)
    paired = json.loads((tmp_path / "summary.json").read_text())
    assert set(paired["sats-semi"]) == {"unet", "siamese", "sats"} and set(paired["sats"]) == {"unet", "siamese"}
    assert paired["sats-semi"]["sats"]["dsc"]["mean_diff"] == pytest.approx(1.0)
    for m in ("hd95", "nsd"):  # the other metrics of the two arms are the same rows: no difference
        assert paired["sats-semi"]["sats"][m]["mean_diff"] == 0.0
    assert "## Paired against `sats`" in (tmp_path / "summary.md").read_text()
