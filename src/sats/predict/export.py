"""Clinical DICOM output: a mask as an RT Structure Set or a DICOM Segmentation, and back.

Both writers take a mask on the grid of a DICOM CT series and reference that series, so a
treatment-planning system can import the result next to the CT it was drawn on.

Axes, once for the whole module. A mask :class:`~sats.data.io.Volume` read from the series has
``array[k, j, i]`` with

* ``k`` (array axis 0, "z") = the k-th CT slice in order along the slice normal
  (:func:`sats.data.dicom.sort_slices`), i.e. one DICOM instance;
* ``j`` (array axis 1, "y") = the DICOM **row** index (down the image, along the column
  direction cosine ``ImageOrientationPatient[3:]``, step ``PixelSpacing[0]``);
* ``i`` (array axis 2, "x") = the DICOM **column** index (along the row direction cosine
  ``ImageOrientationPatient[:3]``, step ``PixelSpacing[1]``).

The LPS position of pixel centre ``(j, i)`` of slice ``k`` is
``IPP_k + i * PixelSpacing[1] * IOP[:3] + j * PixelSpacing[0] * IOP[3:]`` (PS3.3 C.7.6.2.1.1),
taken from each slice's own ``ImagePositionPatient``.

RTSTRUCT contours follow the pixel edges: marching squares (contourpy) on the 0/1 mask puts
each vertex between an inside and an outside pixel centre, 0.01 pixel inside the pixel edge
(:data:`CONTOUR_LEVEL`). The polygon area is the mask's area less the cut corners (99.8 %
on the 4D-Lung tumour), and a planning system that fills a polygon by testing pixel centres
gets exactly the mask back (every centre is at least 0.34 pixel from the polygon). Holes and
islands are separate closed contours on the slice; a pixel is inside when it is inside an
odd number of them (the even-odd rule planning systems apply to nested contours).
"""

from __future__ import annotations

import datetime as _dt
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from sats import __version__
from sats.data.dicom import DicomSlice, choose_ct_series, sort_slices, truncated_element
from sats.data.io import atomic_path
from sats.geometry.volume import SatsError, Volume

#: Default ROI / segment name: primary gross tumour volume.
DEFAULT_ROI_NAME = "GTVp"
#: Series and structure set description; a flagged case's says why instead.
DEFAULT_DESCRIPTION = "sats automatic GTV segmentation"
#: Default display colour (R, G, B), 0-255.
DEFAULT_COLOR = (255, 0, 0)
#: Marching-squares level on the 0/1 mask: vertices sit 1 - 0.51 = 0.49 pixel from the inside
#: pixel centre, i.e. 0.01 pixel inside the pixel edge. Centre-in-polygon rasterisers (planning
#: systems, dicompyler) and rounding ones that fill the polygon's own pixels (OpenCV
#: ``fillPoly`` after ``np.around``, as rt-utils does) then both give back exactly the mask;
#: at 0.5 the rounding ones would grow it by up to a pixel.
CONTOUR_LEVEL = 0.51
#: Largest geometry difference (mm) between a mask and the CT series it is written against.
GEOMETRY_TOLERANCE_MM = 1e-3

# Attributes copied from the CT so the new object joins the same patient and study.
_PATIENT_STUDY = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientIdentityRemoved", "DeidentificationMethod",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription",
)
# Type 2 attributes of the Patient and General Study modules: present, empty when unknown.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


@dataclass
class CtReference:
    """A DICOM CT series as the target grid of a mask.

    Attributes:
        folder: the folder it was read from.
        slices: slice headers in array order (index k = array axis 0), sorted along the normal.
        grid: the series geometry as a :class:`Volume` of shape ``(slices, rows, columns)``
            (its array is a zero-size broadcast, only the geometry matters).
        header: the first slice's header (no pixel data): patient, study, frame of reference.
    """

    folder: Path
    slices: list[DicomSlice]
    grid: Volume
    header: Dataset

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.header.get("FrameOfReferenceUID", ""))

    @property
    def series_uid(self) -> str:
        return str(self.header.SeriesInstanceUID)


def load_ct_reference(ct_dir: str | Path, series_uid: str | None = None) -> CtReference:
    """Headers and geometry of the CT series in ``ct_dir`` (the same series ``sats`` reads).

    Raises:
        SatsError: no CT series, or missing slices, uneven spacing, gantry tilt, ...
    """
    folder = Path(ct_dir)
    if not folder.is_dir():
        raise SatsError(f"{folder}: not a DICOM CT series folder")
    series = choose_ct_series(folder, series_uid)
    slices, geometry = sort_slices(series, folder)
    rows, cols = slices[0].shape
    grid = Volume(np.broadcast_to(np.zeros((), np.uint8), (len(slices), rows, cols)),
                  geometry.spacing, geometry.origin, geometry.direction)
    header = pydicom.dcmread(slices[0].path, stop_before_pixels=True)
    return CtReference(folder, slices, grid, header)


def check_mask_on_ct(mask: Volume, ct: CtReference, mask_name: str) -> np.ndarray:
    """The mask as a boolean ``(slices, rows, columns)`` array after checking it lies on the CT grid.

    Raises:
        SatsError: when size, spacing, origin (beyond :data:`GEOMETRY_TOLERANCE_MM`) or
            direction differ from the CT series, or the mask holds non-finite values.
    """
    diff = mask.same_geometry(ct.grid, tol_mm=GEOMETRY_TOLERANCE_MM)
    if diff is not None:
        raise SatsError(f"{mask_name}: not on the grid of the CT series in {ct.folder}: {diff} "
                        f"(resample the mask onto the CT first)")
    array = np.asarray(mask.array)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise SatsError(f"{mask_name}: holds NaN or infinite values")
    return array != 0  # any non-zero label is the structure


# --- contours ------------------------------------------------------------------------------


def slice_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed contours of one binary slice along the pixel edges (0.01 pixel inside them).

    Args:
        mask2d: ``(rows, columns)`` boolean slice.
    Returns:
        One ``(n, 2)`` float array per closed contour (outer boundaries and holes alike),
        vertices as continuous ``(row, column)`` pixel indices (pixel centres at integers),
        the first vertex not repeated at the end, collinear vertices dropped.
    """
    import contourpy

    if not mask2d.any():
        return []
    # A one-pixel border of background closes the contours of structures touching the edge.
    padded = np.pad(mask2d.astype(np.float64), 1)
    gen = contourpy.contour_generator(z=padded, name="serial", line_type="Separate", corner_mask=False)
    contours = []
    for line in gen.lines(CONTOUR_LEVEL):
        xy = np.asarray(line)[:-1] - 1.0  # drop the repeated closing vertex, undo the padding
        rc = xy[:, ::-1]  # contourpy gives (x = column, y = row)
        rc = _drop_collinear(rc)
        if len(rc) >= 3:
            contours.append(rc)
    return contours


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices lying on the straight line through their neighbours (exact here: on a
    binary mask every marching-squares vertex is a pixel index plus one of a few offsets)."""
    prev, nxt = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    a, b = points - prev, nxt - points
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    return points[np.abs(cross) > 1e-9]


def _slice_frame(s: DicomSlice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, step per row index, step per column index) of one slice, LPS mm."""
    row_cos, col_cos = s.orientation[:3], s.orientation[3:]
    dy, dx = s.pixel_spacing  # PixelSpacing = (between rows, between columns)
    return s.position, col_cos * dy, row_cos * dx


def pixel_to_patient(points_rc: np.ndarray, s: DicomSlice) -> np.ndarray:
    """``(n, 2)`` continuous ``(row, column)`` indices on slice ``s`` -> ``(n, 3)`` LPS mm."""
    origin, per_row, per_col = _slice_frame(s)
    return origin + np.outer(points_rc[:, 0], per_row) + np.outer(points_rc[:, 1], per_col)


def patient_to_pixel(points: np.ndarray, s: DicomSlice) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 3)`` LPS mm -> (``(n, 2)`` continuous ``(row, column)`` on slice ``s``, ``(n,)``
    signed distance from the slice plane in mm)."""
    origin, per_row, per_col = _slice_frame(s)
    d = points - origin
    normal = np.cross(s.orientation[:3], s.orientation[3:])
    rc = np.stack([d @ per_row / (per_row @ per_row), d @ per_col / (per_col @ per_col)], axis=1)
    return rc, d @ normal


# --- RTSTRUCT -------------------------------------------------------------------------------


def parse_color(text: str) -> tuple[int, int, int]:
    """``"255,0,0"`` -> ``(255, 0, 0)``; raises SatsError for anything else."""
    parts = [p.strip() for p in text.split(",")]
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise SatsError(f"--color must be three integers 0-255 like 255,0,0, not {text!r}")
    return rgb  # type: ignore[return-value]


def check_roi_name(name: str) -> str:
    """ROI names are DICOM LO: 1-64 characters, no backslash or control characters."""
    if not name.strip() or len(name) > 64 or "\\" in name or any(ord(c) < 32 for c in name):
        raise SatsError(f"ROI name {name!r} must be 1-64 characters without backslash or control characters")
    return name


def _copy_patient_study(ds: Dataset, ct: Dataset) -> None:
    for keyword in _PATIENT_STUDY:
        if keyword in ct:
            ds[keyword] = ct[keyword]
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")


def _ds(values: np.ndarray) -> list[str]:
    """Decimal strings for ContourData (DS, at most 16 characters): 1e-5 mm resolution."""
    out = []
    for v in np.asarray(values, dtype=np.float64).ravel():
        text = f"{v:.5f}".rstrip("0").rstrip(".")
        out.append("0" if text in ("-0", "") else text)
    return out


def build_rtstruct(
    mask: np.ndarray,
    ct: CtReference,
    roi_name: str = DEFAULT_ROI_NAME,
    color: tuple[int, int, int] = DEFAULT_COLOR,
    description: str = DEFAULT_DESCRIPTION,
) -> Dataset:
    """An RT Structure Set dataset with one ROI drawn from ``mask``.

    Args:
        mask: boolean ``(slices, rows, columns)`` on ``ct``'s grid (see the module docstring
            for the axis mapping).
        ct: the referenced CT series.
    Returns:
        The dataset, file meta included, ready for ``save_as``. An empty mask gives the ROI
        (name, GTV type, colour) without a Contour Sequence: valid, as that sequence is type 3
        and must hold at least one item when present.
    """
    check_roi_name(roi_name)
    frame_uid = ct.frame_of_reference_uid
    if not frame_uid:
        raise SatsError(f"{ct.folder}: the CT series has no FrameOfReferenceUID; an RTSTRUCT needs one")
    ds = _rtstruct_header(ct, roi_name, description)
    # Frame of Reference module (in the RT Structure Set IOD since 2020): the CT's frame.
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ct.header.get("PositionReferenceIndicator", "")
    ds.ReferencedFrameOfReferenceSequence = Sequence([_referenced_frame(ct, frame_uid)])
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = frame_uid
    roi.ROIName = roi_name
    roi.ROIDescription = description[:64]
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"sats {__version__}"[:64]
    ds.StructureSetROISequence = Sequence([roi])
    ds.ROIContourSequence = Sequence([_roi_contour(mask, ct, color)])
    # RT ROI Observations
    obs = Dataset()
    obs.ObservationNumber = 1
    obs.ReferencedROINumber = 1
    obs.ROIObservationLabel = roi_name[:16]
    obs.RTROIInterpretedType = "GTV"
    obs.ROIInterpreter = ""
    ds.RTROIObservationsSequence = Sequence([obs])
    # Approval: a machine contour awaits a clinician's review.
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def _rtstruct_header(ct: CtReference, roi_name: str, description: str) -> Dataset:
    """File meta, patient and study (copied from the CT), SOP common, a new RT series in
    the CT's study, equipment and the Structure Set module."""
    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    _copy_patient_study(ds, ct.header)
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 901
    ds.SeriesDescription = description[:64]
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.OperatorsName = ""
    ds.Manufacturer = "sats"
    ds.ManufacturerModelName = "sats"
    ds.SoftwareVersions = __version__
    ds.StructureSetLabel = roi_name[:16]
    ds.StructureSetName = "sats"
    ds.StructureSetDescription = description[:1024]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.InstanceNumber = 1
    return ds


def _referenced_frame(ct: CtReference, frame_uid: str) -> Dataset:
    """Referenced Frame of Reference: the CT's frame, study and series, every slice in array order."""
    contour_images = Sequence()
    for s in ct.slices:
        item = Dataset()
        item.ReferencedSOPClassUID = s.sop_class_uid or ct.header.SOPClassUID
        item.ReferencedSOPInstanceUID = s.sop_instance_uid
        contour_images.append(item)
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = ct.series_uid
    ref_series.ContourImageSequence = contour_images
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, as PS3.3 asks)
    ref_study.ReferencedSOPInstanceUID = ct.header.StudyInstanceUID
    ref_study.RTReferencedSeriesSequence = Sequence([ref_series])
    ref_frame = Dataset()
    ref_frame.FrameOfReferenceUID = frame_uid
    ref_frame.RTReferencedStudySequence = Sequence([ref_study])
    return ref_frame


#: Longest ContourData value (bytes): DS in explicit VR little endian has a 16-bit length;
#: longer, pydicom writes it as VR UN, which planning systems may refuse.
MAX_CONTOUR_BYTES = 65534


def _encoded_bytes(values: list[str]) -> int:
    n = sum(map(len, values)) + max(len(values) - 1, 0)  # backslash-separated
    return n + n % 2  # padded to even length


def slice_contour_data(mask2d: np.ndarray, s: DicomSlice, limit: int = MAX_CONTOUR_BYTES) -> list[list[str]]:
    """ContourData (DS strings, x y z per vertex) of one slice's closed contours, each at most
    ``limit`` bytes. A contour that is longer is not cut (a cut polygon encloses something
    else): the slice's rows are split into two bands and each band is contoured on its own,
    again until every contour fits. Bands meet along a pixel edge, so their contours are
    disjoint and even-odd filling gives back exactly the slice's pixels.
    """
    def band(r0: int, r1: int) -> list[list[str]]:
        out = []
        for rc in slice_contours(mask2d[r0:r1]):
            values = _ds(pixel_to_patient(rc + np.array([r0, 0.0]), s))
            if _encoded_bytes(values) > limit and r1 - r0 > 1:
                mid = (r0 + r1) // 2
                return band(r0, mid) + band(mid, r1)
            out.append(values)
        return out

    return band(0, mask2d.shape[0])


def _roi_contour(mask: np.ndarray, ct: CtReference, color: tuple[int, int, int]) -> Dataset:
    """The ROI Contour item: closed planar contours of ``mask``, slice by slice."""
    contours = Sequence()
    for k, s in enumerate(ct.slices):  # array axis 0 = slice k = this DICOM instance
        for values in slice_contour_data(mask[k], s):  # rows, columns = array axes 1, 2
            image = Dataset()
            image.ReferencedSOPClassUID = s.sop_class_uid or ct.header.SOPClassUID
            image.ReferencedSOPInstanceUID = s.sop_instance_uid
            contour = Dataset()
            contour.ContourImageSequence = Sequence([image])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(values) // 3
            contour.ContourNumber = len(contours) + 1
            contour.ContourData = values
            contours.append(contour)
    roi_contour = Dataset()
    roi_contour.ROIDisplayColor = [int(c) for c in color]
    if len(contours):
        # Type 3 but 1-n items when present: an empty mask leaves the sequence out.
        roi_contour.ContourSequence = contours
    roi_contour.ReferencedROINumber = 1
    return roi_contour


def write_rtstruct(
    mask: Volume,
    ct_dir: str | Path,
    out: str | Path,
    roi_name: str = DEFAULT_ROI_NAME,
    color: tuple[int, int, int] = DEFAULT_COLOR,
    series_uid: str | None = None,
    mask_name: str = "mask",
    description: str = DEFAULT_DESCRIPTION,
) -> int:
    """Write ``mask`` (on the grid of the CT series in ``ct_dir``) as an RTSTRUCT file, atomically.

    Args:
        mask: a Volume whose geometry equals the CT series' within 1e-3 mm; non-zero = inside.
        ct_dir: folder of the CT series (``series_uid`` picks one, else the CT with most slices).
        out: the RTSTRUCT file to write.
        mask_name: how to name the mask in error messages (its file name).
        description: the series and structure set description (a flag's reason goes here).
    Returns:
        The number of contours written (0 for an empty mask).
    Raises:
        SatsError: the mask is not on the CT grid, the CT series is unusable, bad ROI name.
    """
    ct = load_ct_reference(ct_dir, series_uid)
    array = check_mask_on_ct(mask, ct, mask_name)
    ds = build_rtstruct(array, ct, roi_name, color, description)
    _save(ds, Path(out))
    return len(ds.ROIContourSequence[0].get("ContourSequence", []))


def _save(ds: Dataset, out: Path) -> None:
    if out.is_dir():
        raise SatsError(f"{out}: is a folder; give a file name such as RS.dcm")
    with atomic_path(out, suffix=".dcm") as tmp:
        try:
            ds.save_as(tmp, enforce_file_format=True)
        except (ValueError, TypeError) as exc:  # pydicom's validation of a value
            raise SatsError(f"{out}: cannot write DICOM ({exc})") from None


def read_rtstruct_roi(
    rs_path: str | Path,
    ct_dir: str | Path,
    roi_name: str,
    series_uid: str | None = None,
) -> Volume:
    """Rasterise one ROI of an RTSTRUCT onto the grid of its CT series.

    A pixel is inside when its centre lies inside an odd number of the ROI's closed planar
    contours on that slice (holes and islands). Each contour is placed on the CT slice by
    its position along the slice normal (not by its image reference, which may be absent).

    Args:
        rs_path: the RTSTRUCT file.
        ct_dir: the CT series folder it was drawn on.
        roi_name: exact ROI name, or a unique case-insensitive match.
    Returns:
        uint8 mask ``(slices, rows, columns)`` = (z, y, x) with the CT's geometry.
    Raises:
        SatsError: not an RTSTRUCT, no such ROI, other frame of reference, contours off the slices.
    """
    rs_path = Path(rs_path)
    try:
        return _rasterise_roi(rs_path, ct_dir, roi_name, series_uid)
    except SatsError as exc:
        # Names and values taken from the file may hold line breaks: keep the message one line.
        message = " ".join(str(exc).splitlines())
        if message == str(exc):
            raise
        raise SatsError(message) from None
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError, OSError, EOFError,
            NotImplementedError) as exc:  # pydicom reads lazily: damage shows up as any of these
        reason = " ".join(str(exc).splitlines())[:200] or type(exc).__name__
        raise SatsError(f"{rs_path}: damaged RT Structure Set ({reason})") from None


def _rasterise_roi(rs_path: Path, ct_dir: str | Path, roi_name: str, series_uid: str | None) -> Volume:
    from matplotlib.path import Path as PolygonPath

    try:
        rs = pydicom.dcmread(rs_path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged file (struct.error, ...)
        reason = " ".join(str(exc).splitlines())[:200] or type(exc).__name__
        raise SatsError(f"{rs_path}: not a readable DICOM file ({reason})") from None
    cut = truncated_element(rs, rs_path)
    if cut is not None:
        raise SatsError(f"{rs_path}: truncated DICOM file ({cut} runs past the end)")
    if str(rs.get("Modality", "")) != "RTSTRUCT" or "StructureSetROISequence" not in rs:
        raise SatsError(f"{rs_path}: not an RT Structure Set (modality {rs.get('Modality', '?')})")
    rois = {str(r.ROIName): r for r in rs.StructureSetROISequence}
    roi = rois.get(roi_name)
    if roi is None:
        matches = [r for name, r in rois.items() if name.lower() == roi_name.lower()]
        if len(matches) != 1:
            raise SatsError(f"{rs_path}: no ROI named {roi_name!r} (ROIs: {', '.join(sorted(rois)) or 'none'})")
        roi = matches[0]
    ct = load_ct_reference(ct_dir, series_uid)
    frame = str(roi.get("ReferencedFrameOfReferenceUID", ""))
    if frame and ct.frame_of_reference_uid and frame != ct.frame_of_reference_uid:
        raise SatsError(f"{rs_path}: ROI {roi.ROIName!r} is in frame of reference {frame}, "
                        f"the CT series in {ct.folder} in {ct.frame_of_reference_uid}")
    number = int(roi.ROINumber)
    contour_items = next((c.get("ContourSequence", []) for c in rs.get("ROIContourSequence", [])
                          if int(c.ReferencedROINumber) == number), None)
    if contour_items is None:  # type 1: present, with an item per ROI, even an empty one
        raise SatsError(f"{rs_path}: no ROI Contour item for ROI {roi.ROIName!r} (truncated or damaged file?)")
    n, rows, cols = ct.grid.shape
    mask = np.zeros((n, rows, cols), dtype=np.uint8)
    normal = ct.grid.direction[:, 2]
    heights = np.array([s.position @ normal for s in ct.slices])
    gap = float(np.min(np.diff(heights))) if n > 1 else 1.0
    centres_r, centres_c = np.mgrid[:rows, :cols]
    for item in contour_items:
        points = _contour_points(item, rs_path, str(roi.ROIName))
        if str(item.ContourGeometricType).strip() != "CLOSED_PLANAR" or len(points) < 3:
            continue  # points and open lines enclose nothing
        h = float(np.mean(points @ normal))
        k = int(np.argmin(np.abs(heights - h)))
        rc, dist = patient_to_pixel(points, ct.slices[k])
        if np.max(np.abs(dist)) > 0.25 * gap:
            raise SatsError(f"{rs_path}: a contour of {roi.ROIName!r} at {h:.2f} mm along the normal "
                            f"does not lie on a slice of the CT series in {ct.folder}")
        lo = np.maximum(np.floor(rc.min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(rc.max(axis=0)).astype(int) + 1, (rows, cols))
        if np.any(hi <= lo):
            continue  # wholly outside the image
        box_r, box_c = centres_r[lo[0]:hi[0], lo[1]:hi[1]], centres_c[lo[0]:hi[0], lo[1]:hi[1]]
        inside = PolygonPath(rc).contains_points(np.stack([box_r.ravel(), box_c.ravel()], axis=1))
        mask[k, lo[0]:hi[0], lo[1]:hi[1]] ^= inside.reshape(box_r.shape).astype(np.uint8)  # even-odd
    return Volume(mask, ct.grid.spacing, ct.grid.origin, ct.grid.direction)


#: ContourGeometricType's defined terms (type 1): anything else is a damaged value.
CONTOUR_TYPES = ("POINT", "OPEN_PLANAR", "OPEN_NONPLANAR", "CLOSED_PLANAR")


def _contour_points(item: Dataset, rs_path: Path, roi_name: str) -> np.ndarray:
    """The (n, 3) LPS mm points of one Contour Sequence item, checked whatever its type: a
    missing or unknown ContourGeometricType, or a point that is not 3 finite numbers, is a
    damaged file, not a contour that encloses nothing."""
    kind = str(item.get("ContourGeometricType", "")).strip()
    if kind not in CONTOUR_TYPES:
        raise SatsError(f"{rs_path}: a contour of {roi_name!r} has no valid ContourGeometricType ({kind[:20]!r})")
    values = np.asarray(item.ContourData, dtype=np.float64).ravel()
    if values.size % 3 or values.size == 0:
        raise SatsError(f"{rs_path}: a contour of {roi_name!r} has {values.size} coordinates, "
                        f"not 3 per point (damaged file?)")
    if not np.all(np.isfinite(values)):
        raise SatsError(f"{rs_path}: a contour of {roi_name!r} holds non-finite coordinates")
    return values.reshape(-1, 3)


# --- DICOM SEG ------------------------------------------------------------------------------


def write_seg(
    mask: Volume,
    ct_dir: str | Path,
    out: str | Path,
    segment_label: str = DEFAULT_ROI_NAME,
    series_uid: str | None = None,
    mask_name: str = "mask",
    description: str = DEFAULT_DESCRIPTION,
) -> int:
    """Write ``mask`` as a binary DICOM Segmentation (highdicom) referencing the CT series.

    One segment labelled ``segment_label`` (category Morphologically Abnormal Structure,
    type Neoplasm), algorithm "sats". Frame k of the pixel array is CT slice k (array
    axis 0); rows and columns are array axes 1 and 2. Empty slices are left out of the
    SEG (highdicom's default); an empty mask keeps all frames, empty.

    Returns:
        The number of CT slices holding the structure.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    check_roi_name(segment_label)
    ct = load_ct_reference(ct_dir, series_uid)
    array = check_mask_on_ct(mask, ct, mask_name).astype(np.uint8)
    sources = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in ct.slices]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="sats", family=codes.cid7162.ArtificialIntelligence, version=__version__,
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    with warnings.catch_warnings():
        # Test and anonymised data often have one-component patient names: not the user's problem.
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        try:
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[segment],
                series_instance_uid=hd.UID(),
                series_number=902,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="sats",
                manufacturer_model_name="sats",
                software_versions=__version__,
                device_serial_number="none",
                series_description=description[:64],
                omit_empty_frames=bool(array.any()),  # a SEG needs at least one frame
            )
        except (ValueError, AttributeError, TypeError) as exc:
            raise SatsError(f"{ct.folder}: cannot build a DICOM SEG on this CT series ({exc})") from None
    _save(seg, Path(out))
    return int(array.reshape(array.shape[0], -1).any(axis=1).sum())
