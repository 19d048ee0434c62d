"""The command line as a user meets it: every command present, summary, bad input."""

from __future__ import annotations

import re

import typer.main
from typer.testing import CliRunner

from sats.cli import app

COMMANDS = {"phantom", "check", "evaluate", "summary", "train", "predict", "rtstruct", "align", "make-atlas", "demo", "ablation", "asymmetry", "serve"}


def test_every_command_is_registered() -> None:
    """By command name, not by words in the help text (the demo's help mentions train,
    predict, evaluate and phantom, so a text search passes without them)."""
    registered = set(typer.main.get_command(app).commands)
    assert registered == COMMANDS, (sorted(COMMANDS - registered), sorted(registered - COMMANDS))
    runner = CliRunner()
    for name in sorted(COMMANDS):
        result = runner.invoke(app, [name, "--help"], terminal_width=200)
        assert result.exit_code == 0, (name, result.output)
        assert re.search(rf"Usage: \S+ {re.escape(name)}\b", result.output), (name, result.output)


def test_help_shows_no_metavar_beside_flags() -> None:
    """A flag takes no value, so --help must not print one (typer 0.29 prints <bool>)."""
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--tta" in result.output and "--save-probabilities" in result.output
    flags = [line for line in result.output.splitlines() if re.search(r"--(tta|help|save-probabilities|all-components)\b", line)]
    assert len(flags) == 4 and not any("<bool>" in line for line in flags), flags
    assert "<path>" in result.output or "PATH" in result.output  # options that take a value still say which
    for name in sorted(COMMANDS):
        assert "<bool>" not in runner.invoke(app, [name, "--help"], terminal_width=200).output, name


def test_summary_paper_parameter_count() -> None:
    result = CliRunner().invoke(app, ["summary", "--preset", "paper"], terminal_width=200)
    assert result.exit_code == 0
    last = result.output.strip().splitlines()[-1]
    n = int(re.fullmatch(r"parameters: ([\d,]+)", last).group(1).replace(",", ""))
    assert abs(n - 30.70e6) / 30.70e6 < 0.01


def test_summary_rounds_an_indivisible_patch_up_and_says_so() -> None:
    """A patch the network cannot stride is rounded up to one it can (issue 25), never a shape error."""
    result = CliRunner().invoke(app, ["summary", "--patch", "56", "190", "192", "--spacing", "3", "1", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "(56, 190, 192) rounded up to (56, 192, 192)" in result.output


def test_truncated_nifti_given_to_commands(tmp_path) -> None:
    """One clear line, non-zero exit, no traceback, for a truncated .nii.gz anywhere."""
    import numpy as np

    from sats.data.io import write_image
    from sats.geometry.volume import Volume

    path = write_image(Volume(np.random.default_rng(0).normal(0, 300, (20, 64, 64)).astype(np.int16)), tmp_path / "ct_0000.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    runner = CliRunner()
    for args in (["align", "-i", str(path), "-o", str(tmp_path / "a.nii.gz")],
                 ["evaluate", "--pred", str(tmp_path), "--gt", str(tmp_path)]):
        r = runner.invoke(app, args)
        assert r.exit_code != 0, args
        assert "ct_0000.nii.gz" in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "a.nii.gz").exists()


def test_train_refuses_a_broken_dataset(tmp_path) -> None:
    r = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "cpu"])
    assert r.exit_code == 1 and "dataset.json" in r.output


def test_train_refuses_a_dataset_that_fails_check(tmp_path) -> None:
    import numpy as np

    from sats.data.io import write_image
    from test_training import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2)
    label = data / "labelsTr" / "case_000.nii.gz"
    from sats.data.io import read_image

    lab = read_image(label)
    write_image(lab.with_array((lab.array * 2).astype(np.uint8)), label)  # label value 2
    r = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "run"), "--preset", "cpu"])
    assert r.exit_code == 1 and "sats check" in r.output and "case_000" in r.output
    assert not (tmp_path / "run" / "model.pt").exists()


def test_resume_refuses_an_incompatible_run(tmp_path) -> None:
    import json

    from test_training import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"format": 999, "train": {}}))
    r = CliRunner().invoke(app, ["train", str(data), "--out", str(run), "--resume"])
    assert r.exit_code == 1 and "incompatible" in r.output


def test_train_fp32_flag_turns_bf16_autocast_off(tmp_path, monkeypatch) -> None:
    import sats.model.training as training

    seen = []
    monkeypatch.setattr(training, "train", lambda dataset, out, cfg, **kw: seen.append(cfg.amp))
    for extra in ([], ["--fp32"]):
        r = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "cpu", *extra])
        assert r.exit_code == 0, r.output
    assert seen == [True, False]
