"""What an image file's header promises, checked before SimpleITK reads the file.

SimpleITK reads many damaged headers without a word: a size or voxel size of 0 as 1, a
damaged number partly parsed, a damaged byte order, both NIfTI orientation codes 0 as origin 0
and identity axes; it reads some damaged compressed data as a few wrong voxels, and one
damaged zlib header makes it never return. :func:`check_header` refuses such a header
(NIfTI-1, MetaImage, NRRD) with one :class:`SatsError` naming the file and the field, and
returns where the voxel data lie (:class:`DataLayout`); :func:`check_voxel_data` checks that
the data are all there and, compressed, that they inflate in full with a good checksum.
Used by :func:`sats.data.io.read_image` and :func:`sats.data.io.read_spacing`.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sats.geometry.volume import SatsError

@dataclass(frozen=True)
class DataLayout:
    """Where a single-file image keeps its voxel data, by its header.

    Attributes:
        n_bytes: bytes of voxel data the header announces.
        offset: byte offset of the data in the file ("raw", "zlib", "gzip"), or in the
            decompressed stream of a whole-file gzip ("gzip-file": .nii.gz).
        codec: "raw", "gzip-file" (.nii.gz), "gzip" (a NRRD payload) or "zlib" (a MetaImage payload).
        stored: compressed bytes of a "zlib" payload (MetaImage ``CompressedDataSize``).
    """

    n_bytes: int
    offset: int
    codec: str
    stored: int = 0


def check_header(path: Path) -> DataLayout | None:
    """Refuse a damaged header (SatsError naming the field); the layout of its voxel data, or
    None where they are not in this file in a form checked here (detached, text, bzip2)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _nifti_layout(path)
    if name.endswith((".mha", ".mhd")):
        return _metaimage_layout(path)
    return _nrrd_layout(path)


def check_voxel_data(path: Path, layout: DataLayout) -> None:
    """Refuse a file whose voxel data are shorter than its header announces, or whose
    compressed data are truncated or corrupt.

    SimpleITK zero-fills a short file, reads a corrupt gzip or zlib stream as a few wrong
    voxels and never returns on some damaged zlib headers; a damaged size field would make it
    allocate whatever the header says. Compressed data are therefore inflated here in full
    first (gzip's CRC-32 and zlib's Adler-32 checked), in bounded chunks.
    """
    if layout.codec == "raw":
        available = path.stat().st_size - layout.offset
    elif layout.codec == "gzip-file":
        available = _inflated_size(path, 0, None, gzip_wrapper=True) - layout.offset
    else:
        stored = path.stat().st_size - layout.offset
        if layout.codec == "zlib":
            if layout.stored > stored:
                raise SatsError(f"{path}: truncated: CompressedDataSize is {layout.stored} bytes, the file holds {stored}")
            stored = layout.stored
        available = _inflated_size(path, layout.offset, stored, gzip_wrapper=layout.codec == "gzip")
    if available < layout.n_bytes:
        raise SatsError(f"{path}: truncated or damaged: the header announces {layout.n_bytes} bytes of voxel data, "
                        f"the file holds {max(available, 0)}")


def _inflated_size(path: Path, offset: int, length: int | None, gzip_wrapper: bool) -> int:
    """Bytes that ``length`` bytes (None: to the end) of ``path`` from ``offset`` inflate to,
    checking the stream is complete and intact: gzip members (CRC-32 and size checked; zero
    padding only at the end) or one zlib stream (Adler-32 checked)."""
    total, remaining = 0, length
    stream = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip_wrapper else zlib.MAX_WBITS)
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            while remaining is None or remaining > 0:
                chunk = fh.read(_INFLATE_STEP if remaining is None else min(_INFLATE_STEP, remaining))
                if not chunk:
                    break
                remaining = None if remaining is None else remaining - len(chunk)
                total += _inflate_chunk(stream, chunk)
                while gzip_wrapper and stream.eof and stream.unused_data.strip(b"\0"):
                    rest = stream.unused_data
                    if rest == b"\x1f":
                        break  # the next member's magic number is split between two reads
                    if not rest.startswith(b"\x1f\x8b"):  # SimpleITK stops there and zero-fills
                        raise SatsError(f"{path}: corrupt compressed data (other bytes after a gzip member)")
                    stream = zlib.decompressobj(16 + zlib.MAX_WBITS)  # another member follows
                    total += _inflate_chunk(stream, rest)
                if stream.eof and not gzip_wrapper:
                    break  # bytes after the zlib stream are not voxel data
    except zlib.error as exc:
        reason = str(exc).partition(": ")[2] or str(exc)
        if reason.startswith("Error 2 "):  # Z_NEED_DICT: a damaged zlib header (SimpleITK never returns on it)
            reason = "the zlib header asks for a preset dictionary"
        raise SatsError(f"{path}: corrupt compressed data ({reason})") from None
    if not stream.eof:
        raise SatsError(f"{path}: truncated compressed data (the {'gzip' if gzip_wrapper else 'zlib'} stream does not end)")
    return total


#: Compressed bytes read, and inflated bytes produced, per step (bounds the memory of the check).
_INFLATE_STEP = 1 << 22


def _inflate_chunk(stream: zlib._Decompress, chunk: bytes) -> int:
    """Feed ``chunk`` to a zlib ``stream``, discarding the output a step at a time; its size."""
    out = stream.decompress(chunk, _INFLATE_STEP)
    total = len(out)
    while not stream.eof and (stream.unconsumed_tail or len(out) == _INFLATE_STEP):
        out = stream.decompress(stream.unconsumed_tail, _INFLATE_STEP)
        total += len(out)
    return total


#: Bytes per voxel of the NIfTI-1 scalar datatypes (nifti1.h). Others (binary, complex, RGB)
#: are refused: SimpleITK's size for them is not the file's, or not one value per voxel.
NIFTI_SCALAR_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8}
#: Size of a NIfTI-1 header (bytes); the voxels of a single file start at 352 or later.
NIFTI1_HEADER = 348


def _nifti_layout(path: Path) -> DataLayout:
    """Check a NIfTI-1 header (standard: nifti1.h) field by field; where its voxels lie.

    SimpleITK reads a pixdim or dim of 0 as 1, a negative pixdim as a flipped axis, a
    vox_offset below 352 (or not a number) as 348, a damaged magic as an Analyze file at
    origin 0, a complex datatype past the end of the file: each is refused here instead.
    """
    header = _nifti_header_bytes(path)
    order = _nifti_byte_order(path, header)

    def get(offset: int, fmt: str) -> tuple:
        return struct.unpack_from(order + fmt, header, offset)

    problem = _nifti_data_problem(get, header[344:348]) or _nifti_geometry_problem(get)
    if problem:
        raise SatsError(f"{path}: damaged NIfTI header ({problem})")
    dim, (datatype,), (vox_offset,) = get(40, "8h"), get(70, "h"), get(108, "f")
    n_bytes = math.prod(dim[1:dim[0] + 1]) * NIFTI_SCALAR_BYTES[datatype]
    return DataLayout(n_bytes, int(vox_offset), "gzip-file" if path.name.lower().endswith(".gz") else "raw")


def _nifti_header_bytes(path: Path) -> bytes:
    """The first 348 bytes of a .nii (or of the decompressed .nii.gz)."""
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as fh:
            header = fh.read(NIFTI1_HEADER)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise SatsError(f"{path}: truncated or corrupt gzip data ({exc})") from None
    except OSError as exc:
        raise SatsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(header) < NIFTI1_HEADER:
        raise SatsError(f"{path}: truncated: {len(header)} bytes, a NIfTI-1 header has {NIFTI1_HEADER}")
    return header


def _nifti_byte_order(path: Path, header: bytes) -> str:
    """"<" or ">": the byte order in which sizeof_hdr reads 348."""
    for order in "<>":
        size = struct.unpack_from(order + "i", header)[0]
        if size == NIFTI1_HEADER:
            return order
        if size == 540:
            raise SatsError(f"{path}: NIfTI-2 files are not supported (save it as NIfTI-1)")
    raise SatsError(f"{path}: not a NIfTI-1 file (damaged header: sizeof_hdr is not {NIFTI1_HEADER})")


def _nifti_data_problem(get: Callable[[int, str], tuple], magic: bytes) -> str | None:
    """What stops the voxel values being read as the header says (magic, dim, datatype,
    vox_offset, scaling), or None."""
    if magic != b"n+1\0":
        return f"magic {magic!r}, not the b'n+1\\x00' of a single-file NIfTI-1"
    dim = get(40, "8h")
    if not 1 <= dim[0] <= 7:
        return f"dim[0] = {dim[0]}, not 1 to 7"
    bad = [k for k in range(1, dim[0] + 1) if dim[k] < 1]
    if bad:
        return f"dim[{bad[0]}] = {dim[bad[0]]}, not a size >= 1"
    (datatype,) = get(70, "h")
    if datatype not in NIFTI_SCALAR_BYTES:
        return f"datatype {datatype} is not a supported scalar type"
    (vox_offset,) = get(108, "f")
    if not (math.isfinite(vox_offset) and vox_offset >= 352):
        return f"vox_offset {vox_offset}, not a byte offset of at least 352"
    return _nifti_scaling_problem(datatype, *get(112, "2f"))


#: Largest magnitude of each NIfTI-1 integer datatype.
_NIFTI_INT_MAX = {2: 255, 4: 2**15, 8: 2**31, 256: 2**7, 512: 2**16 - 1, 768: 2**32 - 1, 1024: 2**63, 1280: 2**64 - 1}
_FLOAT32 = np.finfo(np.float32)


def _nifti_scaling_problem(datatype: int, slope: float, inter: float) -> str | None:
    """Why ``value * scl_slope + scl_inter`` cannot be applied as the standard says, or None.

    A slope of 0 or not finite means "unscaled". SimpleITK scales integers into float32: a
    slope that overflows it for storable values (inf) or makes them subnormal (digits lost)
    would give other values than the header says.
    """
    if not math.isfinite(slope) or slope == 0 or (slope, inter) == (1.0, 0.0):
        return None
    if not math.isfinite(inter):
        return f"scl_slope {slope} with a non-finite scl_inter {inter}"
    top = _NIFTI_INT_MAX.get(datatype)
    if top is not None and (abs(slope) < _FLOAT32.tiny or 0 < abs(inter) < _FLOAT32.tiny
                            or abs(slope) * top + abs(inter) > _FLOAT32.max):
        return f"scl_slope {slope} and scl_inter {inter} scale the voxels out of the float32 range"
    return None


def _nifti_geometry_problem(get: Callable[[int, str], tuple]) -> str | None:
    """What stops the geometry being read as the header says (pixdim, the orientation in
    use), or None. Both xform codes 0 is refused: the standard's "method 1" for it places the
    voxels in no patient space, which SimpleITK would read as origin 0, identity."""
    dim0, pixdim = get(40, "h")[0], get(76, "8f")
    bad = [k for k in range(1, min(dim0, 3) + 1) if not (math.isfinite(pixdim[k]) and pixdim[k] > 0)]
    if bad:
        return f"pixdim[{bad[0]}] = {pixdim[bad[0]]}, not a voxel size > 0"
    qform, sform = get(252, "2h")
    if qform <= 0 and sform <= 0:
        return f"qform_code {qform} and sform_code {sform}: no orientation in the patient (NIfTI-1 method 1)"
    # ITK's NIfTI reader never returns (an endless loop) on an infinite sform entry.
    used = [("pixdim[0]", pixdim[:1])] + [("quatern/qoffset", get(256, "6f"))] * (qform > 0) + [("srow", get(280, "12f"))] * (sform > 0)
    for name, values in used:
        if not all(math.isfinite(v) for v in values):
            return f"non-finite {name}"
    return None


#: A decimal number as headers write them; "nan", "inf", hex and trailing junk are not.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
#: Longest text header read (bytes); real ones are a few hundred.
_MAX_TEXT_HEADER = 1 << 20


def _numbers(text: str | None, count: int, integer: bool = False) -> list[float] | None:
    """Exactly ``count`` finite numbers separated by white space (``integer``: whole), else None.
    ITK parses a damaged list partly (``1 2`` for three values, ``0.8A`` as 0.8): refuse it."""
    parts = (text or "").split()
    pattern = re.compile(r"[+-]?\d+") if integer else _NUMBER
    if len(parts) != count or not all(pattern.fullmatch(p) for p in parts):
        return None
    values = [int(p) if integer else float(p) for p in parts]
    return values if all(math.isfinite(v) for v in values) else None


def _is_count(text: str) -> bool:
    """Whether ``text`` is a whole number >= 0 in ASCII digits (``str.isdigit`` also takes "²")."""
    return text.isascii() and text.isdigit()


def _text_header_lines(path: Path, metaimage: bool) -> tuple[list[str], int]:
    """The header lines of a MetaImage (through ``ElementDataFile``) or NRRD file (up to the
    first empty line, or the end of a detached header), and the offset where the data follow."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
        found = _split_text_header(head, metaimage)
        if found is None and len(head) == 1 << 16:  # a long header: read on, within reason
            head += fh.read(_MAX_TEXT_HEADER - len(head))
            found = _split_text_header(head, metaimage)
    if found is not None:
        return found
    if metaimage or len(head) == _MAX_TEXT_HEADER:
        raise SatsError(f"{path}: damaged header (no {'ElementDataFile line' if metaimage else 'end'} "
                        f"in the first {len(head)} bytes)")
    lines = [line.rstrip("\r") for line in head.decode("latin-1").split("\n")]
    return lines[:-1] if lines and not lines[-1] else lines, len(head)  # a detached NRRD header (.nhdr)


def _split_text_header(head: bytes, metaimage: bool) -> tuple[list[str], int] | None:
    """(lines, data offset) of the header at the start of ``head``, or None where it does not end there."""
    lines: list[str] = []
    pos = 0
    while (nl := head.find(b"\n", pos)) >= 0:
        line = head[pos:nl].decode("latin-1").rstrip("\r")
        pos = nl + 1
        if not metaimage and line == "":
            return lines, pos
        lines.append(line)
        if metaimage and line.partition("=")[0].strip() == "ElementDataFile":
            return lines, pos
    if metaimage and head[pos:].partition(b"=")[0].strip() == b"ElementDataFile":
        return lines + [head[pos:].decode("latin-1").rstrip("\r")], len(head)  # no newline after the last line
    return None


#: Bytes per value of the scalar MetaImage element types (MetaIO's table; MET_LONG is 4 bytes).
METAIMAGE_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                        "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                        "MET_DOUBLE": 8}


def _metaimage_fields(path: Path) -> tuple[dict[str, str], int]:
    """``key = value`` fields of a MetaImage header (keys as written) and the data offset."""
    lines, data_at = _text_header_lines(path, metaimage=True)
    fields = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            if line.strip():
                raise SatsError(f"{path}: damaged MetaImage header (line {line[:40]!r} is not 'key = value')")
            continue
        fields[key.strip()] = value.strip()
    return fields, data_at


def _metaimage_layout(path: Path) -> DataLayout | None:
    """Check a MetaImage header: every field the voxels and geometry are read from must be
    well-formed (MetaIO parses a damaged number list partly and reads any boolean starting
    with T as true). Optional fields may be absent: Offset 0, ElementSpacing 1, TransformMatrix
    identity, byte order little-endian, data uncompressed."""
    fields, data_at = _metaimage_fields(path)
    ndims = fields.get("NDims", "")
    if not (_is_count(ndims) and 1 <= int(ndims) <= 16):  # ITK crashes (segmentation fault) on others
        raise SatsError(f"{path}: unreadable image (invalid NDims = {ndims[:20]!r})")
    n = int(ndims)
    problem = _metaimage_problem(fields, n)
    if problem:
        raise SatsError(f"{path}: damaged MetaImage header ({problem})")
    if fields["ElementDataFile"].upper() != "LOCAL":
        return None  # data in another file (.mhd): left to SimpleITK
    n_bytes = math.prod(_numbers(fields["DimSize"], n, integer=True)) * METAIMAGE_TYPE_BYTES[fields["ElementType"]]
    if fields.get("CompressedData", "False").lower() == "false":
        return DataLayout(n_bytes, data_at, "raw")
    return DataLayout(n_bytes, data_at, "zlib", stored=int(fields["CompressedDataSize"]))


def _metaimage_problem(fields: dict[str, str], n: int) -> str | None:
    """The first malformed or missing field of a MetaImage header with ``n`` dimensions, or None."""
    sizes = _numbers(fields.get("DimSize"), n, integer=True)
    if sizes is None or min(sizes) < 1:
        return f"DimSize = {fields.get('DimSize', '(missing)')[:40]!r}, not {n} sizes >= 1"
    if fields.get("ElementType") not in METAIMAGE_TYPE_BYTES:
        return f"ElementType = {fields.get('ElementType', '(missing)')[:40]!r}, not a scalar type"
    spacing = _numbers(fields.get("ElementSpacing", " ".join(["1"] * n)), n)
    if spacing is None or min(spacing) <= 0:
        return f"ElementSpacing = {fields['ElementSpacing'][:40]!r}, not {n} voxel sizes > 0"
    for keys, count in ((("Offset", "Position", "Origin"), n), (("TransformMatrix", "Rotation", "Orientation"), n * n)):
        for key in keys:
            if key in fields and _numbers(fields[key], count) is None:
                return f"{key} = {fields[key][:40]!r}, not {count} numbers"
    if fields.get("BinaryData", "").lower() != "true":  # absent means text data, not read here
        return f"BinaryData = {fields.get('BinaryData', '(missing)')[:20]!r}, only True (binary data) is read"
    for key in ("BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData"):
        if key in fields and fields[key].lower() not in ("true", "false"):
            return f"{key} = {fields[key][:20]!r}, not True or False"
    if fields.get("ElementNumberOfChannels", "1") != "1":
        return f"ElementNumberOfChannels = {fields['ElementNumberOfChannels'][:20]!r}, only 1 is read"
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if compressed and not _is_count(fields.get("CompressedDataSize", "")):
        # Without it SimpleITK reads the stream wrongly (the first voxels garbage).
        return f"CompressedDataSize = {fields.get('CompressedDataSize', '(missing)')[:20]!r}, not a byte count"
    return None


def _nrrd_types() -> dict[str, int]:
    """NRRD ``type`` spellings -> bytes per value (the NRRD0004 format definition)."""
    spellings = {
        1: ["signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"],
        2: ["short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short",
            "unsigned short int", "uint16", "uint16_t"],
        4: ["int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"],
        8: ["longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t",
            "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"],
    }
    return {name: size for size, names in spellings.items() for name in names}


NRRD_TYPE_BYTES = _nrrd_types()
#: NRRD ``space`` names -> number of world coordinates.
NRRD_SPACES = {**dict.fromkeys(["right-anterior-superior", "RAS", "left-anterior-superior", "LAS", "left-posterior-superior",
                                "LPS", "scanner-xyz", "3D-right-handed", "3D-left-handed"], 3),
               **dict.fromkeys(["right-anterior-superior-time", "RAST", "left-anterior-superior-time", "LAST",
                                "left-posterior-superior-time", "LPST", "scanner-xyz-time", "3D-right-handed-time",
                                "3D-left-handed-time"], 4)}
NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "other", "bz2": "other", "txt": "text",
                  "text": "text", "ascii": "text", "hex": "other"}


def _nrrd_vectors(text: str, count: int, length: int) -> bool:
    """Whether ``text`` is ``count`` vectors "(a,b,c)" of ``length`` finite numbers, where
    "none" may stand for a non-spatial axis (one past the ``length`` spatial ones)."""
    items = re.findall(r"none|\([^()]*\)", text)
    if len(items) != count or re.sub(r"none|\([^()]*\)", "", text).strip():
        return False
    vectors = [item for item in items if item != "none"]
    return len(vectors) == min(count, length) and all(
        item.count(",") == length - 1 and _numbers(item[1:-1].replace(",", " "), length) is not None for item in vectors)


def _nrrd_fields(path: Path) -> tuple[dict[str, str], int]:
    """``field: value`` pairs of a NRRD header (comments and ``key:=value`` pairs skipped) and
    the offset where the data follow."""
    lines, data_at = _text_header_lines(path, metaimage=False)
    if not lines or not lines[0].startswith("NRRD000"):
        raise SatsError(f"{path}: not a NRRD file (no NRRD000x magic line)")
    fields = {}
    for line in lines[1:]:
        if line.startswith("#") or ":=" in line:
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            raise SatsError(f"{path}: damaged NRRD header (line {line[:40]!r} is not 'field: value')")
        fields[key] = value.strip()
    return fields, data_at


def _nrrd_layout(path: Path) -> DataLayout | None:
    """Check a NRRD header: every field the voxels and geometry are read from must be
    well-formed (teem parses a damaged vector partly). Optional: ``space origin`` (0),
    ``space directions`` (1 mm along the axes)."""
    fields, data_at = _nrrd_fields(path)
    problem = _nrrd_problem(fields)
    if problem:
        raise SatsError(f"{path}: damaged NRRD header ({problem})")
    encoding = NRRD_ENCODINGS[fields["encoding"]]
    detached = {"data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip"} & set(fields)
    if detached or encoding not in ("raw", "gzip"):
        return None  # left to SimpleITK
    n = int(fields["dimension"])
    n_bytes = math.prod(_numbers(fields["sizes"], n, integer=True)) * NRRD_TYPE_BYTES[fields["type"]]
    return DataLayout(n_bytes, data_at, encoding)


def _nrrd_problem(fields: dict[str, str]) -> str | None:
    """The first malformed or missing field of a NRRD header, or None."""
    dimension = fields.get("dimension", "")
    if not (_is_count(dimension) and 1 <= int(dimension) <= 16):
        return f"dimension: {dimension[:20]!r}, not 1 to 16"
    n = int(dimension)
    sizes = _numbers(fields.get("sizes"), n, integer=True)
    if sizes is None or min(sizes) < 1:
        return f"sizes: {fields.get('sizes', '(missing)')[:40]!r}, not {n} sizes >= 1"
    if fields.get("type") not in NRRD_TYPE_BYTES:
        return f"type: {fields.get('type', '(missing)')[:40]!r}, not a scalar type"
    if fields.get("encoding") not in NRRD_ENCODINGS:
        return f"encoding: {fields.get('encoding', '(missing)')[:40]!r}, not a NRRD encoding"
    endian = fields.get("endian")
    needs_endian = NRRD_ENCODINGS[fields["encoding"]] != "text" and NRRD_TYPE_BYTES[fields["type"]] > 1
    if endian not in ("little", "big") and (endian is not None or needs_endian):
        return f"endian: {(endian or '(missing)')[:20]!r}, not little or big"
    width = _nrrd_space_width(fields)
    if width is None:
        return f"space: {fields.get('space', fields.get('space dimension'))[:40]!r}, not a NRRD space"
    for key, count in (("space directions", n), ("space origin", 1)):
        if key in fields and not _nrrd_vectors(fields[key], count, width):
            return f"{key}: {fields[key][:40]!r}, not {count} vector(s) of {width} numbers"
    spacings = fields.get("spacings", " ".join(["nan"] * n)).split()
    if len(spacings) != n or not all(p.lower() == "nan" or _numbers(p, 1) for p in spacings):
        return f"spacings: {fields['spacings'][:40]!r}, not {n} numbers"
    return None


def _nrrd_space_width(fields: dict[str, str]) -> int | None:
    """Coordinates per world vector: by ``space`` or ``space dimension`` (0: neither); None if malformed."""
    if "space" in fields:
        return NRRD_SPACES.get(fields["space"])
    text = fields.get("space dimension", "0")
    return int(text) if _is_count(text) else None


