"""Image I/O: one in-memory volume type and readers/writers for NIfTI, NRRD, MHA and DICOM CT.

Axis convention (the only place it is converted):

* **array space** is ``(z, y, x)``: ``Volume.array[k, j, i]``; ``Volume.spacing`` is
  ``(z, y, x)`` in mm, like the array shape.
* **physical space** is DICOM/ITK LPS in mm, written ``(x, y, z)``: ``Volume.origin``
  (centre of voxel ``[0, 0, 0]``) and every physical point in this project.
* ``Volume.direction`` is ITK's 3x3 matrix: column ``c`` is the unit LPS vector along
  image index ``c`` with ITK's index order ``(i, j, k) = (x, y, z)`` array axes.

SimpleITK speaks ``(x, y, z)`` for sizes and spacing; :func:`to_sitk` and
:func:`from_sitk` are the boundary and the rest of the package never reorders axes.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class SatsError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


@dataclass
class Volume:
    """A 3D image with its geometry.

    Attributes:
        array: voxel values, shape ``(z, y, x)``. CT in HU, labels as integers.
        spacing: voxel size in mm, ``(z, y, x)`` like the array.
        origin: LPS position in mm of the centre of voxel ``[0, 0, 0]``, ``(x, y, z)``.
        direction: 3x3 direction cosines (ITK convention, columns = index axes i, j, k,
            i.e. array axes x, y, z).

    Example:
        >>> v = Volume(np.zeros((2, 3, 4)), spacing=(3.0, 1.0, 1.0))
        >>> v.shape, v.voxel_volume_ml
        ((2, 3, 4), 0.003)
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise SatsError(f"expected a 3D volume, got an array of shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry around another array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def index_to_physical(self, zyx: np.ndarray) -> np.ndarray:
        """Map array indices ``(..., 3)`` in (z, y, x) order to LPS points ``(..., 3)`` (x, y, z) mm."""
        ijk = np.asarray(zyx, dtype=np.float64)[..., ::-1]
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing[::-1])) @ self.direction.T

    def physical_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`index_to_physical`: LPS points (x, y, z) to continuous (z, y, x) indices."""
        d = np.asarray(xyz, dtype=np.float64) - np.asarray(self.origin)
        ijk = (d @ self.direction) / np.asarray(self.spacing[::-1])
        return ijk[..., ::-1]

    def same_geometry(self, other: "Volume", tol_mm: float = 1e-3) -> str | None:
        """None when both volumes share grid and geometry, else a short description of the difference."""
        if self.shape != other.shape:
            return f"size {self.shape[::-1]} vs {other.shape[::-1]} (x, y, z)"
        if not np.allclose(self.spacing, other.spacing, atol=tol_mm, rtol=0):
            return f"spacing {_fmt(self.spacing[::-1])} vs {_fmt(other.spacing[::-1])} mm (x, y, z)"
        if not np.allclose(self.origin, other.origin, atol=tol_mm, rtol=0):
            return f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} mm"
        if not np.allclose(self.direction, other.direction, atol=1e-5, rtol=0):
            return "direction cosines differ"
        return None


def _fmt(t) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in t) + ")"


def to_sitk(volume: Volume) -> sitk.Image:
    """Volume -> SimpleITK image, geometry kept exactly."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(d) for d in volume.direction.ravel()))
    return image


def from_sitk(image: sitk.Image) -> Volume:
    """SimpleITK image -> Volume, geometry kept exactly."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SatsError(
            f"expected a 3D single-channel image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    return Volume(
        sitk.GetArrayFromImage(image),
        spacing=image.GetSpacing()[::-1],
        origin=image.GetOrigin(),
        direction=np.array(image.GetDirection()).reshape(3, 3),
    )


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def strip_suffix(name: str) -> str:
    """File name without its image suffix (``case_0000.nii.gz`` -> ``case_0000``)."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_image(path: str | os.PathLike) -> Volume:
    """Read a 3D image file (NIfTI, NRRD, MHA/MHD) or a DICOM CT series folder.

    Raises:
        SatsError: naming the file and the problem (missing, unreadable, truncated,
            not 3D, ...).
    """
    path = Path(path)
    if not path.exists():
        raise SatsError(f"{path}: no such file or folder")
    if path.is_dir():
        from sats.dicom import read_dicom_series

        return read_dicom_series(path)
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise SatsError(f"{path}: not a supported image (expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        if path.name.lower().endswith(".gz"):
            _check_gzip_complete(path, reader)
        image = reader.Execute()
    except SatsError:
        raise
    except RuntimeError as exc:
        raise SatsError(f"{path}: unreadable image ({_first_line(exc)})") from None
    try:
        return from_sitk(image)
    except SatsError as exc:
        raise SatsError(f"{path}: {exc}") from None


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file/line banner; the last line holds the reason.
    return lines[-1] if lines else type(exc).__name__


def _check_gzip_complete(path: Path, reader: sitk.ImageFileReader) -> None:
    """SimpleITK zero-fills a truncated .nii.gz silently; decompress it fully to catch that."""
    n_bytes = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                n_bytes += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise SatsError(f"{path}: truncated or corrupt gzip data ({exc})") from None
    # A NIfTI-1 header is at least 348 bytes, followed by the voxel data.
    needed = 348 + int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents() * _PIXEL_BYTES.get(reader.GetPixelID(), 1)
    if n_bytes < needed:
        raise SatsError(f"{path}: truncated: {n_bytes} bytes after decompression, the header needs at least {needed}")


_PIXEL_BYTES = {
    sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
    sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkFloat32: 4,
    sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat64: 8,
}


def write_image(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``volume`` atomically: a temporary file in the same folder, then a rename.

    The suffix of ``path`` chooses the format (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``).
    """
    path = Path(path)
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise SatsError(f"{path}: unsupported output format")
    array = volume.array
    if array.dtype == bool:
        volume = volume.with_array(array.astype(np.uint8))
    image = to_sitk(volume)
    suffix = next(s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s))
    with atomic_path(path, suffix=suffix) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise SatsError(f"{path}: cannot write ({_first_line(exc)})") from None
    return path


_UMASK = os.umask(0)
os.umask(_UMASK)


class atomic_path:
    """Context manager giving a temporary path beside ``path``; renamed onto it on success.

    Example:
        >>> with atomic_path(Path("out.csv")) as tmp:  # doctest: +SKIP
        ...     tmp.write_text("a,b\\n")
    """

    def __init__(self, path: str | os.PathLike, suffix: str = "") -> None:
        self.path = Path(path)
        self.suffix = suffix or "".join(self.path.suffixes)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        folder = self.path.parent
        if not folder.exists():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SatsError(f"{folder}: cannot create output folder ({exc.strerror})") from None
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=f".tmp{self.suffix}", dir=folder)
        except OSError as exc:
            raise SatsError(f"{folder}: output folder is not writable ({exc.strerror})") from None
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is None:
            os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
