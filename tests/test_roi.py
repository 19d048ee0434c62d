"""The prediction ROI (sats.predict.roi): bounded, symmetric, and missing no tumour voxel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sats.data.io import Volume
from sats.data.phantom import PhantomConfig, make_case
from sats.geometry.preprocessing import foreground_samples, intensity_stats, preprocess
from sats.predict.roi import Localiser, box_to_roi, find_roi, fit_localiser, landmark_box, whole_roi

SPACING = (3.0, 1.6, 1.6)
PATCH = (24, 80, 80)


def test_box_to_roi_holds_the_box_is_symmetric_in_x_and_at_least_a_patch():
    rng = np.random.default_rng(0)
    for _ in range(300):
        shape = tuple(int(v) for v in rng.integers(10, 120, 3))
        shape = (shape[0], shape[1], shape[2] + shape[2] % 2)  # the symmetric grid's x size is even
        grid = Volume(np.zeros(shape, np.uint8), spacing=(3.0, 1.5, 1.5))
        extent = np.array(shape) * np.array(grid.spacing)
        lo = rng.uniform(-0.2, 1.0, 3) * extent
        hi = lo + rng.uniform(0, 0.6, 3) * extent
        patch = tuple(int(v) for v in rng.integers(8, 64, 3))
        roi = box_to_roi(lo, hi, grid, patch, "test")
        start, stop = np.array(roi.start), np.array(roi.stop)
        assert np.all(start >= 0) and np.all(stop <= shape) and np.all(stop > start)
        assert start[2] + stop[2] == shape[2], "x range not symmetric about the mid-sagittal plane"
        assert np.all(np.array(roi.shape) >= np.minimum(patch, shape))
        # Every voxel of the box that lies in the grid is inside the ROI.
        box_lo = np.clip(np.floor(lo / grid.spacing), 0, np.array(shape) - 1)
        box_hi = np.clip(np.ceil(hi / grid.spacing), 0, np.array(shape) - 1)
        inside = (lo / grid.spacing < shape) & (hi >= 0)
        assert np.all(~inside | ((start <= box_lo) & (box_hi < stop)))


def test_miss_fraction_counts_label_voxels_outside():
    label = np.zeros((10, 10, 10), np.uint8)
    label[2:4, 2:4, 2:4] = 1  # 8 voxels
    roi = box_to_roi(np.array([0, 0, 0.0]), np.array([2.0, 2.0, 2.0]), Volume(label, spacing=(1, 1, 1)), (1, 1, 1), "t")
    assert 0 < roi.miss_fraction(label) < 1
    assert whole_roi(label.shape).miss_fraction(label) == 0.0
    assert roi.miss_fraction(np.zeros_like(label)) == 0.0


@pytest.fixture(scope="module")
def phantom_cases():
    """8 training and 4 test phantoms on a cpu-preset grid (grid-centre planes: the
    localiser does not need the alignment, and it keeps the test fast)."""
    cases = [make_case(11, i, "Tr" if i < 8 else "Ts", PhantomConfig()) for i in range(12)]
    stats = intensity_stats([foreground_samples(c.ct, c.label) for c in cases[:8]])
    pres = [preprocess(c.ct, SPACING, stats, label=c.label) for c in cases]
    return cases, pres


def test_localiser_covers_every_tumour_voxel_of_the_phantom_test_cases(phantom_cases):
    cases, pres = phantom_cases
    localiser = fit_localiser(pres[:8], SPACING, seed=0, iterations=200)
    whole = []
    for case, pre in zip(cases[8:], pres[8:]):
        roi = find_roi(case.ct, pre, PATCH, localiser)
        assert roi.miss_fraction(pre.label) == 0.0, f"{roi} misses tumour"
        assert roi.source == "localiser"
        whole.append(np.prod(roi.shape) < np.prod(pre.image.shape))
    assert any(whole), "the ROI never narrows the grid"


def test_an_untrained_localiser_falls_back_to_a_bounded_landmark_roi(phantom_cases):
    cases, pres = phantom_cases
    case, pre = cases[8], pres[8]
    torch.manual_seed(0)  # an untrained net's output depends on its initialisation
    roi = find_roi(case.ct, pre, PATCH, Localiser().eval())
    assert roi.source in ("landmarks", "body-top")
    assert 0 < np.prod(roi.shape)
    lo, hi, _ = landmark_box(case.ct, pre)
    assert np.all(hi - lo <= 250.0), "the fallback box is not bounded"


def test_landmark_roi_covers_lesions_inserted_into_real_ct(openkbp, tmp_path):
    from sats.data.io import read_image
    from sats.data.lesion import LesionConfig, write_lesion_dataset
    from sats.geometry.alignment import find_plane

    data = tmp_path / "bed"
    write_lesion_dataset(data, openkbp, n_train=0, n_test=2, seed=3, config=LesionConfig(), workers=2)
    stats = None  # HU: the landmark search reads HU from the CT itself
    for image in sorted((data / "imagesTs").glob("*.nii.gz")):
        ct = read_image(image)
        label = read_image(data / "labelsTs" / image.name.replace("_0000", ""))
        pre = preprocess(ct, (3.0, 4.7, 4.7), stats, label=label, plane=find_plane(ct).plane)
        roi = find_roi(ct, pre, (24, 32, 32), None)
        assert roi.miss_fraction(pre.label) == 0.0, f"{image.name}: {roi} misses tumour"
        assert np.prod(roi.shape) < np.prod(pre.image.shape)


def test_precision_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch):
    import sats.predict.inference as inference

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.resolve_precision("auto", "cpu") == "fp32"
    assert inference.resolve_precision("bf16", "cpu") == "bf16"
    assert inference.resolve_precision("fp32", "cpu") == "fp32"


def test_prediction_over_a_roi_is_zero_outside_it(tiny_trained_run):
    from sats.data.dataset import list_cases
    from sats.predict.inference import load_run, native_box, predict_case, preprocess_for
    from sats.data.io import read_image
    from sats.predict.roi import Roi

    run_dir, data = tiny_trained_run
    run = load_run(run_dir)
    ct = read_image(list_cases(data, "Ts")[0].image if list_cases(data, "Ts") else list_cases(data, "Tr")[0].image)
    pre = preprocess_for(run, ct)
    nz, ny, nx = pre.image.shape
    roi = Roi((0, 0, 0), (nz, ny // 2, nx), "test")  # the front half of the grid
    part = predict_case(run, ct, pre, region=roi, precision="fp32", largest_component=False).probabilities.array
    whole = predict_case(run, ct, pre, roi="whole", precision="fp32", largest_component=False).probabilities.array
    box = native_box(roi, pre.grid, ct)
    outside = np.ones(ct.shape, bool)
    outside[box] = False
    assert outside.any() and np.all(part[outside] == 0.0)
    assert part[box].max() > 0
    assert np.any(whole[outside] > 0), "the whole-body map is not zero there: the ROI is what zeroes it"
