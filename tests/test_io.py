"""Image I/O: geometry round trips, atomic writes, truncated files, DICOM series."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from sats.data.dicom import read_dicom_series, write_ct_series
from sats.data.io import read_image, write_image
from sats.geometry.volume import SatsError, Volume, from_sitk, to_sitk


def rotation(yaw_deg: float, roll_deg: float) -> np.ndarray:
    a, b = np.radians(yaw_deg), np.radians(roll_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rz @ ry


@pytest.fixture
def oblique() -> Volume:
    rng = np.random.default_rng(1)
    array = rng.integers(-1000, 1500, size=(7, 10, 12)).astype(np.int16)  # odd slice count
    return Volume(array, spacing=(2.5, 0.9, 0.8), origin=(-12.5, 33.25, -401.0), direction=rotation(17, -8))


def test_sitk_round_trip_keeps_geometry_exactly(oblique: Volume) -> None:
    image = to_sitk(oblique)
    assert image.GetSize() == (12, 10, 7)  # SimpleITK speaks (x, y, z)
    assert image.GetSpacing() == (0.8, 0.9, 2.5)
    back = from_sitk(image)
    assert back.spacing == oblique.spacing and back.origin == oblique.origin
    np.testing.assert_array_equal(back.direction, oblique.direction)
    np.testing.assert_array_equal(back.array, oblique.array)


def test_index_to_physical_matches_simpleitk(oblique: Volume) -> None:
    image = to_sitk(oblique)
    zyx = np.array([[0, 0, 0], [6, 9, 11], [3.5, 2.25, 7.0]])
    ours = oblique.index_to_physical(zyx)
    for p, q in zip(zyx, ours):
        expected = image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in p[::-1]))
        np.testing.assert_allclose(q, expected, atol=1e-9)
    np.testing.assert_allclose(oblique.physical_to_index(ours), zyx, atol=1e-9)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_file_round_trip_keeps_geometry(tmp_path, oblique: Volume, suffix: str) -> None:
    path = write_image(oblique, tmp_path / f"ct{suffix}")
    back = read_image(path)
    np.testing.assert_array_equal(back.array, oblique.array)
    assert back.same_geometry(oblique, tol_mm=1e-4) is None
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_same_geometry_names_the_difference(oblique: Volume) -> None:
    shifted = Volume(oblique.array, oblique.spacing, (oblique.origin[0] + 0.01, *oblique.origin[1:]), oblique.direction)
    assert "origin" in shifted.same_geometry(oblique)
    assert shifted.same_geometry(oblique, tol_mm=0.1) is None


def test_truncated_nifti_gz_is_an_error(tmp_path, oblique: Volume) -> None:
    big = Volume(np.random.default_rng(0).normal(0, 300, (20, 64, 64)).astype(np.int16))
    path = write_image(big, tmp_path / "ct.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # SimpleITK alone reads the truncated file and zero-fills: our reader must notice.
    with pytest.raises(SatsError, match=r"ct\.nii\.gz.*truncated"):
        read_image(path)


def test_gzip_complete_but_short_nifti_is_an_error(tmp_path) -> None:
    path = write_image(Volume(np.ones((10, 20, 20), np.int16)), tmp_path / "ct.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 400]))
    with pytest.raises(SatsError, match="ct.nii.gz"):
        read_image(path)


def test_missing_and_unsupported_files(tmp_path) -> None:
    with pytest.raises(SatsError, match="no such file"):
        read_image(tmp_path / "absent.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SatsError, match="not a supported image"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(SatsError, match="junk.nii.gz"):
        read_image(tmp_path / "junk.nii.gz")


def test_2d_and_4d_images_are_rejected(tmp_path) -> None:
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(SatsError, match="flat.nii.gz.*3D"):
        read_image(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.Image([4, 4, 4, 2], sitk.sitkInt16), str(tmp_path / "t.nii.gz"))
    with pytest.raises(SatsError, match="t.nii.gz.*3D"):
        read_image(tmp_path / "t.nii.gz")


def test_failed_write_leaves_nothing(tmp_path) -> None:
    target = tmp_path / "out.nii.gz"
    write_image(Volume(np.zeros((2, 2, 2), np.uint8)), target)
    before = target.read_bytes()

    class Boom(Exception):
        pass

    from sats.data.io import atomic_path

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise Boom
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_unwritable_output_is_a_clear_error(tmp_path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(SatsError, match="cannot create output folder"):
        write_image(Volume(np.zeros((2, 2, 2), np.uint8)), blocker / "sub" / "m.nii.gz")


# --- DICOM -----------------------------------------------------------------------------


def ct_volume(direction=None) -> Volume:
    rng = np.random.default_rng(3)
    array = rng.integers(-1024, 2000, size=(9, 16, 20)).astype(np.int16)
    return Volume(array, spacing=(3.0, 0.75, 0.8), origin=(-100.0, -80.5, 40.0), direction=np.eye(3) if direction is None else direction)


@pytest.mark.parametrize("yaw, roll", [(0, 0), (12, 5)], ids=["axial", "oblique"])
@pytest.mark.parametrize("reader", [read_dicom_series, read_image], ids=["read_dicom_series", "read_image"])
def test_dicom_series_round_trip(tmp_path, yaw: float, roll: float, reader) -> None:
    ct = ct_volume(rotation(yaw, roll))
    write_ct_series(ct, tmp_path / "ct")
    back = reader(tmp_path / "ct")
    np.testing.assert_array_equal(back.array, ct.array)
    assert back.same_geometry(ct, tol_mm=1e-4) is None


def test_dicom_slices_sorted_by_position_not_name(tmp_path) -> None:
    ct = ct_volume()
    paths = write_ct_series(ct, tmp_path / "ct")
    # Reverse file names and instance numbers: order must still come from the positions.
    n = len(paths)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = n - k
        ds.save_as(tmp_path / "ct" / f"tmp{n - k:04d}.dcm")
        p.unlink()
    back = read_dicom_series(tmp_path / "ct")
    np.testing.assert_array_equal(back.array, ct.array)


def test_dicom_missing_slice_is_an_error(tmp_path) -> None:
    paths = write_ct_series(ct_volume(), tmp_path / "ct")
    paths[4].unlink()
    with pytest.raises(SatsError, match="1 missing slice"):
        read_dicom_series(tmp_path / "ct")


def test_dicom_mixed_orientation_is_an_error(tmp_path) -> None:
    paths = write_ct_series(ct_volume(), tmp_path / "ct")
    ds = pydicom.dcmread(paths[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]
    ds.save_as(paths[2])
    with pytest.raises(SatsError, match="mixed slice orientations"):
        read_dicom_series(tmp_path / "ct")


def test_dicom_picks_the_ct_series_with_most_slices(tmp_path) -> None:
    big = ct_volume()
    small = Volume(big.array[:4], big.spacing, (0.0, 0.0, 0.0))
    write_ct_series(big, tmp_path / "mixed" / "a")
    write_ct_series(small, tmp_path / "mixed" / "b")
    back = read_image(tmp_path / "mixed")
    assert back.shape == big.shape


def test_dicom_folder_without_ct(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SatsError, match="no DICOM files"):
        read_image(tmp_path / "empty")


def test_real_dicom_ct_series(lung_dicom) -> None:
    """The real 4D-Lung series (RTSTRUCT beside it): HU after rescale, geometry as GDCM sees it."""
    staged = lung_dicom
    ct = read_image(staged)  # the whole folder: the RTSTRUCT must be ignored
    assert ct.shape == (99, 512, 512)
    assert ct.spacing == pytest.approx((3.0, 0.9766, 0.9766))
    assert ct.array.min() == -1000 and ct.array.max() > 1000  # intercept -1000 applied
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(staged / "ct")))
    reference = from_sitk(reader.Execute())
    assert ct.same_geometry(reference, tol_mm=1e-3) is None
    np.testing.assert_array_equal(ct.array, reference.array)


def test_real_dicom_copy_with_a_missing_slice(lung_dicom, tmp_path) -> None:
    files = sorted((lung_dicom / "ct").glob("*.dcm"))
    for f in files[:20]:
        shutil.copy(f, tmp_path / f.name)
    positions = {f.name: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files[:20]}
    middle = sorted(positions, key=positions.get)[10]
    (tmp_path / middle).unlink()
    with pytest.raises(SatsError, match="missing slice"):
        read_image(tmp_path)


def test_written_files_get_the_usual_permissions(tmp_path) -> None:
    import os

    path = write_image(Volume(np.zeros((2, 2, 2), np.uint8)), tmp_path / "m.nii.gz")
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
