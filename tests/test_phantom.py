"""The phantom: determinism, symmetry about its true plane, the tumour, the dataset layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from sats.cli import app
from sats.data.dataset import check_dataset
from sats.data.io import read_image
from sats.data.phantom import MUSCLE_HU, PhantomConfig, make_case
from sats.geometry.grid import body_mask
from sats.geometry.symmetry import Plane
from sats.geometry.volume import to_sitk


def reflect(volume, plane: Plane) -> np.ndarray:
    """The volume reflected about ``plane`` (physical space), on its own grid."""
    n = plane.normal
    t = sitk.AffineTransform(3)
    t.SetMatrix((np.eye(3) - 2 * np.outer(n, n)).ravel().tolist())
    t.SetTranslation((2 * (plane.point @ n) * n).tolist())
    image = to_sitk(volume.with_array(volume.array.astype(np.float32)))
    return sitk.GetArrayFromImage(sitk.Resample(image, image, t, sitk.sitkLinear, -1000.0))


def test_same_seed_same_case_and_index_independence() -> None:
    a, b = make_case(3, 1), make_case(3, 1)
    np.testing.assert_array_equal(a.ct.array, b.ct.array)
    np.testing.assert_array_equal(a.label.array, b.label.array)
    assert a.pose == b.pose
    assert not np.array_equal(make_case(4, 1).ct.array, a.ct.array)
    assert not np.array_equal(make_case(3, 1, split="Ts").ct.array, a.ct.array)


@pytest.mark.parametrize("seed", [0, 1])
def test_tumour_free_phantom_is_symmetric_about_its_true_plane(seed: int) -> None:
    case = make_case(seed, 0, config=PhantomConfig(tumor_free=True, noise=0.0, max_angle=10, max_shift=10))
    true = Plane(case.pose["normal"], case.pose["point"])
    ct = case.ct
    # Compare inside the head, away from the couch and the field-of-view border.
    head = body_mask(ct.array)
    head[:, :, :10] = head[:, :, -10:] = False
    head[:3] = head[-3:] = False
    centre_plane = Plane(ct.direction[:, 0], ct.index_to_physical(np.array([(s - 1) / 2 for s in ct.shape])))
    err_true = np.abs(reflect(ct, true) - ct.array)[head]
    err_grid = np.abs(reflect(ct, centre_plane) - ct.array)[head]
    assert np.median(err_true) < 5.0  # interpolation and partial volume only
    assert np.mean(err_true) < 0.5 * np.mean(err_grid)  # the grid centre is not the plane


def test_tumour_is_plausible_and_low_contrast() -> None:
    vols, sides = [], []
    for i in range(4):
        case = make_case(0, i, config=PhantomConfig(bilateral_fraction=0.0, noise=0.0))
        lab = case.label.array > 0
        ml = lab.sum() * case.ct.voxel_volume_ml
        vols.append(ml)
        core = np.zeros_like(lab)
        from scipy import ndimage

        core = ndimage.binary_erosion(lab, iterations=2)
        assert abs(case.ct.array[core].mean() - (MUSCLE_HU + 12.0)) < 6.0
        # One-sided: nearly all of it on the side named in the pose.
        plane = Plane(case.pose["normal"], case.pose["point"])
        d = plane.signed_distance(case.ct.index_to_physical(np.argwhere(lab)))
        frac_left = (d > 0).mean()
        assert (frac_left > 0.9) if case.pose["side"] == "left" else (frac_left < 0.1)
        sides.append(case.pose["side"])
    assert all(3 < v < 80 for v in vols), vols


def test_bilateral_tumours_cross_the_midline() -> None:
    case = make_case(0, 0, config=PhantomConfig(bilateral_fraction=1.0))
    assert case.pose["bilateral"]
    plane = Plane(case.pose["normal"], case.pose["point"])
    d = plane.signed_distance(case.ct.index_to_physical(np.argwhere(case.label.array > 0)))
    assert 0.1 < (d > 0).mean() < 0.9


def test_contrast_option_changes_the_tumour_intensity() -> None:
    lo = make_case(0, 2, config=PhantomConfig(tumor_contrast=0.0, noise=0.0))
    hi = make_case(0, 2, config=PhantomConfig(tumor_contrast=60.0, noise=0.0))
    lab = lo.label.array > 0
    assert hi.ct.array[lab].mean() - lo.ct.array[lab].mean() > 40


def test_phantom_cli_writes_a_valid_dataset(tmp_path) -> None:
    out = tmp_path / "p"
    result = CliRunner().invoke(app, ["phantom", str(out), "--cases", "3", "--test-cases", "1", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert check_dataset(out).problems == []
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 3
    poses = json.loads((out / "poses.json").read_text())
    assert sorted(poses) == ["phantom_000", "phantom_001", "phantom_002", "phantom_test_000"]
    for pose in poses.values():
        assert abs(np.linalg.norm(pose["normal"]) - 1) < 1e-9
    ct = read_image(out / "imagesTr" / "phantom_000_0000.nii.gz")
    assert 2.5 <= ct.spacing[0] <= 3.0 and 0.8 <= ct.spacing[1] <= 1.0 and ct.spacing[1] == ct.spacing[2]
    assert 48 <= ct.shape[0] <= 64 and 128 <= ct.shape[1] <= 160
    assert ct.array.min() <= -1000 and ct.array.max() > 500
    # Same seed again: identical files' content.
    again = tmp_path / "q"
    CliRunner().invoke(app, ["phantom", str(again), "--cases", "1", "--seed", "0"])
    np.testing.assert_array_equal(read_image(again / "imagesTr" / "phantom_000_0000.nii.gz").array, ct.array)
