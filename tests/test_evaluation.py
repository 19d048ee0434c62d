"""Evaluation metrics: hand-computed cases, empty-mask rules, agreement with MONAI, cropping,
speed, CSV/plot outputs and the ``sats evaluate`` command."""

from __future__ import annotations

import csv
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from sats.cli import app
from sats.evaluation.metrics import (
    CSV_COLUMNS,
    CaseMetrics,
    average_surface_distance,
    compute_metrics,
    dice,
    evaluate_folders,
    hd95,
    normalized_surface_dice,
    plot_dice,
    print_summary,
    surface,
    surface_distances,
    write_csv,
)
from sats.data.io import case_id, write_image
from sats.geometry.volume import SatsError, Volume

SPACING = (3.0, 1.0, 1.0)


def ellipsoid(shape, center, radii) -> np.ndarray:
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c, r = center, radii
    return ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1.0


def random_blob(rng: np.random.Generator, shape, n_parts: int = 3) -> np.ndarray:
    """A union of a few random ellipsoids: irregular, sometimes touching the array border."""
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n_parts):
        center = [rng.uniform(0, s) for s in shape]
        radii = [rng.uniform(1.5, s / 3) for s in shape]
        mask |= ellipsoid(shape, center, radii)
    return mask


# --------------------------------------------------------------------------- by hand


def two_cubes() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((9, 8, 8), dtype=bool)
    gt[2:5, 2:5, 2:5] = True
    pred = np.zeros_like(gt)
    pred[3:6, 2:5, 2:5] = True  # the same 3x3x3 cube one slice (3 mm) higher
    return pred, gt


def test_cubes_offset_by_one_slice_match_hand_computation() -> None:
    # Each 27-voxel cube has 26 surface voxels (all but its centre); they share 18 voxels.
    # pred -> gt: the 8 non-centre voxels of slices z=3 and z=4 lie on gt's surface (16 x 0);
    # pred's centre of z=3 is 1 mm (in x) from gt's surface; the top slice z=5 (9 voxels)
    # is one slice = 3 mm above gt's top face. gt -> pred is the mirror image.
    pred, gt = two_cubes()
    m = compute_metrics(pred, gt, SPACING)
    assert m.dsc == pytest.approx(200 * 18 / 54)
    assert m.hd95 == pytest.approx(3.0)  # 95th percentile of 16x0, 1x1, 9x3 is 3
    assert m.asd == pytest.approx(2 * (1 * 1 + 9 * 3) / 52)  # = 1.0769 mm
    assert m.nsd == pytest.approx(100 * 34 / 52)  # 17 of 26 within 1 mm, each side
    assert m.gt_ml == pytest.approx(27 * 3 / 1000) and m.pred_ml == pytest.approx(27 * 3 / 1000)
    d_pg, d_gp = surface_distances(pred, gt, SPACING)
    assert sorted(d_pg) == sorted(d_gp) == [0.0] * 16 + [1.0] + [3.0] * 9


def test_spacing_is_applied_per_array_axis() -> None:
    pred, gt = two_cubes()
    # The same offset along x instead of z costs 1 mm, not 3 mm.
    pred_x = np.zeros_like(gt)
    pred_x[2:5, 2:5, 3:6] = True
    assert hd95(pred_x, gt, SPACING) == pytest.approx(1.0)
    assert hd95(pred, gt, SPACING) == pytest.approx(3.0)


def test_single_voxel_against_a_shifted_voxel() -> None:
    gt = np.zeros((8, 8, 8), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[5, 5, 5] = 1
    pred[6, 6, 5] = 7  # any label > 0 is tumour
    d = math.sqrt(3.0**2 + 1.0**2)
    m = compute_metrics(pred, gt, SPACING)
    assert m.dsc == 0.0
    assert m.hd95 == pytest.approx(d) and m.asd == pytest.approx(d)
    assert m.nsd == 0.0
    assert normalized_surface_dice(pred, gt, SPACING, tolerance_mm=3.2) == 100.0


def test_identical_masks() -> None:
    _, gt = two_cubes()
    m = compute_metrics(gt, gt, SPACING)
    assert (m.dsc, m.hd95, m.asd, m.nsd) == (100.0, 0.0, 0.0, 100.0)


def test_surface_is_six_connected_and_array_border_is_outside() -> None:
    mask = np.ones((3, 4, 5), dtype=bool)
    s = surface(mask)
    assert s.sum() == mask.sum() - 1 * 2 * 3  # only the 1x2x3 interior is not surface
    cube = np.zeros((5, 5, 5), dtype=bool)
    cube[1:4, 1:4, 1:4] = True
    assert surface(cube).sum() == 26  # 6-connected: the centre is interior


# --------------------------------------------------------------------------- empty masks


def test_both_empty() -> None:
    empty = np.zeros((4, 5, 6), dtype=bool)
    m = compute_metrics(empty, empty, SPACING)
    assert (m.dsc, m.hd95, m.asd, m.nsd, m.gt_ml, m.pred_ml) == (100.0, 0.0, 0.0, 100.0, 0.0, 0.0)
    assert m.distances_finite
    assert dice(empty, empty) == 100.0
    assert hd95(empty, empty, SPACING) == 0.0 and average_surface_distance(empty, empty, SPACING) == 0.0
    assert normalized_surface_dice(empty, empty, SPACING) == 100.0


@pytest.mark.parametrize("empty_side", ["pred", "gt"])
def test_exactly_one_empty(empty_side: str) -> None:
    _, full = two_cubes()
    empty = np.zeros_like(full)
    pred, gt = (empty, full) if empty_side == "pred" else (full, empty)
    m = compute_metrics(pred, gt, SPACING)
    assert m.dsc == 0.0 and m.nsd == 0.0
    assert math.isinf(m.hd95) and math.isinf(m.asd)
    assert not m.distances_finite
    assert math.isinf(hd95(pred, gt, SPACING)) and math.isinf(average_surface_distance(pred, gt, SPACING))
    assert normalized_surface_dice(pred, gt, SPACING) == 0.0
    with pytest.raises(ValueError):
        surface_distances(pred, gt, SPACING)


# --------------------------------------------------------------------------- MONAI


def test_agrees_with_monai_on_random_blobs_with_anisotropic_spacing() -> None:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(7)
    shape = (20, 40, 36)
    checked = discriminating = 0
    for spacing in [(3.0, 0.97, 0.97), (2.5, 1.2, 0.8), (1.0, 0.5, 2.0)]:
        for _ in range(3):
            gt = random_blob(rng, shape)
            pred = random_blob(rng, shape) if rng.random() < 0.5 else ndi_jitter(gt, rng)
            if not gt.any() or not pred.any():
                continue
            # MONAI wants one-hot (batch, channel, *spatial); one foreground channel, so
            # include_background=True keeps it. The spatial order is ours: (z, y, x) with
            # spacing in the same order.
            p_t = torch.from_numpy(pred[None, None].astype(np.float32))
            g_t = torch.from_numpy(gt[None, None].astype(np.float32))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref_hd = float(compute_hausdorff_distance(p_t, g_t, include_background=True, percentile=95, spacing=spacing))
                ref_asd = float(compute_average_surface_distance(p_t, g_t, include_background=True, symmetric=True, spacing=spacing))
                ref_nsd = float(compute_surface_dice(p_t, g_t, [1.0], include_background=True, spacing=spacing, use_subvoxels=False))
            m = compute_metrics(pred, gt, spacing, nsd_tolerance_mm=1.0)
            assert m.hd95 == pytest.approx(ref_hd, rel=1e-3, abs=1e-4)
            assert m.asd == pytest.approx(ref_asd, rel=1e-3, abs=1e-4)
            assert m.nsd == pytest.approx(100 * ref_nsd, rel=1e-3, abs=1e-4)
            checked += 1
            # MONAI pools both directions before the mean, as we do; averaging the two
            # directed means instead would differ here whenever the surfaces differ in size.
            d_pg, d_gp = surface_distances(pred, gt, spacing)
            if abs((d_pg.mean() + d_gp.mean()) / 2 - ref_asd) > 1e-2 * ref_asd:
                discriminating += 1
    assert checked >= 6 and discriminating >= 3


def ndi_jitter(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 'prediction' close to ``mask``: shifted by a voxel or two and dilated or eroded."""
    from scipy import ndimage

    out = np.roll(mask, tuple(int(v) for v in rng.integers(-2, 3, size=3)), axis=(0, 1, 2))
    return ndimage.binary_dilation(out) if rng.random() < 0.5 else ndimage.binary_erosion(out) | (out & mask)


# --------------------------------------------------------------------------- cropping and speed


def assert_crop_changes_nothing(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Cropped == uncropped in both directions (pred->gt and gt->pred), whichever mask is
    passed first; returns the uncropped ``(d_pred_to_gt, d_gt_to_pred)``."""
    ref_pg, ref_gp = surface_distances(pred, gt, spacing, crop=False)
    # One distance per surface voxel of the mask the direction starts from.
    assert ref_pg.size == surface(pred).sum() and ref_gp.size == surface(gt).sum()
    crop_pg, crop_gp = surface_distances(pred, gt, spacing, crop=True)
    swap_gp, swap_pg = surface_distances(gt, pred, spacing, crop=True)  # the roles swapped
    ref_swap_gp, ref_swap_pg = surface_distances(gt, pred, spacing, crop=False)
    for pg, gp in ((crop_pg, crop_gp), (swap_pg, swap_gp), (ref_swap_pg, ref_swap_gp)):
        np.testing.assert_allclose(np.sort(pg), np.sort(ref_pg))
        np.testing.assert_allclose(np.sort(gp), np.sort(ref_gp))
    return ref_pg, ref_gp


def test_cropping_does_not_change_the_numbers() -> None:
    rng = np.random.default_rng(3)
    shape = (24, 48, 40)
    spacing = (2.0, 0.9, 1.1)
    for k in range(6):
        gt = random_blob(rng, shape, n_parts=2)
        pred = ndi_jitter(gt, rng)
        # A far stray voxel in an array corner, in one mask only: the union box reaches the
        # border through that mask alone (pred for even k, gt for odd k).
        (pred if k % 2 == 0 else gt)[(0, 0, 0) if k % 4 < 2 else (-1, -1, -1)] = True
        assert_crop_changes_nothing(pred, gt, spacing)
    # A small blob deep inside a large array: the crop is much smaller than the array.
    gt = np.zeros((40, 80, 80), dtype=bool)
    gt[18:23, 30:41, 33:44] = ellipsoid((5, 11, 11), (2, 5, 5), (2.5, 5.5, 5.5))
    pred = np.roll(gt, (1, -2, 1), axis=(0, 1, 2))
    assert_crop_changes_nothing(pred, gt, SPACING)
    # Asymmetric cases, each way round: a box mid-volume and one voxel in a far corner of
    # the array, so the union box spans from the box to the array edge through one mask
    # only. The distances are known by hand, so a mix-up of the directions fails too.
    shape, spacing = (12, 30, 30), (2.0, 1.0, 1.0)
    box = np.zeros(shape, dtype=bool)
    box[4:8, 10:20, 10:20] = True
    zz, yy, xx = np.nonzero(box)
    on_face = (np.isin(zz, (4, 7)) | np.isin(yy, (10, 19)) | np.isin(xx, (10, 19)))
    box_surface = np.stack([zz, yy, xx], axis=1)[on_face]  # 4*10*10 - 2*8*8 = 272 voxels
    assert len(box_surface) == 272
    for corner in ((0, 0, 29), (11, 29, 0)):
        far = np.zeros(shape, dtype=bool)
        far[corner] = True
        to_corner = np.sort(np.linalg.norm((box_surface - corner) * spacing, axis=1))
        nearest = to_corner[0]  # to the box's corner (4, 10, 19) or (7, 19, 10)
        assert np.isclose(nearest, np.sqrt(8**2 + 10**2 + 10**2))
        # gt far out at the edge, pred mid-volume ...
        d_pg, d_gp = assert_crop_changes_nothing(box, far, spacing)
        np.testing.assert_allclose(np.sort(d_pg), to_corner)
        np.testing.assert_allclose(d_gp, [nearest])
        # ... and pred far out at the edge, gt mid-volume.
        d_pg, d_gp = assert_crop_changes_nothing(far, box, spacing)
        np.testing.assert_allclose(d_pg, [nearest])
        np.testing.assert_allclose(np.sort(d_gp), to_corner)


def test_full_size_case_is_fast() -> None:
    # A planning-CT-sized grid (100 x 256 x 256, 3 x 0.98 x 0.98 mm) and ~50 ml tumours.
    shape, spacing = (100, 256, 256), (3.0, 0.98, 0.98)
    gt = ellipsoid(shape, (50, 128, 130), (8, 25, 22))
    pred = ellipsoid(shape, (51, 126, 133), (7.5, 27, 21))
    compute_metrics(pred, gt, spacing)  # warm-up (imports, page faults)
    start = time.perf_counter()
    m = compute_metrics(pred, gt, spacing)
    elapsed = time.perf_counter() - start
    assert 80 < m.dsc < 95 and 0 < m.hd95 < 10
    assert elapsed < 2.0, f"{elapsed:.2f} s for one 100x256x256 case"  # typically ~0.02 s


# --------------------------------------------------------------------------- outputs


def sample_results() -> list[CaseMetrics]:
    return [
        CaseMetrics("a", 80.0, 3.0, 1.0, 70.0, 10.0, 11.0),
        CaseMetrics("b", 60.0, 5.0, 2.0, 50.0, 20.0, 15.0),
        CaseMetrics("c", 0.0, math.inf, math.inf, 0.0, 5.0, 0.0),
    ]


def test_csv_columns_and_inf(tmp_path: Path) -> None:
    path = write_csv(sample_results(), tmp_path / "sub" / "metrics.csv")
    rows = list(csv.reader(path.open()))
    assert tuple(rows[0]) == CSV_COLUMNS == ("case", "dsc", "hd95", "asd", "nsd", "gt_ml", "pred_ml")
    assert rows[1] == ["a", "80.0000", "3.0000", "1.0000", "70.0000", "10.000", "11.000"]
    assert rows[3][:4] == ["c", "0.0000", "inf", "inf"]
    assert float(rows[3][2]) == math.inf
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_summary_excludes_inf_from_distance_means() -> None:
    console = Console(record=True, width=120)
    print_summary(sample_results(), console=console)
    text = console.export_text()
    assert "46.67 ± " in text  # DSC mean over all three cases, the empty one as 0
    assert "4.00 ± 1.00" in text  # HD95 over the two finite cases only
    assert "1.50 ± 0.50" in text  # ASD likewise
    assert "1 case with an empty prediction or reference: distances inf, excluded from the distance means" in text
    assert "inf ±" not in text and "nan" not in text


def test_plot_is_written(tmp_path: Path) -> None:
    path = plot_dice(sample_results(), tmp_path / "dice.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["dice.png"]


# --------------------------------------------------------------------------- folders and CLI


def write_case(folder: Path, name: str, mask: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_image(Volume(mask.astype(np.uint8), spacing=spacing, origin=origin), folder / name)


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    pred, gt = two_cubes()
    folder = tmp_path / "gt"
    write_case(folder, "npc_001.nii.gz", gt)
    write_case(folder, "npc_002.nii.gz", pred)
    return folder


def test_case_ids() -> None:
    assert case_id("npc_001.nii.gz") == "npc_001"
    assert case_id("npc_001_0000.nii.gz") == "npc_001"
    assert case_id("NPC_7.NRRD") == "NPC_7"


def test_evaluate_folders_matches_by_case_id(tmp_path: Path, labels: Path) -> None:
    pred, gt = two_cubes()
    preds = tmp_path / "pred"
    write_case(preds, "npc_001_0000.nii.gz", pred)  # nnU-Net style name still matches
    write_case(preds, "npc_002.mha", pred)
    write_case(preds, "npc_999.nii.gz", pred)  # no reference: ignored with a note
    console = Console(record=True, width=120)
    results = evaluate_folders(preds, labels, console=console)
    assert [r.case for r in results] == ["npc_001", "npc_002"]
    assert results[0].dsc == pytest.approx(200 * 18 / 54) and results[0].hd95 == pytest.approx(3.0)
    assert results[1].dsc == 100.0
    assert "1 prediction(s) without a reference ignored: npc_999" in console.export_text()


def test_evaluate_folders_errors(tmp_path: Path, labels: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SatsError, match="no reference images"):
        evaluate_folders(labels, tmp_path / "empty")
    with pytest.raises(SatsError, match="no prediction for case 'npc_001'"):
        evaluate_folders(tmp_path / "empty", labels)
    with pytest.raises(SatsError, match="no such reference folder"):
        evaluate_folders(labels, tmp_path / "nowhere")


def test_cli_same_folder_prints_perfect_scores(tmp_path: Path, labels: Path) -> None:
    result = CliRunner().invoke(
        app, ["evaluate", "--pred", str(labels), "--gt", str(labels),
              "--csv", str(tmp_path / "out" / "m.csv"), "--plot", str(tmp_path / "out" / "dice.png")],
    )
    assert result.exit_code == 0, result.output
    dsc_line = next(line for line in result.output.splitlines() if "DSC (%)" in line)
    hd_line = next(line for line in result.output.splitlines() if "HD95 (mm)" in line)
    assert "100.00 ± 0.00" in dsc_line and "0.00 ± 0.00" in hd_line
    rows = list(csv.reader((tmp_path / "out" / "m.csv").open()))
    assert [r[0] for r in rows] == ["case", "npc_001", "npc_002"]
    assert (tmp_path / "out" / "dice.png").stat().st_size > 0


def test_cli_missing_prediction(tmp_path: Path, labels: Path) -> None:
    preds = tmp_path / "pred"
    write_case(preds, "npc_001.nii.gz", two_cubes()[1])
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(preds), "--gt", str(labels)])
    assert result.exit_code != 0
    assert "npc_002" in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit(1), not an uncaught error


def test_cli_geometry_mismatch(tmp_path: Path, labels: Path) -> None:
    pred, gt = two_cubes()
    preds = tmp_path / "pred"
    write_case(preds, "npc_001.nii.gz", gt, spacing=(2.0, 1.0, 1.0))
    write_case(preds, "npc_002.nii.gz", pred)
    result = CliRunner().invoke(app, ["evaluate", "--pred", str(preds), "--gt", str(labels)])
    assert result.exit_code != 0
    assert "npc_001" in result.output and "spacing" in result.output
    assert "Traceback" not in result.output
