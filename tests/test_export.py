"""Clinical DICOM: CT series input checks, RTSTRUCT and DICOM SEG output, read back by
independent readers (rt-utils rasterises RTSTRUCTs, highdicom reads SEGs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from rt_utils import RTStructBuilder
from typer.testing import CliRunner

from sats.cli import app
from sats.data.dicom import read_dicom_series, scan_folder, write_ct_series
from sats.data.io import read_image, write_image
from sats.geometry.volume import SatsError, Volume
from sats.predict.export import load_ct_reference, read_rtstruct_roi, slice_contours, write_rtstruct, write_seg
from test_io import rotation

runner = CliRunner()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def slices_of(mask: np.ndarray) -> list[int]:
    return np.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0].tolist()


def rtutils_mask(ct_dir: Path, rs: Path, roi: str) -> np.ndarray:
    """The ROI rasterised by rt-utils, as (z, y, x) like sats arrays.

    rt-utils returns (rows, columns, slices) with slices sorted along the normal; it builds
    the mask as (Columns, Rows) and fills it as (row, column), so only square slices are safe.
    """
    rt = RTStructBuilder.create_from(str(ct_dir), str(rs))
    if not any("ContourSequence" in c for c in rt.ds.ROIContourSequence):
        # An ROI without contours (empty mask) is valid DICOM, but rt-utils 1.2.7 raises on it.
        return np.zeros(read_image(ct_dir).shape, bool)
    return np.transpose(rt.get_roi_mask_by_name(roi), (2, 0, 1))


def seg_mask(seg_path: Path, ct_dir: Path, series_uid: str | None = None) -> np.ndarray:
    """A DICOM SEG read back by highdicom, frames in the CT series' slice order: (z, y, x)."""
    seg = hd.seg.segread(seg_path)
    uids = [s.sop_instance_uid for s in load_ct_reference(ct_dir, series_uid).slices]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], assert_missing_frames_are_empty=True)
    return pixels[..., 0]


def head_ct(direction=None) -> Volume:
    """A small head-like CT: skull ring, soft tissue, air; square 48 x 48 slices."""
    z, y, x = np.mgrid[:10, :48, :48].astype(np.float64)
    r = np.hypot((y - 24) / 20, (x - 24) / 18)
    ct = np.where(r < 1, 40.0, -1000.0) + np.where((r > 0.85) & (r < 1), 900.0, 0.0)
    return Volume(ct.astype(np.int16), spacing=(2.5, 0.8, 0.8), origin=(-19.2, -30.0, 100.0),
                  direction=np.eye(3) if direction is None else direction)


def gtv_with_hole_and_islands(shape) -> np.ndarray:
    """An ellipsoid with a hole, a second island, and a structure touching the image edge."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    m = ((z - 5) / 3.5) ** 2 + ((y - 22) / 10) ** 2 + ((x - 28) / 9) ** 2 < 1
    m[4:7, 20:24, 26:29] = False  # hole
    m[3:8, 38:42, 8:12] = True  # island
    m[6, 0:3, 20:30] = True  # touches the first row
    return m.astype(np.uint8)


def write_reversed_series(volume: Volume, folder: Path, **kw) -> list[Path]:
    """write_ct_series, then file names and InstanceNumbers in reverse slice order."""
    paths = write_ct_series(volume, folder, **kw)
    n = len(paths)
    out = []
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = n - k
        target = folder / f"CT{n - k:04d}.dcm"
        ds.save_as(target)
        p.unlink()
        out.append(target)
    return out  # out[k] = array slice k


# --- DICOM CT series input ----------------------------------------------------------------


def test_non_ct_modality_is_an_error(tmp_path) -> None:
    paths = write_ct_series(head_ct(), tmp_path / "mr")
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(p)
    with pytest.raises(SatsError, match=r"mr: no CT image series \(modalities found: MR\)"):
        read_image(tmp_path / "mr")
    uid = next(iter(scan_folder(tmp_path / "mr")))
    with pytest.raises(SatsError, match="modality MR, not CT"):
        read_dicom_series(tmp_path / "mr", series_uid=uid)


def test_series_option_chooses_among_two_series(tmp_path) -> None:
    big = head_ct()
    small = Volume(big.array[:4, :32, :32], big.spacing, (5.0, 5.0, 5.0))
    write_ct_series(big, tmp_path / "two" / "a")
    write_ct_series(small, tmp_path / "two" / "b")
    series = scan_folder(tmp_path / "two")
    small_uid = next(uid for uid, s in series.items() if len(s.slices) == 4)
    assert read_dicom_series(tmp_path / "two").shape == big.shape  # default: most slices
    chosen = read_dicom_series(tmp_path / "two", series_uid=small_uid)
    assert chosen.shape == small.shape and chosen.same_geometry(small, tol_mm=1e-4) is None
    with pytest.raises(SatsError, match=r"no series with SeriesInstanceUID 1\.2\.3 \(found: .*10 slices"):
        read_dicom_series(tmp_path / "two", series_uid="1.2.3")


def test_uneven_spacing_is_an_error(tmp_path) -> None:
    paths = write_ct_series(head_ct(), tmp_path / "ct")
    ds = pydicom.dcmread(paths[5])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.6  # gaps 3.1 and 1.9 mm
    ds.save_as(paths[5])
    with pytest.raises(SatsError, match="uneven slice spacing"):
        read_dicom_series(tmp_path / "ct")


def test_gantry_tilt_is_an_error(tmp_path) -> None:
    paths = write_ct_series(head_ct(), tmp_path / "ct")
    for k, p in enumerate(paths):  # slice origins walk in y: a 10 degree tilt
        ds = pydicom.dcmread(p)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + k * 2.5 * np.tan(np.radians(10))
        ds.save_as(p)
    with pytest.raises(SatsError, match="gantry tilt"):
        read_dicom_series(tmp_path / "ct")


def test_rescale_slope_and_intercept_per_slice(tmp_path) -> None:
    """GDCM takes the pixel type from the first file: a later fractional rescale must not be truncated."""
    ct = head_ct()
    paths = write_ct_series(ct, tmp_path / "ct")
    ds = pydicom.dcmread(paths[3])
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1000.25"
    ds.PixelData = np.rint((ct.array[3] + 1000.25) / 0.5).astype(np.uint16).tobytes()
    ds.save_as(paths[3])
    back = read_dicom_series(tmp_path / "ct")
    np.testing.assert_allclose(back.array[3], ct.array[3], atol=0.25 + 1e-6)
    np.testing.assert_array_equal(back.array[:3], ct.array[:3])


# --- RTSTRUCT ---------------------------------------------------------------------------------


def test_slice_contours_holes_islands_and_edges() -> None:
    m = gtv_with_hole_and_islands((10, 48, 48))
    assert len(slice_contours(m[5])) == 3  # outer, hole, island
    assert len(slice_contours(m[6])) == 4  # + the structure on the first row
    assert slice_contours(np.zeros((8, 8), bool)) == []
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    (contour,) = slice_contours(one)
    assert np.all(np.abs(contour - 2) < 0.5)  # around the pixel, within its edges


@pytest.mark.parametrize("direction", [None, rotation(12, 5)], ids=["axial", "oblique"])
def test_rtstruct_round_trip_by_rt_utils(tmp_path, direction) -> None:
    ct_dir = tmp_path / "ct"
    files = write_reversed_series(head_ct(direction), ct_dir, patient_id="P123", patient_name="Doe^Jane")
    ct = read_image(ct_dir)
    mask = gtv_with_hole_and_islands(ct.shape)
    write_image(ct.with_array(mask), tmp_path / "gtv.nii.gz")
    rs_path = tmp_path / "out" / "RS.dcm"
    r = runner.invoke(app, ["rtstruct", "--mask", str(tmp_path / "gtv.nii.gz"), "--ct", str(ct_dir), "--out", str(rs_path),
                            "--name", "GTVp", "--color", "0,128,255"])
    assert r.exit_code == 0, r.output
    # Independent reader: rt-utils' own sorting and OpenCV fillPoly.
    theirs = rtutils_mask(ct_dir, rs_path, "GTVp")
    assert dice(theirs, mask) >= 0.98 and slices_of(theirs) == slices_of(mask)
    assert np.array_equal(theirs, mask > 0)  # exact, in fact
    np.testing.assert_array_equal(read_rtstruct_roi(rs_path, ct_dir, "GTVp").array, mask)
    # The object itself.
    rs = pydicom.dcmread(rs_path)
    ct0 = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert rs.Modality == "RTSTRUCT" and rs.SOPClassUID == pydicom.uid.RTStructureSetStorage
    assert (rs.PatientID, str(rs.PatientName), rs.StudyInstanceUID) == ("P123", "Doe^Jane", ct0.StudyInstanceUID)
    assert rs.SeriesInstanceUID != ct0.SeriesInstanceUID and rs.SOPInstanceUID != ct0.SOPInstanceUID
    (roi,) = rs.StructureSetROISequence
    assert roi.ROIName == "GTVp" and roi.ReferencedFrameOfReferenceUID == ct0.FrameOfReferenceUID
    assert rs.RTROIObservationsSequence[0].RTROIInterpretedType == "GTV"
    assert list(rs.ROIContourSequence[0].ROIDisplayColor) == [0, 128, 255]
    (frame,) = rs.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == ct0.FrameOfReferenceUID
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct0.SeriesInstanceUID
    ct_uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    assert [str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence] == ct_uids
    # Each contour references the CT slice whose plane holds its points.
    contours = rs.ROIContourSequence[0].ContourSequence
    assert len(contours) == sum(len(slice_contours(m)) for m in mask)
    for c in contours:
        assert c.ContourGeometricType == "CLOSED_PLANAR" and c.NumberOfContourPoints * 3 == len(c.ContourData)
        k = ct_uids.index(c.ContourImageSequence[0].ReferencedSOPInstanceUID)
        ds = pydicom.dcmread(files[k], stop_before_pixels=True)
        normal = np.cross(np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float))
        points = np.array(c.ContourData, float).reshape(-1, 3)
        np.testing.assert_allclose((points - np.array(ds.ImagePositionPatient, float)) @ normal, 0, atol=1e-4)


def test_rtstruct_refuses_a_mask_off_the_ct_grid(tmp_path) -> None:
    ct_dir = tmp_path / "ct"
    write_ct_series(head_ct(), ct_dir)
    ct = read_image(ct_dir)
    mask = gtv_with_hole_and_islands(ct.shape)
    shifted = Volume(mask, ct.spacing, (ct.origin[0] + 0.01, *ct.origin[1:]), ct.direction)
    write_image(shifted, tmp_path / "shifted.nii.gz")
    out = tmp_path / "RS.dcm"
    r = runner.invoke(app, ["rtstruct", "--mask", str(tmp_path / "shifted.nii.gz"), "--ct", str(ct_dir), "--out", str(out)])
    assert r.exit_code == 1 and "shifted.nii.gz: not on the grid of the CT series" in r.output and "origin" in r.output
    assert "Traceback" not in r.output and not out.exists()
    cropped = Volume(mask[:, :40], ct.spacing, ct.origin, ct.direction)
    with pytest.raises(SatsError, match="size"):
        write_rtstruct(cropped, ct_dir, out)
    nearly = Volume(mask, ct.spacing, (ct.origin[0] + 1e-4, *ct.origin[1:]), ct.direction)
    assert write_rtstruct(nearly, ct_dir, out) > 0  # within the 1e-3 mm tolerance
    for args, message in (
        (["--color", "red"], "--color must be three integers"),
        (["--name", "x" * 65], "1-64 characters"),
        (["--ct", str(tmp_path / "shifted.nii.gz")], "not a DICOM CT series folder"),
    ):
        base = {"--mask": str(tmp_path / "shifted.nii.gz"), "--ct": str(ct_dir), "--out": str(tmp_path / "x.dcm")}
        base.update(dict(zip(args[::2], args[1::2])))
        r = runner.invoke(app, ["rtstruct", *[v for kv in base.items() for v in kv]])
        assert r.exit_code == 1 and message in r.output, r.output


def test_rtstruct_against_the_chosen_series_of_two(tmp_path) -> None:
    folder = tmp_path / "two"
    big = head_ct()
    small = Volume(big.array[:8], big.spacing, (1.0, 2.0, 3.0))
    write_ct_series(big, folder / "a")
    write_ct_series(small, folder / "b")
    small_uid = next(uid for uid, s in scan_folder(folder).items() if len(s.slices) == 8)
    mask = small.with_array(gtv_with_hole_and_islands(small.shape))
    with pytest.raises(SatsError, match="not on the grid"):  # the default series is the big one
        write_rtstruct(mask, folder, tmp_path / "RS.dcm")
    write_rtstruct(mask, folder, tmp_path / "RS.dcm", series_uid=small_uid)
    rs = pydicom.dcmread(tmp_path / "RS.dcm")
    assert rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID == small_uid
    np.testing.assert_array_equal(rtutils_mask(folder / "b", tmp_path / "RS.dcm", "GTVp"), mask.array > 0)


def test_empty_mask_gives_valid_rtstruct_and_seg(tmp_path) -> None:
    """Decision: an empty mask still writes the ROI (GTVp, GTV, colour) without a Contour
    Sequence (type 3; dciodvfy rejects it present with zero items) and a SEG with all frames
    empty; readers get an empty mask back."""
    ct_dir = tmp_path / "ct"
    write_ct_series(head_ct(), ct_dir)
    ct = read_image(ct_dir)
    empty = ct.with_array(np.zeros(ct.shape, np.uint8))
    assert write_rtstruct(empty, ct_dir, tmp_path / "RS.dcm") == 0
    rs = pydicom.dcmread(tmp_path / "RS.dcm")
    assert rs.StructureSetROISequence[0].ROIName == "GTVp" and rs.RTROIObservationsSequence[0].RTROIInterpretedType == "GTV"
    assert "ContourSequence" not in rs.ROIContourSequence[0]
    assert read_rtstruct_roi(tmp_path / "RS.dcm", ct_dir, "gtvp").array.sum() == 0  # case-insensitive name
    assert write_seg(empty, ct_dir, tmp_path / "SEG.dcm") == 0
    assert seg_mask(tmp_path / "SEG.dcm", ct_dir).sum() == 0


def test_read_rtstruct_roi_errors(tmp_path) -> None:
    ct_dir = tmp_path / "ct"
    files = write_ct_series(head_ct(), ct_dir)
    ct = read_image(ct_dir)
    write_rtstruct(ct.with_array(gtv_with_hole_and_islands(ct.shape)), ct_dir, tmp_path / "RS.dcm", roi_name="GTVp")
    with pytest.raises(SatsError, match=r"IM0001\.dcm: not an RT Structure Set \(modality CT\)"):
        read_rtstruct_roi(files[0], ct_dir, "GTVp")
    with pytest.raises(SatsError, match=r"RS\.dcm: no ROI named 'GTVn' \(ROIs: GTVp\)"):
        read_rtstruct_roi(tmp_path / "RS.dcm", ct_dir, "GTVn")
    other = tmp_path / "other"
    write_ct_series(head_ct(), other)  # same grid, another frame of reference
    with pytest.raises(SatsError, match="is in frame of reference"):
        read_rtstruct_roi(tmp_path / "RS.dcm", other, "GTVp")


# --- DICOM SEG --------------------------------------------------------------------------------


def test_seg_round_trip_is_exact(tmp_path) -> None:
    ct_dir = tmp_path / "ct"
    files = write_reversed_series(head_ct(rotation(-7, 3)), ct_dir)
    ct = read_image(ct_dir)
    mask = gtv_with_hole_and_islands(ct.shape)
    assert write_seg(ct.with_array(mask), ct_dir, tmp_path / "SEG.dcm", segment_label="GTVp") == len(slices_of(mask))
    np.testing.assert_array_equal(seg_mask(tmp_path / "SEG.dcm", ct_dir), mask)
    seg = hd.seg.segread(tmp_path / "SEG.dcm")
    ct0 = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert seg.SegmentationType == "BINARY" and seg.StudyInstanceUID == ct0.StudyInstanceUID
    assert seg.get_segment_description(1).segment_label == "GTVp"
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "sats"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct0.SeriesInstanceUID


# --- real data: 4D-Lung ------------------------------------------------------------------------


def test_real_rtstruct_round_trip(lung_dicom, tmp_path) -> None:
    """Tumor_c40 of the 4D-Lung RTSTRUCT -> mask -> `sats rtstruct` -> rt-utils -> same mask."""
    ct_dir = lung_dicom / "ct"
    tumour = read_rtstruct_roi(lung_dicom / "rtstruct" / "1-1.dcm", ct_dir, "Tumor_c40")
    assert tumour.shape == (99, 512, 512)
    assert len(slices_of(tumour.array)) == 28  # the README: 28 contours on 28 slices
    assert tumour.array.sum() * tumour.voxel_volume_ml == pytest.approx(67.6, rel=0.02)
    write_image(tumour, tmp_path / "tumour.nii.gz")
    rs_path = tmp_path / "RS.dcm"
    r = runner.invoke(app, ["rtstruct", "--mask", str(tmp_path / "tumour.nii.gz"), "--ct", str(ct_dir), "--out", str(rs_path), "--name", "Tumor_c40"])
    assert r.exit_code == 0, r.output
    theirs = rtutils_mask(ct_dir, rs_path, "Tumor_c40")
    assert dice(theirs, tumour.array) >= 0.98 and slices_of(theirs) == slices_of(tumour.array)
    # The written series reference has no empty first item (the input's quirk is not copied).
    rs = pydicom.dcmread(rs_path)
    refs = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence
    assert len(refs) == 99 and all("ReferencedSOPInstanceUID" in i for i in refs)
    assert rs.PatientID == pydicom.dcmread(next(ct_dir.iterdir()), stop_before_pixels=True).PatientID

    # rt-utils reads the original too once its empty ContourImageSequence item is dropped.
    original = pydicom.dcmread(lung_dicom / "rtstruct" / "1-1.dcm")
    seq = original.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence
    assert "ReferencedSOPInstanceUID" not in seq[0]
    del seq[0]
    original.save_as(tmp_path / "original_fixed.dcm")
    theirs_original = rtutils_mask(ct_dir, tmp_path / "original_fixed.dcm", "Tumor_c40")
    # Different conventions on the same polygons (rt-utils rounds vertices and fills the
    # polygon's own pixels; sats tests pixel centres), so close but not identical ...
    assert dice(theirs_original, tumour.array) >= 0.95
    # ... and a round trip wholly by rt-utils' reading is exact as well.
    write_rtstruct(tumour.with_array(theirs_original.astype(np.uint8)), ct_dir, tmp_path / "RS2.dcm")
    assert np.array_equal(rtutils_mask(ct_dir, tmp_path / "RS2.dcm", "GTVp"), theirs_original)
    # DICOM SEG of the same mask, read back by highdicom.
    write_seg(tumour, ct_dir, tmp_path / "SEG.dcm", segment_label="Tumor_c40")
    np.testing.assert_array_equal(seg_mask(tmp_path / "SEG.dcm", ct_dir), tumour.array)


# --- sats predict on a DICOM series -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dicom_run(tiny_trained_run, tmp_path_factory):
    """The tiny trained model and one of its training CTs as a DICOM folder holding two series."""
    run_dir, data = tiny_trained_run
    root = tmp_path_factory.mktemp("tiny_dicom")
    ct = read_image(data / "imagesTr" / "case_001_0000.nii.gz")  # 16 x 40 x 40, square slices for rt-utils
    write_ct_series(ct, root / "target")
    decoy = Volume(np.concatenate([ct.array, ct.array[:4]]), ct.spacing, (ct.origin[0], ct.origin[1], ct.origin[2] + 200))
    write_ct_series(decoy, root / "decoy")  # more slices: the default choice
    both = root / "both"
    both.mkdir()
    for sub in ("target", "decoy"):
        for f in (root / sub).iterdir():
            shutil.copy(f, both / f"{sub}_{f.name}")
    uid = pydicom.dcmread(next((root / "target").iterdir()), stop_before_pixels=True).SeriesInstanceUID
    return run_dir, both, root / "target", str(uid)


def test_predict_rtstruct_and_seg_match_the_nifti_prediction(tiny_dicom_run, make_predicting_run, tmp_path) -> None:
    trained_dir, both, target, uid = tiny_dicom_run
    # The trained weights with the final bias set so that the model marks ~1 % of the CT:
    # a tiny model may predict nothing, and empty against empty proves nothing.
    run_dir = make_predicting_run(trained_dir, read_image(target), tmp_path / "run")
    common = ["-i", str(both), "-m", str(run_dir), "--series", uid]
    r = runner.invoke(app, ["predict", *common, "-o", str(tmp_path / "pred.nii.gz")])
    assert r.exit_code == 0, r.output
    nifti = read_image(tmp_path / "pred.nii.gz")
    assert nifti.same_geometry(read_image(target), tol_mm=1e-4) is None  # the --series one, not the decoy
    assert 50 <= nifti.array.sum() <= 0.5 * nifti.array.size, f"prediction has {nifti.array.sum()} voxels"
    assert len(slices_of(nifti.array)) >= 2
    r = runner.invoke(app, ["predict", *common, "-o", str(tmp_path / "RS.dcm"), "--format", "rtstruct"])
    assert r.exit_code == 0, r.output
    assert "ContourSequence" in pydicom.dcmread(tmp_path / "RS.dcm").ROIContourSequence[0]
    # A case flagged for review (the toy heads have no nasopharynx) names its ROI so.
    name = "GTVp (review)" if json.loads((tmp_path / "RS_qa.json").read_text())["flag"] == "review" else "GTVp"
    ours = read_rtstruct_roi(tmp_path / "RS.dcm", both, name, series_uid=uid)
    np.testing.assert_array_equal(ours.array, nifti.array)
    theirs = rtutils_mask(target, tmp_path / "RS.dcm", name)
    assert dice(theirs, nifti.array) >= 0.98 and slices_of(theirs) == slices_of(nifti.array)
    r = runner.invoke(app, ["predict", *common, "-o", str(tmp_path / "SEG.dcm"), "--format", "seg"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(seg_mask(tmp_path / "SEG.dcm", both, uid), nifti.array)


def test_predict_dicom_formats_fail_cleanly(tiny_dicom_run, tmp_path) -> None:
    run_dir, both, target, uid = tiny_dicom_run
    nifti_in = tmp_path / "ct.nii.gz"
    write_image(read_image(target), nifti_in)
    for args, message in (
        (["-i", str(nifti_in), "-o", str(tmp_path / "RS.dcm"), "--format", "rtstruct"], "needs a DICOM CT series folder"),
        (["-i", str(target), "-o", str(tmp_path / "RS.nii.gz"), "--format", "rtstruct"], "name it *.dcm"),
        (["-i", str(target), "-o", str(tmp_path / "RS.dcm"), "--format", "dicom"], "--format must be one of"),
        (["-i", str(nifti_in), "-o", str(tmp_path / "p.nii.gz"), "--series", uid], "--series needs one DICOM series folder"),
        (["-i", str(both), "-o", str(tmp_path / "p.nii.gz"), "--series", "1.2.3"], "no series with SeriesInstanceUID 1.2.3"),
    ):
        r = runner.invoke(app, ["predict", "-m", str(run_dir), *args])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (args, r.output)
    assert not any(p.suffix == ".dcm" for p in tmp_path.iterdir())


def ragged_square(shape: tuple[int, int]) -> np.ndarray:
    """A square of 490 pixels with a ragged edge (as a noisy prediction has) and a hole, one
    region: its outline has about 7,000 vertices, some 90 kB of ContourData."""
    from scipy import ndimage

    r, c = np.mgrid[: shape[0], : shape[1]]
    noise = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=shape), 1.0)
    big = np.maximum(np.abs(r - 256), np.abs(c - 256)) < 245 + 6 * noise / noise.std()
    labels, _ = ndimage.label(big)
    big = ndimage.binary_fill_holes(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    big[200:260, 100:160] = False
    return big


def test_a_large_structure_is_written_without_vr_un_and_comes_back_voxel_for_voxel(lung_dicom, tmp_path) -> None:
    """A slice-filling structure's staircase contour is longer than DS's 64 kB: it is written as
    row bands that each fit, never as VR UN, and rasterises back to the same pixels."""
    import warnings

    from sats.predict.export import MAX_CONTOUR_BYTES

    ct_dir = lung_dicom / "ct"
    ct = read_dicom_series(ct_dir)
    big = ragged_square(ct.shape[1:])
    mask = np.zeros(ct.shape, np.uint8)
    mask[40] = big
    mask[70, 100:120, 100:140] = 1  # and a small one
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns when it falls back to VR UN
        write_rtstruct(ct.with_array(mask), ct_dir, tmp_path / "RS.dcm")
    raw = pydicom.dcmread(tmp_path / "RS.dcm")
    items = raw.ROIContourSequence[0].ContourSequence
    lengths = [len("\\".join(str(v) for v in it["ContourData"].value)) for it in items]
    assert all(it["ContourData"].VR == "DS" for it in items) and max(lengths) <= MAX_CONTOUR_BYTES
    assert max(lengths) > MAX_CONTOUR_BYTES // 4  # the split keeps contours large, it does not shred them
    on_40 = [it for it in items if it.ContourImageSequence[0].ReferencedSOPInstanceUID
             == load_ct_reference(ct_dir).slices[40].sop_instance_uid]
    assert 3 <= len(on_40) <= 5  # two or three bands (and the hole), not rows
    np.testing.assert_array_equal(read_rtstruct_roi(tmp_path / "RS.dcm", ct_dir, "GTVp").array, mask)


def _dciodvfy() -> str:
    import os

    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("SATS_REQUIRE_DICOM_TOOLS") == "1":
            pytest.fail("dciodvfy (Debian dicom3tools) is missing and SATS_REQUIRE_DICOM_TOOLS=1")
        pytest.skip("dciodvfy (Debian dicom3tools) not installed")
    return tool


@pytest.mark.parametrize("size", ["small", "large"])
def test_dciodvfy_finds_no_error_in_the_rtstruct_and_seg(lung_dicom, tmp_path, size) -> None:
    import subprocess

    tool = _dciodvfy()
    ct_dir = lung_dicom / "ct"
    ct = read_dicom_series(ct_dir)
    mask = np.zeros(ct.shape, np.uint8)
    if size == "small":
        mask[50:53, 240:250, 250:262] = 1
    else:  # contours past the 64 kB of one DS element, split into bands
        mask[40:43] = ragged_square(ct.shape[1:])
    write_rtstruct(ct.with_array(mask), ct_dir, tmp_path / "RS.dcm")
    write_seg(ct.with_array(mask), ct_dir, tmp_path / "SEG.dcm")
    for name in ("RS.dcm", "SEG.dcm"):
        out = subprocess.run([tool, str(tmp_path / name)], capture_output=True, text=True, timeout=300)
        report = out.stdout + out.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{name}:\n" + "\n".join(errors[:20])
        assert ("RTStructureSet" if name == "RS.dcm" else "Segmentation") in report  # it did check the IOD
