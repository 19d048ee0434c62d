"""Dataset layout and `sats check`: a valid dataset passes; each kind of breakage is one
problem line naming the file; warnings for empty labels and non-HU images; real OpenKBP."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sats.cli import app
from sats.data.dataset import (
    Case,
    check_dataset,
    ct_intensity_warning,
    foreground_name,
    list_cases,
    load_dataset_json,
)
from sats.data.io import read_image, write_image
from sats.geometry.volume import SatsError, Volume

SHAPE = (8, 16, 16)  # (z, y, x)
GEO = dict(spacing=(2.5, 1.0, 1.0), origin=(-8.0, -8.0, 20.0))
META = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "GTV": 1}, "numTraining": 3, "file_ending": ".nii.gz"}


def ct_array(seed: int = 0) -> np.ndarray:
    """Air outside, soft tissue inside, a bone ring: a CT in HU."""
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    r = np.hypot(y - 7.5, x - 7.5)
    ct = np.where(r < 7, 40, -1000) + np.where((r > 5) & (r < 6.5), 700, 0)
    return (ct + np.random.default_rng(seed).normal(0, 5, SHAPE)).astype(np.int16)


def label_array() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[3:6, 6:9, 4:7] = 1
    return lab


def make_dataset(root: Path, tr: tuple[str, ...] = ("case_000", "case_001", "case_002"), ts: tuple[str, ...] = ("case_100",)) -> Path:
    for split, ids in (("Tr", tr), ("Ts", ts)):
        for i, cid in enumerate(ids):
            write_image(Volume(ct_array(i), **GEO), root / f"images{split}" / f"{cid}_0000.nii.gz")
            write_image(Volume(label_array(), **GEO), root / f"labels{split}" / f"{cid}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({**META, "numTraining": len(tr)}))
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


def lbl(root: Path, cid: str = "case_001", split: str = "Tr") -> Path:
    return root / f"labels{split}" / f"{cid}.nii.gz"


def img(root: Path, cid: str = "case_001", split: str = "Tr") -> Path:
    return root / f"images{split}" / f"{cid}_0000.nii.gz"


def rewrite_label(root: Path, **geometry) -> None:
    write_image(Volume(label_array(), **{**GEO, **geometry}), lbl(root))


def problems_for(report, path: Path) -> list[str]:
    return [p for p in report.problems if p.startswith(str(path))]


# ------------------------------------------------------------------ valid dataset and listing


def test_valid_dataset_passes_with_a_row_per_case(data: Path) -> None:
    report = check_dataset(data)
    assert report.ok and report.problems == [] and report.warnings == []
    assert [(r.case_id, r.split) for r in report.rows] == [
        ("case_000", "Tr"), ("case_001", "Tr"), ("case_002", "Tr"), ("case_100", "Ts")]
    row = report.rows[0]
    assert row.size == (16, 16, 8) and row.spacing == (1.0, 1.0, 2.5)
    assert row.label_ml == pytest.approx(27 * 2.5 / 1000)
    assert row.hu_min < -900 and row.hu_max > 600


def test_list_cases_sorted_with_labels_and_file_ending_from_dataset_json(data: Path) -> None:
    lbl(data, "case_002").unlink()
    cases = list_cases(data)
    assert [c.case_id for c in cases] == ["case_000", "case_001", "case_002"]
    assert cases[0] == Case("case_000", img(data, "case_000"), lbl(data, "case_000"), "Tr")
    assert cases[2].label is None
    assert [c.case_id for c in list_cases(data, "Ts")] == ["case_100"]
    with pytest.raises(SatsError, match="split"):
        list_cases(data, "Val")
    (data / "dataset.json").unlink()
    with pytest.raises(SatsError, match="dataset.json"):
        list_cases(data)
    assert len(list_cases(data, file_ending=".nii.gz")) == 3


def test_test_split_without_labels_is_fine(data: Path) -> None:
    shutil.rmtree(data / "labelsTs")
    report = check_dataset(data)
    assert report.ok, report.problems
    assert report.rows[-1].label_ml is None


def test_load_dataset_json_and_foreground_name(data: Path) -> None:
    meta = load_dataset_json(data)
    assert foreground_name(meta) == "GTV"


@pytest.mark.parametrize(
    "change, words",
    [
        ({"channel_names": {"0": "MRI"}}, "CT"),
        ({"channel_names": {"0": "CT", "1": "PET"}}, "single CT channel"),
        ({"labels": {"background": 0, "GTV": 1, "nodes": 2}}, "one foreground"),
        ({"labels": {"background": 0, "GTV": 2}}, "one foreground"),
        ({"labels": {"background": 1, "GTV": 0}}, "one foreground"),
        ({"numTraining": "3"}, "numTraining"),
        ({"file_ending": ".png"}, "file_ending"),
        ({"labels": None, "channel_names": None}, "labels"),
    ],
)
def test_dataset_json_contents_are_validated(data: Path, change: dict, words: str) -> None:
    meta = {**META, **change}
    meta = {k: v for k, v in meta.items() if v is not None}
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(SatsError, match=words) as info:
        load_dataset_json(data)
    assert str(info.value).startswith(str(data / "dataset.json"))
    assert "\n" not in str(info.value)


def test_channel_name_is_case_insensitive(data: Path) -> None:
    (data / "dataset.json").write_text(json.dumps({**META, "channel_names": {"0": "ct"}}))
    assert load_dataset_json(data)["numTraining"] == 3


# ------------------------------------------------------------------ problems, one per broken file


def _missing_label(root: Path) -> Path:
    lbl(root).unlink()
    return img(root)


def _orphan_label(root: Path) -> Path:
    write_image(Volume(label_array(), **GEO), lbl(root, "case_009"))
    return lbl(root, "case_009")


def _missing_ts_label(root: Path) -> Path:
    lbl(root, "case_100", "Ts").unlink()
    return img(root, "case_100", "Ts")


def _spacing(root: Path) -> Path:
    rewrite_label(root, spacing=(2.5, 1.0, 1.01))
    return lbl(root)


def _origin(root: Path) -> Path:
    rewrite_label(root, origin=(-8.0, -8.0, 20.5))
    return lbl(root)


def _direction(root: Path) -> Path:
    rewrite_label(root, direction=np.diag([-1.0, 1.0, 1.0]))
    return lbl(root)


def _size(root: Path) -> Path:
    write_image(Volume(np.zeros((8, 16, 15), np.uint8), **GEO), lbl(root))
    return lbl(root)


def _label_value_2(root: Path) -> Path:
    lab = label_array()
    lab[0, 0, 0] = 2
    write_image(Volume(lab, **GEO), lbl(root))
    return lbl(root)


def _num_training(root: Path) -> Path:
    (root / "dataset.json").write_text(json.dumps({**META, "numTraining": 5}))
    return root / "dataset.json"


def _invalid_json(root: Path) -> Path:
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"},')
    return root / "dataset.json"


def _truncated_image(root: Path) -> Path:
    raw = img(root).read_bytes()
    img(root).write_bytes(raw[: len(raw) // 2])
    return img(root)


def _truncated_label(root: Path) -> Path:
    raw = lbl(root).read_bytes()
    lbl(root).write_bytes(raw[: len(raw) - 12])  # drop the gzip trailer and a little data
    return lbl(root)


def _second_channel(root: Path) -> Path:
    shutil.copy(img(root), root / "imagesTr" / "case_001_0001.nii.gz")
    return root / "imagesTr" / "case_001_0001.nii.gz"


def _no_channel_suffix(root: Path) -> Path:
    shutil.copy(img(root), root / "imagesTr" / "case_003.nii.gz")
    return root / "imagesTr" / "case_003.nii.gz"


@pytest.mark.parametrize(
    "breakage, words",
    [
        (_orphan_label, "label without an image"),
        (_missing_ts_label, "no label"),
        (_spacing, "spacing"),
        (_origin, "origin"),
        (_direction, "direction"),
        (_size, "size"),
        (_label_value_2, "found 2"),
        (_num_training, "numTraining is 5"),
        (_invalid_json, "invalid JSON"),
        (_truncated_image, "truncated"),
        (_truncated_label, "truncated"),
        (_second_channel, "extra channel"),
        (_no_channel_suffix, "_0000"),
    ],
)
def test_each_breakage_is_one_problem_naming_the_file(data: Path, breakage, words: str) -> None:
    path = breakage(data)
    report = check_dataset(data)
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith(f"{path}: "), report.problems
    assert words in report.problems[0]
    assert "\n" not in report.problems[0]


def test_training_image_without_label_is_an_unlabelled_ct(data: Path) -> None:
    _missing_label(data)
    report = check_dataset(data)
    assert report.ok, report.problems
    assert report.unlabelled == ["case_001"]
    for f in (data / "labelsTr").iterdir():
        f.unlink()
    report = check_dataset(data)
    assert not report.ok and "no training image has a label" in report.problems[0]


def test_all_problems_are_reported_in_one_run(data: Path) -> None:
    expected = [_invalid_json(data), _truncated_image(data), _label_value_2(data), _orphan_label(data), _second_channel(data)]
    write_image(Volume(label_array(), **{**GEO, "origin": (0.0, 0.0, 0.0)}), lbl(data, "case_002"))
    expected.append(lbl(data, "case_002"))
    report = check_dataset(data)
    # dataset.json is broken, but the file ending is guessed and every case is still read.
    assert len(report.rows) == 4
    for path in expected:
        assert problems_for(report, path), (path, report.problems)
    assert len(report.problems) == len(expected)


def test_unreadable_image_keeps_its_label_checked(data: Path) -> None:
    _truncated_image(data)
    _label_value_2(data)
    report = check_dataset(data)
    assert problems_for(report, img(data)) and problems_for(report, lbl(data))


def test_missing_dataset_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SatsError, match="no such dataset folder"):
        check_dataset(tmp_path / "nope")


# ------------------------------------------------------------------ warnings


def test_empty_label_warns_naming_the_label(data: Path) -> None:
    write_image(Volume(np.zeros(SHAPE, np.uint8), **GEO), lbl(data))
    report = check_dataset(data)
    assert report.ok
    assert report.warnings == [f"{lbl(data)}: empty label (no foreground voxel)"]


def test_non_hu_image_warns_naming_the_image(data: Path) -> None:
    ct8 = np.clip(ct_array().astype(np.int32) + 1000, 0, 2000) * 255 // 2000
    write_image(Volume(ct8.astype(np.uint8), **GEO), img(data))
    report = check_dataset(data)
    assert report.ok
    assert len(report.warnings) == 1 and report.warnings[0].startswith(f"{img(data)}: ")
    assert "8-bit" in report.warnings[0]


def test_file_with_another_ending_warns_and_is_ignored(data: Path) -> None:
    write_image(Volume(label_array(), **GEO), data / "labelsTr" / "case_005.nii", compress=False)
    report = check_dataset(data)
    assert report.ok and report.warnings[0].startswith(str(data / "labelsTr" / "case_005.nii"))


@pytest.mark.parametrize(
    "lo, hi, words",
    [(-1024, 3071, None), (-3024, 1500, None), (0, 255, "8-bit"), (0, 4095, "12-bit"),
     (-200, 2000, "no air"), (-1000, 100, "no bone"), (-1.0, 1.0, "no air")],
)
def test_ct_intensity_rule(lo: float, hi: float, words: str | None) -> None:
    why = ct_intensity_warning(lo, hi)
    assert (why is None) if words is None else (words in why)


# ------------------------------------------------------------------ the CLI


def test_cli_check_valid_exits_0_and_prints_the_table(data: Path) -> None:
    result = CliRunner().invoke(app, ["check", str(data)])
    assert result.exit_code == 0, result.output
    for cid in ("case_000", "case_001", "case_002", "case_100"):
        assert cid in result.stdout
    assert "label ml" in result.stdout and "valid" in result.stdout
    assert result.stderr == ""


def test_cli_check_broken_exits_1_with_one_line_per_problem(data: Path) -> None:
    broken = [_missing_ts_label(data), _orphan_label(data), lbl(data, "case_000")]
    write_image(Volume(label_array(), **{**GEO, "spacing": (2.5, 1.1, 1.0)}), lbl(data, "case_000"))
    result = CliRunner().invoke(app, ["check", str(data)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    error_lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(error_lines) == 3, result.stderr
    for path in broken:
        assert any(ln.startswith(f"error: {path}: ") for ln in error_lines), (path, error_lines)
    assert "3 problem(s)" in result.stdout


def test_cli_check_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["check", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such dataset folder"]


# ------------------------------------------------------------------ real data (OpenKBP)


REAL_TR = ("kbp_train_1", "kbp_train_10", "kbp_val_202")
REAL_TS = ("kbp_test_242",)


def real_subset(openkbp: Path, root: Path) -> Path:
    """Symlinks to a few real OpenKBP cases, with dataset.json adjusted to them."""
    for split, ids in (("Tr", REAL_TR), ("Ts", REAL_TS)):
        for cid in ids:
            for src, dst in ((img(openkbp, cid, split), img(root, cid, split)), (lbl(openkbp, cid, split), lbl(root, cid, split))):
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(src)
    meta = json.loads((openkbp / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(REAL_TR)}))
    return root


def test_real_openkbp_subset_passes_and_matches_cases_csv(openkbp: Path, tmp_path: Path) -> None:
    data = real_subset(openkbp, tmp_path / "kbp")
    assert foreground_name(load_dataset_json(openkbp)) == "PTV70"
    report = check_dataset(data)
    assert report.ok and report.warnings == [], (report.problems, report.warnings)
    assert [r.case_id for r in report.rows] == sorted(REAL_TR) + list(REAL_TS)
    with open(openkbp / "cases.csv", newline="") as fh:
        ref = {row["case"]: row for row in csv.DictReader(fh)}
    for r in report.rows:
        assert r.size == (128, 128, 128)
        assert r.spacing == pytest.approx([float(ref[r.case_id][f"spacing_{a}_mm"]) for a in "xyz"], abs=1e-3)
        assert r.label_ml == pytest.approx(float(ref[r.case_id]["ptv70_ml"]), abs=0.01)
        assert r.hu_min == -1024 and 1000 < r.hu_max <= 3071


def test_real_openkbp_label_from_another_case_is_a_geometry_problem(openkbp: Path, tmp_path: Path) -> None:
    data = real_subset(openkbp, tmp_path / "kbp")
    a, b = "kbp_train_1", "kbp_train_10"  # 3.91 x 3.91 x 2.5 mm vs 4.68 x 4.68 x 3 mm
    assert read_image(img(openkbp, a)).spacing != read_image(img(openkbp, b)).spacing
    lbl(data, a).unlink()
    lbl(data, a).symlink_to(lbl(openkbp, b))
    report = check_dataset(data)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"{lbl(data, a)}: geometry differs") and "spacing" in report.problems[0]


def test_real_openkbp_truncated_copy_is_reported(openkbp: Path, tmp_path: Path) -> None:
    data = real_subset(openkbp, tmp_path / "kbp")
    target = img(data, "kbp_test_242", "Ts")
    raw = target.read_bytes()
    target.unlink()
    target.write_bytes(raw[: len(raw) * 3 // 4])
    with gzip.open(target) as fh, pytest.raises(EOFError):
        fh.read()
    report = check_dataset(data)
    assert [p.split(": ")[0] for p in report.problems] == [str(target)]
