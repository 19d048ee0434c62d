"""The mirror at inference: fusion inputs, feature fusion, and the statistics over seeds and cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from sats.cli import app
from sats.data.io import read_image, write_image
from sats.data.phantom import make_case
from sats.evaluation.ablation import seed_case_differences, seed_level, two_level_interval
from sats.geometry.alignment import reflection_matrix
from sats.geometry.grid import Roi
from sats.geometry.preprocessing import IntensityStats, Preprocessor
from sats.geometry.symmetry import Plane, mirror_lr
from sats.geometry.volume import Volume
from sats.model.network import SATsNet, plan_network
from sats.model.training import train
from sats.predict.inference import sliding_window_probabilities
from test_io import rotation
from test_training import make_tiny_dataset, tiny_config

STATS = IntensityStats(-200.0, 300.0, 40.0, 60.0)


def _network_inputs(model: SATsNet) -> list[torch.Tensor]:
    """Every input the encoder-decoder is given from now on."""
    seen: list[torch.Tensor] = []
    model.encoder_decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("seed", [3, 8])
def test_the_second_input_channel_is_the_mirror_about_the_plane(seed):
    """A phantom with a lesion on one side: at every voxel the fusion model's second channel
    holds the CT at the voxel's reflection about the phantom's true mid-sagittal plane."""
    case = make_case(seed, 1)
    pre = Preprocessor((3.0, 1.6, 1.6), STATS)(case.ct, label=case.label)  # aligned on the plane it finds
    patch = (16, 64, 64)
    nz, ny, nx = pre.image.shape
    cz, cy, _ = np.argwhere(pre.label > 0).mean(axis=0).round().astype(int)
    z0, y0 = int(np.clip(cz - patch[0] // 2, 0, nz - patch[0])), int(np.clip(cy - patch[1] // 2, 0, ny - patch[1]))
    roi = Roi((z0, y0, nx // 2 - patch[2] // 2), (z0 + patch[0], y0 + patch[1], nx // 2 + patch[2] // 2), "test")  # one window
    model = SATsNet(plan_network(patch, pre.grid.spacing, 4, 16), projection_head=False, fusion="mirror").eval()
    seen = _network_inputs(model)
    sliding_window_probabilities(model, pre.channels[(slice(None), *roi.slices)], patch)
    (x,) = seen
    ct_channel, mirror_channel = x[0, 0].numpy(), x[0, 1].numpy()
    np.testing.assert_array_equal(ct_channel, pre.image[roi.slices])
    # The reference: the original CT, normalised, sampled at each voxel's reflection about the true plane.
    crop = pre.grid.crop(roi.slices)
    a, b = reflection_matrix(Plane(case.pose["normal"], case.pose["point"]))
    mirrored_points = crop.index_to_physical(np.argwhere(np.ones(patch, bool))) @ a.T + b
    at = case.ct.physical_to_index(mirrored_points).T
    expected = STATS.normalise(ndimage.map_coordinates(case.ct.array.astype(np.float32), at, order=1, cval=-1024.0)).reshape(patch)
    head = ndimage.binary_erosion(ct_channel > STATS.normalise(np.float32(-300)), iterations=2)  # inside, off the outline
    assert head.sum() > 5000
    err = np.abs(mirror_channel - expected)[head]
    naive = np.abs(ct_channel - expected)[head]  # what a model without the mirror would see
    assert np.median(err) < 0.25 * np.median(naive), (np.median(err), np.median(naive))
    # ... and at the lesion, where the two sides differ most, it is the healthy partner.
    lesion = (pre.label[roi.slices] > 0) & head
    assert lesion.sum() > 20
    assert np.mean(np.abs(mirror_channel - expected)[lesion]) < 0.5 * np.mean(np.abs(ct_channel - mirror_channel)[lesion])


def test_feature_fusion_reads_each_voxels_mirror_partner():
    """The fused logit at voxel v is w_E . E(v) + w_E' . E'(v) + bias, with E' the mirror
    branch's features at v: those of v's mirror partner (the mirrored case holds it there)."""
    torch.manual_seed(0)
    plan = plan_network((8, 16, 16), (3.0, 1.6, 1.6), 4, 16)
    model = SATsNet(plan, projection_head=False, feature_fusion=True).eval()
    c = model.encoder_decoder.feature_channels
    x = torch.randn(2, 1, 8, 16, 16)
    with torch.no_grad():
        _, e = model.encoder_decoder(x)
        _, e_mirror = model.encoder_decoder(mirror_lr(x))
        w, bias = model.fuse.weight[0, :, 0, 0, 0], model.fuse.bias[0]
        out = model(x, mirror_lr(x), with_features=False)
        own = torch.einsum("c,bcdhw->bdhw", w[:c], e) + bias
        partner = torch.einsum("c,bcdhw->bdhw", w[c:], e_mirror)
    torch.testing.assert_close(out["logits"][:, 0], own + partner, rtol=1e-4, atol=1e-5)
    # The mirrored sample reads the CT's features as its partner's: the same weights, roles swapped.
    with torch.no_grad():
        swapped = torch.einsum("c,bcdhw->bdhw", w[:c], e_mirror) + torch.einsum("c,bcdhw->bdhw", w[c:], e) + bias
    torch.testing.assert_close(out["logits_mirror"][:, 0], swapped, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(partner, torch.einsum("c,bcdhw->bdhw", w[c:], mirror_lr(e_mirror)))  # no flip back
    with pytest.raises(ValueError, match="mirror"):
        model(x, None)


# --- the statistics over seeds and cases --------------------------------------------------------


def _naive_two_level(d: np.ndarray, draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """Seeds with replacement, then cases with replacement, the mean of the drawn grid: a loop."""
    means = []
    for _ in range(draws):
        seeds = rng.integers(0, d.shape[0], d.shape[0])
        cases = rng.integers(0, d.shape[1], d.shape[1])
        grid = d[np.ix_(seeds, cases)]
        means.append(np.nanmean(grid))
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_the_two_level_interval_recomputed_independently():
    rng = np.random.default_rng(5)
    # 6 seeds x 30 cases: a seed effect (sd 3) and a case effect (sd 6) around +1.
    d = 1.0 + rng.normal(0, 3, (6, 1)) + rng.normal(0, 6, (1, 30)) + rng.normal(0, 2, (6, 30))
    d[2, 7] = np.nan  # an empty prediction's HD95
    lo, hi = two_level_interval(d)
    ref_lo, ref_hi = _naive_two_level(d, 4000, np.random.default_rng(99))
    width = ref_hi - ref_lo
    assert abs(lo - ref_lo) < 0.08 * width and abs(hi - ref_hi) < 0.08 * width
    # Resampling the seeds widens the interval over a cases-only bootstrap of the seed averages.
    per_case = np.nanmean(d, axis=0)
    boot = per_case[np.random.default_rng(0).integers(0, 30, (4000, 30))].mean(axis=1)
    assert hi - lo > 1.3 * (np.percentile(boot, 97.5) - np.percentile(boot, 2.5))
    # No spread at all: a zero-width interval at the value.
    assert two_level_interval(np.full((3, 5), 2.5)) == (2.5, 2.5)


def test_seed_level_pairs_seed_with_seed_and_case_with_case():
    cases = [f"c{i}" for i in range(4)]
    base = {s: {c: {"dsc": 50.0 + i} for i, c in enumerate(cases)} for s in (0, 1, 2)}
    # seed 0 gains 4 points on every case, seed 1 loses 2, seed 2 is not in the variant's runs.
    variant = {0: {c: {"dsc": base[0][c]["dsc"] + 4.0} for c in cases},
               1: {c: {"dsc": base[1][c]["dsc"] - 2.0} for c in reversed(cases)}}
    seeds, d = seed_case_differences(variant, base, "dsc")
    assert seeds == [0, 1] and d.shape == (2, 4)
    out = seed_level(variant, base, "dsc")
    assert out["per_seed"] == [4.0, -2.0] and out["seeds"] == [0, 1]
    assert out["ci_low_2level"] == pytest.approx(-2.0) and out["ci_high_2level"] == pytest.approx(4.0)


def test_ablation_summary_has_both_intervals_and_subgroups(tmp_path):
    from sats.evaluation.ablation import AblationSettings, write_outputs

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    lesions = {f"t{i}": {"contrast_hu": float(rng.uniform(0, 15)), "volume_ml": float(rng.uniform(5, 60)),
                         "contralateral_fraction": float(i % 3 == 0) * 0.2, "side": "left" if i % 2 else "right"} for i in range(18)}
    (data / "lesions.json").write_text(json.dumps(lesions))
    rows = []
    for variant, gain in (("unet", 0.0), ("fusion", 2.0)):
        for seed in range(3):
            for case, lesion in lesions.items():
                faint = 3.0 if lesion["contrast_hu"] < 5 and variant == "fusion" else 0.0
                rows.append({"variant": variant, "seed": seed, "case": case, "dsc": 60 + gain + faint + rng.normal(0, 1),
                             "hd95": 5.0, "asd": 1.0, "nsd": 50.0})
    write_outputs(tmp_path / "study", AblationSettings(dataset=str(data), variants=["unet", "fusion"], seeds=[0, 1, 2]), rows)
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    dsc = summary["fusion"]["unet"]["dsc"]
    assert {"ci_low", "ci_high", "ci_low_2level", "ci_high_2level", "per_seed", "p_wilcoxon"} <= set(dsc)
    assert len(dsc["per_seed"]) == 3 and dsc["ci_low_2level"] < dsc["mean_diff"] < dsc["ci_high_2level"]
    groups = {g["group"]: g for g in json.loads((tmp_path / "study" / "subgroups.json").read_text())}
    faint = groups["contrast 0-5 HU"]
    assert faint["n"] == sum(v["contrast_hu"] < 5 for v in lesions.values())
    assert faint["mean_diff"] == pytest.approx(5.0, abs=1.0) and groups["contrast 5-10 HU"]["mean_diff"] == pytest.approx(2.0, abs=1.0)
    assert groups["crosses the midline"]["n"] == 6 and groups["left side"]["n"] == 9
    assert (tmp_path / "study" / "subgroups.png").stat().st_size > 5000
    md = (tmp_path / "study" / "summary.md").read_text()
    assert "2-level CI" in md and "Subgroups" in md and "treats the seeds as fixed" in md


# --- a fusion RUN end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fusion_runs(tmp_path_factory):
    """Tiny RUNs of the three designs that use the mirror at inference."""
    root = tmp_path_factory.mktemp("fusion")
    data = make_tiny_dataset(root / "data")
    runs = {}
    for name, options in (("fusion", {"fusion": "mirror", "siamese": False}),
                          ("fusion-reg", {"fusion": "registered", "fusion_difference": True, "siamese": False}),
                          ("feature-fusion", {"feature_fusion": True})):
        cfg = tiny_config(stage1_epochs=2, stage2_epochs=0, schedule="joint", projection_head=False, margin_loss=False,
                          fold="all", **options)
        train(data, root / name, cfg, device="cpu")
        runs[name] = root / name
    return runs, data


@pytest.mark.parametrize("name", ["fusion", "fusion-reg", "feature-fusion"])
def test_a_fusion_run_predicts_nifti_dicom_and_oblique_grids_onto_the_input_grid(fusion_runs, name, tmp_path):
    from sats.data.dicom import write_ct_series

    runs, data = fusion_runs
    ct = read_image(next((data / "imagesTr").iterdir()))
    odd = Volume(ct.array[:15], spacing=(2.7, 1.3, 1.7), origin=(12.5, -40.25, 101.0), direction=rotation(9, -4))
    write_image(odd, tmp_path / "odd_0000.nii.gz")
    write_ct_series(ct, tmp_path / "series")
    runner = CliRunner()
    for source, target, reference in ((tmp_path / "odd_0000.nii.gz", tmp_path / "odd.nii.gz", odd),
                                      (tmp_path / "series", tmp_path / "series.nii.gz", ct)):
        result = runner.invoke(app, ["predict", "-i", str(source), "-o", str(target), "-m", str(runs[name]), "--save-probabilities", "--tta"])
        assert result.exit_code == 0, result.output
        mask = read_image(target)
        assert mask.same_geometry(reference, tol_mm=1e-4) is None and set(np.unique(mask.array)) <= {0, 1}
        prob = read_image(str(target).replace(".nii.gz", "_probabilities.nii.gz"))
        assert prob.array.max() > 0.0


def test_the_fusion_runs_record_their_design(fusion_runs):
    runs, _ = fusion_runs
    configs = {n: json.loads((p / "config.json").read_text())["train"] for n, p in runs.items()}
    assert configs["fusion"]["fusion"] == "mirror" and configs["fusion-reg"]["fusion"] == "registered"
    assert configs["feature-fusion"]["feature_fusion"] and configs["fusion"]["schedule"] == "joint"
    weights = torch.load(Path(runs["fusion-reg"]) / "model.pt", weights_only=True)["model"]
    first = next(v for k, v in weights.items() if k.endswith("input_block.conv1.conv.weight"))
    assert first.shape[1] == 3  # the CT, its registered mirror, their difference


def assert_served_like_predict(run_dir, ct_file, make_predicting_run, tmp_path) -> None:
    """The DICOM node with the RUN ``run_dir`` (calibrated to mark a few % of ``ct_file``):
    the RTSTRUCT it sends holds the mask `sats predict` writes for the same series."""
    from sats.data.dicom import read_dicom_series, write_ct_series
    from sats.predict.export import read_rtstruct_roi
    from test_serve import Node, PlanningSystem, send_series, wait_state

    files = write_ct_series(read_image(ct_file), tmp_path / "series")
    run = make_predicting_run(run_dir, read_dicom_series(tmp_path / "series"), tmp_path / "run", fraction=0.03)
    result = CliRunner().invoke(app, ["predict", "-i", str(tmp_path / "series"), "-o", str(tmp_path / "pred.nii.gz"), "-m", str(run)])
    assert result.exit_code == 0, result.output
    expected = read_image(tmp_path / "pred.nii.gz")
    assert expected.array.sum() > 20
    tps = PlanningSystem()
    node = Node(run, tmp_path / "store", "--send-to", f"TPS@127.0.0.1:{tps.port}")
    try:
        assert set(send_series(files, node.port)) == {0}
        wait_state(tmp_path / "store", "sent", 240)
        (rs,) = tps.wait_for(1, 30)
        rs.save_as(tmp_path / "RS.dcm", enforce_file_format=True)
    finally:
        node.stop()
        tps.stop()
    got = read_rtstruct_roi(tmp_path / "RS.dcm", tmp_path / "series", rs.StructureSetROISequence[0].ROIName)
    assert got.same_geometry(expected, tol_mm=1e-3) is None
    np.testing.assert_array_equal(got.array > 0, expected.array > 0)


def test_a_fusion_run_serves_dicom_like_sats_predict(fusion_runs, make_predicting_run, tmp_path):
    """A registered-mirror fusion RUN through the DICOM node."""
    runs, data = fusion_runs
    assert_served_like_predict(runs["fusion-reg"], sorted((data / "imagesTr").iterdir())[1], make_predicting_run, tmp_path)


def test_a_small_ablation_of_the_fusion_arms_runs_end_to_end(tmp_path):
    """`sats ablation --variants unet,fusion,fusion-reg --seeds 0,1 --epochs 2 --iters-per-epoch 2`:
    every run scored, and summary.json's two intervals and per-seed differences for each arm."""
    from test_ablation import _tiny_with_test_split

    data = _tiny_with_test_split(tmp_path / "tiny")
    out = tmp_path / "study"
    result = CliRunner().invoke(app, ["ablation", str(data), "--out", str(out), "--variants", "unet,fusion,fusion-reg",
                                      "--seeds", "0,1", "--epochs", "2", "--iters-per-epoch", "2", "--no-align",
                                      "--fold", "all", "--patch-size", "16", "32", "32"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "runs").glob("*/metrics.csv"))) == 6
    paired = json.loads((out / "summary.json").read_text())
    for arm in ("fusion", "fusion-reg"):
        dsc = paired[arm]["unet"]["dsc"]
        assert dsc["ci_low_2level"] <= dsc["mean_diff"] <= dsc["ci_high_2level"] and len(dsc["per_seed"]) == 2
        assert dsc["ci_low"] <= dsc["mean_diff"] <= dsc["ci_high"] and dsc["seeds"] == [0, 1]
    assert len(list((out / "test_mirrors").glob("*.npy"))) == len(list((data / "imagesTs").iterdir()))  # fusion-reg's, once
