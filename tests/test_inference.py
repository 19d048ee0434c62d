"""Prediction: geometry of the written masks, folder mode with a broken file, bf16 vs fp32."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from sats.cli import app
from sats.data.io import collect_inputs, read_image, write_image
from sats.geometry.volume import SatsError, Volume
from sats.predict.inference import load_run, predict_case
from test_io import rotation


@pytest.fixture(scope="module")
def tiny_run(tiny_trained_run):
    return tiny_trained_run


def test_mask_keeps_the_input_geometry_exactly(tiny_run, tmp_path) -> None:
    run_dir, data = tiny_run
    ct = read_image(next((data / "imagesTr").iterdir()))
    # Oblique, shifted, anisotropic, odd slice count.
    odd = Volume(ct.array[:15], spacing=(2.7, 1.3, 1.7), origin=(12.5, -40.25, 101.0), direction=rotation(9, -4))
    write_image(odd, tmp_path / "odd_0000.nii.gz")
    result = CliRunner().invoke(app, ["predict", "-i", str(tmp_path / "odd_0000.nii.gz"), "-o", str(tmp_path / "out.nii.gz"), "-m", str(run_dir), "--save-probabilities", "--asymmetry-map"])
    assert result.exit_code == 0, result.output
    mask = read_image(tmp_path / "out.nii.gz")
    assert mask.same_geometry(odd, tol_mm=1e-5) is None
    assert set(np.unique(mask.array)) <= {0, 1}
    prob = read_image(tmp_path / "out_probabilities.nii.gz")
    asym = read_image(tmp_path / "out_asymmetry.nii.gz")
    assert prob.same_geometry(odd, tol_mm=1e-5) is None and asym.same_geometry(odd, tol_mm=1e-5) is None
    assert 0 <= prob.array.min() and prob.array.max() <= 1 and asym.array.max() > 0


def test_folder_mode_reports_a_broken_case_and_finishes_the_rest(tiny_run, tmp_path) -> None:
    run_dir, data = tiny_run
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((data / "imagesTr").iterdir())[:2]:
        (inputs / f.name).write_bytes(f.read_bytes())
    bad = inputs / "broken_0000.nii.gz"
    good_bytes = next((data / "imagesTr").iterdir()).read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 2])
    result = CliRunner().invoke(app, ["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(run_dir)])
    assert result.exit_code == 1
    assert "broken_0000.nii.gz" in result.output and "Traceback" not in result.output
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    # Each good case: its mask, its verdict and its review sheet; nothing of the broken one.
    assert written == [f"case_00{i}{end}" for i in (0, 1) for end in (".nii.gz", "_qa.json", "_review.png")]


def test_bad_inputs_fail_cleanly(tiny_run, tmp_path) -> None:
    run_dir, data = tiny_run
    runner = CliRunner()
    not_ct = tmp_path / "mr_0000.nii.gz"
    write_image(Volume(np.random.default_rng(0).uniform(0, 255, (8, 20, 20)).astype(np.float32)), not_ct)
    r = runner.invoke(app, ["predict", "-i", str(not_ct), "-o", str(tmp_path / "o.nii.gz"), "-m", str(run_dir)])
    assert r.exit_code == 1 and "not CT in HU" in r.output and r.output.count("error:") == 1 and not (tmp_path / "o.nii.gz").exists()
    r = runner.invoke(app, ["predict", "-i", str(not_ct), "-o", str(tmp_path / "o.nii.gz"), "-m", str(tmp_path)])
    assert r.exit_code == 1 and "not a sats RUN folder" in r.output
    image = next((data / "imagesTr").iterdir())
    r = runner.invoke(app, ["predict", "-i", str(image), "-o", str(tmp_path / "o.nii.gz"), "-m", str(run_dir), "--precision", "fp8"])
    assert r.exit_code == 1 and "--precision must be one of fp32, bf16" in r.output


def test_incompatible_run_folder_is_refused(tiny_run, tmp_path) -> None:
    import json
    import shutil

    run_dir, _ = tiny_run
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("cache"))
    config = json.loads((old / "config.json").read_text())
    config["format"] = 0
    (old / "config.json").write_text(json.dumps(config))
    with pytest.raises(SatsError, match="incompatible"):
        load_run(old)


def test_bf16_agrees_with_fp32(tiny_run, make_predicting_run, tmp_path) -> None:
    run_dir, data = tiny_run
    ct = read_image(min((data / "imagesTr").iterdir()))
    # The trained weights with the final bias set so that fp32 marks ~1 % of the CT (about
    # the tumour): a mask bf16 can get wrong, not the empty one a tiny model may give.
    run = load_run(make_predicting_run(run_dir, ct, tmp_path / "run"))
    p32 = predict_case(run, ct, precision="fp32")
    p16 = predict_case(run, ct, precision="bf16")
    a, b = p32.mask.array > 0, p16.mask.array > 0
    assert 50 <= a.sum() <= 0.5 * a.size, f"fp32 mask has {a.sum()} of {a.size} voxels"
    diff = np.abs(p32.probabilities.array - p16.probabilities.array)
    assert diff.max() > 0, "bf16 gave bit-identical probabilities: was it used at all?"
    assert diff.mean() < 0.02 and diff.max() < 0.1, (diff.mean(), diff.max())
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9


def test_collect_inputs_strips_channel_suffix(tmp_path) -> None:
    write_image(Volume(np.zeros((2, 2, 2), np.int16)), tmp_path / "p1_0000.nii.gz")
    write_image(Volume(np.zeros((2, 2, 2), np.int16)), tmp_path / "p2.mha")
    items, single = collect_inputs(tmp_path)
    assert [c for c, _ in items] == ["p1", "p2"] and not single


def test_keep_largest_component() -> None:
    from sats.geometry.grid import keep_largest_component

    m = np.zeros((5, 10, 10), bool)
    m[1:4, 1:5, 1:5] = True  # 48 voxels
    m[2, 8, 8] = True  # a stray island
    out = keep_largest_component(m)
    assert out.sum() == 48 and not out[2, 8, 8]
    assert not keep_largest_component(np.zeros((2, 2, 2), bool)).any()


def test_torch_resampling_matches_simpleitk() -> None:
    """The GPU path of preprocessing (torch grid_sample, run here on the CPU) gives
    SimpleITK's values, fill outside the image included, on oblique grids."""
    from scipy.spatial.transform import Rotation

    from sats.geometry.grid import resample_to
    from sats.geometry.volume import Volume

    rng = np.random.default_rng(3)
    rot = Rotation.from_euler("xyz", [4, -7, 11], degrees=True).as_matrix()
    volume = Volume(rng.normal(0, 100, (20, 30, 26)).astype(np.float32), spacing=(2.5, 0.9, 1.1),
                    origin=(-12.0, 4.0, 30.0), direction=rot)
    tilt = Rotation.from_euler("z", 20, degrees=True).as_matrix()
    reference = Volume(np.zeros((23, 31, 29), np.uint8), spacing=(2.0, 1.3, 0.8), origin=(-20.0, -5.0, 22.0),
                       direction=tilt)
    for order in (0, 1):
        itk = resample_to(volume, reference, order=order, default=-1024.0).array
        torch_ = resample_to(volume, reference, order=order, default=-1024.0, device="cpu").array
        outside = itk == -1024.0
        assert 0.05 < outside.mean() < 0.95  # the grids overlap partly: both rules are exercised
        agree = np.isclose(itk, torch_, atol=1e-3 if order else 0.0)
        # Nearest neighbour may round a point exactly between two voxels either way.
        assert agree.mean() > (0.9999 if order else 0.999), (order, agree.mean())
