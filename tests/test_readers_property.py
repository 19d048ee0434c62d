"""Every reader fed damaged files (hypothesis): a correct read or one SatsError line naming the file.

Readers: ``read_image`` (NIfTI .nii.gz and .nii, NRRD, MHA), ``read_dicom_series``,
``read_rtstruct_roi``, ``evaluate_folders`` and ``load_dataset_json``. Damage: the file cut at
any byte, header fields overwritten (NIfTI binary fields, NRRD/MHA header lines) or removed,
random bytes overwritten, DICOM tags removed or set to garbage. Two outcomes are allowed:

* a :class:`SatsError` whose message is one line naming the file, or
* a correct read. Every aspect of it (voxel values and shape; spacing, origin and direction,
  compared as the index-to-LPS map) must be the undamaged file's, or, where the damage left a
  *well-formed* different value in a field that sets that aspect, exactly what that value says
  by the format (e.g. a NIfTI pixdim of 0.5 gives 0.5 mm; a changed byte in the voxel data of an
  uncompressed file gives the damaged voxel). A removed or malformed mandatory field gives
  nothing: a reader that fills in a default (1 mm for a missing PixelSpacing or a pixdim of 0, a
  zero origin for a damaged NIfTI magic), reads a number off a garbled value or takes voxels
  from the wrong place fails. Fields the format makes optional may be absent with the
  format's stated value (MetaImage: Offset 0, ElementSpacing 1, TransformMatrix identity;
  NRRD: no space origin = 0, no space directions = 1 mm along the axes).

What a damaged header "says" is worked out here, independently of the readers, by the small
``*_readings`` models below (NIfTI-1, NRRD, MetaImage, and the damaged DICOM tag); each is checked
to reproduce the read of the undamaged file, so they cannot silently accept anything.

The examples are derandomised, so CI runs the same ones every time. To search further, run with
``SATS_FUZZ_EXAMPLES=500`` (random examples, that many per test). Each property runs as an
inner function so that the test can count what its examples did: most must get past the
damage (``assume``) to the read and the checks, which is asserted.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import shutil
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st
from test_io import rotation

from sats.data.dataset import load_dataset_json
from sats.data.dicom import read_dicom_series, write_ct_series
from sats.data.io import IMAGE_SUFFIXES, read_image, write_image
from sats.evaluation.metrics import compute_metrics, evaluate_folders
from sats.geometry.volume import SatsError, Volume
from sats.predict.export import read_rtstruct_roi, write_rtstruct

FUZZ = int(os.environ.get("SATS_FUZZ_EXAMPLES", "0"))
#: Share of a property's examples that must reach the read and its checks (not filtered out).
MIN_SHARE_CHECKED = 0.8


def fuzz(n: int):
    """Hypothesis settings: ``n`` fixed examples, or SATS_FUZZ_EXAMPLES random ones. No health
    check is suppressed: the properties are inner functions (no function-scoped fixture)."""
    return settings(max_examples=FUZZ or n, deadline=None, database=None, derandomize=not FUZZ)


class Tally(Counter):
    """What a property's examples did: "read", "refused" or "filtered" (damage not applicable)."""

    def add(self, outcome: str) -> None:
        self[outcome] += 1
        event(outcome)  # shown by pytest --hypothesis-show-statistics

    def check(self) -> None:
        total = sum(self.values())
        assert total and self["filtered"] <= (1 - MIN_SHARE_CHECKED) * total, f"too few examples checked: {dict(self)}"


def check_error(exc: SatsError, *names: str) -> None:
    """A user-facing error: one line, naming (one of) the file(s)."""
    message = str(exc)
    assert "\n" not in message.strip(), f"more than one line: {message!r}"
    assert any(n in message for n in names), f"{message!r} names none of {names}"


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    # Invalid values read back make pydicom warn; the warnings are not what is tested here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- what a read may be ----------------------------------------------------------------------------


def geometry(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """(origin, A): LPS of voxel 0 and the 3x3 map from index (i, j, k) steps to LPS mm
    (direction times spacing). A negative spacing with a flipped axis is the same map."""
    return np.asarray(volume.origin, float), volume.direction @ np.diag(np.asarray(volume.spacing[::-1], float))


@dataclasses.dataclass
class Reading:
    """One way to read a file: any of ``arrays`` together with any of ``geometries``."""

    arrays: list[np.ndarray]
    geometries: list[tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class Said:
    """What a damaged file says by its format, aspect by aspect (empty: nothing well-formed)."""

    arrays: list[np.ndarray] = dataclasses.field(default_factory=list)
    geometries: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)


def original_and(baseline: Volume, arrays=(), geometries=()) -> list[Reading]:
    """The undamaged read, each aspect of it possibly replaced by what the damaged header says."""
    return [Reading([baseline.array, *arrays], [geometry(baseline), *geometries])]


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "iub" and b.dtype.kind in "iub":
        return bool(np.array_equal(a, b))
    return bool(np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-6, atol=0, equal_nan=True))


def same_geometry(g: tuple[np.ndarray, np.ndarray], h: tuple[np.ndarray, np.ndarray]) -> bool:
    # Header numbers are float32 in NIfTI: relative 1e-5, and tiny absolute slack for zeros.
    return bool(np.allclose(g[0], h[0], rtol=1e-5, atol=1e-4) and np.allclose(g[1], h[1], rtol=1e-5, atol=1e-5))


def assert_read_as(volume: Volume, readings: list[Reading], what: str) -> None:
    """``volume`` is one of ``readings``: voxel values and geometry both."""
    g = geometry(volume)
    for r in readings:
        if any(same_values(volume.array, a) for a in r.arrays) and any(same_geometry(g, h) for h in r.geometries):
            return
    values_ok = any(same_values(volume.array, a) for r in readings for a in r.arrays)
    raise AssertionError(
        f"{what} was read, but not as the original nor as its damaged header says: "
        f"{'geometry' if values_ok else 'voxel values'} wrong (shape {volume.shape}, spacing {volume.spacing}, "
        f"origin {volume.origin}, direction {np.round(volume.direction, 4).tolist()}, "
        f"first values {volume.array.ravel()[:4].tolist()})"
    )


# --- image files -------------------------------------------------------------------------------

SHAPE = (4, 5, 6)
ORIGINAL = Volume(
    np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) * 7 - 300,
    spacing=(2.5, 0.9, 0.8), origin=(-12.5, 33.25, -401.0), direction=rotation(17, -8),
)
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


class Files(dict):
    """File contents by name; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"<{', '.join(self)}>"


@pytest.fixture(scope="module")
def image_bytes(tmp_path_factory) -> Files:
    folder = tmp_path_factory.mktemp("images")
    return Files({s: write_image(ORIGINAL, folder / f"ct{s}").read_bytes() for s in SUFFIXES})


@pytest.fixture(scope="module")
def baselines(image_bytes, tmp_path_factory) -> Files:
    """The read of each undamaged file: what a damaged one is compared with."""
    folder = tmp_path_factory.mktemp("baseline")
    out = Files()
    for suffix, raw in image_bytes.items():
        (folder / f"ct{suffix}").write_bytes(raw)
        out[suffix] = read_image(folder / f"ct{suffix}")
    return out


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def numbers(text: str | None, n: int, integer: bool = False) -> list[float] | None:
    """Exactly ``n`` finite numbers separated by white space (``integer``: whole numbers), else None."""
    if text is None:
        return None
    parts = text.split()
    pattern = re.compile(r"[+-]?\d+") if integer else _NUMBER
    if len(parts) != n or not all(pattern.fullmatch(p) for p in parts):
        return None
    values = [int(p) if integer else float(p) for p in parts]
    return values if all(math.isfinite(v) for v in values) else None


def voxels(data: bytes, dtype: str, sizes_xyz, offset: int = 0) -> np.ndarray | None:
    """The (z, y, x) array of ``sizes_xyz`` voxels of ``dtype`` at ``offset``; None if the data are short."""
    n = math.prod(sizes_xyz)
    if len(data) < offset + n * np.dtype(dtype).itemsize:
        return None
    return np.frombuffer(data, dtype, count=n, offset=offset).reshape(tuple(sizes_xyz)[::-1])


# NIfTI-1 (single file, little-endian as written here) by the standard.
NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8", 1280: "u8"}
NIFTI_SPATIAL_UNITS = {1: 1000.0, 2: 1.0, 3: 0.001}  # xyzt_units & 7: metre, mm, micron (0: unknown, as mm)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def nifti_quaternion(b: float, c: float, d: float, qfac: float) -> np.ndarray:
    """The qform rotation (NIfTI-1 standard, nifti1.h), third column times qfac."""
    s = b * b + c * c + d * d
    if 1.0 - s < 1e-7:  # a is 0: (b, c, d) normalised
        n = math.sqrt(s)
        a, b, c, d = 0.0, b / n, c / n, d / n
    else:
        a = math.sqrt(1.0 - s)
    r = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                  [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                  [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    r[:, 2] *= qfac
    return r


def nifti_readings(content: bytes) -> Said:
    """What a .nii file says (nothing for a header that is not NIfTI-1, voxels not in the file).

    Values: ``dim`` (dim[0] dims, each >= 1, those past the third 1), ``datatype``, ``vox_offset``
    (finite, >= 352) and ``scl_slope``/``scl_inter`` (applied when the slope is finite and not 0).
    Spacing: pixdim[1..3] (positive) or the norms of the sform columns. Origin and direction: the
    sform (sform_code > 0; its columns normalised, or orthogonalised) or the qform (qform_code > 0).
    Both scaled by the spatial unit of xyzt_units. Both codes 0 (the standard's "method 1", kept
    for Analyze: voxels in no patient space) give no geometry: such a file must be refused, not
    placed at origin 0 with identity axes.
    """
    if len(content) < 352 or struct.unpack_from("<i", content)[0] != 348 or content[344:348] != b"n+1\0":
        return Said()

    def get(offset: int, fmt: str) -> tuple:
        return struct.unpack_from("<" + fmt, content, offset)

    dim, (datatype,), (vox_offset,), (slope, inter) = get(40, "8h"), get(70, "h"), get(108, "f"), get(112, "2f")
    arrays = []
    if (1 <= dim[0] <= 7 and all(v >= 1 for v in dim[1:dim[0] + 1]) and all(v == 1 for v in dim[4:dim[0] + 1])
            and datatype in NIFTI_DTYPES and math.isfinite(vox_offset) and vox_offset >= 352):
        sizes = [dim[i] if i <= dim[0] else 1 for i in (1, 2, 3)]
        array = voxels(content, "<" + NIFTI_DTYPES[datatype], sizes, int(vox_offset))
        if array is not None and math.isfinite(slope) and slope != 0:
            array = array * np.float64(slope) + np.float64(inter) if math.isfinite(inter) else None
        elif not math.isfinite(slope):
            array = None  # a NaN or infinite scale factor says nothing
        if array is not None:
            arrays.append(array)

    pixdim = get(76, "8f")
    unit = NIFTI_SPATIAL_UNITS.get(content[123] & 7, 1.0)
    (qform_code, sform_code) = get(252, "2h")
    spacings, frames = [], []
    if all(math.isfinite(p) and p > 0 for p in pixdim[1:4]):
        spacings.append(np.array(pixdim[1:4]) * unit)
    srow = np.array(get(280, "12f"), dtype=np.float64).reshape(3, 4)
    if sform_code > 0 and np.all(np.isfinite(srow)):
        m = RAS_TO_LPS @ srow[:, :3]
        norms = np.linalg.norm(m, axis=0)
        if np.all(norms > 0) and abs(np.linalg.det(m)) > 0:
            spacings.append(norms * unit)
            u, _, vt = np.linalg.svd(m / norms)
            frames += [(RAS_TO_LPS @ srow[:, 3] * unit, m / norms), (RAS_TO_LPS @ srow[:, 3] * unit, u @ vt)]
    quatern = get(256, "6f")
    if qform_code > 0 and all(math.isfinite(q) for q in quatern) and math.isfinite(pixdim[0]):
        r = nifti_quaternion(*quatern[:3], -1.0 if pixdim[0] < 0 else 1.0)
        frames.append((RAS_TO_LPS @ np.array(quatern[3:]) * unit, RAS_TO_LPS @ r))
    return Said(arrays, [(origin, direction @ np.diag(s)) for s in spacings for origin, direction in frames])


NRRD_TYPES = {
    **dict.fromkeys(["signed char", "int8", "int8_t"], "i1"),
    **dict.fromkeys(["uchar", "unsigned char", "uint8", "uint8_t"], "u1"),
    **dict.fromkeys(["short", "short int", "signed short", "signed short int", "int16", "int16_t"], "i2"),
    **dict.fromkeys(["ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"], "u2"),
    **dict.fromkeys(["int", "signed int", "int32", "int32_t"], "i4"),
    **dict.fromkeys(["uint", "unsigned int", "uint32", "uint32_t"], "u4"),
    **dict.fromkeys(["longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t"], "i8"),
    **dict.fromkeys(["ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"], "u8"),
    "float": "f4", "double": "f8",
}


def nrrd_vectors(text: str | None, n: int) -> list[list[float]] | None:
    """``n`` vectors "(a,b,c)" of 3 finite numbers, else None."""
    if text is None:
        return None
    groups = re.fullmatch(r"\s*" + r"\s+".join([r"\(([^()]*)\)"] * n) + r"\s*", text)
    if not groups:
        return None
    vectors = [numbers(g.replace(",", " ") if g.count(",") == 2 else "", 3) for g in groups.groups()]
    return vectors if all(v is not None for v in vectors) else None


def nrrd_readings(content: bytes) -> Said:
    """What a single-file NRRD says: type, dimension 3, sizes, endian, encoding raw or gzip
    (a complete stream); geometry in LPS space from ``space directions`` (absent: 1 mm along
    the axes) and ``space origin`` (absent: 0)."""
    end = content.find(b"\n\n")
    if not content.startswith(b"NRRD000") or end < 0:
        return Said()
    fields = {}
    for line in content[:end].decode("latin-1").split("\n")[1:]:
        if line.startswith("#") or ":=" in line:
            continue  # comments and key/value pairs
        key, sep, value = line.partition(": ")
        if not sep:
            return Said()  # not a field: a malformed header
        fields[key] = value.strip()
    arrays = []
    dtype, sizes = NRRD_TYPES.get(fields.get("type", "")), numbers(fields.get("sizes"), 3, integer=True)
    endian = {"little": "<", "big": ">"}.get(fields.get("endian", ""))
    if dtype and fields.get("dimension") == "3" and sizes and min(sizes) >= 1 and (endian or dtype[1] == "1"):
        payload, data = content[end + 2:], None
        if fields.get("encoding") == "raw":
            data = payload
        elif fields.get("encoding") in ("gzip", "gz"):
            try:
                data = gzip.decompress(payload)
            except (OSError, EOFError, zlib.error):
                pass
        if data is not None and (array := voxels(data, (endian or "|") + dtype, sizes)) is not None:
            arrays.append(array)
    geometries = []
    if "space" not in fields and "space directions" not in fields and "space origin" not in fields:
        geometries.append((np.zeros(3), np.eye(3)))
    elif fields.get("space") in ("left-posterior-superior", "LPS"):
        directions = nrrd_vectors(fields["space directions"], 3) if "space directions" in fields else np.eye(3)
        origin = nrrd_vectors(fields["space origin"], 1) if "space origin" in fields else [[0.0, 0.0, 0.0]]
        if directions is not None and origin is not None and abs(np.linalg.det(np.array(directions))) > 0:
            geometries.append((np.array(origin[0]), np.array(directions, dtype=np.float64).T))
    return Said(arrays, geometries)


MET_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4", "MET_UINT": "u4",
             "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def mha_readings(content: bytes) -> Said:
    """What a single-file MetaImage says: ObjectType Image, NDims 3, DimSize, ElementType,
    binary data, byte order (absent: little-endian), CompressedData (absent: raw; compressed:
    one complete zlib stream, CompressedDataSize bytes when given); geometry from TransformMatrix
    (columns; absent: identity), Offset (absent: 0) and ElementSpacing (absent: 1 mm)."""
    fields, pos = {}, 0
    while "ElementDataFile" not in fields:
        nl = content.find(b"\n", pos)
        if nl < 0:
            return Said()
        key, sep, value = content[pos:nl].decode("latin-1").partition("=")
        pos = nl + 1
        if not sep:
            return Said()  # not "key = value": a malformed header
        fields[key.strip()] = value.strip()
    payload = content[pos:]

    def boolean(key: str, default: str) -> bool | None:
        return {"true": True, "false": False}.get(fields.get(key, default).lower())

    arrays = []
    sizes, dtype = numbers(fields.get("DimSize"), 3, integer=True), MET_TYPES.get(fields.get("ElementType", ""))
    msb, compressed = boolean("BinaryDataByteOrderMSB", "False"), boolean("CompressedData", "False")
    if (fields.get("ObjectType") == "Image" and fields.get("NDims") == "3" and sizes and min(sizes) >= 1 and dtype
            and boolean("BinaryData", "False") and msb is not None and compressed is not None
            and fields.get("ElementNumberOfChannels", "1") == "1" and fields["ElementDataFile"] == "LOCAL"):
        data = payload if not compressed else None
        if compressed:
            size = numbers(fields["CompressedDataSize"], 1, integer=True) if "CompressedDataSize" in fields else [len(payload)]
            stream = zlib.decompressobj()
            try:
                if size is not None and size[0] >= 0:
                    out = stream.decompress(payload[:size[0]])
                    data = out if stream.eof else None
            except zlib.error:
                pass
        if data is not None and (array := voxels(data, (">" if msb else "<") + dtype, sizes)) is not None:
            arrays.append(array)
    geometries = []
    matrix = numbers(fields["TransformMatrix"], 9) if "TransformMatrix" in fields else np.eye(3).ravel()
    offset = numbers(fields["Offset"], 3) if "Offset" in fields else [0.0, 0.0, 0.0]
    spacing = numbers(fields["ElementSpacing"], 3) if "ElementSpacing" in fields else [1.0, 1.0, 1.0]
    if matrix is not None and offset is not None and spacing is not None and all(s != 0 for s in spacing):
        geometries.append((np.array(offset), np.array(matrix, dtype=np.float64).reshape(3, 3).T @ np.diag(spacing)))
    return Said(arrays, geometries)


def image_readings(suffix: str, content: bytes) -> Said:
    """What the (damaged) file says, by its format."""
    if suffix == ".nii.gz":
        try:
            content = gzip.decompress(content)
        except (OSError, EOFError, zlib.error):
            return Said()
    return {".nii.gz": nifti_readings, ".nii": nifti_readings, ".nrrd": nrrd_readings, ".mha": mha_readings}[suffix](content)


def check_image_read(path: Path, suffix: str, baseline: Volume, tally: Tally | None = None) -> Volume | None:
    """Read a damaged image: a SatsError naming it, or the original or what its header says."""
    try:
        volume = read_image(path)
    except SatsError as exc:
        check_error(exc, str(path))
        if tally is not None:
            tally.add("refused")
        return None
    said = image_readings(suffix, path.read_bytes())
    assert_read_as(volume, original_and(baseline, said.arrays, said.geometries), str(path))
    if tally is not None:
        tally.add("read")
    return volume


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_undamaged_images_and_their_models(tmp_path, image_bytes, baselines, suffix) -> None:
    """The undamaged files read as written, and the format models say exactly that (so a model
    cannot accept a wrong read): one reading, the baseline's values and geometry."""
    baseline = baselines[suffix]
    np.testing.assert_array_equal(baseline.array, ORIGINAL.array)
    assert baseline.same_geometry(ORIGINAL, tol_mm=1e-5) is None
    said = image_readings(suffix, image_bytes[suffix])
    assert len(said.arrays) == 1 and same_values(said.arrays[0], baseline.array)
    assert said.geometries and all(same_geometry(g, geometry(baseline)) for g in said.geometries)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_image_is_an_error_or_read_in_full(tmp_path, image_bytes, baselines, suffix) -> None:
    raw, tally = image_bytes[suffix], Tally()

    @fuzz(40)
    @given(cut=st.integers(0, len(raw) - 1))
    def run(cut: int) -> None:
        path = tmp_path / f"cut{suffix}"
        path.write_bytes(raw[:cut])
        check_image_read(path, suffix, baselines[suffix], tally)

    run()
    tally.check()


# NIfTI-1 header fields: (offset, struct format).
NIFTI_FIELDS = {
    "sizeof_hdr": (0, "<i"), "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern": (256, "<6f"), "srow": (280, "<12f"),
    "magic": (344, "4s"),
}
INTERESTING_INTS = st.sampled_from([0, 1, -1, 2, 3, 4, 7, 8, 16, 64, 255, 256, 1000, 32767, -32768])
INTERESTING_FLOATS = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"), 352.0, 0.5])


@st.composite
def nifti_field_damage(draw) -> tuple[str, int, bytes]:
    """(field, offset, new bytes): one element of a header field set to a random or extreme value."""
    name = draw(st.sampled_from(sorted(NIFTI_FIELDS)))
    offset, fmt = NIFTI_FIELDS[name]
    count = struct.calcsize(fmt)
    code = fmt[-1]
    size = 4 if code in "if" else 2 if code == "h" else count
    n = count // size
    element = draw(st.integers(0, n - 1)) if code != "s" else 0
    if code == "s" or draw(st.booleans()):
        value = draw(st.binary(min_size=size, max_size=size))
    elif code == "f":
        value = struct.pack("<f", draw(INTERESTING_FLOATS))
    else:
        value = struct.pack("<" + code, draw(INTERESTING_INTS))
    return name, offset + element * size, value


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_header_fields_overwritten(tmp_path, image_bytes, baselines, suffix) -> None:
    tally = Tally()
    plain = gzip.decompress(image_bytes[suffix]) if suffix == ".nii.gz" else image_bytes[suffix]

    @fuzz(60)
    @given(damage=nifti_field_damage())
    # The review's case: a pixdim that says nothing (0, NaN) must not become 1 mm.
    @example(damage=("pixdim", 76 + 4, struct.pack("<f", float("nan"))))
    @example(damage=("pixdim", 76 + 12, struct.pack("<f", 0.0)))
    def run(damage: tuple[str, int, bytes]) -> None:
        _name, offset, value = damage
        raw = bytearray(plain)
        raw[offset:offset + len(value)] = value
        path = tmp_path / f"hdr{suffix}"
        path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
        check_image_read(path, suffix, baselines[suffix], tally)

    run()
    tally.check()


GARBAGE_VALUES = st.one_of(
    st.sampled_from(["", "0", "-1", "1e300", "nan", "inf", "99999 99999 99999", "1 2", "1 2 3 4 5 6 7 8 9 10",
                     "2147483647 2147483647 2147483647", "0 0 0", "-4 5 6", "abc", "MET_UNKNOWN", "True", "False",
                     "(1,0,0) (0,1,0)", "(nan,0,0) (0,1,0) (0,0,1)", "none", "bzip2", "raw", "txt", "big",
                     "/dev/zero", "../../../etc/passwd", "LIST", "\x00\x01", "π"]),
    st.text(max_size=24).filter(lambda s: "\n" not in s and "\r" not in s),
)


@st.composite
def header_line_damage(draw, raw: bytes, separator: bytes) -> bytes:
    """The file with one header line removed, or its value replaced by garbage."""
    end = raw.index(b"\n\n") + 1 if separator == b":" else raw.index(b"ElementDataFile")
    lines = raw[:end].split(b"\n")
    k = draw(st.integers(0, len(lines) - 1))
    if draw(st.booleans()) or separator not in lines[k]:
        new = lines[:k] + lines[k + 1:]
    else:
        key = lines[k].split(separator, 1)[0]
        value = draw(GARBAGE_VALUES).encode("utf-8", "replace")
        new = lines[:k] + [key + separator + b" " + value] + lines[k + 1:]
    return b"\n".join(new) + raw[end:]


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_text_header_lines_removed_or_garbled(tmp_path, image_bytes, baselines, suffix) -> None:
    raw, tally = image_bytes[suffix], Tally()

    @fuzz(60)
    @given(damaged=header_line_damage(raw, b":" if suffix == ".nrrd" else b"="))
    def run(damaged: bytes) -> None:
        path = tmp_path / f"hdr{suffix}"
        path.write_bytes(damaged)
        check_image_read(path, suffix, baselines[suffix], tally)

    run()
    tally.check()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_random_bytes_overwritten_anywhere(tmp_path, image_bytes, baselines, suffix) -> None:
    """Header bytes: as the header fields above. Voxel bytes of the uncompressed .nii: the
    damaged voxels are read as they now are, every other voxel and the geometry unchanged (the
    NIfTI model reads the damaged file). Compressed data: the original or an error."""
    tally = Tally()

    @fuzz(30)
    @given(start=st.integers(0, len(image_bytes[suffix]) - 1), junk=st.binary(min_size=1, max_size=16))
    def run(start: int, junk: bytes) -> None:
        raw = bytearray(image_bytes[suffix])
        raw[start:start + len(junk)] = junk
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(bytes(raw))
        check_image_read(path, suffix, baselines[suffix], tally)

    run()
    tally.check()


# --- DICOM series --------------------------------------------------------------------------------

CT = Volume(np.arange(4 * 6 * 7, dtype=np.int16).reshape(4, 6, 7) * 5 - 500, spacing=(2.0, 0.8, 0.9),
            origin=(-20.0, 10.0, 30.0), direction=rotation(8, 3))
#: The series stores CT = STORED * SLOPE + INTERCEPT (a slope other than 1, so that a missing
#: RescaleSlope read as 1 shows).
SLOPE, INTERCEPT = 5, -500
STORED = ((CT.array.astype(np.int64) - INTERCEPT) // SLOPE).astype(np.uint16)
DICOM_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "PixelData",
              "RescaleSlope", "RescaleIntercept", "Modality", "SeriesInstanceUID", "BitsAllocated", "BitsStored",
              "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation", "SOPClassUID", "TransferSyntaxUID")
DICOM_GARBAGE = st.one_of(
    st.sampled_from(["", "abc", "1\\2", "nan\\nan\\nan", "1e400\\0\\0", "0\\0\\0\\0\\0\\0", "-5", "0", "65536", "1.2.3", "CT",
                     "MR", "1\\0\\0\\0\\1\\0", "1\\2\\3\\4\\5\\6\\7"]),
    st.binary(max_size=12),
)


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / "ct"
    for k, path in enumerate(write_ct_series(CT, folder)):
        ds = pydicom.dcmread(path)
        ds.RescaleSlope, ds.RescaleIntercept = str(SLOPE), str(INTERCEPT)
        ds.PixelData = STORED[k].astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def dicom_baseline(dicom_series) -> Volume:
    return read_dicom_series(dicom_series)


def test_undamaged_dicom_series_reads_as_written(dicom_baseline) -> None:
    np.testing.assert_array_equal(STORED.astype(np.int64) * SLOPE + INTERCEPT, CT.array)
    np.testing.assert_array_equal(dicom_baseline.array, CT.array)
    assert dicom_baseline.same_geometry(CT, tol_mm=1e-6) is None


def _raw_value(value: bytes | str) -> bytes:
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return raw + b" " if len(raw) % 2 else raw


def _set_raw(ds: pydicom.Dataset, keyword: str, value: bytes | str) -> None:
    """Store ``value`` as the element's raw bytes (any VR), bypassing pydicom's validation."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    raw = _raw_value(value)
    target = ds.file_meta if keyword == "TransferSyntaxUID" else ds
    vr = dictionary_VR(tag)
    target._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)


def ds_numbers(value: bytes | str | None, n: int) -> list[float] | None:
    """A DS value of exactly ``n`` finite numbers, as the stored bytes say, else None."""
    if value is None:
        return None
    text = _raw_value(value).decode("latin-1").strip(" \x00")
    return numbers(text.replace("\\", " ") if text.count("\\") == n - 1 else "", n)


@st.composite
def dicom_damage(draw) -> tuple[str, str | int, bytes | str | None]:
    """(tag, "all" or a slice index, garbage value or None = removed)."""
    keyword = draw(st.sampled_from(DICOM_TAGS))
    which = draw(st.one_of(st.just("all"), st.integers(0, CT.shape[0] - 1)))
    value = draw(st.one_of(st.none(), DICOM_GARBAGE))
    return keyword, which, value


def dicom_readings(baseline: Volume, keyword: str, which: str | int, value) -> list[Reading]:
    """The original, or what the damaged tag says where its new value is well-formed:

    * PixelSpacing, all slices, 2 positive numbers: that in-plane spacing;
    * RescaleSlope (not 0) / RescaleIntercept, a number: the damaged slices' HU with it;
    * BitsStored, 1 to 16 in the damaged slices: their stored values masked to that many bits;
    * SeriesInstanceUID of the first or last slice: the other slices are a series of their own
      (the largest CT series is read): the original without that slice.

    Anything else damaged (positions, orientation, sizes, pixel encoding, a removed tag) can
    only be read as the original.
    """
    n = baseline.shape[0]
    z = list(range(n)) if which == "all" else [which]
    readings = original_and(baseline)
    if keyword == "PixelSpacing" and which == "all" and (ps := ds_numbers(value, 2)) and min(ps) > 0:
        other = Volume(baseline.array, (baseline.spacing[0], ps[0], ps[1]), baseline.origin, baseline.direction)
        readings += original_and(baseline, geometries=[geometry(other)])
    if keyword in ("RescaleSlope", "RescaleIntercept") and (v := ds_numbers(value, 1)):
        slope, intercept = (v[0], INTERCEPT) if keyword == "RescaleSlope" else (SLOPE, v[0])
        if slope != 0:
            array = baseline.array.astype(np.float64)
            array[z] = STORED[z].astype(np.float64) * slope + intercept
            readings += original_and(baseline, arrays=[array])
    if keyword == "BitsStored" and value is not None and len(raw := _raw_value(value)) == 2:
        bits = struct.unpack("<H", raw)[0]
        if 1 <= bits <= 16:
            array = baseline.array.astype(np.int64)
            array[z] = (STORED[z].astype(np.int64) & ((1 << bits) - 1)) * SLOPE + INTERCEPT
            readings += original_and(baseline, arrays=[array])
    if keyword == "SeriesInstanceUID" and which in (0, n - 1):
        rest = baseline.crop((slice(1, None) if which == 0 else slice(0, n - 1), slice(None), slice(None)))
        readings += original_and(rest)
    return readings


def test_dicom_tags_removed_or_garbage(tmp_path, dicom_series, dicom_baseline) -> None:
    tally = Tally()

    @fuzz(50)
    @given(damage=dicom_damage())
    # The review's case: a series without PixelSpacing (type 1 in a CT image) must not read as 1 mm.
    @example(damage=("PixelSpacing", "all", None))
    def run(damage) -> None:
        keyword, which, value = damage
        folder = tmp_path / "ct"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(dicom_series, folder)
        files = sorted(folder.glob("*.dcm"))
        targets = files if which == "all" else [files[which]]
        for f in targets:
            ds = pydicom.dcmread(f)
            if value is None:
                container = ds.file_meta if keyword == "TransferSyntaxUID" else ds
                if keyword in container:
                    delattr(container, keyword)
            else:
                _set_raw(ds, keyword, value)
            try:
                ds.save_as(f, enforce_file_format=False)
            except Exception:  # noqa: BLE001 - pydicom refuses to write some garbage: not an example
                tally.add("filtered")
                assume(False)
        try:
            volume = read_dicom_series(folder)
        except SatsError as exc:
            check_error(exc, str(folder), targets[0].name)
            tally.add("refused")
            return
        assert_read_as(volume, dicom_readings(dicom_baseline, keyword, which, value), f"{folder} ({keyword} damaged)")
        tally.add("read")

    run()
    tally.check()


def test_dicom_slice_truncated(tmp_path, dicom_series, dicom_baseline) -> None:
    tally = Tally()

    @fuzz(40)
    @given(data=st.data())
    def run(data) -> None:
        folder = tmp_path / "ct"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(dicom_series, folder)
        files = sorted(folder.glob("*.dcm"))
        victim = files[data.draw(st.integers(0, len(files) - 1), label="slice")]
        raw = victim.read_bytes()
        victim.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")])
        try:
            volume = read_dicom_series(folder)
        except SatsError as exc:
            check_error(exc, str(folder), victim.name)
            tally.add("refused")
            return
        assert_read_as(volume, original_and(dicom_baseline), f"{folder} ({victim.name} cut)")
        tally.add("read")

    run()
    tally.check()


# --- RTSTRUCT --------------------------------------------------------------------------------------

RS_TAGS = ("StructureSetROISequence", "ROIContourSequence", "ROINumber", "ReferencedROINumber", "ROIName",
           "ContourSequence", "ContourData", "ContourGeometricType", "ReferencedFrameOfReferenceUID", "Modality",
           "NumberOfContourPoints")
RS_MASK = (slice(1, 3), slice(2, 5), slice(2, 6))


@pytest.fixture(scope="module")
def rtstruct(tmp_path_factory, dicom_series, dicom_baseline) -> Files:
    mask = np.zeros(CT.shape, np.uint8)
    mask[RS_MASK] = 1
    out = tmp_path_factory.mktemp("rs") / "RS.dcm"
    write_rtstruct(dicom_baseline.with_array(mask), dicom_series, out)
    return Files({"RS.dcm": out.read_bytes()})


def test_undamaged_rtstruct_reads_as_written(tmp_path, dicom_series, dicom_baseline, rtstruct) -> None:
    (tmp_path / "RS.dcm").write_bytes(rtstruct["RS.dcm"])
    mask = read_rtstruct_roi(tmp_path / "RS.dcm", dicom_series, "GTVp")
    expected = np.zeros(CT.shape, np.uint8)
    expected[RS_MASK] = 1
    np.testing.assert_array_equal(mask.array, expected)
    assert mask.same_geometry(dicom_baseline, tol_mm=1e-9) is None


def _damage_items(ds: pydicom.Dataset, keyword: str, value, remove: bool) -> bool:
    """Apply the damage to every occurrence of ``keyword`` (top level or nested); True if any."""
    hit = False
    for item in [ds] + [i for elem in ds.iterall() if elem.VR == "SQ" for i in elem.value]:
        if keyword in item:
            hit = True
            if remove:
                delattr(item, keyword)
            else:
                _set_raw(item, keyword, value)
    return hit


def rtstruct_masks(keyword: str | None, value, remove: bool) -> list[np.ndarray]:
    """The written mask, or an empty one where the damage leaves well-formed contours that
    enclose nothing: no ContourSequence (type 3: the ROI has no contours), every ContourData
    fewer than 3 points, every ContourGeometricType a defined open type."""
    written = np.zeros(CT.shape, np.uint8)
    written[RS_MASK] = 1
    empty = keyword == "ContourSequence"
    if keyword == "ContourGeometricType" and not remove:
        empty = _raw_value(value).strip(b" \x00") in (b"POINT", b"OPEN_PLANAR", b"OPEN_NONPLANAR")
    if keyword == "ContourData" and not remove:
        text = _raw_value(value).decode("latin-1").strip(" \x00")
        count = text.count("\\") + 1
        empty = count % 3 == 0 and count // 3 < 3 and ds_numbers(value, count) is not None
    return [written] + [np.zeros_like(written)] * empty


def test_rtstruct_damaged(tmp_path, dicom_series, dicom_baseline, rtstruct) -> None:
    raw, tally = rtstruct["RS.dcm"], Tally()
    path = tmp_path / "RS.dcm"

    @fuzz(50)
    @given(data=st.data())
    def run(data) -> None:
        keyword, value, remove = None, None, False
        if data.draw(st.booleans(), label="truncate"):
            path.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")])
        else:
            path.write_bytes(raw)
            ds = pydicom.dcmread(path)
            keyword = data.draw(st.sampled_from(RS_TAGS), label="tag")
            remove = data.draw(st.booleans(), label="remove")
            value = None if remove else data.draw(DICOM_GARBAGE, label="value")
            if not _damage_items(ds, keyword, value, remove):
                tally.add("filtered")
                assume(False)
            try:
                ds.save_as(path, enforce_file_format=False)
            except Exception:  # noqa: BLE001 - pydicom refuses to write some garbage: not an example
                tally.add("filtered")
                assume(False)
        try:
            mask = read_rtstruct_roi(path, dicom_series, "GTVp")
        except SatsError as exc:
            check_error(exc, str(path))
            tally.add("refused")
            return
        # The grid is the CT's whatever the RTSTRUCT says; the contours as written or, where
        # the damage leaves contours that enclose nothing, none.
        assert mask.same_geometry(dicom_baseline, tol_mm=1e-9) is None, mask.same_geometry(dicom_baseline, tol_mm=1e-9)
        allowed = rtstruct_masks(keyword, value, remove)
        assert any(np.array_equal(mask.array, m) for m in allowed), (
            f"{keyword} {'removed' if remove else value!r}: a mask of {int(mask.array.sum())} voxels was read, "
            f"allowed: {[int(m.sum()) for m in allowed]}")
        tally.add("read")

    run()
    tally.check()


# --- evaluation folders ----------------------------------------------------------------------------

LABEL_BOX = (slice(1, 3), slice(1, 4), slice(2, 5))


@pytest.fixture(scope="module")
def label_bytes(tmp_path_factory) -> Files:
    mask = np.zeros(SHAPE, np.uint8)
    mask[LABEL_BOX] = 1
    return Files({"c.nii.gz": write_image(ORIGINAL.with_array(mask), tmp_path_factory.mktemp("lab") / "c.nii.gz").read_bytes()})


def test_evaluate_folders_with_a_damaged_file(tmp_path, label_bytes) -> None:
    """The damaged file is refused (naming it), or read as the image properties above allow,
    and the metrics are those of what was read; the undamaged case scores perfectly."""
    label = label_bytes["c.nii.gz"]
    (tmp_path / "base.nii.gz").write_bytes(label)
    baseline = read_image(tmp_path / "base.nii.gz")
    assert int(baseline.array.sum()) == math.prod(s.stop - s.start for s in LABEL_BOX)
    tally = Tally()

    @fuzz(40)
    @given(data=st.data())
    def run(data) -> None:
        pred, gt = tmp_path / "pred", tmp_path / "gt"
        shutil.rmtree(pred, ignore_errors=True)
        shutil.rmtree(gt, ignore_errors=True)
        pred.mkdir()
        gt.mkdir()
        for folder in (pred, gt):
            for case in ("a", "b"):
                (folder / f"{case}.nii.gz").write_bytes(label)
        victim = data.draw(st.sampled_from([pred / "a.nii.gz", gt / "b.nii.gz"]), label="file")
        if data.draw(st.booleans(), label="truncate"):
            victim.write_bytes(label[:data.draw(st.integers(0, len(label) - 1), label="cut")])
        else:
            raw = bytearray(gzip.decompress(label))
            start = data.draw(st.integers(0, len(raw) - 1), label="start")
            junk = data.draw(st.binary(min_size=1, max_size=8), label="junk")
            raw[start:start + len(junk)] = junk
            victim.write_bytes(gzip.compress(bytes(raw)))
        read = check_image_read(victim, ".nii.gz", baseline)
        try:
            results = evaluate_folders(pred, gt)
        except SatsError as exc:
            check_error(exc, str(victim), victim.name)
            tally.add("refused")
            return
        assert read is not None, f"evaluate_folders used {victim}, which read_image refuses"
        assert [r.case for r in results] == ["a", "b"]
        damaged = victim.name[0]
        for r in results:
            p = read if (r.case == damaged and victim.parent == pred) else baseline
            g = read if (r.case == damaged and victim.parent == gt) else baseline
            expected = compute_metrics(p.array, g.array, g.spacing, 1.0, case=r.case)
            np.testing.assert_equal(dataclasses.astuple(r), dataclasses.astuple(expected))
            if r.case != damaged:
                assert r.dsc == 100.0 and r.gt_ml == r.pred_ml
        tally.add("read")

    run()
    tally.check()


# --- dataset.json ----------------------------------------------------------------------------------

VALID_META = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "GTV": 1}, "numTraining": 2, "file_ending": ".nii.gz"}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@st.composite
def valid_dataset_json(draw) -> dict:
    """A dataset.json as documented, varied: any foreground name, CT in any case, any file ending, extra keys."""
    meta = {"channel_names": {"0": draw(st.sampled_from(["CT", "ct", " Ct "]))},
            "labels": {"background": 0, draw(st.text(min_size=1, max_size=8).filter(lambda s: s != "background")): 1},
            "numTraining": draw(st.integers(0, 10**6)),
            "file_ending": draw(st.sampled_from(IMAGE_SUFFIXES))}
    if draw(st.booleans()):
        meta["file_ending"] = meta["file_ending"].upper()
    meta.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in meta), JSON_VALUES, max_size=2)))
    return meta


@st.composite
def dataset_json_bytes(draw) -> tuple[bytes, bool]:
    """(content, valid): damaged content, or (valid) a documented variant that must load."""
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "truncated", "valid"]))
    if kind == "valid":
        return json.dumps(draw(valid_dataset_json())).encode(), True
    if kind == "bytes":
        return draw(st.binary(max_size=64)), False
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode(), False
    text = json.dumps(VALID_META).encode()
    if kind == "truncated":
        return text[:draw(st.integers(0, len(text) - 1))], False
    meta = json.loads(text)
    key = draw(st.sampled_from(sorted(meta) + ["labels.GTV", "labels.background", "channel_names.0"]))
    head, _, sub = key.partition(".")
    target = meta[head] if sub else meta
    if draw(st.booleans()):
        target.pop(sub or head, None)
    else:
        target[sub or head] = draw(JSON_VALUES)
    return json.dumps(meta).encode(), False


def _is_int(value, expected: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (expected is None or value == expected)


def test_dataset_json_damaged(tmp_path) -> None:
    """Refused (never a documented one), or returned as the file holds it and as documented: one
    CT channel, labels background 0 plus one foreground 1, numTraining a non-negative integer, a
    known file ending."""
    tally = Tally()

    @fuzz(60)
    @given(case=dataset_json_bytes())
    def run(case: tuple[bytes, bool]) -> None:
        content, valid = case
        (tmp_path / "dataset.json").write_bytes(content)
        try:
            meta = load_dataset_json(tmp_path)
        except SatsError as exc:
            check_error(exc, str(tmp_path / "dataset.json"))
            assert not valid, f"a documented dataset.json was refused: {exc}"
            tally.add("refused")
            return
        assert json.dumps(meta) == json.dumps(json.loads(content))  # as the file holds it (NaN-safe)
        assert set(VALID_META) <= set(meta)
        assert list(meta["channel_names"]) == ["0"] and meta["channel_names"]["0"].strip().lower() == "ct"
        labels = meta["labels"]
        assert len(labels) == 2 and _is_int(labels.get("background"), 0) and sum(_is_int(v, 1) for v in labels.values()) == 1
        assert _is_int(meta["numTraining"]) and meta["numTraining"] >= 0
        assert isinstance(meta["file_ending"], str) and meta["file_ending"].lower() in IMAGE_SUFFIXES
        tally.add("read")

    run()
    tally.check()
