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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from sats.volume import SatsError, Volume

#: Relative deviation of one slice gap from the median gap that counts as uneven.
SPACING_TOLERANCE = 0.05


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
    """Read the headers of every DICOM file under ``folder`` (recursively), grouped by series."""
    series: dict[str, DicomSeries] = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        modality = str(ds.get("Modality", ""))
        entry = series.setdefault(uid, DicomSeries(uid, modality, str(ds.get("SeriesDescription", "")), []))
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue  # not an image slice (RTSTRUCT, SR, ...)
        entry.slices.append(
            DicomSlice(
                path=path,
                position=np.array([float(v) for v in ds.ImagePositionPatient]),
                orientation=np.array([float(v) for v in ds.ImageOrientationPatient]),
                pixel_spacing=tuple(float(v) for v in ds.get("PixelSpacing", (1.0, 1.0))),  # type: ignore[arg-type]
                shape=(int(ds.Rows), int(ds.Columns)),
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                sop_class_uid=str(ds.get("SOPClassUID", "")),
                rescale=(float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)),
            )
        )
    return series


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
        raise SatsError(f"{folder}: cannot decode the CT pixel data ({str(exc).strip().splitlines()[-1]})") from None
    array = sitk.GetArrayFromImage(image)
    if array.shape[0] != len(slices):
        raise SatsError(f"{folder}: expected {len(slices)} slices, decoded {array.shape[0]}")
    # GDCM widens to int32/float when rescaling; store HU as int16 whenever that is exact.
    if array.size and np.all(np.mod(array, 1) == 0) and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    return Volume(array, spacing=geometry.spacing, origin=geometry.origin, direction=geometry.direction)


def series_summary(folder: str | Path) -> list[tuple[str, str, int, str]]:
    """(SeriesInstanceUID, modality, number of slices, description) for every series of a folder."""
    return [(s.uid, s.modality, len(s.slices), s.description) for s in scan_folder(Path(folder)).values()]


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
