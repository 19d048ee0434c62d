"""DICOM CT series input.

A folder may hold several series (and RTSTRUCT or other objects). The CT series with the
most slices is taken unless ``series_uid`` names one. Slices are ordered by their position
along the slice normal (``ImagePositionPatient`` projected on row x column of
``ImageOrientationPatient``), never by file name or InstanceNumber. Pixel data are decoded
by SimpleITK/GDCM with rescale slope and intercept applied, so values are HU; the geometry
is computed here from the headers and checked for missing slices, uneven spacing, gantry
tilt and mixed orientations.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.datadict import keyword_for_tag

from sats.geometry.volume import SatsError, Volume, itk_reason

#: SOP Class UID of CT Image Storage.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Relative deviation of one slice gap from the median gap that counts as uneven.
SPACING_TOLERANCE = 0.05
#: Type 1 attributes of a CT image (CT Image, Image Plane and Image Pixel modules) the reading
#: depends on: a slice without one was cut short or damaged, and no default may stand in.
CT_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "PixelData",
               "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation",
               "RescaleSlope", "RescaleIntercept")


@dataclass
class DicomSlice:
    path: Path
    position: np.ndarray  # ImagePositionPatient, LPS mm (x, y, z)
    orientation: np.ndarray  # ImageOrientationPatient, 6 cosines
    pixel_spacing: tuple[float, float]  # (row spacing = y, column spacing = x) mm
    shape: tuple[int, int]  # (rows, columns)
    sop_instance_uid: str
    sop_class_uid: str = ""
    rescale: tuple[float, float] = (1.0, 0.0)  # (RescaleSlope, RescaleIntercept)


@dataclass
class DicomSeries:
    """One series of a folder: its UID, modality and slice headers (unsorted)."""

    uid: str
    modality: str
    description: str
    slices: list[DicomSlice]


def scan_folder(folder: Path) -> dict[str, DicomSeries]:
    """Read the headers of every DICOM file under ``folder`` (recursively), grouped by series.

    Files that are not DICOM are skipped; a file that looks like DICOM (``DICM`` at byte 128
    or a ``.dcm`` name) but cannot be parsed, or an image slice whose geometry attributes
    are missing values or garbage, is a :class:`SatsError` naming the file.
    """
    series: dict[str, DicomSeries] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            # Large values (the pixel data) are skipped, not read, but their presence is seen.
            ds = pydicom.dcmread(path, defer_size=1024)
            uid = str(ds.get("SeriesInstanceUID", ""))
            modality = str(ds.get("Modality", ""))
            description = str(ds.get("SeriesDescription", ""))
            is_slice = "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds
            sop_classes = {str(ds.get("SOPClassUID", "")), str((ds.get("file_meta") or {}).get("MediaStorageSOPClassUID", ""))} - {""}
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged file
            if _looks_like_dicom(path):
                raise SatsError(f"{path}: unreadable DICOM file, truncated or damaged ({_reason(exc)})") from None
            continue
        cut = truncated_element(ds, path)
        if cut is not None:
            raise SatsError(f"{path}: truncated DICOM file ({cut} runs past the end)")
        if _looks_like_dicom(path):
            # pydicom silently returns what it could read of a file cut short: check that the
            # file meta is complete and the SOP class named, which every DICOM file has.
            meta = ds.get("file_meta") or {}
            group_length = meta.get("FileMetaInformationGroupLength")
            if (not sop_classes or "TransferSyntaxUID" not in meta
                    or (group_length is not None and path.stat().st_size < 144 + int(group_length))):
                raise SatsError(f"{path}: truncated or damaged DICOM file (incomplete file meta information)")
        is_ct = CT_IMAGE_STORAGE in sop_classes
        if is_ct:
            missing = [k for k in CT_REQUIRED if k not in ds]
            if missing:
                raise SatsError(f"{path}: truncated or damaged CT slice (no {', '.join(missing)})")
            problem = _ct_pixel_problem(ds)
            if problem:
                raise SatsError(f"{path}: damaged CT slice ({problem})")
        entry = series.setdefault(uid, DicomSeries(uid, modality, description, []))
        if not is_slice:
            continue  # not an image slice (RTSTRUCT, SR, ...)
        entry.slices.append(_slice_header(ds, path, is_ct))
    return series


def truncated_element(ds: pydicom.Dataset, path: Path) -> str | None:
    """The keyword (or tag) of a top-level element that runs past the end of the file, if any.

    pydicom returns what it could read of a file cut short without a word; an element whose
    declared length ends beyond the file is the trace such a cut leaves. Only elements not
    yet converted (read with ``dcmread``, not accessed) carry their file position.
    """
    size = path.stat().st_size
    for elem in ds.elements():
        tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
        if tell is not None and length is not None and length != 0xFFFFFFFF and tell + length > size:
            return keyword_for_tag(elem.tag) or str(elem.tag)
    return None


def _ct_pixel_problem(ds: pydicom.Dataset) -> str | None:
    """Why the pixel data of a CT slice cannot be decoded as its header says, or None.

    GDCM decodes a garbled PhotometricInterpretation as inverted values, and pixel data of
    another length than Rows x Columns x BitsAllocated (a damaged size or bit depth) as
    something: the Image Pixel attributes are checked against the CT Image module's values
    and the (uncompressed) pixel data must have exactly the length they give.
    """
    samples, bits, stored, sign = (_integer(ds, k) for k in ("SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation"))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"SamplesPerPixel {samples} and PhotometricInterpretation {photometric[:20]!r}: not a grey-scale image"
    if bits not in (8, 16, 32) or stored is None or not 1 <= stored <= bits or sign not in (0, 1):
        return f"BitsAllocated {bits}, BitsStored {stored}, PixelRepresentation {sign}: not a valid pixel encoding"
    ts = (ds.get("file_meta") or {}).get("TransferSyntaxUID")
    try:
        if ts is None or pydicom.uid.UID(str(ts)).is_compressed:
            return None  # encapsulated: the codec knows the length
    except ValueError:  # not a transfer syntax at all: GDCM will refuse the file, with its reason
        return None
    rows, columns = _integer(ds, "Rows"), _integer(ds, "Columns")
    if rows is None or columns is None or rows < 1 or columns < 1:
        return None  # _slice_header reports bad geometry
    need = rows * columns * bits // 8
    try:
        elem = ds.get_item(0x7FE00010, keep_deferred=True)
        have = getattr(elem, "length", None)  # raw: its length, the value unread
        have = int(have) if have is not None else len(elem.value or b"")  # already converted
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    if have == need + need % 2:  # an odd length is padded to even
        return None
    return f"pixel data of {have} bytes, {need} needed for {rows} x {columns} pixels of {bits} bits"


def _integer(ds: pydicom.Dataset, keyword: str) -> int | None:
    """A single whole-number value of ``keyword``; None if missing, empty or garbage."""
    try:
        value = ds.get(keyword)
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    except (AttributeError, TypeError, ValueError, OverflowError, KeyError, IndexError, struct.error):
        return None


def _decimals(ds: pydicom.Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """``count`` finite numbers of a (DS) value; None if missing, empty, another count or garbage."""
    try:
        value = ds.get(keyword)
        values = [value] if isinstance(value, (str, bytes, int, float)) or value is None else list(value)
        numbers = tuple(float(v) for v in values)
    except (AttributeError, TypeError, ValueError, OverflowError, KeyError, IndexError, struct.error):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(v) for v in numbers) else None


def _reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _slice_header(ds: pydicom.Dataset, path: Path, is_ct: bool = False) -> DicomSlice:
    """The geometry of one image slice, checked: numbers where numbers belong.

    PixelSpacing (Image Plane module) and, in a CT image, RescaleSlope and RescaleIntercept
    are Type 1: missing, empty or garbage is an error, never 1 mm or slope 1."""
    spacing = _decimals(ds, "PixelSpacing", 2)
    rescale = _ct_rescale(ds, path) if is_ct else None
    try:
        if rescale is None:  # optional outside a CT image: absent means the stored values as they are
            rescale = (float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0))
        s = DicomSlice(
            path=path,
            position=np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64),
            orientation=np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64),
            pixel_spacing=spacing or (math.nan, math.nan),
            shape=(int(ds.Rows), int(ds.Columns)),
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            rescale=rescale,
        )
    except (AttributeError, TypeError, ValueError, OverflowError, KeyError, IndexError) as exc:
        raise SatsError(f"{path}: invalid or missing slice geometry ({_reason(exc)})") from None
    problem = None
    if s.position.shape != (3,) or not np.all(np.isfinite(s.position)):
        problem = "ImagePositionPatient must be 3 numbers"
    elif s.orientation.shape != (6,) or not np.all(np.isfinite(s.orientation)) or not np.allclose(
        [np.linalg.norm(s.orientation[:3]), np.linalg.norm(s.orientation[3:])], 1.0, atol=1e-3
    ) or abs(float(s.orientation[:3] @ s.orientation[3:])) > 1e-3:
        problem = "ImageOrientationPatient must be two orthogonal unit vectors (6 numbers)"
    elif len(s.pixel_spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in s.pixel_spacing):
        problem = "PixelSpacing must be 2 positive numbers"
    elif min(s.shape) < 1:
        problem = "Rows and Columns must be positive"
    elif not all(math.isfinite(v) for v in s.rescale):
        problem = "RescaleSlope and RescaleIntercept must be finite numbers"
    if problem:
        raise SatsError(f"{path}: invalid slice geometry: {problem}")
    return s


def _ct_rescale(ds: pydicom.Dataset, path: Path) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a CT image: HU = stored * slope + intercept."""
    slope, intercept = _decimals(ds, "RescaleSlope", 1), _decimals(ds, "RescaleIntercept", 1)
    if slope is None or slope[0] == 0 or intercept is None:
        raise SatsError(f"{path}: damaged CT slice (RescaleSlope and RescaleIntercept must be numbers, the slope not 0)")
    return slope[0], intercept[0]


def choose_ct_series(folder: Path, series_uid: str | None = None) -> DicomSeries:
    """The CT series to read: the one named by ``series_uid`` or the CT series with most slices."""
    series = scan_folder(folder)
    if not series:
        raise SatsError(f"{folder}: no DICOM files found")
    if series_uid is not None:
        if series_uid not in series:
            found = "; ".join(f"{s.uid} ({s.modality or '?'}, {len(s.slices)} slices)" for s in series.values())
            raise SatsError(f"{folder}: no series with SeriesInstanceUID {series_uid} (found: {found})")
        chosen = series[series_uid]
        if chosen.modality != "CT":
            raise SatsError(f"{folder}: series {series_uid} has modality {chosen.modality or '?'}, not CT")
        return chosen
    cts = [s for s in series.values() if s.modality == "CT" and s.slices]
    if not cts:
        found = ", ".join(sorted({s.modality or "?" for s in series.values()}))
        raise SatsError(f"{folder}: no CT image series (modalities found: {found})")
    return max(cts, key=lambda s: (len(s.slices), s.uid))


def sort_slices(series: DicomSeries, folder: Path) -> tuple[list[DicomSlice], Volume]:
    """Order slices along the normal and derive the geometry; raise on anything inconsistent.

    Returns the sorted slices and an empty :class:`Volume` carrying the geometry.
    """
    slices = series.slices
    name = f"{folder} (series {series.uid})"
    if len(slices) < 2:
        raise SatsError(f"{name}: a 3D CT needs at least 2 slices, found {len(slices)}")
    ref = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, ref.orientation, atol=1e-4):
            raise SatsError(f"{name}: mixed slice orientations ({s.path.name} differs from {ref.path.name})")
        if s.shape != ref.shape:
            raise SatsError(f"{name}: mixed slice sizes ({s.path.name} is {s.shape}, {ref.path.name} is {ref.shape})")
        if not np.allclose(s.pixel_spacing, ref.pixel_spacing, atol=1e-4):
            raise SatsError(f"{name}: mixed pixel spacing ({s.path.name})")
    row_dir, col_dir = ref.orientation[:3], ref.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slices = sorted(slices, key=lambda s: float(s.position @ normal))
    heights = np.array([s.position @ normal for s in slices])
    gaps = np.diff(heights)
    if np.any(gaps < 1e-3):
        k = int(np.argmin(gaps))
        raise SatsError(f"{name}: two slices at the same position ({slices[k].path.name}, {slices[k + 1].path.name})")
    # Gantry tilt: consecutive origins step off the normal.
    steps = np.diff(np.stack([s.position for s in slices]), axis=0)
    off_normal = np.linalg.norm(steps - np.outer(steps @ normal, normal), axis=1)
    if np.any(off_normal > 1e-2 * np.maximum(gaps, 1.0)):
        raise SatsError(f"{name}: gantry tilt or sheared slices are not supported (slice origins do not follow the slice normal)")
    dz = float(np.median(gaps))
    uneven = np.abs(gaps - dz) > SPACING_TOLERANCE * dz
    if np.any(uneven):
        k = int(np.argmax(uneven))
        ratio = gaps[k] / dz
        if abs(ratio - round(ratio)) < SPACING_TOLERANCE and round(ratio) >= 2:
            raise SatsError(
                f"{name}: {int(round(ratio)) - 1} missing slice(s) between z = {heights[k]:.2f} and {heights[k + 1]:.2f} mm "
                f"({slices[k].path.name}, {slices[k + 1].path.name})"
            )
        raise SatsError(f"{name}: uneven slice spacing ({gaps[k]:.3f} mm vs median {dz:.3f} mm near {slices[k].path.name})")
    # Empty placeholder array: only the geometry is returned here.
    geometry = Volume(
        np.zeros((1, 1, 1), dtype=np.uint8),
        spacing=(dz, ref.pixel_spacing[0], ref.pixel_spacing[1]),  # PixelSpacing is (row = y, column = x)
        origin=tuple(slices[0].position),
        direction=np.stack([row_dir, col_dir, normal], axis=1),
    )
    return slices, geometry


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> Volume:
    """Read a CT series folder into a :class:`Volume` in HU, slices ordered along the normal.

    Raises:
        SatsError: no CT series, mixed orientations or sizes, missing slices, uneven
            spacing, gantry tilt, or unreadable pixel data, naming the folder.
    """
    folder = Path(folder)
    series = choose_ct_series(folder, series_uid)
    slices, geometry = sort_slices(series, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in slices])
    # GDCM picks the output pixel type from the first file; a later slice with another or a
    # fractional slope/intercept would be truncated to its integers, so decode to float then.
    rescales = {s.rescale for s in slices}
    if len(rescales) > 1 or any(v != round(v) for r in rescales for v in r):
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise SatsError(f"{folder}: cannot decode the CT pixel data ({itk_reason(exc)})") from None
    array = sitk.GetArrayFromImage(image)
    if array.shape[0] != len(slices):
        raise SatsError(f"{folder}: expected {len(slices)} slices, decoded {array.shape[0]}")
    if array.shape[1:] != slices[0].shape:
        raise SatsError(f"{folder}: slices of {slices[0].shape[0]} x {slices[0].shape[1]} pixels (Rows x Columns), "
                        f"decoded {' x '.join(map(str, array.shape[1:]))}")
    # GDCM widens to int32/float when rescaling; store HU as int16 whenever that is exact.
    if array.size and np.all(np.mod(array, 1) == 0) and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    return Volume(array, spacing=geometry.spacing, origin=geometry.origin, direction=geometry.direction)


def write_ct_series(
    volume: Volume,
    folder: str | Path,
    patient_id: str = "SATS_PHANTOM",
    patient_name: str = "Phantom^SATS",
    series_description: str = "sats synthetic CT",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> list[Path]:
    """Write a CT volume (HU) as a DICOM CT Image Storage series, one file per slice.

    Used to make DICOM test series from phantoms and NIfTI files. Pixel values are stored
    unsigned with RescaleIntercept -1024 and slope 1 (HU below -1024 are clipped). The
    volume's third direction column must be the cross product of the first two (a
    right-handed slice stack), as DICOM derives the slice normal that way.

    Returns:
        The written file paths, in slice order (``IM0001.dcm`` = array index z 0).
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = volume.direction
    if not np.allclose(np.cross(d[:, 0], d[:, 1]), d[:, 2], atol=1e-6):
        raise SatsError("write_ct_series needs a right-handed direction matrix (slice normal = row x column)")
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    raw = np.clip(np.rint(volume.array.astype(np.float64)) + 1024, 0, 65535).astype(np.uint16)
    dz, dy, dx = volume.spacing
    paths = []
    for k in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "", ""
        ds.Manufacturer = "sats"
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = series_description
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in (*d[:, 0], *d[:, 1])]
        position = volume.index_to_physical(np.array([k, 0, 0]))
        ds.ImagePositionPatient = [f"{v:.10g}" for v in position]
        ds.PixelSpacing = [f"{dy:.10g}", f"{dx:.10g}"]
        ds.SliceThickness = f"{dz:.10g}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.PixelData = raw[k].tobytes()
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
