"""Mid-sagittal plane: accuracy on posed phantoms, round trips, real-CT rotation consistency."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from sats.cli import app
from sats.data.io import read_image, write_image
from sats.data.phantom import PhantomConfig, make_case
from sats.geometry.alignment import aligned_volume, find_plane
from sats.geometry.preprocessing import PlaneSettings, estimate_plane, preprocess
from sats.geometry.symmetry import Plane, mirror_lr
from sats.geometry.volume import SatsError, Volume, from_sitk, to_sitk


@pytest.mark.parametrize("index", [0, 1, 2])
def test_plane_of_posed_phantoms(index: int) -> None:
    case = make_case(11, index, config=PhantomConfig(max_angle=10, max_shift=10))
    true = Plane(case.pose["normal"], case.pose["point"])
    found = find_plane(case.ct)
    assert true.angle_to(found.plane) < 1.0
    assert abs(found.plane.signed_distance(true.point)) < 1.0  # midline offset at the nasopharynx, mm
    assert found.score_after > found.score_before and found.score_after > 0.8


def test_tumour_free_aligned_phantom_branches_are_identical() -> None:
    """On the symmetric grid of the true plane, the CT and its mirror are the same image:
    the two branch inputs of the Siamese network coincide."""
    case = make_case(2, 0, config=PhantomConfig(tumor_free=True, noise=0.0))
    true = Plane(case.pose["normal"], case.pose["point"])
    pre = preprocess(case.ct, (3.0, 1.6, 1.6), None, plane=true)
    image = pre.image
    body = image > -500
    diff = np.abs(image - mirror_lr(image))[body & mirror_lr(body)]
    assert np.median(diff) < 5.0
    # Without alignment (the grid's own centre) the mirror is other anatomy.
    naive = preprocess(case.ct, (3.0, 1.6, 1.6), None).image
    nbody = naive > -500
    assert np.median(np.abs(naive - mirror_lr(naive))[nbody & mirror_lr(nbody)]) > 2 * max(np.median(diff), 1.0)


def test_native_aligned_native_round_trip_keeps_the_mask() -> None:
    case = make_case(5, 1)
    plane = find_plane(case.ct).plane
    aligned, tfm = aligned_volume(case.label.with_array(case.label.array.astype(np.float32)), plane)
    # Back through the inverse: resample the aligned mask onto the native grid with T.
    back = sitk.Resample(to_sitk(aligned), to_sitk(case.label), tfm.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    returned = sitk.GetArrayFromImage(back) >= 0.5
    ref = case.label.array > 0
    dice = 2 * (returned & ref).sum() / (returned.sum() + ref.sum())
    assert dice >= 0.99


def test_align_cli_writes_volume_transform_and_plane(tmp_path) -> None:
    case = make_case(0, 3)
    write_image(case.ct, tmp_path / "ct.nii.gz")
    r = CliRunner().invoke(app, ["align", "-i", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "al.nii.gz"),
                                 "--transform", str(tmp_path / "t.tfm"), "--plane-json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    import json

    plane = json.loads((tmp_path / "p.json").read_text())
    assert {"normal", "point", "symmetry_before", "symmetry_after"} <= set(plane)
    aligned = read_image(tmp_path / "al.nii.gz")
    np.testing.assert_array_equal(aligned.direction, np.eye(3))
    tfm = sitk.ReadTransform(str(tmp_path / "t.tfm"))
    # The aligned image's x = 0 plane maps onto the found plane in the input.
    p = np.array(tfm.TransformPoint((0.0, 5.0, -3.0)))
    assert abs(Plane(plane["normal"], plane["point"]).signed_distance(p)) < 1e-6


def test_not_a_head_is_refused() -> None:
    rng = np.random.default_rng(0)
    blob = np.full((30, 60, 60), -1000, np.int16)
    blob[5:25, 10:30, 5:50] = rng.integers(-100, 1500, size=(20, 20, 45))  # random, nothing symmetric
    with pytest.raises(SatsError, match="symmetry score"):
        estimate_plane(Volume(blob, spacing=(3.0, 1.0, 1.0)))


def rotate_about(ct: Volume, centre: np.ndarray, yaw_deg: float, roll_deg: float) -> tuple[Volume, np.ndarray, np.ndarray]:
    """The CT rotated (content moved) by R about ``centre``: a point p goes to R (p - c) + c."""
    from test_io import rotation

    r = rotation(yaw_deg, roll_deg)
    t = sitk.AffineTransform(3)
    # Resampling maps output points to input points: the inverse rotation.
    t.SetMatrix(r.T.ravel().tolist())
    t.SetCenter(centre.tolist())
    image = to_sitk(ct.with_array(ct.array.astype(np.float32)))
    out = sitk.Resample(image, image, t, sitk.sitkLinear, -1024.0)
    return from_sitk(out), r, centre


def test_real_head_ct_rotation_consistency(openkbp) -> None:
    ct = read_image(openkbp / "imagesTr" / "kbp_train_1_0000.nii.gz")
    before = find_plane(ct).plane
    centre = before.point
    rotated, r, c = rotate_about(ct, centre, 6.0, -4.0)
    after = find_plane(rotated).plane
    expected = Plane(r @ before.normal, r @ (before.point - c) + c)
    assert expected.angle_to(after) < 1.0
    assert abs(after.signed_distance(expected.point)) < 1.0


def test_registration_method_agrees_on_a_phantom() -> None:
    case = make_case(11, 4)
    true = Plane(case.pose["normal"], case.pose["point"])
    found = estimate_plane(case.ct, PlaneSettings(method="registration")).plane
    assert true.angle_to(found) < 1.0 and abs(found.signed_distance(true.point)) < 1.0
    with pytest.raises(SatsError, match="--method must be one of symmetry, registration"):
        PlaneSettings(method="guess")


def test_atlas_mode_finds_the_plane_through_a_symmetric_atlas(tmp_path) -> None:
    from sats.geometry.preprocessing import make_atlas

    atlas = make_atlas([make_case(21, i, config=PhantomConfig(tumor_free=True)).ct for i in range(2)], spacing=(3.0, 2.0, 2.0))
    np.testing.assert_allclose(atlas.array, mirror_lr(atlas.array), atol=1e-3)  # symmetric by construction
    case = make_case(22, 0)
    true = Plane(case.pose["normal"], case.pose["point"])
    write_image(atlas, tmp_path / "atlas.nii.gz")
    found = estimate_plane(case.ct, PlaneSettings("atlas", str(tmp_path / "atlas.nii.gz"))).plane
    # Affine freedom makes atlas mode coarser than the self-mirror search (see its docstring).
    assert true.angle_to(found) < 4.0 and abs(found.signed_distance(true.point)) < 2.0


def _perturbed(kind: str):
    """A posed phantom (with tumour and couch) plus one real-world nuisance, fixed to the grid."""
    case = make_case(31, 2)
    ct = case.ct.array.astype(np.float32)
    nz, ny, nx = ct.shape
    zz, yy, xx = np.mgrid[:nz, :ny, :nx]
    if kind == "immobilisation mask":
        # A thin thermoplastic shell (+150 HU, about 2 mm) on a cylinder centred on the
        # grid, not on the head, covering the front half.
        r = np.hypot((yy - ny / 2) * 1.0, (xx - nx / 2) * 1.0)
        shell = (np.abs(r - 0.47 * nx) < 1.2) & (yy < ny * 0.55)
        ct[shell] = 150.0
    elif kind == "cut field of view":
        ct[:, :, : int(0.12 * nx)] = -1024.0  # one side cut off
        ct[-6:] = -1024.0  # and the skull top
    elif kind == "dental metal streaks":
        cz = nz // 2 - 8
        cy, cx = int(0.22 * ny), int(0.62 * nx)  # off the midline
        for angle in np.linspace(0, np.pi, 7, endpoint=False):
            t = np.arange(-60, 61)
            ys = np.clip((cy + t * np.sin(angle)).astype(int), 0, ny - 1)
            xs = np.clip((cx + t * np.cos(angle)).astype(int), 0, nx - 1)
            for dz in range(-2, 3):
                ct[cz + dz, ys, xs] = 1500.0 if angle < np.pi / 2 else -700.0
        ct[cz - 2 : cz + 3, cy - 2 : cy + 3, cx - 2 : cx + 3] = 3071.0
    return case, case.ct.with_array(ct.astype(np.int16))


@pytest.mark.parametrize("kind", ["immobilisation mask", "cut field of view", "dental metal streaks"])
def test_plane_is_robust_to_nuisances(kind: str) -> None:
    case, ct = _perturbed(kind)
    true = Plane(case.pose["normal"], case.pose["point"])
    found = find_plane(ct).plane
    assert true.angle_to(found) < 1.5, kind
    assert abs(found.signed_distance(true.point)) < 1.0, kind
