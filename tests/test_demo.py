"""The quick demo, end to end: every promised file is written and the table is printed."""

from __future__ import annotations

from typer.testing import CliRunner

from sats.cli import app


def test_quick_demo_end_to_end(tmp_path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick"], terminal_width=160)
    assert result.exit_code == 0, result.output[-3000:]
    for name in ("results.csv", "dice.png", "model/model.pt", "model/config.json", "model/log.csv", "model/curves.png"):
        assert (out / name).exists(), name
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header == "case,dsc,hd95,asd,nsd,gt_ml,pred_ml"
    preds = sorted(p.name for p in (out / "predictions").glob("*.nii.gz"))
    assert preds == ["phantom_test_000.nii.gz", "phantom_test_001.nii.gz"]
    assert len(list((out / "overlays").glob("*.png"))) == 2
    assert len(list(out.glob("asymmetry_*.png"))) == 1
    for metric in ("DSC", "HD95", "ASD", "NSD"):
        assert metric in result.output
