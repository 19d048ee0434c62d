"""Shared fixtures. Tests needing ../shared/data skip when it is absent, unless
SATS_REQUIRE_SHARED_DATA=1 (as in CI), where they fail instead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SATS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        if os.environ.get("SATS_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{path} is missing and SATS_REQUIRE_SHARED_DATA=1")
        pytest.skip(f"{path} not present (shared data is optional outside CI)")
    return path


#: The nasopharynx of two OpenKBP CTs, read by hand (not by sats) on sagittal slices through
#: the middle of the head in a soft-tissue window: LPS mm of the roof of the nasopharyngeal
#: airway (z: where the air behind the choanae meets the soft tissue under the sphenoid) and of
#: its posterior wall at mid-height (y: where the air meets the prevertebral soft tissue in front
#: of the clivus and the atlas). The voxels are 4.2-4.7 mm in-plane and 2.5-3 mm thick, so
#: each value is good to about one voxel.
NASOPHARYNX_BY_HAND = {
    "kbp_train_112": {"roof_z": 246.0, "posterior_wall_y": 237.0},
    "kbp_test_276": {"roof_z": 270.0, "posterior_wall_y": 272.0},
}


@pytest.fixture
def openkbp() -> Path:
    """The OpenKBP head-and-neck dataset (nnU-Net raw layout)."""
    return _shared("openkbp")


@pytest.fixture
def lung_dicom() -> Path:
    """The real 4D-Lung DICOM CT series + RTSTRUCT folder."""
    return _shared("dicom/4d-lung")


# --- a RUN folder whose model is known to predict something ----------------------------------


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """``(run_dir, dataset)``: a tiny model trained for a few seconds on the toy heads of
    ``test_training.make_tiny_dataset`` (16 x 40 x 40, a bright one-sided tumour each).
    Enough training for its strongest logits to sit on the tumour, not enough to trust its
    threshold: use :func:`predicting_run` where a test needs a non-empty prediction."""
    from test_training import make_tiny_dataset, tiny_config

    from sats.model.training import train

    root = tmp_path_factory.mktemp("tiny")
    data = make_tiny_dataset(root / "data")
    train(data, root / "run", tiny_config(stage1_epochs=2, stage2_epochs=1, iters_per_epoch=4), device="cpu")
    return root / "run", data


#: The one bias of the network's final 1x1x1 segmentation conv: MONAI DynUNet's output
#: block (nnunet), the output conv a :class:`sats.model.backbones.monai_nets.Tapped` holds
#: (Swin UNETR, UNETR; MedNeXt's is ``conv_out``). A tuple of suffixes for ``str.endswith``.
OUTPUT_BIAS = ("output_block.conv.conv.bias", "encoder_decoder.head.conv.conv.bias", "encoder_decoder.head.conv_out.bias")


def _replace_output_bias(obj, value: float) -> int:
    """Set every ``*output_block.conv.conv.bias`` tensor inside a loaded ``model.pt`` object."""
    import torch

    found = 0
    if isinstance(obj, dict):
        for key, item in obj.items():
            if isinstance(key, str) and key.endswith(OUTPUT_BIAS) and isinstance(item, torch.Tensor):
                item.fill_(value)
                found += 1
            else:
                found += _replace_output_bias(item, value)
    return found


def predicting_run(run_dir: Path, ct, out_dir: Path, fraction: float = 0.01) -> Path:
    """A copy of the RUN folder ``run_dir`` at ``out_dir`` whose model predicts a non-trivial
    mask on ``ct``: the final conv's bias is set so that ``fraction`` of the voxels of ``ct``
    (before keeping the largest component) get probability >= 0.5 under fp32.

    A barely trained tiny model may predict nothing at all (or everything); then a test that
    compares two predictions compares empty with empty. All weights but that one bias stay
    the trained ones, so fp32 and bf16 still run the real network. (The fraction is of the
    whole volume, not of the body: the toy data's intensity window is the tumour's, so the
    network sees body and air alike. The default, ~1 %, is about the size of the toy tumour,
    where the tiny model's strongest logits are: a compact mask of a few contours a slice.)
    Fails, never skips, when the calibrated model does not predict a non-trivial mask.
    """
    import shutil

    import numpy as np
    import torch

    from sats.predict.inference import load_run, predict_case

    shutil.copytree(run_dir, out_dir, ignore=shutil.ignore_patterns("cache", "checkpoint.pt"))
    run = load_run(out_dir)
    (bias,) = [p for name, p in run.model.named_parameters() if name.endswith(OUTPUT_BIAS)]
    with torch.no_grad():
        bias.zero_()
    p = predict_case(run, ct, precision="fp32", largest_component=False).probabilities.array.astype(np.float64)
    p = np.clip(p, 1e-6, 1 - 1e-6)
    logits = np.log(p / (1 - p))  # of the network without its bias (close: resampling is linear in p)
    new_bias = -float(np.quantile(logits, 1 - fraction))
    weights = out_dir / "model.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert _replace_output_bias(state, new_bias) == 1, f"not one {OUTPUT_BIAS} in {weights}"
    torch.save(state, weights)
    # Check the calibration took, through the public loader, as every caller will see it.
    mask = predict_case(load_run(out_dir), ct, precision="fp32", largest_component=False).mask.array > 0
    assert 0.5 * fraction < mask.mean() < 2 * fraction, f"calibrated model marks {mask.mean():.4f} of the CT, not ~{fraction}"
    return out_dir


@pytest.fixture(scope="session")
def make_predicting_run():
    """The factory :func:`predicting_run`: ``make_predicting_run(run_dir, ct, out_dir, fraction)``."""
    return predicting_run
