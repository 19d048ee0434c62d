"""Faults, each a test: training killed, a full disk at every write site, damaged RUN files,
two processes on one folder.

What every fault must leave behind: a resumable RUN folder (a killed training run loses at
most the epoch in progress, and the resumed run ends with the same weights as one never
interrupted), or one ``error:`` line on stderr naming the file, exit code 1, no traceback,
the previous file under that name byte for byte, and no partial or temporary file.

The training runs are tiny (5 epochs of one iteration, 16 x 32 x 32 patches, 8 base
features); the kills and the concurrent runs use real processes (``python -m sats``), the rest
runs in-process through the CLI.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OUTPUT_BIAS
from test_training import make_tiny_dataset
from typer.testing import CliRunner

from sats.cli import app
from sats.data.io import read_image, write_image
from sats.geometry.volume import SatsError, Volume

SATS = [sys.executable, "-m", "sats"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
EPOCHS = 5
#: One short configuration for every run in this file (the cpu preset, shrunk).
TRAIN_OPTIONS = ["--preset", "cpu", "--epochs", str(EPOCHS), "--iters-per-epoch", "1", "--patch-size", "16", "32", "32",
                 "--no-align", "--fold", "all", "--seed", "0", "--device", "cpu"]


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", str(data), "--out", str(run), *TRAIN_OPTIONS, *extra]


def resume_args(data: Path, run: Path) -> list[str]:
    """The command line that continues an interrupted run."""
    return train_args(data, run, "--resume")


@contextmanager
def one_thread():
    """Single-threaded torch, as in the subprocesses (ENV), so that results agree bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def invoke(args: list[str]):
    with one_thread():
        return CliRunner().invoke(app, args, catch_exceptions=True)


def assert_one_error_line(result, *names: str, words: str = "") -> str:
    """Exit 1, one stderr line naming (one of) ``names`` and containing ``words``, no traceback."""
    stderr = result.stderr
    assert result.exit_code == 1, (result.exit_code, repr(result.exception), result.output[-2000:])
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert any(n in lines[0] for n in names), (lines[0], names)
    assert words.lower() in lines[0].lower(), (lines[0], words)
    return lines[0]


def temp_files(folder: Path) -> list[str]:
    """Atomic-write leftovers (``.name.XXXXXXXX.tmp...``) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = weights(a)["model"], weights(b)["model"]
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def log_rows(run: Path) -> list[str]:
    path = run / "log.csv"
    return path.read_text().splitlines()[1:] if path.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, RUN folder of an uninterrupted run of TRAIN_OPTIONS), trained in-process."""
    root = tmp_path_factory.mktemp("faults")
    data = make_tiny_dataset(root / "data", n=4)
    result = invoke(train_args(data, root / "reference"))
    assert result.exit_code == 0, result.output[-3000:]
    return data, root / "reference"


# --- 1. training killed ---------------------------------------------------------------------------


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"training ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def _epoch_seconds(run: Path) -> float:
    """How long the last logged epoch took (the log's own timer)."""
    try:
        header, *rows = (run / "log.csv").read_text().splitlines()
        return float(rows[-1].split(",")[header.split(",").index("seconds")])
    except (OSError, ValueError, IndexError):
        return 0.2


def _kill_while_writing_checkpoint(proc: subprocess.Popen, run: Path) -> None:
    """SIGKILL while ``checkpoint.pt`` is being rewritten: freeze the process when its temp
    file appears, and kill it only if the file is still there (else let it go on)."""
    checkpoint = run / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("training ended before a checkpoint write could be caught")
        if checkpoint.exists() and list(run.glob(".checkpoint.pt.*.tmp*")):
            os.kill(proc.pid, signal.SIGSTOP)
            if list(run.glob(".checkpoint.pt.*.tmp*")):
                os.kill(proc.pid, signal.SIGKILL)
                return
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    proc.kill()
    pytest.fail("never caught a checkpoint write")


@pytest.mark.parametrize("when", ["random", "while-writing-checkpoint"])
def test_killed_training_resumes_to_the_same_weights(reference, tmp_path, when) -> None:
    data, ref_run = reference
    run = tmp_path / "run"
    with open(tmp_path / "killed.out", "w") as out:
        proc = subprocess.Popen([*SATS, *train_args(data, run)], env=ENV, stdout=out, stderr=subprocess.STDOUT)
        try:
            if when == "random":
                # A seeded point: a fraction u of the way into epoch k + 1 (k >= 1, so a checkpoint exists).
                rng = np.random.default_rng(11)
                k, u = int(rng.integers(1, EPOCHS - 2)), float(rng.uniform())
                _wait_for(lambda: len(log_rows(run)) >= k and (run / "checkpoint.pt").exists(), proc, what=f"epoch {k}")
                time.sleep(u * _epoch_seconds(run))
                assert proc.poll() is None, "training finished before the kill"
                os.kill(proc.pid, signal.SIGKILL)
            else:
                _kill_while_writing_checkpoint(proc, run)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    if when == "while-writing-checkpoint":
        assert list(run.glob(".checkpoint.pt.*.tmp*")), "the kill did not land during the write"
    printed = (tmp_path / "killed.out").read_text()
    # What the killed run had: epochs finished (printed or logged) and the last checkpoint.
    rows_at_kill = log_rows(run)
    finished = max([int(n) for n in re.findall(r"^\s*epoch (\d+):", printed, re.MULTILINE)] + [len(rows_at_kill)])
    checkpoint = weights(run / "checkpoint.pt")  # complete and loadable after a SIGKILL
    saved = int(checkpoint["epoch"]) + 1  # epochs in the checkpoint
    assert 1 <= saved <= EPOCHS
    assert len(rows_at_kill) <= saved, "log.csv is ahead of checkpoint.pt"
    assert finished - saved <= 1, f"{finished} epochs finished, {saved} saved: more than one epoch lost"

    result = invoke(resume_args(data, run))
    assert result.exit_code == 0, result.output[-3000:]
    assert_same_weights(run / "model.pt", ref_run / "model.pt")
    rows = log_rows(run)
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, EPOCHS + 1))
    kept = min(saved, len(rows_at_kill))
    assert rows[:kept] == rows_at_kill[:kept], "epochs saved before the kill were run again"
    # A write cut by SIGKILL leaves its hidden temporary file; the resumed run clears it.
    assert not list(run.glob(".*.tmp*")), "temporaries of the killed run are left behind"


# --- 2. out of disk space at every write site ---------------------------------------------------------


def _final_name(target: Path) -> str:
    """The file a temporary ``.name.XXXXXXXX.tmp.suffix`` stands for (else the name itself)."""
    m = re.match(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp", target.name)
    return m["name"] if m else target.name


class DiskFull:
    """Stand-in for a low-level writer: the first call aimed at ``name`` (directly or through a
    temporary file beside it) writes a few bytes, then fails with ENOSPC. ``before`` keeps what
    ``name`` held at that moment."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.final: Path | None = None
        self.before: bytes | None = None

    def hit(self, target) -> bool:
        if self.final is not None or target is None:
            return False
        path = Path(getattr(target, "name", target))
        if _final_name(path) != self.name:
            return False
        self.final = path.parent / self.name
        self.before = self.final.read_bytes() if self.final.exists() else None
        return True

    def fail(self, target) -> None:
        """Write a few bytes to ``target`` (a path or an open file), then raise ENOSPC."""
        if hasattr(target, "write"):
            target.write(b"\x93NUM" if "b" in getattr(target, "mode", "b") else "part")
            target.flush()
        else:
            with open(target, "ab") as fh:
                fh.write(b"\x00part")
        raise OSError(errno.ENOSPC, "No space left on device")

    def wrap(self, real, target_index: int = 0):
        def writer(*args, **kwargs):
            target = args[target_index] if len(args) > target_index else next(iter(kwargs.values()), None)
            if self.hit(target):
                self.fail(target)
            return real(*args, **kwargs)

        return writer

    def open(self, real_open):
        """An ``open`` whose files opened for writing ``name`` fail on their first write."""
        full = self

        class FullFile:  # a proxy whose first write fails
            def __init__(self, fh):
                self._fh = fh

            def write(self, data):
                full.fail(self._fh)

            def __getattr__(self, attr):
                return getattr(self._fh, attr)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._fh.close()
                return False

            def __iter__(self):
                return iter(self._fh)

        def opener(file, mode="r", *args, **kwargs):
            fh = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike)) and full.hit(file):
                return FullFile(fh)
            return fh

        return opener

    def check(self, folder_hint: Path | None = None) -> None:
        """After the failure: the previous file (or none) under the final name, no temp file."""
        assert self.final is not None, f"nothing was written to {self.name}"
        if self.before is None:
            assert not self.final.exists(), f"a partial {self.final} was left"
        else:
            assert self.final.read_bytes() == self.before, f"{self.final} changed"
        assert temp_files(self.final.parent) == [], temp_files(self.final.parent)


def patch_open(monkeypatch, full: DiskFull) -> None:
    opener = full.open(builtins.open)
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)


@pytest.fixture
def one_epoch_left(reference, tmp_path) -> tuple[Path, Path]:
    """A copy of the reference run whose checkpoint is wound back to one epoch before the end."""
    data, ref_run = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    ckpt = weights(run / "checkpoint.pt")
    ckpt["epoch"] = EPOCHS - 2
    ckpt["history"] = ckpt["history"][: EPOCHS - 1]
    torch.save(ckpt, run / "checkpoint.pt")
    return data, run


@pytest.mark.parametrize("name", ["checkpoint.pt", "model.pt", "log.csv"])
def test_disk_full_while_training_writes(one_epoch_left, monkeypatch, name) -> None:
    data, run = one_epoch_left
    full = DiskFull(name)
    if name.endswith(".pt"):
        monkeypatch.setattr(torch, "save", full.wrap(torch.save, target_index=1))
    else:
        patch_open(monkeypatch, full)
    result = invoke(resume_args(data, run))
    monkeypatch.undo()
    assert_one_error_line(result, name, words="cannot write")
    full.check()


def test_disk_full_while_caching_training_cases(reference, tmp_path, monkeypatch) -> None:
    data, _ = reference
    cache = tmp_path / "cache"
    cache.mkdir()
    # A stale cache (no meta.json): it is rebuilt, and the old file must survive a failed write.
    np.save(cache / "case_000_image.npy", np.arange(5))
    full = DiskFull("case_000_image.npy")
    monkeypatch.setattr(np, "save", full.wrap(np.save))
    result = invoke(train_args(data, tmp_path / "run", "--cache", str(cache)))
    monkeypatch.undo()
    assert_one_error_line(result, full.name, words="cannot write")
    full.check()


def test_disk_full_while_writing_a_mask(reference, tmp_path, monkeypatch) -> None:
    import SimpleITK as sitk

    data, run = reference
    image = next((data / "imagesTr").iterdir())
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"the previous mask")
    full = DiskFull(out.name)
    monkeypatch.setattr(sitk, "WriteImage", full.wrap(sitk.WriteImage, target_index=1))
    result = invoke(["predict", "-i", str(image), "-o", str(out), "-m", str(run)])
    monkeypatch.undo()
    assert_one_error_line(result, out.name, words="cannot write")
    full.check()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_disk_full_in_write_image(tmp_path, monkeypatch, suffix) -> None:
    import SimpleITK as sitk

    out = write_image(Volume(np.ones((2, 3, 4), np.int16)), tmp_path / f"old{suffix}")
    full = DiskFull(out.name)
    monkeypatch.setattr(sitk, "WriteImage", full.wrap(sitk.WriteImage, target_index=1))
    with pytest.raises(SatsError, match=rf"{re.escape(out.name)}: cannot write") as info:
        write_image(Volume(np.zeros((2, 3, 4), np.int16)), out)
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    full.check()
    assert read_image(out).array.max() == 1


@pytest.fixture
def dicom_case(tmp_path) -> tuple[Path, Path]:
    """(CT series folder, mask on its grid)."""
    from sats.data.dicom import write_ct_series

    ct = Volume(np.full((3, 12, 12), -1000, np.int16), spacing=(2.0, 1.0, 1.0))
    ct.array[:, 3:9, 3:9] = 40
    write_ct_series(ct, tmp_path / "ct")
    grid = read_image(tmp_path / "ct")
    mask = np.zeros(grid.shape, np.uint8)
    mask[1, 4:7, 4:8] = 1
    return tmp_path / "ct", write_image(grid.with_array(mask), tmp_path / "mask.nii.gz")


def test_disk_full_while_writing_an_rtstruct(dicom_case, tmp_path, monkeypatch) -> None:
    from pydicom.dataset import Dataset

    ct_dir, mask = dicom_case
    out = tmp_path / "RS.dcm"
    out.write_bytes(b"the previous structure set")
    full = DiskFull(out.name)
    monkeypatch.setattr(Dataset, "save_as", full.wrap(Dataset.save_as, target_index=1))
    result = invoke(["rtstruct", "--mask", str(mask), "--ct", str(ct_dir), "--out", str(out)])
    monkeypatch.undo()
    assert_one_error_line(result, out.name, words="cannot write")
    full.check()


def test_disk_full_while_writing_a_seg(dicom_case, tmp_path, monkeypatch) -> None:
    from pydicom.dataset import Dataset

    from sats.predict.export import write_seg

    ct_dir, mask = dicom_case
    out = tmp_path / "SEG.dcm"
    out.write_bytes(b"the previous segmentation")
    full = DiskFull(out.name)
    monkeypatch.setattr(Dataset, "save_as", full.wrap(Dataset.save_as, target_index=1))
    with pytest.raises(SatsError, match=rf"{re.escape(out.name)}: cannot write"):
        write_seg(read_image(mask), ct_dir, out)
    monkeypatch.undo()
    full.check()


def test_disk_full_while_writing_the_metrics_csv(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "masks"
    mask = np.zeros((3, 6, 6), np.uint8)
    mask[1, 2:4, 2:4] = 1
    write_image(Volume(mask), folder / "a.nii.gz")
    out = tmp_path / "metrics.csv"
    out.write_text("case,dsc\nprevious,1\n")
    full = DiskFull(out.name)
    patch_open(monkeypatch, full)
    result = invoke(["evaluate", "--pred", str(folder), "--gt", str(folder), "--csv", str(out)])
    monkeypatch.undo()
    assert_one_error_line(result, out.name, words="cannot write")
    full.check()


def test_disk_full_while_writing_the_ablation_csv(tmp_path, monkeypatch) -> None:
    from sats.evaluation import ablation

    out = tmp_path / "cases.csv"
    out.write_text("variant,seed,case\nprevious,0,a\n")
    full = DiskFull(out.name)
    patch_open(monkeypatch, full)
    rows = [{"variant": "unet", "seed": 0, "case": "a", **{m: 50.0 for m in ablation.METRICS}}]
    with pytest.raises(SatsError, match=r"cases\.csv: cannot write"):
        ablation._write_rows(out, rows, ("variant", "seed", "case", *ablation.METRICS))
    monkeypatch.undo()
    full.check()


def test_a_ct_slice_with_short_pixel_data_is_refused_naming_it(dicom_case) -> None:
    """Well-formed DICOM whose PixelData cannot fill Rows x Columns: GDCM would decode it
    into something; the reader refuses it, naming the slice."""
    import pydicom

    from sats.data.dicom import read_dicom_series

    ct_dir, _ = dicom_case
    victim = sorted(ct_dir.glob("*.dcm"))[1]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(victim)
    with pytest.raises(SatsError, match=rf"{victim.name}: damaged CT slice \(pixel data of 144 bytes, 288 needed"):
        read_dicom_series(ct_dir)


# --- 3. damaged RUN-folder files ----------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(5).integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    elif how == "empty":
        path.write_bytes(b"")
    else:  # "foreign": well-formed, but not what sats wrote
        if path.suffix == ".json":
            path.write_text('{"format": 1, "train": 5, "plan": [], "spacing": "x"}')
        else:
            torch.save({"format": 1, "model": {"conv.weight": torch.zeros(2)}}, path)


@pytest.fixture
def run_copy(reference, tmp_path) -> tuple[Path, Path]:
    data, ref_run = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    return data, run


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "foreign"])
@pytest.mark.parametrize("name", ["model.pt", "config.json"])
def test_predict_with_a_damaged_run_file(run_copy, tmp_path, name, how) -> None:
    data, run = run_copy
    _damage(run / name, how)
    image = next((data / "imagesTr").iterdir())
    result = invoke(["predict", "-i", str(image), "-o", str(tmp_path / "out.nii.gz"), "-m", str(run)])
    assert_one_error_line(result, name)
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "foreign"])
@pytest.mark.parametrize("name", ["checkpoint.pt", "config.json"])
def test_resume_with_a_damaged_run_file(run_copy, name, how) -> None:
    data, run = run_copy
    _damage(run / name, how)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = invoke(resume_args(data, run))
    assert_one_error_line(result, name)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == {k: v for k, v in before.items() if k != ".lock"}, "the refused resume changed the RUN folder"


def test_damaged_image_header_is_one_line_on_stderr(tmp_path) -> None:
    """C libraries print their own complaints to file descriptor 2 (niftilib: "** ERROR:
    nifti_convert_nhdr2nim: bad dim[1]"): only a real process shows whether the user sees
    one line."""
    import struct

    folder = tmp_path / "masks"
    good = write_image(Volume(np.zeros((3, 4, 5), np.uint8)), folder / "a.nii")
    raw = bytearray(good.read_bytes())
    raw[40:48] = struct.pack("<4h", 3, -1, 4, 3)  # dim[1] = -1
    (folder / "b.nii").write_bytes(bytes(raw))
    proc = subprocess.run([*SATS, "evaluate", "--pred", str(folder), "--gt", str(folder)], env=ENV,
                          capture_output=True, text=True, timeout=120, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "b.nii" in lines[0], proc.stderr


# --- 4. two processes on one folder --------------------------------------------------------------------


def test_two_predicts_writing_one_folder_leave_complete_files(reference, make_predicting_run, tmp_path) -> None:
    """Two `sats predict` runs whose models predict different masks write the same output
    paths at once. Whenever a reader looks, and at the end, each file there is, byte for
    byte, one run's complete file: never one truncated mid-write, never a mix of the two."""
    data, run = reference
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((data / "imagesTr").iterdir())[:3]:
        shutil.copy(f, inputs / f.name)
    ct = read_image(sorted(inputs.iterdir())[0])
    runs = [make_predicting_run(run, ct, tmp_path / "run0", fraction=0.01), tmp_path / "run1"]
    shutil.copytree(runs[0], runs[1])  # the same network with a higher output bias: larger masks
    state = weights(runs[1] / "model.pt")
    (bias,) = [k for k in state["model"] if k.endswith(OUTPUT_BIAS)]
    state["model"][bias] += 1.5
    torch.save(state, runs[1] / "model.pt")

    def args(model: Path, out: Path) -> list[str]:
        return ["predict", "-i", str(inputs), "-o", str(out), "-m", str(model), "--save-probabilities", "--precision", "fp32"]

    versions = []  # each run's complete files, written alone
    for i, model in enumerate(runs):
        result = invoke(args(model, tmp_path / f"alone{i}"))
        assert result.exit_code == 0, result.output[-2000:]
        versions.append({p.name: p.read_bytes() for p in (tmp_path / f"alone{i}").iterdir()})
    names = sorted(versions[0])
    assert sorted(versions[1]) == names and len(names) == 12  # mask, probabilities, verdict, review sheet: 3 cases
    same = [n for n in names if versions[0][n] == versions[1][n]]
    assert not same, f"the two runs write the same bytes to {same}: no test of atomic writes"

    def check(folder: Path, final: bool) -> None:
        for p in folder.iterdir():
            if p.name.startswith("."):  # a writer's temporary file
                continue
            try:
                got = p.read_bytes()
            except FileNotFoundError:
                continue
            complete = [v[p.name] for v in versions if p.name in v]
            assert any(got == c for c in complete), (f"{p.name} ({len(got)} bytes) is neither run's complete file "
                                                     f"({' / '.join(str(len(c)) for c in complete)} bytes){' at the end' if final else ''}")

    out = tmp_path / "out"
    procs = []
    for i, model in enumerate(runs):
        with open(tmp_path / f"stderr{i}", "w") as err:
            procs.append(subprocess.Popen([*SATS, *args(model, out)], env=ENV, stdout=subprocess.DEVNULL, stderr=err))
    deadline = time.monotonic() + 300
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:  # a reader looking while both write
            if out.is_dir():
                check(out, final=False)
            time.sleep(0.005)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=60)
    for i, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"stderr{i}").read_text()[-2000:]
    assert sorted(p.name for p in out.iterdir()) == names, "temporary or missing files"
    check(out, final=True)


def test_second_training_on_a_busy_run_folder_is_refused(reference, tmp_path) -> None:
    """The first run holds RUN/.lock (flock); a second `sats train` on the folder is one line
    saying it is in use, and touches nothing. (flock conflicts between any two opens of the
    lock file, so the second run may be in this process.)"""
    data, _ = reference
    run = tmp_path / "run"
    with open(tmp_path / "first.out", "w") as out:
        first = subprocess.Popen([*SATS, *train_args(data, run)], env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: (run / "checkpoint.pt").exists(), first, what="the first run's first checkpoint")
        os.kill(first.pid, signal.SIGSTOP)  # frozen mid-run, still holding the folder
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        second = invoke(train_args(data, run))
        after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    finally:
        first.kill()
        first.wait(timeout=60)
    assert_one_error_line(second, str(run), run.name, words="in use")
    assert after == before, "the refused run changed the RUN folder"
