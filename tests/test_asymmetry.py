"""Unsupervised asymmetric-region selection (sats.geometry.asymmetry) and training with unlabelled CTs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sats.data.io import read_image
from sats.data.phantom import PhantomConfig, make_case
from sats.geometry.asymmetry import AsymmetryConfig, analysis_region, asymmetry_map, asymmetry_on_input_grid, precision_recall
from sats.geometry.preprocessing import Preprocessor
from sats.model.losses import asymmetric_mask
from sats.model.training import train
from test_training import make_tiny_dataset, tiny_config

SPACING = (2.0, 2.0, 2.0)


def _on_grid(case):
    return Preprocessor(SPACING)(case.ct, label=case.label)


@pytest.fixture(scope="module")
def phantom_maps():
    out = {}
    for seed in (101, 102):
        for free in (False, True):
            pre = _on_grid(make_case(seed, 0, "Tr", PhantomConfig(tumor_free=free)))
            out[seed, free] = (pre, asymmetry_map(pre))
    return out


def test_m_unsup_finds_the_phantom_tumour_asymmetry(phantom_maps) -> None:
    # Measured (BENCHMARKS.md): precision 0.24 / 0.46, recall 0.34 / 0.32 against s XOR s'
    # on these two cases; the floor leaves a margin.
    scores = []
    for seed in (101, 102):
        pre, result = phantom_maps[seed, False]
        union = asymmetric_mask(torch.from_numpy(pre.label), region="union").numpy()
        scores.append(precision_recall(result.mask, union))
    precision, recall = np.mean(scores, axis=0)
    assert precision >= 0.15 and recall >= 0.15, scores


def test_tumour_free_phantom_gives_nearly_empty_m_unsup(phantom_maps) -> None:
    # Threshold: at most 5 ml, and under a quarter of the same head with its tumour
    # (measured 3.1 and 0.0 ml against 25 and 22 ml).
    for seed in (101, 102):
        ml_free = phantom_maps[seed, True][1].mask.sum() * np.prod(SPACING) / 1000
        ml_tumour = phantom_maps[seed, False][1].mask.sum() * np.prod(SPACING) / 1000
        assert ml_free <= 5.0 and ml_free < ml_tumour / 4, (seed, ml_free, ml_tumour)


def test_m_unsup_stays_in_the_nasopharynx_box(phantom_maps) -> None:
    pre, result = phantom_maps[101, False]
    box = analysis_region(pre)
    nx = pre.grid.shape[2]
    assert box[2].start + box[2].stop == nx  # symmetric about the plane (x = left-right)
    assert np.prod([sl.stop - sl.start for sl in box]) < 0.8 * np.prod(pre.grid.shape)  # a box, not the whole head
    outside = result.mask.copy()
    outside[box] = 0
    assert result.mask[box].any() and not outside.any()
    assert (analysis_region(pre, AsymmetryConfig(region="body"))[0].stop == pre.grid.shape[0])


def test_volume_crop_keeps_points_in_place() -> None:
    pre = _on_grid(make_case(101, 0, "Tr", PhantomConfig()))
    box = (slice(3, 20), slice(5, 30), slice(2, 40))
    sub = pre.grid.crop(box)
    assert sub.shape == (17, 25, 38)
    assert np.allclose(sub.index_to_physical(np.array([1, 2, 3])), pre.grid.index_to_physical(np.array([4, 7, 5])))
    assert sub.array[1, 2, 3] == pre.grid.array[4, 7, 5]


def test_mask_and_score_come_back_on_the_input_grid() -> None:
    case = make_case(102, 0, "Tr", PhantomConfig())
    mask, score, _ = asymmetry_on_input_grid(case.ct, SPACING)
    assert mask.same_geometry(case.ct) is None and score.same_geometry(case.ct) is None
    assert set(np.unique(mask.array)) <= {0, 1} and mask.array.any()
    assert (mask.array & case.label.array).any()  # it reaches the tumour itself


def test_cli_asymmetry_writes_both_images(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sats.cli import app
    from sats.data.io import write_image

    case = make_case(101, 0, "Tr", PhantomConfig())
    write_image(case.ct, tmp_path / "ct.nii.gz")
    result = CliRunner().invoke(app, ["asymmetry", "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "m.nii.gz"),
                                      "--score", str(tmp_path / "s.nii.gz")])
    assert result.exit_code == 0, result.output
    assert read_image(tmp_path / "m.nii.gz").same_geometry(case.ct) is None
    assert read_image(tmp_path / "s.nii.gz").array.max() > 1.0  # above the threshold somewhere
    bad = CliRunner().invoke(app, ["asymmetry", "-i", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "x.nii.gz")])
    assert bad.exit_code == 1 and "missing.nii.gz" in bad.output and not (tmp_path / "x.nii.gz").exists()


def _split_off_unlabelled(data: Path, unlabelled: Path, ids: list[str]) -> None:
    unlabelled.mkdir()
    for cid in ids:
        (data / "imagesTr" / f"{cid}_0000.nii.gz").rename(unlabelled / f"u_{cid}.nii.gz")
        (data / "labelsTr" / f"{cid}.nii.gz").unlink()
    meta = json.loads((data / "dataset.json").read_text())
    meta["numTraining"] -= len(ids)
    (data / "dataset.json").write_text(json.dumps(meta))


def test_train_with_unlabelled_cts_runs_resumes_and_records_them(tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path / "data", n=6)
    _split_off_unlabelled(data, tmp_path / "unl", ["case_004", "case_005"])
    (data / "labelsTr" / "case_003.nii.gz").unlink()  # an imagesTr entry without a label joins them
    cfg = tiny_config(stage1_epochs=1, stage2_epochs=2, fold="all", unlabelled=str(tmp_path / "unl"),
                      unlabelled_fraction=0.5, localiser_iters=0)
    run = tmp_path / "run"
    train(data, run, cfg, device="cpu", max_epochs=2)  # interrupted in stage 2
    result = train(data, run, cfg, resume=True, device="cpu")
    assert result.epochs == 3
    config = json.loads((run / "config.json").read_text())
    assert sorted(config["unlabelled_ids"]) == ["case_003", "u_case_004", "u_case_005"]
    assert config["train"]["unlabelled_fraction"] == 0.5 and config["train"]["unlabelled"] == str(tmp_path / "unl")
    assert sorted(config["train_ids"]) == ["case_000", "case_001", "case_002"]
    log = [line.split(",") for line in (run / "log.csv").read_text().splitlines()]
    margin = [float(row[log[0].index("margin")]) for row in log[1:]]
    assert margin[0] == 0.0 and all(m > 0 for m in margin[1:])  # stage 2 has the margin loss
    # m_unsup is cached once per unlabelled CT and found again by the resumed call.
    assert len(list((run / "cache" / "unlabelled").glob("*_asym.npy"))) == 3


def test_unlabelled_patches_add_only_the_margin_loss() -> None:
    from sats.model.losses import SegmentationLoss
    from sats.model.network import SATsNet, plan_network
    from sats.model.training import train_step

    cfg = tiny_config()
    torch.manual_seed(0)
    model = SATsNet(plan_network(cfg.patch_size, cfg.spacing, cfg.base_features, cfg.max_features),
                    head_channels=cfg.head_channels)
    x = torch.randn(2, 1, *cfg.patch_size)
    s = torch.zeros(2, 1, *cfg.patch_size)
    s[1, :, 4:8, 8:16, 2:8] = 1
    m = torch.zeros_like(s)
    m[0, :, 4:8, 8:16, 20:28] = 1  # patch 0 (unlabelled): its m_unsup

    def step(label: torch.Tensor) -> dict:
        frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay as they are
        return train_step(model, x, label, cfg, "2", frozen, SegmentationLoss(), m=m, labelled=torch.tensor([False, True]))

    t1 = step(s)
    s2 = s.clone()
    s2[0] = 1  # whatever an unlabelled patch's placeholder label says, the loss ignores it
    t2 = step(s2)
    assert float(t1["dice"]) == pytest.approx(float(t2["dice"])) and float(t1["ce"]) == pytest.approx(float(t2["ce"]))
    assert float(t1["margin"]) > 0


def test_an_atlas_training_aligns_its_unlabelled_cts_with_the_atlas(tmp_path: Path) -> None:
    """With --atlas, unlabelled CTs go through the same plane search as the labelled ones:
    their cached image is the atlas-aligned one, not the self-aligned one."""
    from sats.data.io import write_image
    from sats.data.phantom import write_phantom_dataset
    from sats.geometry.preprocessing import IntensityStats, PlaneSettings, Preprocessor, make_atlas

    data = write_phantom_dataset(tmp_path / "data", n_train=2, n_test=0, seed=5)
    atlas = tmp_path / "atlas.nii.gz"
    write_image(make_atlas([make_case(21, i, config=PhantomConfig(tumor_free=True)).ct for i in range(2)], spacing=(3.0, 2.0, 2.0)), atlas)
    (tmp_path / "unl").mkdir()
    ct = make_case(6, 3).ct
    write_image(ct, tmp_path / "unl" / "u0.nii.gz")
    cfg = tiny_config(spacing=(3.0, 3.2, 3.2), stage1_epochs=1, stage2_epochs=1, fold="all", unlabelled=str(tmp_path / "unl"),
                      localiser_iters=0, align=True, atlas=str(atlas))
    run = tmp_path / "run"
    train(data, run, cfg, device="cpu")
    config = json.loads((run / "config.json").read_text())
    assert config["unlabelled_ids"] == ["u0"]
    stats, spacing = IntensityStats(**config["intensity"]), tuple(config["spacing"])
    by_atlas = Preprocessor(spacing, stats, PlaneSettings("atlas", str(atlas)))(ct)
    by_self = Preprocessor(spacing, stats, PlaneSettings("self"))(ct)
    # The two planes differ enough for the images to tell them apart (else this test could not fail).
    assert by_atlas.plane.angle_to(by_self.plane) > 0.2 or abs(by_atlas.plane.signed_distance(by_self.plane.point)) > 0.5
    cached = np.load(run / "cache" / "unlabelled" / "u0_image.npy")
    assert cached.shape == by_atlas.image.shape and np.allclose(cached, by_atlas.image, atol=1e-4)
    assert cached.shape != by_self.image.shape or np.abs(cached - by_self.image).max() > 0.5
