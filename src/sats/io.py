"""Image I/O: readers and atomic writers for NIfTI, NRRD, MHA and DICOM CT folders.

Every reader returns a :class:`sats.volume.Volume` (array ``(z, y, x)``, spacing
``(z, y, x)`` mm, LPS origin and direction); the axis convention is stated once, in
:mod:`sats.volume`. Every writer writes a temporary file beside the target and renames it.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sats.volume import SatsError, Volume, from_sitk, to_sitk

__all__ = ["SatsError", "Volume", "atomic_path", "from_sitk", "read_image", "to_sitk", "write_image", "write_text_atomic"]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


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

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is None:
            try:
                os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
                os.replace(self.tmp, self.path)
                return False
            except OSError as error:
                exc_type, exc = OSError, error
        self.tmp.unlink(missing_ok=True)
        # A failed write (disk full, quota, I/O error) is one line naming the file; the
        # previous file under that name, if any, is untouched.
        if issubclass(exc_type, OSError) and not isinstance(exc, PermissionError):
            raise SatsError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        return False


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
