"""The nnU-Net v2 raw dataset layout: list its cases and check it before training.

Layout (https://github.com/MIC-DKFZ/nnUNet/blob/master/documentation/dataset_format.md)::

    root/
      dataset.json                      channel_names {"0": "CT"}, labels {"background": 0, "GTV": 1},
                                        numTraining, file_ending (e.g. ".nii.gz")
      imagesTr/{case}_0000{ending}      CT in HU (one channel only: SATs works on CT alone)
      labelsTr/{case}{ending}           0 = background, 1 = the one foreground structure
      imagesTs/{case}_0000{ending}      optional test split
      labelsTs/{case}{ending}           optional; when present every test image needs one

:func:`list_cases` is what later stages use to find cases; :func:`check_dataset` is the
``sats check`` command: it reads every file once and reports *all* problems in one run.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sats.data.io import IMAGE_SUFFIXES, read_image
from sats.geometry.volume import SatsError, Volume
from sats.progress import progress_bar

SPLITS = ("Tr", "Ts")
REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")

# CT-intensity plausibility (warnings, not problems). A head-and-neck planning CT always
# holds air around the patient (about -1000 HU) and bone (skull, mandible, vertebrae,
# several hundred HU or more). No voxel below AIR_MAX_HU means no air, which in practice
# means the values are not HU (e.g. raw stored values without the rescale intercept,
# or an 8-bit export); no voxel above BONE_MIN_HU means no bone, i.e. values squashed
# into a small range (normalised or windowed images).
AIR_MAX_HU = -500.0
BONE_MIN_HU = 200.0

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Case:
    """One case of a split: its CT (channel ``_0000``) and its label, if any."""

    case_id: str
    image: Path
    label: Path | None
    split: str = "Tr"


@dataclass
class CaseRow:
    """What ``sats check`` learned about one case (one line of the table)."""

    case_id: str
    split: str
    size: tuple[int, int, int] | None = None  # (x, y, z) voxels
    spacing: tuple[float, float, float] | None = None  # (x, y, z) mm
    label_ml: float | None = None
    hu_min: float | None = None
    hu_max: float | None = None
    n_problems: int = 0
    n_warnings: int = 0
    unlabelled: bool = False  # a training image without a label: an unlabelled CT


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`. Every problem and warning starts with a file path."""

    root: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rows: list[CaseRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unlabelled(self) -> list[str]:
        """Training case ids without a label (unlabelled CTs, used by the margin loss only)."""
        return [r.case_id for r in self.rows if r.unlabelled]


# ---------------------------------------------------------------------------- dataset.json


def dataset_json_problems(meta: object) -> list[str]:
    """What is wrong with parsed dataset.json contents (empty list: nothing).

    Only what SATs supports is accepted: one channel named CT, and labels exactly
    ``background: 0`` plus one foreground name with value 1.
    """
    if not isinstance(meta, dict):
        return ["expected a JSON object at the top level"]
    out = []
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        hint = " (this looks like nnU-Net v1: v2 uses channel_names instead of modality)" if "modality" in meta else ""
        out.append(f"missing key(s) {', '.join(missing)}{hint}")
    channels = meta.get("channel_names")
    if "channel_names" in meta:
        if not isinstance(channels, dict) or len(channels) != 1 or "0" not in channels:
            out.append(f'channel_names must be {{"0": "CT"}} (a single CT channel), got {json.dumps(channels)}')
        elif not isinstance(channels["0"], str) or channels["0"].strip().lower() != "ct":
            out.append(f'channel_names["0"] must be "CT" (SATs segments CT only), got {json.dumps(channels["0"])}')
    labels = meta.get("labels")
    if "labels" in meta:
        ok = (
            isinstance(labels, dict)
            and len(labels) == 2
            and _is_int(labels.get("background"), 0)
            and sum(_is_int(v, 1) for v in labels.values()) == 1
        )
        if not ok:
            out.append(f'labels must be {{"background": 0, "<name>": 1}} (one foreground structure), got {json.dumps(labels)}')
    if "numTraining" in meta and not (_is_int(meta["numTraining"]) and meta["numTraining"] >= 0):
        out.append(f"numTraining must be a non-negative integer, got {json.dumps(meta['numTraining'])}")
    ending = meta.get("file_ending")
    if "file_ending" in meta and (not isinstance(ending, str) or ending.lower() not in IMAGE_SUFFIXES):
        out.append(f"file_ending must be one of {', '.join(IMAGE_SUFFIXES)}, got {json.dumps(ending)}")
    return out


def _is_int(value: object, expected: int | None = None) -> bool:
    # bool is an int subclass in Python; true/false in JSON is not a label value.
    return isinstance(value, int) and not isinstance(value, bool) and (expected is None or value == expected)


def load_dataset_json(root: Path) -> dict:
    """Read and validate ``root/dataset.json``.

    Raises:
        SatsError: naming the file when it is missing, not valid JSON, lacks a required
            key, has other channels than a single CT, or labels other than
            background = 0 plus one foreground = 1.
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise SatsError(f"{path}: missing (an nnU-Net v2 dataset needs dataset.json)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SatsError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SatsError(f"{path}: unreadable ({exc})") from None
    problems = dataset_json_problems(meta)
    if problems:
        raise SatsError(f"{path}: " + "; ".join(problems))
    return meta


def foreground_name(meta: dict) -> str:
    """The name of label 1 in a validated dataset.json (e.g. ``"GTV"``, ``"PTV70"``)."""
    return next(name for name, value in meta["labels"].items() if name != "background" and value == 1)


# ---------------------------------------------------------------------------- case listing


@dataclass
class _Scan:
    """Everything found in one split's folders, including what does not fit the layout."""

    cases: list[Case]
    extra_channels: list[Path]  # {case}_0001... files
    no_channel_0: list[Path]  # {case}_0001 without a {case}_0000
    misnamed: list[Path]  # image files without a _XXXX channel suffix
    orphan_labels: list[Path]  # labels without an image
    other_files: list[Path]  # not ending in file_ending


def _files(folder: Path) -> list[Path]:
    # Hidden files (macOS "._x", atomic-write temporaries) are not part of a dataset.
    # Broken symlinks are kept on purpose: reading them reports them.
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())


def _scan(root: Path, split: str, ending: str) -> _Scan:
    images, labels = root / f"images{split}", root / f"labels{split}"
    ending_l = ending.lower()
    channel0: dict[str, Path] = {}
    others: dict[str, list[Path]] = {}
    misnamed, other_files = [], []
    for f in _files(images):
        if not f.name.lower().endswith(ending_l):
            other_files.append(f)
            continue
        m = _CHANNEL.match(f.name[: -len(ending)])
        if m is None:
            misnamed.append(f)
        elif m["channel"] == "0000":
            channel0[m["case"]] = f
        else:
            others.setdefault(m["case"], []).append(f)
    label_files: dict[str, Path] = {}
    for f in _files(labels):
        if f.name.lower().endswith(ending_l):
            label_files[f.name[: -len(ending)]] = f
        else:
            other_files.append(f)
    cases = [Case(cid, channel0[cid], label_files.get(cid), split) for cid in sorted(channel0)]
    extra = sorted(f for cid, fs in others.items() if cid in channel0 for f in fs)
    no0 = sorted(f for cid, fs in others.items() if cid not in channel0 for f in fs)
    orphans = sorted(f for cid, f in label_files.items() if cid not in channel0)
    return _Scan(cases, extra, no0, misnamed, orphans, other_files)


def list_cases(root: Path, split: str = "Tr", file_ending: str | None = None) -> list[Case]:
    """The cases of a split, sorted by case id.

    A case is an ``images{split}/{case}_0000{ending}`` file; ``label`` is
    ``labels{split}/{case}{ending}`` or None when that file does not exist. Files that
    do not fit the layout (other channels, other endings, labels without an image) are
    not listed here: :func:`check_dataset` reports them.

    Args:
        root: dataset folder.
        split: ``"Tr"`` or ``"Ts"``.
        file_ending: e.g. ``".nii.gz"``; None reads it from dataset.json (validated).
    """
    if split not in SPLITS:
        raise SatsError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root)
    if file_ending is None:
        file_ending = load_dataset_json(root)["file_ending"]
    return _scan(root, split, file_ending).cases


# ---------------------------------------------------------------------------- checking


def ct_intensity_warning(hu_min: float, hu_max: float) -> str | None:
    """Why an image's value range does not look like CT in HU, or None when it does.

    Rule: warn when min > -500 (no air) or max < 200 (no bone); see AIR_MAX_HU.
    The message names the likely cause for the common 0..255 and 0..4095 ranges.
    """
    if hu_min <= AIR_MAX_HU and hu_max >= BONE_MIN_HU:
        return None
    rng = f"values {hu_min:g}..{hu_max:g}"
    if hu_min >= 0 and hu_max <= 255:
        return f"{rng} look like an 8-bit image, not CT in HU"
    if hu_min >= 0 and hu_max <= 4095:
        return f"{rng} look like raw 12-bit scanner values (rescale intercept, e.g. -1024, not applied?), not HU"
    if hu_min > AIR_MAX_HU:
        return f"{rng}: no air (nothing below {AIR_MAX_HU:g}), not CT in HU?"
    return f"{rng}: no bone (nothing above {BONE_MIN_HU:g}), normalised or windowed rather than HU?"


def _read(path: Path, problems: list[str]) -> Volume | None:
    try:
        return read_image(path)
    except SatsError as exc:
        problems.append(str(exc))
    except OSError as exc:  # permission errors and the like: report, keep going
        problems.append(f"{path}: unreadable ({exc.strerror or exc})")
    return None


def _check_case(case: Case, labels_expected: bool) -> tuple[CaseRow, list[str], list[str]]:
    """Read one case's image and label once each; return its row, problems and warnings."""
    problems: list[str] = []
    warnings: list[str] = []
    row = CaseRow(case.case_id, case.split)
    image = _read(case.image, problems)
    if image is not None:
        row.size = image.shape[::-1]
        row.spacing = image.spacing[::-1]
        if image.array.size:
            row.hu_min, row.hu_max = float(image.array.min()), float(image.array.max())
            why = ct_intensity_warning(row.hu_min, row.hu_max)
            if why:
                warnings.append(f"{case.image}: {why}")
    if case.label is None:
        if labels_expected:
            problems.append(f"{case.image}: no label (expected {_expected_label(case)})")
        elif case.split == "Tr":
            row.unlabelled = True
    else:
        label = _read(case.label, problems)
        if label is not None:
            if image is not None and (diff := image.same_geometry(label)):
                problems.append(f"{case.label}: geometry differs from its image {case.image.name} (image vs label): {diff}")
            arr = label.array
            bad = arr[(arr != 0) & (arr != 1)]
            if bad.size:
                values = np.unique(bad)
                shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if values.size > 5 else "")
                problems.append(f"{case.label}: label values must be 0 or 1, found {shown} ({bad.size} voxels)")
            n_fg = int(np.count_nonzero(arr == 1))
            row.label_ml = n_fg * label.voxel_volume_ml
            if n_fg == 0:
                warnings.append(f"{case.label}: empty label (no foreground voxel)")
    row.n_problems, row.n_warnings = len(problems), len(warnings)
    return row, problems, warnings


def _expected_label(case: Case) -> Path:
    ending = case.image.name[len(case.case_id) + len("_0000"):]
    return case.image.parent.parent / f"labels{case.split}" / f"{case.case_id}{ending}"


def check_dataset(root: Path, console: Console | None = None, workers: int = 2) -> CheckReport:
    """Validate an nnU-Net v2 raw dataset for SATs; report every problem found.

    Problems (the dataset is not usable as is): invalid dataset.json; a test image
    without a label when labelsTs exists; a label without an image; channel files other
    than ``_0000``; image files not named ``{case}_0000{ending}``; image and label
    differing in size, spacing, origin or direction (1e-3 mm); label values other than
    0 and 1; numTraining not the number of imagesTr cases; unreadable or truncated files.

    Training images without a label are unlabelled CTs (``report.unlabelled``; SATs uses
    them for the margin loss only), counted in the summary; every training case without
    a label is a problem only when none has one.

    Warnings: empty labels; image values that do not look like CT in HU
    (:func:`ct_intensity_warning`); files with another ending (ignored); a case id in
    both splits.

    Args:
        root: dataset folder.
        console: where to show a progress bar (None, or not a terminal: no progress bar).
        workers: reading threads; SimpleITK and zlib release the GIL while decoding.

    Raises:
        SatsError: only when ``root`` is not a folder; everything else is in the report.
    """
    start = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise SatsError(f"{root}: no such dataset folder")
    report = CheckReport(root)
    try:
        meta: dict | None = load_dataset_json(root)
    except SatsError as exc:
        report.problems.append(str(exc))
        meta = None
    # A usable file ending lets us carry on checking files even when dataset.json is broken.
    ending = meta["file_ending"] if meta else _guess_ending(root)

    jobs: list[tuple[Case, bool]] = []
    cases_by_split: dict[str, list[Case]] = {}
    extra_per_case: dict[tuple[str, str], int] = {}
    for split in SPLITS:
        images, labels = root / f"images{split}", root / f"labels{split}"
        if split == "Tr" and not images.is_dir():
            report.problems.append(f"{images}: missing (the training images folder)")
        scan = _scan(root, split, ending)
        cases_by_split[split] = scan.cases
        # A training image without a label is an unlabelled CT (sats train uses it for the
        # margin loss); a test image needs one only where labelsTs exists.
        labels_expected = split == "Ts" and labels.is_dir()
        if labels.is_dir() and not images.is_dir():
            report.problems.append(f"{labels}: labels without an images{split} folder")
        jobs += [(c, labels_expected) for c in scan.cases]
        for f in scan.orphan_labels:
            report.problems.append(f"{f}: label without an image (expected {images / (f.name[: -len(ending)] + '_0000' + ending)})")
        for f in scan.extra_channels:
            key = (split, _CHANNEL.match(f.name[: -len(ending)])["case"])  # type: ignore[index]
            extra_per_case[key] = extra_per_case.get(key, 0) + 1
            report.problems.append(f"{f}: extra channel file: SATs uses one channel, CT (_0000), only")
        for f in scan.no_channel_0:
            report.problems.append(f"{f}: channel file without a matching _0000 (CT) image")
        for f in scan.misnamed:
            report.problems.append(f"{f}: image not named {{case}}_0000{ending} (the nnU-Net channel suffix is missing)")
        for f in scan.other_files:
            report.warnings.append(f"{f}: ignored (not a {ending} file)")
    report.problems += _training_split_problems(root, cases_by_split["Tr"], meta, ending)
    for cid in sorted({c.case_id for c in cases_by_split["Tr"]} & {c.case_id for c in cases_by_split["Ts"]}):
        report.warnings.append(f"{root / 'imagesTs'}: case {cid} is also in imagesTr (same patient in both splits?)")

    for row, problems, warnings in _check_cases(jobs, console, workers):
        row.n_problems += extra_per_case.get((row.split, row.case_id), 0)  # _0001... files are this case's too
        report.rows.append(row)
        report.problems += problems
        report.warnings += warnings
    report.seconds = time.perf_counter() - start
    return report


def _training_split_problems(root: Path, train: list[Case], meta: dict | None, ending: str) -> list[str]:
    """What is wrong with imagesTr as a whole: no images, no label at all, numTraining off."""
    problems = []
    if train and all(c.label is None for c in train):
        problems.append(f"{root / 'labelsTr'}: no training image has a label")
    if not train and (root / "imagesTr").is_dir():
        problems.append(f"{root / 'imagesTr'}: no {{case}}_0000{ending} images")
    if meta is not None and meta["numTraining"] != len(train):
        problems.append(f"{root / 'dataset.json'}: numTraining is {meta['numTraining']} but imagesTr holds {len(train)} case(s)")
    return problems


def _check_cases(jobs: list[tuple[Case, bool]], console: Console | None, workers: int) -> list:
    """Read and check every case's files in threads; results in case order (Tr then Ts,
    sorted ids), whatever order the threads finished in."""
    results: list = [None] * len(jobs)
    progress = progress_bar(console if console is not None and console.is_terminal else None, transient=True)
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        with progress:
            task = progress.add_task("checking", total=len(jobs))
            futures = {pool.submit(_check_case, case, expected): i for i, (case, expected) in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                progress.advance(task)
    finally:
        # On Ctrl-C (or a bug) do not read the remaining hundreds of files first.
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _guess_ending(root: Path) -> str:
    """The most common image suffix in imagesTr (when dataset.json cannot say)."""
    counts: dict[str, int] = {}
    for f in _files(root / "imagesTr"):
        suffix = next((s for s in IMAGE_SUFFIXES if f.name.lower().endswith(s)), None)
        if suffix:
            counts[suffix] = counts.get(suffix, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else ".nii.gz"


# ---------------------------------------------------------------------------- reporting


def print_report(report: CheckReport, console: Console, err_console: Console) -> None:
    """One table per split and a summary on ``console``; one line per warning/problem on ``err_console``."""
    for split in SPLITS:
        rows = [r for r in report.rows if r.split == split]
        if rows:
            console.print(_table(rows, f"{report.root / ('images' + split)}: {len(rows)} case(s)"))
    for w in report.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    for p in report.problems:
        err_console.print(f"[bold red]error:[/] {escape(p)}", highlight=False, soft_wrap=True)
    n = {s: sum(r.split == s for r in report.rows) for s in SPLITS}
    verdict = "[green]valid[/]" if report.ok else f"[bold red]{len(report.problems)} problem(s)[/]"
    unlabelled = f" ({len(report.unlabelled)} unlabelled: the margin loss only)" if report.unlabelled else ""
    console.print(
        f"{verdict}: {n['Tr']} training{unlabelled} and {n['Ts']} test case(s), {len(report.warnings)} warning(s), "
        f"checked in {report.seconds:.1f} s",
        highlight=False,
    )


def _table(rows: list[CaseRow], title: str) -> Table:
    # Sized to fit an 80-column terminal: every column no_wrap, padding collapsed.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title=escape(title), title_justify="left")
    for name, justify in (("case", "left"), ("size x×y×z", "left"), ("spacing mm", "left"),
                          ("label ml", "right"), ("HU min..max", "right"), ("status", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            escape(r.case_id),
            "×".join(str(s) for s in r.size) if r.size else "-",
            "×".join(f"{s:.3g}" for s in r.spacing) if r.spacing else "-",
            f"{r.label_ml:.1f}" if r.label_ml is not None else "-",
            f"{r.hu_min:g}..{r.hu_max:g}" if r.hu_min is not None else "-",
            _status(r),
        )
    return table


def _status(row: CaseRow) -> str:
    if row.unlabelled and not row.n_problems:
        return "[cyan]unlabelled[/]"
    if row.n_problems:
        return f"[red]{row.n_problems} problem{'s' if row.n_problems > 1 else ''}[/]"
    if row.n_warnings:
        return f"[yellow]{row.n_warnings} warning{'s' if row.n_warnings > 1 else ''}[/]"
    return "[green]ok[/]"


def check_ct(volume: Volume, name: str) -> None:
    """Refuse images that are not 3D CT in HU (a clear message rather than a silent bad mask);
    the rule is :func:`sats.data.dataset.ct_intensity_warning`'s."""
    if min(volume.shape) < 2:
        raise SatsError(f"{name}: a 3D CT is needed, got size {volume.shape[::-1]} (x, y, z)")
    problem = ct_intensity_warning(float(volume.array.min()), float(volume.array.max()))
    if problem:
        raise SatsError(f"{name}: {problem}")


def split_folds(ids: list[str], folds: int, fold: int | str, seed: int = 12345) -> tuple[list[str], list[str]]:
    """Train/validation ids for ``fold`` of a ``folds``-fold split by case id (fixed seed)."""
    if fold == "all":
        return sorted(ids), []
    fold = int(fold)
    if not 0 <= fold < folds:
        raise SatsError(f"fold {fold} out of range 0..{folds - 1}")
    order = sorted(ids)
    np.random.default_rng(seed).shuffle(order)
    val = sorted(order[fold::folds])
    return sorted(set(ids) - set(val)), val
