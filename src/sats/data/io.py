"""Image I/O: readers and atomic writers for NIfTI, NRRD, MHA and DICOM CT folders.

Every reader returns a :class:`sats.geometry.volume.Volume` (array ``(z, y, x)``, spacing
``(z, y, x)`` mm, LPS origin and direction); the axis convention is stated once, in
:mod:`sats.geometry.volume`. Every writer writes a temporary file beside the target and renames it.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sats.geometry.volume import SatsError, Volume, from_sitk, itk_reason, to_sitk

__all__ = ["SatsError", "Volume", "atomic_path", "collect_inputs", "from_sitk", "read_image", "to_sitk", "write_image", "write_text_atomic"]

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


def case_id(path: str | os.PathLike) -> str:
    """Case id of an image file or DICOM folder: the image suffix and a trailing nnU-Net
    channel ``_0000`` removed (``npc_001_0000.nii.gz`` -> ``npc_001``)."""
    path = Path(path)
    stem = path.name if path.is_dir() else strip_suffix(path.name)
    return stem[: -len("_0000")] if stem.endswith("_0000") else stem


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
        from sats.data.dicom import read_dicom_series

        return read_dicom_series(path)
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise SatsError(f"{path}: not a supported image (expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)")
    try:
        if path.name.lower().endswith((".mha", ".mhd")):
            _check_metaimage_ndims(path)
        elif path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_geometry(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        with quiet_c_stderr():
            reader.ReadImageInformation()
        if path.name.lower().endswith(".gz"):
            _check_gzip_complete(path, reader)
        else:
            _check_data_size(path, reader)
        with quiet_c_stderr():
            image = reader.Execute()
    except SatsError:
        raise
    except (RuntimeError, OverflowError, ValueError, MemoryError) as exc:
        raise SatsError(f"{path}: unreadable image ({itk_reason(exc)})") from None
    try:
        return from_sitk(image)
    except SatsError as exc:
        raise SatsError(f"{path}: {exc}") from None


def read_spacing(path: str | os.PathLike) -> tuple[float, float, float]:
    """Voxel spacing (z, y, x) mm of an image file from its header alone (a DICOM folder is read)."""
    path = Path(path)
    if path.is_dir() or not path.name.lower().endswith(IMAGE_SUFFIXES):
        return read_image(path).spacing
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return read_image(path).spacing  # raises a clean SatsError naming the file
    if reader.GetDimension() != 3:
        return read_image(path).spacing
    return tuple(float(v) for v in reader.GetSpacing()[::-1])  # type: ignore[return-value]


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
    needed = _voxel_offset(reader, 348) + _data_bytes(reader)
    if n_bytes < needed:
        raise SatsError(f"{path}: truncated: {n_bytes} bytes after decompression, the header needs at least {needed}")


def _data_bytes(reader: sitk.ImageFileReader) -> int:
    """Bytes of voxel data the header announces (Python ints: no overflow for absurd sizes)."""
    return math.prod(int(n) for n in reader.GetSize()) * reader.GetNumberOfComponents() * _PIXEL_BYTES.get(reader.GetPixelID(), 1)


def _voxel_offset(reader: sitk.ImageFileReader, default: int) -> int:
    try:
        return max(int(float(reader.GetMetaData("vox_offset"))), default)
    except (RuntimeError, ValueError, OverflowError):
        return default


#: deflate (gzip, zlib) never expands data more than 1032-fold.
_MAX_DEFLATE_RATIO = 1032


def _check_data_size(path: Path, reader: sitk.ImageFileReader) -> None:
    """Refuse a file too short for the voxels its header announces.

    SimpleITK zero-fills a short uncompressed NIfTI without a word, and a damaged size field
    would make it allocate whatever the header says. Raw data must fit in the file, deflated
    data within deflate's largest ratio. Detached data (.mhd, .nhdr, a data file named in the
    header) and other encodings are left to SimpleITK.
    """
    name = path.name.lower()
    size = path.stat().st_size
    needed = _data_bytes(reader)
    if name.endswith(".nii"):
        available, compressed = size - _voxel_offset(reader, 348), False
    elif name.endswith((".mha", ".nrrd")):
        encoding = _text_header_encoding(path, metaimage=name.endswith(".mha"))
        if encoding is None:
            return
        available, compressed = size, encoding == "deflate"
    else:
        return
    if needed > (_MAX_DEFLATE_RATIO * available + 1024 if compressed else available):
        raise SatsError(f"{path}: truncated or damaged: the header announces {needed} bytes of voxel data, "
                        f"the file holds {max(available, 0)}")


def _text_header(path: Path, metaimage: bool) -> dict[str, str]:
    """The ``key = value`` (MetaImage) or ``key: value`` (NRRD) fields of a text header,
    keys and values lower-cased."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    fields: dict[str, str] = {}
    for line in head.split(b"\n"):
        if not line.strip():
            if not metaimage:
                break  # a NRRD header ends at the first blank line
            continue
        key, sep, value = line.decode("latin-1").partition("=" if metaimage else ":")
        key = key.strip().lower()
        if sep:
            fields[key] = value.strip().lower()
        if metaimage and key == "elementdatafile":
            break  # the data follow
    return fields


def _text_header_encoding(path: Path, metaimage: bool) -> str | None:
    """"raw" or "deflate" for a single-file MHA/NRRD with its data inline, else None (unknown)."""
    fields = _text_header(path, metaimage)
    if metaimage:
        if fields.get("elementdatafile") != "local":
            return None
        return "deflate" if fields.get("compresseddata") == "true" else "raw"
    if "data file" in fields or "datafile" in fields:
        return None
    return {"raw": "raw", "gzip": "deflate", "gz": "deflate"}.get(fields.get("encoding", ""))


_stderr_lock = threading.Lock()
_stderr_users = 0
_stderr_saved: int | None = None


@contextlib.contextmanager
def quiet_c_stderr() -> Iterator[None]:
    """Keep what C libraries print straight to file descriptor 2 (niftilib's ``** ERROR: ...``,
    VNL's SVD warnings on a damaged header) off the user's terminal while reading: the reason
    is in the exception ITK raises, and a damaged file must give one error line. Safe across
    threads (the first reader in silences, the last one out restores)."""
    global _stderr_users, _stderr_saved
    with _stderr_lock:
        if _stderr_users == 0:
            try:
                sys.stderr.flush()
                saved = os.dup(2)
            except (OSError, ValueError, AttributeError):
                saved = None
            if saved is not None:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 2)
                os.close(devnull)
            _stderr_saved = saved
        _stderr_users += 1
    try:
        yield
    finally:
        with _stderr_lock:
            _stderr_users -= 1
            if _stderr_users == 0 and _stderr_saved is not None:
                os.dup2(_stderr_saved, 2)
                os.close(_stderr_saved)
                _stderr_saved = None


def _check_nifti_geometry(path: Path) -> None:
    """ITK's NIfTI reader never returns (an endless loop) on an infinite sform entry: refuse
    non-finite numbers in the geometry fields in use before it sees them."""
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as fh:
            header = fh.read(348)
    except (EOFError, OSError, zlib.error):
        return  # not readable as gzip: the reader says so
    if len(header) < 348:
        return
    for order in "<>":
        if struct.unpack(order + "i", header[:4])[0] == 348:
            break
    else:
        return  # not NIfTI-1: left to SimpleITK
    pixdim = struct.unpack(order + "8f", header[76:108])
    qform, sform = struct.unpack(order + "2h", header[252:256])
    quatern = struct.unpack(order + "6f", header[256:280])
    srow = struct.unpack(order + "12f", header[280:328])
    used = [("pixdim", pixdim[:4])] + [("quatern/qoffset", quatern)] * (qform > 0) + [("srow", srow)] * (sform > 0)
    for name, values in used:
        if not all(math.isfinite(v) for v in values):
            raise SatsError(f"{path}: damaged NIfTI header (non-finite {name})")


def _check_metaimage_ndims(path: Path) -> None:
    """ITK's MetaImage reader crashes the process (segmentation fault) on a negative or huge
    ``NDims``: check it first."""
    ndims = _text_header(path, metaimage=True).get("ndims")
    if ndims is not None and not (ndims.isdigit() and 1 <= int(ndims) <= 16):
        raise SatsError(f"{path}: unreadable image (invalid NDims = {ndims[:20]!r})")


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
            raise SatsError(f"{path}: cannot write ({itk_reason(exc)})") from None
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


def _has_dicom(folder: Path) -> bool:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM" or f.suffix.lower() == ".dcm":
                return True
    return False


def collect_inputs(path: Path) -> tuple[list[tuple[str, Path]], bool]:
    """``([(case_id, path), ...], single)`` for an image file, a DICOM series folder, or a
    folder of image files and/or DICOM series sub-folders."""
    path = Path(path)
    if not path.exists():
        raise SatsError(f"{path}: no such file or folder")
    if path.is_file():
        return [(case_id(path), path)], True
    if _has_dicom(path):
        return [(case_id(path), path)], True
    items = [(case_id(f), f) for f in sorted(path.iterdir()) if is_image_file(f) and not f.name.startswith(".")]
    items += [(case_id(d), d) for d in sorted(path.iterdir()) if d.is_dir() and _has_dicom(d)]
    if not items:
        raise SatsError(f"{path}: no images (.nii.gz, .nii, .nrrd, .mha) or DICOM series found")
    ids = [c for c, _ in items]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise SatsError(f"{path}: several inputs share the case id {dupes[0]}")
    return items, False
