"""Fold ensembles, the per-case quality flag, calibration and the review sheet (issue 26)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from sats.cli import app
from sats.data.io import read_image, write_image
from sats.geometry.volume import Volume
from sats.predict.inference import Ensemble, load_model, load_run, output_paths, predict_case
from sats.predict.quality import (FEATURES, MIN_MEMBER_DICE, Evidence, QualityModel, assess, calibrate,
                                  expected_calibration_error, fit_quality, fit_temperature, load_quality)

from conftest import predicting_run
from test_io import rotation
from test_training import make_tiny_dataset


def _train_folds(data, out, folds="0,1", extra=()):
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "--preset", "cpu", "--folds", folds, "--epochs", "1",
                                      "--iters-per-epoch", "2", "--patch-size", "16", "32", "32", "--spacing", "3", "1.6", "1.6",
                                      "--no-align", *extra])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def fold_run(tmp_path_factory):
    """``(RUN, dataset)``: two folds of a tiny model, each calibrated to mark ~1 % of a CT,
    so that a member's and the ensemble's masks are never empty by accident."""
    root = tmp_path_factory.mktemp("folds")
    data = make_tiny_dataset(root / "data", n=6)
    _train_folds(data, root / "trained")
    ct = read_image(sorted((data / "imagesTr").iterdir())[0])
    run = root / "run"
    run.mkdir()
    for k in (0, 1):
        predicting_run(root / "trained" / f"fold_{k}", ct, run / f"fold_{k}", fraction=0.02 + 0.01 * k)
    return run, data


def test_sats_train_folds_trains_each_fold_once_and_fits_the_quality_model(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=6)
    out = tmp_path / "run"
    result = _train_folds(data, out)
    for k in (0, 1):
        assert (out / f"fold_{k}" / "model.pt").exists()
        evidence = json.loads((out / f"fold_{k}" / "validation" / "evidence.json").read_text())
        held_out = json.loads((out / f"fold_{k}" / "config.json").read_text())["val_ids"]
        assert [r["case"] for r in evidence] == held_out and held_out  # out of fold: its own validation cases
        assert {"dsc", "true_ml", "mirror_dice", "nasopharynx"} <= set(evidence[0])
    model = load_quality(out / "quality.json")
    assert model is not None and model.fitted_on["cases"] == sum(
        len(json.loads((out / f"fold_{k}" / "config.json").read_text())["val_ids"]) for k in (0, 1))
    assert (out / "crossval.csv").exists() and (out / "calibration.png").stat().st_size > 1000
    assert "out of fold" in result.output
    # Again: nothing is trained or predicted a second time.
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("fold_*/model.pt")}
    _train_folds(data, out)
    assert stamp == {p: p.stat().st_mtime_ns for p in out.glob("fold_*/model.pt")}
    bad = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "x"), "--preset", "cpu", "--folds", "0,7"])
    assert bad.exit_code != 0 and "--folds" in bad.output


def test_an_ensemble_averages_its_members_probabilities(fold_run, tmp_path):
    """Each member's probabilities through the same plane and ROI, then averaged."""
    run, data = fold_run
    ct = read_image(sorted((data / "imagesTr").iterdir())[2])
    ens = load_model(run)
    assert len(ens.members) == 2 and ens.quality is None
    pre = ens.preprocessor(ct)
    whole = predict_case(ens, ct, pre, precision="fp32", roi="whole")
    alone = [predict_case(m, ct, pre, precision="fp32", roi="whole") for m in ens.members]
    expected = (alone[0].probabilities.array + alone[1].probabilities.array) / 2
    np.testing.assert_allclose(whole.probabilities.array, expected, atol=1e-5)
    assert not np.allclose(alone[0].probabilities.array, alone[1].probabilities.array, atol=1e-3)  # two models, not one twice
    # The same through `sats predict`: -m RUN (its folds) against -m fold_0 and -m fold_1 apart.
    src = sorted((data / "imagesTr").iterdir())[2]
    for name, models in (("ens", [run]), ("f0", [run / "fold_0"]), ("f1", [run / "fold_1"])):
        args = ["predict", "-i", str(src), "-o", str(tmp_path / f"{name}.nii.gz"), "--roi", "whole", "--precision", "fp32",
                "--save-probabilities"] + [a for m in models for a in ("-m", str(m))]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    p = {n: read_image(tmp_path / f"{n}_probabilities.nii.gz").array for n in ("ens", "f0", "f1")}
    np.testing.assert_allclose(p["ens"], (p["f0"] + p["f1"]) / 2, atol=1e-5)
    # -m given twice is the same ensemble.
    result = CliRunner().invoke(app, ["predict", "-i", str(src), "-o", str(tmp_path / "two.nii.gz"), "--roi", "whole",
                                      "--precision", "fp32", "--save-probabilities", "-m", str(run / "fold_0"), "-m", str(run / "fold_1")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(read_image(tmp_path / "two_probabilities.nii.gz").array, p["ens"], atol=1e-6)


def test_an_ensemble_predicts_an_odd_oblique_ct_and_dicom_onto_the_input_grid(fold_run, tmp_path):
    from sats.data.dicom import read_dicom_series, write_ct_series
    from sats.predict.export import read_rtstruct_roi

    run, data = fold_run
    ct = read_image(sorted((data / "imagesTr").iterdir())[1])
    odd = Volume(ct.array[:15, 1:38, 2:], spacing=(2.7, 1.3, 1.7), origin=(12.5, -40.25, 101.0), direction=rotation(9, -4))
    write_image(odd, tmp_path / "odd_0000.nii.gz")
    result = CliRunner().invoke(app, ["predict", "-i", str(tmp_path / "odd_0000.nii.gz"), "-o", str(tmp_path / "odd.nii.gz"),
                                      "-m", str(run), "--roi", "whole"])
    assert result.exit_code == 0, result.output
    assert read_image(tmp_path / "odd.nii.gz").same_geometry(odd, tol_mm=1e-4) is None
    assert json.loads((tmp_path / "odd_qa.json").read_text())["flag"] in ("ok", "review")
    write_ct_series(odd, tmp_path / "series")
    result = CliRunner().invoke(app, ["predict", "-i", str(tmp_path / "series"), "-o", str(tmp_path / "dcm"), "-m", str(run),
                                      "--roi", "whole", "--format", "nifti,rtstruct,seg,sc"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "dcm"
    qa = json.loads((out / "series_qa.json").read_text())
    name = "GTVp (review)" if qa["flag"] == "review" else "GTVp"
    mask = read_image(out / "series.nii.gz")
    assert mask.same_geometry(read_dicom_series(tmp_path / "series"), tol_mm=1e-3) is None and mask.array.any()
    np.testing.assert_array_equal(read_rtstruct_roi(out / "series_rtstruct.dcm", tmp_path / "series", name).array > 0,
                                  mask.array > 0)
    for f in ("series_seg.dcm", "series_review.dcm", "series_review.png"):
        assert (out / f).stat().st_size > 1000


def _ensemble_factory(run_dir, ct, out_dir, fraction=0.01):
    """make_predicting_run for a RUN of folds: each fold calibrated alike, the fold layout kept."""
    out_dir.mkdir(parents=True)
    for fold in sorted(run_dir.glob("fold_*")):
        predicting_run(fold, ct, out_dir / fold.name, fraction)
    return out_dir


def test_an_ensemble_serves_dicom_like_sats_predict(fold_run, tmp_path):
    from test_fusion import assert_served_like_predict

    run, data = fold_run
    assert_served_like_predict(run, sorted((data / "imagesTr").iterdir())[3], _ensemble_factory, tmp_path)


def test_the_verdict_sits_beside_every_mask(tmp_path):
    assert output_paths(tmp_path / "out.nii.gz", "c1", True)["qa"] == tmp_path / "out_qa.json"
    assert output_paths(tmp_path / "folder", "c1", False)["qa"] == tmp_path / "folder" / "c1_qa.json"
    assert output_paths(tmp_path / "RS.dcm", "c1", True, "rtstruct")["qa"] == tmp_path / "RS_qa.json"
    both = output_paths(tmp_path / "f", "c1", False, "rtstruct,sc")
    assert both["rtstruct"].name == "c1_rtstruct.dcm" and both["sc"].name == "c1_review.dcm" and both["mask"] == both["rtstruct"]


def _set_output_bias(run_dir, value):
    import torch

    from conftest import _replace_output_bias

    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert _replace_output_bias(state, value) == 1
    torch.save(state, run_dir / "model.pt")


def test_a_ct_with_no_lesion_found_is_flagged_review(fold_run, tmp_path):
    """A model that finds nothing in the ROI: an empty mask is never an unflagged 'ok'."""
    run, data = fold_run
    shutil.copytree(run / "fold_0", tmp_path / "blind")
    _set_output_bias(tmp_path / "blind", -1e4)
    ct = read_image(sorted((data / "imagesTr").iterdir())[0])
    pred = predict_case(load_run(tmp_path / "blind"), ct)
    assert not pred.mask.array.any()
    assert pred.qa["flag"] == "review" and "no GTV found" in pred.qa["reason"]


def test_a_broken_member_makes_the_ensemble_review(fold_run, tmp_path):
    """One member marks the whole ROI: the members disagree, whatever else the case shows."""
    run, data = fold_run
    ct = read_image(sorted((data / "imagesTr").iterdir())[0])
    shutil.copytree(run, tmp_path / "run")
    healthy = predict_case(load_model(tmp_path / "run"), ct, roi="whole")
    assert healthy.qa["parts"]["member_dice"] > MIN_MEMBER_DICE
    _set_output_bias(tmp_path / "run" / "fold_1", 1e4)
    broken = predict_case(load_model(tmp_path / "run"), ct, roi="whole")
    assert broken.qa["parts"]["member_dice"] < MIN_MEMBER_DICE
    assert broken.qa["flag"] == "review" and "members disagree" in broken.qa["reason"]


def test_the_fitted_score_flags_the_failures_it_was_fitted_to_find():
    """Synthetic out-of-fold cases where failures have low mirror agreement: the fitted
    score ranks them first and its threshold flags at least 90 % of them."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(80):
        fail = i % 4 == 0
        rows.append({"case": f"c{i}", "fold": i % 5, "dsc": rng.uniform(0.0, 0.3) if fail else rng.uniform(0.6, 0.9),
                     "true_ml": rng.uniform(5, 60), "mirror_dice": rng.uniform(0.1, 0.6) if fail else rng.uniform(0.5, 0.95),
                     "mean_prob": rng.uniform(0.6, 0.9), "entropy": rng.uniform(0.2, 0.6), "volume_ml": rng.uniform(5, 60),
                     "outside_fraction": 0.0, "member_dice": 1.0, "nasopharynx": None, "roi_source": "localiser"})
    model = fit_quality(rows, np.zeros(0), np.zeros(0), [0, 1, 2, 3, 4])
    assert model.fitted and model.coef[FEATURES.index("mirror_dice")] < 0  # more agreement, fewer failures
    verdicts = [assess(Evidence(**{k: r[k] for k in Evidence.__dataclass_fields__}), model) for r in rows]
    failed = np.array([r["dsc"] < 0.5 for r in rows])
    flagged = np.array([v["flag"] == "review" for v in verdicts])
    assert flagged[failed].mean() >= 0.9 and flagged[~failed].mean() < 0.5
    # The rules still flag what the score cannot see.
    no_npx = assess(Evidence(0.9, 0.9, 0.2, 20.0, 0.0, nasopharynx="no pharyngeal airway"), model)
    assert no_npx["flag"] == "review" and "nasopharynx" in no_npx["reason"]
    # Saved and loaded as JSON, it scores alike.
    assert QualityModel(**{**model.__dict__}).score(Evidence(0.8, 0.8, 0.3, 20.0, 0.0)) == model.score(Evidence(0.8, 0.8, 0.3, 20.0, 0.0))


def test_the_temperature_recovers_a_known_miscalibration():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 4, 200_000)
    truth = rng.random(z.size) < 1 / (1 + np.exp(-z / 2.5))  # the real odds are 2.5x flatter than the logits say
    p = 1 / (1 + np.exp(-z))
    t = fit_temperature(p, truth)
    assert abs(t - 2.5) < 0.1
    assert expected_calibration_error(calibrate(p, t), truth) < 0.5 * expected_calibration_error(p, truth)


def _head_cut_above_the_skull_base(openkbp):
    """A real OpenKBP head with every slice below 15 mm above the nasopharynx roof removed."""
    from sats.data.lesion import _head
    from sats.geometry.landmarks import find_nasopharynx

    ct = read_image(openkbp / "imagesTs" / "kbp_test_314_0000.nii.gz")
    head, frame, _ = _head(ct)
    npx = find_nasopharynx(head)
    cut = ct.physical_to_index(frame.to_lps(np.array([[0.0, npx.posterior_wall_y, npx.roof_z + 15.0]])))[0][0]
    up = ct.direction[2, 2] > 0  # array axis 0 (z) points to the head
    k = int(np.ceil(cut)) if up else int(np.floor(cut))
    nz, ny, nx = ct.shape
    box = (slice(k, nz) if up else slice(0, k + 1), slice(0, ny), slice(0, nx))
    from sats.predict.inference import sub_volume

    return ct, sub_volume(ct, box)


def test_the_nasopharynx_check_tells_a_head_from_a_thorax_and_a_cut_head(openkbp, lung_dicom):
    from sats.data.dicom import read_dicom_series
    from sats.geometry.landmarks import head_frame, nasopharynx_in_view
    from sats.geometry.preprocessing import Preprocessor

    whole, cut = _head_cut_above_the_skull_base(openkbp)
    prep = Preprocessor((3.0, 1.6, 1.6))
    verdicts = {}
    for name, ct in (("head", whole), ("cut head", cut), ("thorax", read_dicom_series(lung_dicom / "ct"))):
        pre = prep(ct)
        verdicts[name] = nasopharynx_in_view(head_frame(ct, pre.grid, pre.plane))
    assert verdicts["head"] is None, verdicts
    assert verdicts["cut head"] and verdicts["thorax"], verdicts


def test_a_ct_without_a_nasopharynx_never_yields_an_unflagged_contour(fold_run, openkbp, lung_dicom, tmp_path):
    """The thorax (DICOM, RTSTRUCT out) and a head cut above the skull base (NIfTI): a model
    calibrated to mark something on each marks it, and the verdict is review, in the DICOM too."""
    import pydicom

    from sats.data.dicom import read_dicom_series

    run, _ = fold_run
    thorax = read_dicom_series(lung_dicom / "ct")
    model = predicting_run(run / "fold_0", thorax, tmp_path / "m_thorax", fraction=0.002)
    result = CliRunner().invoke(app, ["predict", "-i", str(lung_dicom / "ct"), "-o", str(tmp_path / "RS.dcm"), "-m", str(model),
                                      "--format", "rtstruct"])
    assert result.exit_code == 0, result.output
    qa = json.loads((tmp_path / "RS_qa.json").read_text())
    assert qa["flag"] == "review" and "nasopharynx" in qa["reason"] and qa["parts"]["volume_ml"] > 0
    rs = pydicom.dcmread(tmp_path / "RS.dcm")
    assert rs.StructureSetROISequence[0].ROIName == "GTVp (review)" and "REVIEW" in rs.SeriesDescription
    _, cut = _head_cut_above_the_skull_base(openkbp)
    write_image(cut, tmp_path / "cut_0000.nii.gz")
    model = predicting_run(run / "fold_0", cut, tmp_path / "m_cut", fraction=0.005)
    result = CliRunner().invoke(app, ["predict", "-i", str(tmp_path / "cut_0000.nii.gz"), "-o", str(tmp_path / "cut.nii.gz"),
                                      "-m", str(model)])
    assert result.exit_code == 0, result.output
    qa = json.loads((tmp_path / "cut_qa.json").read_text())
    assert read_image(tmp_path / "cut.nii.gz").array.any() and qa["flag"] == "review" and "nasopharynx" in qa["reason"]


def test_a_thorax_sent_to_the_node_comes_back_flagged_and_logged(fold_run, lung_dicom, tmp_path):
    """`sats serve` sends the flagged structure (GTVp (review), the reason in the series
    description), logs the series as flagged, and `--status` shows the QA column."""
    from sats.data.dicom import read_dicom_series
    from test_serve import Node, PlanningSystem, send_series, wait_state

    run, _ = fold_run
    model = predicting_run(run / "fold_0", read_dicom_series(lung_dicom / "ct"), tmp_path / "m", fraction=0.002)
    tps = PlanningSystem()
    node = Node(model, tmp_path / "store", "--send-to", f"TPS@127.0.0.1:{tps.port}")
    try:
        assert set(send_series(sorted((lung_dicom / "ct").glob("*.dcm")), node.port)) == {0}
        wait_state(tmp_path / "store", "sent", 300)
        (rs,) = tps.wait_for(1, 30)
    finally:
        node.stop()
        tps.stop()
    assert rs.StructureSetROISequence[0].ROIName == "GTVp (review)"
    log = (tmp_path / "store" / "serve.log").read_text()
    assert "flagged for review" in log and "nasopharynx" in log
    status = CliRunner().invoke(app, ["serve", "--status", str(tmp_path / "store")], terminal_width=250)
    assert status.exit_code == 0 and "QA" in status.output and "review" in status.output


def test_flagged_rtstruct_seg_and_secondary_capture_pass_dciodvfy(lung_dicom, tmp_path):
    from sats.data.dicom import read_dicom_series
    from sats.predict.inference import PredictOptions, Prediction, write_outputs
    from sats.geometry.grid import Roi
    from test_export import _dciodvfy

    tool = _dciodvfy()
    ct = read_dicom_series(lung_dicom / "ct")
    mask = np.zeros(ct.shape, np.uint8)
    mask[48:53, 240:256, 250:266] = 1
    qa = assess(Evidence(0.4, 0.6, 0.8, 2.3, 0.1, nasopharynx="no pharyngeal airway (midline air ...)"), None)
    pred = Prediction(ct.with_array(mask), ct.with_array(mask.astype(np.float32)), None, 1.0, qa,
                      Roi((40, 200, 200), (60, 300, 320), "body-top"), ct)
    opt = PredictOptions(fmt="rtstruct,seg,sc")
    paths = output_paths(tmp_path, "lung", False, opt.fmt)
    write_outputs(pred, lung_dicom / "ct", paths, "lung", opt, ct)
    for fmt, iod in (("rtstruct", "RTStructureSet"), ("seg", "Segmentation"), ("sc", "Object SCImage")):
        out = subprocess.run([tool, "-v", str(paths[fmt])], capture_output=True, text=True, timeout=300)
        report = out.stdout + out.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{fmt}:\n" + "\n".join(errors[:20])
        assert iod in report
    import pydicom

    seg = pydicom.dcmread(paths["seg"])
    assert seg.SegmentSequence[0].SegmentLabel == "GTVp (review)" and "REVIEW" in seg.SeriesDescription
    sc = pydicom.dcmread(paths["sc"])
    assert sc.StudyInstanceUID == pydicom.dcmread(next((lung_dicom / "ct").glob("*.dcm"))).StudyInstanceUID
    from PIL import Image

    np.testing.assert_array_equal(sc.pixel_array, np.asarray(Image.open(paths["review"]).convert("RGB")))


def test_an_ensemble_is_scored_member_by_member_as_each_was_fitted(fold_run):
    """The score was fitted on one model's out-of-fold evidence: an ensemble's score is the
    mean of its members' scores, each member's the score it gets predicting alone."""
    run, data = fold_run
    ct = read_image(sorted((data / "imagesTr").iterdir())[4])
    model = QualityModel(mean=[0.5] * len(FEATURES), scale=[0.2] * len(FEATURES), coef=[-1.0, -1.0, 1.0, 0.5, 1.0],
                         intercept=0.0, threshold=0.5)
    ens = Ensemble(load_model(run).members, model)
    pre = ens.preprocessor(ct)
    whole = predict_case(ens, ct, pre, roi="whole")
    alone = [predict_case(Ensemble([m], model), ct, pre, roi="whole").qa for m in ens.members]
    assert [m["score"] for m in whole.qa["members"]] == pytest.approx([a["score"] for a in alone], abs=1e-4)
    assert whole.qa["score"] == pytest.approx(np.mean([a["score"] for a in alone]), abs=1e-4)
    assert [m["volume_ml"] for m in whole.qa["members"]] == pytest.approx([a["parts"]["volume_ml"] for a in alone], abs=1e-3)


def test_the_temperature_changes_the_probabilities_written_not_the_evidence(fold_run):
    """The score was fitted on evidence read before any temperature: calibrating the written
    probabilities must leave the verdict's inputs as they were."""
    run, data = fold_run
    ct = read_image(sorted((data / "imagesTr").iterdir())[5])
    member = load_model(run / "fold_0").members[0]
    pre = member.preprocessor(ct)
    plain = predict_case(Ensemble([member], QualityModel(temperature=1.0)), ct, pre, roi="whole")
    warm = predict_case(Ensemble([member], QualityModel(temperature=2.5)), ct, pre, roi="whole")
    assert plain.qa["parts"] == warm.qa["parts"]
    p, q = plain.probabilities.array, warm.probabilities.array
    inside = (p > 0.6) & (p < 0.99)
    assert inside.any() and np.all(q[inside] < p[inside])  # flatter: sigmoid(z / 2.5) nearer 0.5
    np.testing.assert_array_equal(plain.mask.array, warm.mask.array)  # one model: z >= 0 either way
