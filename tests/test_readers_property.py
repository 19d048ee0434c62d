"""Every reader fed damaged files (hypothesis): a correct read or one SatsError line naming the file.

Readers: ``read_image`` (NIfTI .nii.gz and .nii, NRRD, MHA), ``read_dicom_series``,
``read_rtstruct_roi``, ``evaluate_folders`` and ``load_dataset_json``. Damage: the file cut at
any byte, header fields overwritten (NIfTI binary fields, NRRD/MHA header lines) or removed,
DICOM tags removed or set to garbage. The only allowed outcomes are a :class:`Volume` (of the
original shape and contents when the damage cannot be repaired, of any shape when a header value
was changed) or a :class:`SatsError` whose message is one line naming the file; any other
exception fails the test.

The examples are derandomised, so CI runs the same ones every time. To search further, run with
``SATS_FUZZ_EXAMPLES=500`` (random examples, that many per test).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_io import rotation

from sats.data.dataset import load_dataset_json
from sats.data.dicom import read_dicom_series, write_ct_series
from sats.data.io import read_image, write_image
from sats.evaluation.metrics import evaluate_folders
from sats.geometry.volume import SatsError, Volume
from sats.predict.export import read_rtstruct_roi, write_rtstruct

FUZZ = int(os.environ.get("SATS_FUZZ_EXAMPLES", "0"))


def fuzz(n: int):
    """Hypothesis settings: ``n`` fixed examples, or SATS_FUZZ_EXAMPLES random ones."""
    return settings(max_examples=FUZZ or n, deadline=None, database=None, derandomize=not FUZZ,
                    suppress_health_check=list(HealthCheck))


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


def read_outcome(path: Path, exact: bool) -> Volume | None:
    """Read ``path``: a Volume (the original when ``exact``) or a SatsError naming the file."""
    try:
        volume = read_image(path)
    except SatsError as exc:
        check_error(exc, str(path))
        return None
    assert volume.array.ndim == 3
    if exact:
        assert volume.shape == SHAPE
        np.testing.assert_array_equal(volume.array, ORIGINAL.array)
    return volume


@pytest.mark.parametrize("suffix", SUFFIXES)
@fuzz(40)
@given(data=st.data())
def test_truncated_image_is_an_error_or_read_in_full(tmp_path, image_bytes, suffix, data) -> None:
    raw = image_bytes[suffix]
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(raw[:cut])
    read_outcome(path, exact=True)


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
    """(field, element, new bytes): one element of a header field set to a random or extreme value."""
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
@fuzz(60)
@given(damage=nifti_field_damage())
def test_nifti_header_fields_overwritten(tmp_path, image_bytes, suffix, damage) -> None:
    _name, offset, value = damage
    raw = bytearray(gzip.decompress(image_bytes[suffix]) if suffix == ".nii.gz" else image_bytes[suffix])
    raw[offset:offset + len(value)] = value
    path = tmp_path / f"hdr{suffix}"
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    read_outcome(path, exact=False)


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
@fuzz(60)
@given(data=st.data())
def test_text_header_lines_removed_or_garbled(tmp_path, image_bytes, suffix, data) -> None:
    raw = image_bytes[suffix]
    damaged = data.draw(header_line_damage(raw, b":" if suffix == ".nrrd" else b"="), label="file")
    path = tmp_path / f"hdr{suffix}"
    path.write_bytes(damaged)
    read_outcome(path, exact=False)


@pytest.mark.parametrize("suffix", SUFFIXES)
@fuzz(30)
@given(data=st.data())
def test_random_bytes_overwritten_anywhere(tmp_path, image_bytes, suffix, data) -> None:
    raw = bytearray(image_bytes[suffix])
    start = data.draw(st.integers(0, len(raw) - 1), label="start")
    junk = data.draw(st.binary(min_size=1, max_size=16), label="junk")
    raw[start:start + len(junk)] = junk
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(bytes(raw))
    read_outcome(path, exact=False)


# --- DICOM series --------------------------------------------------------------------------------

CT = Volume(np.arange(4 * 6 * 7, dtype=np.int16).reshape(4, 6, 7) * 5 - 500, spacing=(2.0, 0.8, 0.9),
            origin=(-20.0, 10.0, 30.0), direction=rotation(8, 3))
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
    write_ct_series(CT, folder)
    return folder


def _set_raw(ds: pydicom.Dataset, keyword: str, value: bytes | str) -> None:
    """Store ``value`` as the element's raw bytes (any VR), bypassing pydicom's validation."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    if len(raw) % 2:
        raw += b" "
    target = ds.file_meta if keyword == "TransferSyntaxUID" else ds
    vr = dictionary_VR(tag)
    target._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)


def damage_dicom(folder: Path, draw) -> tuple[Path, str]:
    """Remove a tag or set it to garbage in one or all slices; returns (damaged file, tag)."""
    files = sorted(folder.glob("*.dcm"))
    keyword = draw(st.sampled_from(DICOM_TAGS))
    which = draw(st.sampled_from(["one", "all"]))
    targets = files if which == "all" else [files[draw(st.integers(0, len(files) - 1))]]
    remove = draw(st.booleans())
    value = None if remove else draw(DICOM_GARBAGE)
    for f in targets:
        ds = pydicom.dcmread(f)
        if remove:
            container = ds.file_meta if keyword == "TransferSyntaxUID" else ds
            if keyword in container:
                delattr(container, keyword)
        else:
            _set_raw(ds, keyword, value)
        try:
            ds.save_as(f, enforce_file_format=False)
        except Exception:  # noqa: BLE001 - pydicom refuses to write some garbage: not an example
            assume(False)
    return targets[0], keyword


@fuzz(50)
@given(data=st.data())
def test_dicom_tags_removed_or_garbage(tmp_path, dicom_series, data) -> None:
    folder = tmp_path / "ct"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(dicom_series, folder)
    damaged, _ = damage_dicom(folder, data.draw)
    try:
        volume = read_dicom_series(folder)
    except SatsError as exc:
        check_error(exc, str(folder), damaged.name)
        return
    assert volume.array.ndim == 3


@fuzz(40)
@given(data=st.data())
def test_dicom_slice_truncated(tmp_path, dicom_series, data) -> None:
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
        return
    assert volume.shape == CT.shape
    np.testing.assert_array_equal(volume.array, CT.array)


# --- RTSTRUCT --------------------------------------------------------------------------------------

RS_TAGS = ("StructureSetROISequence", "ROIContourSequence", "ROINumber", "ReferencedROINumber", "ROIName",
           "ContourSequence", "ContourData", "ContourGeometricType", "ReferencedFrameOfReferenceUID", "Modality",
           "NumberOfContourPoints")


@pytest.fixture(scope="module")
def rtstruct(tmp_path_factory, dicom_series) -> Files:
    mask = np.zeros(CT.shape, np.uint8)
    mask[1:3, 2:5, 2:6] = 1
    out = tmp_path_factory.mktemp("rs") / "RS.dcm"
    write_rtstruct(read_dicom_series(dicom_series).with_array(mask), dicom_series, out)
    return Files({"RS.dcm": out.read_bytes()})


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


@fuzz(50)
@given(data=st.data())
def test_rtstruct_damaged(tmp_path, dicom_series, rtstruct, data) -> None:
    raw = rtstruct["RS.dcm"]
    path = tmp_path / "RS.dcm"
    if data.draw(st.booleans(), label="truncate"):
        path.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")])
        exact = True
    else:
        path.write_bytes(raw)
        ds = pydicom.dcmread(path)
        keyword = data.draw(st.sampled_from(RS_TAGS), label="tag")
        remove = data.draw(st.booleans(), label="remove")
        assume(_damage_items(ds, keyword, None if remove else data.draw(DICOM_GARBAGE, label="value"), remove))
        try:
            ds.save_as(path, enforce_file_format=False)
        except Exception:  # noqa: BLE001 - pydicom refuses to write some garbage: not an example
            assume(False)
        exact = False
    try:
        mask = read_rtstruct_roi(path, dicom_series, "GTVp")
    except SatsError as exc:
        check_error(exc, str(path))
        return
    assert mask.shape == CT.shape
    if exact:
        assert mask.array.sum() == 2 * 3 * 4


# --- evaluation folders ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def label_bytes(tmp_path_factory) -> Files:
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:3, 1:4, 2:5] = 1
    return Files({"c.nii.gz": write_image(ORIGINAL.with_array(mask), tmp_path_factory.mktemp("lab") / "c.nii.gz").read_bytes()})


@fuzz(40)
@given(data=st.data())
def test_evaluate_folders_with_a_damaged_file(tmp_path, label_bytes, data) -> None:
    label_bytes = label_bytes["c.nii.gz"]
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    shutil.rmtree(pred, ignore_errors=True)
    shutil.rmtree(gt, ignore_errors=True)
    pred.mkdir()
    gt.mkdir()
    for folder in (pred, gt):
        for case in ("a", "b"):
            (folder / f"{case}.nii.gz").write_bytes(label_bytes)
    victim = data.draw(st.sampled_from([pred / "a.nii.gz", gt / "b.nii.gz"]), label="file")
    if data.draw(st.booleans(), label="truncate"):
        victim.write_bytes(label_bytes[:data.draw(st.integers(0, len(label_bytes) - 1), label="cut")])
    else:
        raw = bytearray(gzip.decompress(label_bytes))
        start = data.draw(st.integers(0, len(raw) - 1), label="start")
        junk = data.draw(st.binary(min_size=1, max_size=8), label="junk")
        raw[start:start + len(junk)] = junk
        victim.write_bytes(gzip.compress(bytes(raw)))
    try:
        results = evaluate_folders(pred, gt)
    except SatsError as exc:
        check_error(exc, str(victim), victim.name)
        return
    assert [r.case for r in results] == ["a", "b"]


# --- dataset.json ----------------------------------------------------------------------------------

VALID_META = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "GTV": 1}, "numTraining": 2, "file_ending": ".nii.gz"}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@st.composite
def dataset_json_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    text = json.dumps(VALID_META).encode()
    if kind == "truncated":
        return text[:draw(st.integers(0, len(text) - 1))]
    meta = json.loads(text)
    key = draw(st.sampled_from(sorted(meta) + ["labels.GTV", "labels.background", "channel_names.0"]))
    head, _, sub = key.partition(".")
    target = meta[head] if sub else meta
    if draw(st.booleans()):
        target.pop(sub or head, None)
    else:
        target[sub or head] = draw(JSON_VALUES)
    return json.dumps(meta).encode()


@fuzz(60)
@given(content=dataset_json_bytes())
def test_dataset_json_damaged(tmp_path, content) -> None:
    (tmp_path / "dataset.json").write_bytes(content)
    try:
        meta = load_dataset_json(tmp_path)
    except SatsError as exc:
        check_error(exc, str(tmp_path / "dataset.json"))
        return
    assert isinstance(meta, dict) and set(VALID_META) <= set(meta)
