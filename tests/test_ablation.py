"""sats ablation: variants, paired statistics, and a study that survives SIGKILL."""

from __future__ import annotations

import csv
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
from scipy.stats import wilcoxon

from sats.evaluation.ablation import BOOTSTRAP, AblationSettings, variant_config, write_outputs
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


def _recompute(cases_csv: Path, variant: str, baseline: str, metric: str) -> dict:
    """The documented statistics, from cases.csv alone, with scipy."""
    with open(cases_csv) as fh:
        rows = list(csv.DictReader(fh))
    per: dict = {}
    for r in rows:
        per.setdefault(r["variant"], {}).setdefault(r["case"], []).append(float(r[metric]))
    v = {c: np.mean(x) for c, x in per[variant].items()}
    b = {c: np.mean(x) for c, x in per[baseline].items()}
    d = np.array([v[c] - b[c] for c in sorted(v) if np.isfinite(v[c]) and np.isfinite(b[c])])
    boot = d[np.random.default_rng(0).integers(0, len(d), size=(BOOTSTRAP, len(d)))].mean(axis=1)
    return {"mean_diff": d.mean(), "ci_low": np.percentile(boot, 2.5), "ci_high": np.percentile(boot, 97.5),
            "p_wilcoxon": wilcoxon(d).pvalue, "n": len(d)}


def test_a_study_in_progress_pairs_only_seeds_every_variant_has_finished(tmp_path):
    rows = [r for r in _rows() if not (r["variant"] != "unet" and r["seed"] == 1)]  # unet ahead by one seed
    settings = AblationSettings(dataset="x", variants=["unet", "siamese", "sats"], seeds=[0, 1])
    write_outputs(tmp_path, settings, rows)
    md = (tmp_path / "summary.md").read_text()
    assert "unet-s1" in md and "| unet | 1 | 12 |" in md  # seed 1 of unet waits for the others
    only_seed0 = [r for r in rows if r["seed"] == 0]
    (tmp_path / "ref").mkdir()
    write_outputs(tmp_path / "ref", settings, only_seed0)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert len((tmp_path / "cases.csv").read_text().splitlines()) == len(rows) + 1  # every run stays in cases.csv


def test_summary_equals_the_statistics_recomputed_from_cases_csv(tmp_path):
    settings = AblationSettings(dataset="x", variants=["unet", "siamese", "sats"], seeds=[0, 1])
    write_outputs(tmp_path, settings, _rows())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"siamese", "sats", "unet"}
    assert set(summary["sats"]) == {"unet", "siamese"} and set(summary["unet"]) == {"siamese"}
    md = (tmp_path / "summary.md").read_text()
    for variant, baseline in (("sats", "unet"), ("sats", "siamese"), ("siamese", "unet")):
        for metric in ("dsc", "hd95", "nsd"):
            ours = summary[variant][baseline][metric]
            ref = _recompute(tmp_path / "cases.csv", variant, baseline, metric)
            assert ours["n"] == ref["n"]
            for key in ("mean_diff", "ci_low", "ci_high", "p_wilcoxon"):
                assert ours[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), (variant, baseline, metric, key)
        # The markdown table carries the same numbers.
        assert f"| {variant} | {summary[variant][baseline]['dsc']['mean_diff']:.2f} |" in md
    # The empty prediction (infinite HD95 of one siamese seed) leaves that case out of HD95 only.
    assert summary["siamese"]["unet"]["hd95"]["n"] == 11 and summary["siamese"]["unet"]["dsc"]["n"] == 12
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_variants_are_the_table_3_rows_and_the_baselines():
    s = AblationSettings(dataset="x", epochs=10, iters_per_epoch=3)
    cfgs = {v: variant_config(s, v, seed=7) for v in VARIANTS}
    assert not cfgs["unet"].siamese and not cfgs["unet"].margin_loss
    assert cfgs["siamese"].siamese and not cfgs["siamese"].projection_head and not cfgs["siamese"].margin_loss
    assert not cfgs["margin-no-head"].projection_head and cfgs["margin-no-head"].margin_loss
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
        assert all(r["stage"] == "1" for r in rows)
    else:  # the margin loss and the head from the first epoch, one stage
        assert all(r["stage"] == "joint" for r in rows)
        assert all(float(r["margin"]) > 0.0 and float(r["lr_head"]) > 0.0 for r in rows)


def test_the_margin_loss_needs_the_mirror_branch():
    from sats.model.config import TrainConfig

    with pytest.raises(SatsError, match="siamese"):
        TrainConfig(siamese=False, margin_loss=True)


def _tiny_with_test_split(root: Path) -> Path:
    data = make_tiny_dataset(root, n=6)
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

    def fake_scores(run, dataset, planes, console, device):
        return [{"case": "case_004", "dsc": 50.0 + len(run.name), "hd95": 3.0, "asd": 1.0, "nsd": 60.0}]

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(ablation, "_predict_and_score", fake_scores)
    monkeypatch.setattr(ablation, "_test_planes", lambda *a: {})
    held = out / "runs" / "sats-s0"
    held.mkdir(parents=True)
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
        assert {(r["variant"], r["seed"]) for r in csv.DictReader(fh)} == {("unet", "0"), ("unet", "1"), ("sats", "0"), ("sats", "1")}


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
