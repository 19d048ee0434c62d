"""Image I/O: readers and atomic writers for NIfTI, NRRD, MHA and DICOM CT folders.

Every reader returns a :class:`sats.geometry.volume.Volume` (array ``(z, y, x)``, spacing
``(z, y, x)`` mm, LPS origin and direction); the axis convention is stated once, in
:mod:`sats.geometry.volume`. Every writer writes a temporary file beside the target and renames it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sats.data.headers import check_header, check_voxel_data
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

    The header is checked here before SimpleITK sees the file: SimpleITK reads many damaged
    headers without a word (a size or voxel size of 0 as 1, a damaged number partly parsed)
    and some damaged compressed data as a few wrong voxels, or never returns.

    Raises:
        SatsError: naming the file and the problem (missing, unreadable, truncated,
            damaged header field, corrupt compressed data, not 3D, ...).
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
        layout = check_header(path)
        if layout is not None:
            check_voxel_data(path, layout)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        with quiet_c_stderr():
            image = reader.Execute()
    except SatsError:
        raise
    except OSError as exc:  # the checks read the file themselves
        raise SatsError(f"{path}: cannot read ({exc.strerror or exc})") from None
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
        check_header(path)  # a damaged voxel size must not become 1 mm here either
        with quiet_c_stderr():
            reader.ReadImageInformation()
    except (RuntimeError, SatsError):
        return read_image(path).spacing  # raises a clean SatsError naming the file
    if reader.GetDimension() != 3:
        return read_image(path).spacing
    return tuple(float(v) for v in reader.GetSpacing()[::-1])  # type: ignore[return-value]


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
