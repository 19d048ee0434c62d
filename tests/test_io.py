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


# --- damaged headers and data: refused, naming the file and the problem ---------------------------


@pytest.mark.parametrize("offset, fmt, values, message", [
    (88, "f", (0.0,), r"pixdim\[3\] = 0\.0"),  # SimpleITK: 1 mm
    (80, "f", (-0.8,), r"pixdim\[1\] = -0\.8"),  # SimpleITK: a flipped axis
    (44, "h", (0,), r"dim\[2\] = 0"),  # SimpleITK: 1
    (108, "f", (0.0,), "vox_offset 0.0"),  # SimpleITK: voxels from byte 348
    (344, "4s", (b"n+2\0",), "magic"),  # SimpleITK: an Analyze file at origin 0
    (70, "h", (32,), "datatype 32"),  # complex: SimpleITK reads past the end
    (252, "2h", (0, 0), "qform_code 0 and sform_code 0: no orientation"),  # SimpleITK: origin 0, identity
], ids=["pixdim-0", "pixdim-negative", "dim-0", "vox_offset-0", "magic", "datatype-complex", "no-xform"])
def test_damaged_nifti_header_field_is_refused(tmp_path, offset: int, fmt: str, values: tuple, message: str) -> None:
    import struct

    path = tmp_path / "ct.nii.gz"
    raw = bytearray(gzip.decompress(write_image(ct_volume(), path).read_bytes()))
    struct.pack_into("<" + fmt, raw, offset, *values)
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(SatsError, match=rf"ct\.nii\.gz: damaged NIfTI header \({message}") as info:
        read_image(path)
    assert "\n" not in str(info.value)


def test_scaled_nifti_is_read_with_its_scaling(tmp_path) -> None:
    """scl_slope/scl_inter apply (SimpleITK then gives float32): no false "truncated"."""
    import struct

    ct = ct_volume()
    for suffix in (".nii", ".nii.gz"):
        path = write_image(ct, tmp_path / f"s{suffix}")
        raw = bytearray(gzip.decompress(path.read_bytes()) if suffix == ".nii.gz" else path.read_bytes())
        struct.pack_into("<2f", raw, 112, 2.0, -5.0)
        path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
        back = read_image(path)
        np.testing.assert_array_equal(back.array, ct.array.astype(np.float64) * 2 - 5)
        assert back.same_geometry(ct, tol_mm=1e-4) is None


def test_corrupt_nifti_gz_payload_is_refused(tmp_path) -> None:
    big = Volume(np.random.default_rng(0).normal(0, 300, (20, 64, 64)).astype(np.int16))
    path = write_image(big, tmp_path / "ct.nii.gz")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(SatsError, match=r"ct\.nii\.gz: corrupt compressed data"):
        read_image(path)


def _mha_payload_start(raw: bytes) -> int:
    return raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")


def test_corrupt_mha_payload_is_refused(tmp_path) -> None:
    """SimpleITK reads this one without a word, with some 40000 wrong voxels."""
    big = Volume(np.random.default_rng(0).normal(0, 300, (20, 64, 64)).astype(np.int16))
    path = write_image(big, tmp_path / "ct.mha")
    raw = bytearray(path.read_bytes())
    start = _mha_payload_start(bytes(raw))
    raw[(start + len(raw)) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(SatsError, match=r"ct\.mha: corrupt compressed data \(incorrect data check\)"):
        read_image(path)


def test_mha_with_a_damaged_zlib_header_is_refused_at_once(tmp_path) -> None:
    """Regression: a zlib header asking for a preset dictionary made SimpleITK loop forever.
    Read in a child process, so that a regression fails here instead of hanging the suite."""
    import subprocess
    import sys

    path = write_image(ct_volume(), tmp_path / "ct.mha")
    raw = bytearray(path.read_bytes())
    raw[_mha_payload_start(bytes(raw)) + 1] = 0x20  # FLG: FDICT set, check bits still valid (0x7820 % 31 == 0)
    path.write_bytes(bytes(raw))
    code = ("import sys\nfrom sats.data.io import read_image\nfrom sats.geometry.volume import SatsError\n"
            "try:\n    read_image(sys.argv[1])\nexcept SatsError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{path}: corrupt compressed data (the zlib header asks for a preset dictionary)"


@pytest.mark.parametrize("old, new, message", [
    (b"CompressedDataSize = ", b"CompressedDataSizeX = ", "CompressedDataSize = '.missing.'"),  # SimpleITK: first voxels garbage
    (b"DimSize = 20 16 9", b"DimSize = 20 16 9x", "DimSize = '20 16 9x'"),  # SimpleITK: 20 16 9
    (b"BinaryDataByteOrderMSB = False", b"BinaryDataByteOrderMSB = Tru", "BinaryDataByteOrderMSB = 'Tru'"),  # byte-swapped
    (b"Offset = -100 -80.5 40", b"Offset = -100 -80.5", "Offset = '-100 -80.5'"),
], ids=["no-CompressedDataSize", "DimSize-garbled", "ByteOrderMSB-garbled", "Offset-2-numbers"])
def test_damaged_mha_header_field_is_refused(tmp_path, old: bytes, new: bytes, message: str) -> None:
    path = write_image(ct_volume(), tmp_path / "ct.mha")
    raw = path.read_bytes()
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))
    with pytest.raises(SatsError, match=rf"ct\.mha: damaged MetaImage header \({message}"):
        read_image(path)


def test_nrrd_with_a_partly_numeric_origin_is_refused(tmp_path) -> None:
    path = write_image(ct_volume(), tmp_path / "ct.nrrd")
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"space origin: (-100,-80.5,40)", b"space origin: (-100,-80.5A,40)"))
    with pytest.raises(SatsError, match=r"ct\.nrrd: damaged NRRD header \(space origin: "):
        read_image(path)


def _damage_slices(paths, **changes) -> None:
    """Set (value) or remove (None) attributes in every slice."""
    for p in paths:
        ds = pydicom.dcmread(p)
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(p)


@pytest.mark.parametrize("changes, message", [
    ({"PixelSpacing": None}, r"truncated or damaged CT slice \(no PixelSpacing\)"),  # was read as 1 mm
    ({"RescaleSlope": None}, r"truncated or damaged CT slice \(no RescaleSlope\)"),  # was read as 1
    ({"RescaleIntercept": ""}, r"damaged CT slice \(RescaleSlope and RescaleIntercept must be numbers"),  # was 0
    ({"RescaleSlope": "0"}, r"damaged CT slice \(RescaleSlope and RescaleIntercept must be numbers"),  # was 1
    ({"Columns": 19}, r"damaged CT slice \(pixel data of 360 bytes, 342 needed for 9 x 19"),  # was read as 9 x 19
    ({"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7}, r"damaged CT slice \(pixel data of 360 bytes, 180 needed"),
    ({"PhotometricInterpretation": "MONOCHROMX"}, r"damaged CT slice \(.*not a grey-scale image"),  # was read inverted
], ids=["no-PixelSpacing", "no-RescaleSlope", "empty-RescaleIntercept", "RescaleSlope-0", "Columns-shrunk",
        "BitsAllocated-8", "PhotometricInterpretation"])
def test_damaged_dicom_ct_attribute_is_refused(tmp_path, changes: dict, message: str) -> None:
    paths = write_ct_series(Volume(ct_volume().array[:3, :9]), tmp_path / "ct")
    _damage_slices(paths, **changes)
    with pytest.raises(SatsError, match=rf"IM0001\.dcm: {message}"):
        read_dicom_series(tmp_path / "ct")


@pytest.mark.parametrize("value", [None, "CLOSED_PLANAX"])
def test_rtstruct_contour_without_a_valid_geometric_type_is_refused(tmp_path, value) -> None:
    """ContourGeometricType is type 1: missing or unknown must not make the ROI silently empty."""
    from sats.predict.export import read_rtstruct_roi, write_rtstruct

    ct = ct_volume()
    write_ct_series(ct, tmp_path / "ct")
    mask = np.zeros(ct.shape, np.uint8)
    mask[2:5, 4:10, 5:12] = 1
    write_rtstruct(read_dicom_series(tmp_path / "ct").with_array(mask), tmp_path / "ct", tmp_path / "RS.dcm")
    ds = pydicom.dcmread(tmp_path / "RS.dcm")
    for item in ds.ROIContourSequence[0].ContourSequence:
        if value is None:
            del item.ContourGeometricType
        else:
            item.ContourGeometricType = value
    ds.save_as(tmp_path / "RS.dcm")
    with pytest.raises(SatsError, match=r"RS\.dcm: a contour of 'GTVp' has no valid ContourGeometricType"):
        read_rtstruct_roi(tmp_path / "RS.dcm", tmp_path / "ct", "GTVp")
