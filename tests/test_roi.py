"""The prediction ROI (sats.predict.roi): bounded, symmetric, and missing no tumour voxel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sats.data.phantom import PhantomConfig, make_case
from sats.geometry.grid import box_to_roi, whole_roi
from sats.geometry.landmarks import landmark_box
from sats.geometry.preprocessing import foreground_samples, intensity_stats, preprocess
from sats.geometry.volume import Volume
from sats.predict.roi import Localiser, find_roi, fit_localiser
from conftest import NASOPHARYNX_BY_HAND

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
    lo, hi, _ = landmark_box(case.ct, pre.grid, pre.plane)
    assert np.all(hi - lo <= 250.0), "the fallback box is not bounded"


def test_landmark_roi_covers_lesions_inserted_into_real_ct(openkbp, tmp_path):
    from sats.data.io import read_image
    from sats.data.lesion import LesionConfig, write_lesion_dataset
    from sats.geometry.preprocessing import Preprocessor

    data = tmp_path / "bed"
    write_lesion_dataset(data, openkbp, n_train=0, n_test=2, seed=3, config=LesionConfig(), workers=2)
    stats = None  # HU: the landmark search reads HU from the CT itself
    for image in sorted((data / "imagesTs").glob("*.nii.gz")):
        ct = read_image(image)
        label = read_image(data / "labelsTs" / image.name.replace("_0000", ""))
        pre = Preprocessor((3.0, 4.7, 4.7), stats)(ct, label=label)
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


def test_prediction_over_a_roi_is_zero_outside_it(tiny_trained_run, make_predicting_run, tmp_path):
    """A ROI away from the grid's origin: zero outside it, and inside it the windows' map put
    back where it belongs. The reference is computed apart from predict_case's crop-and-paste:
    the ROI's probabilities placed into an empty map of the whole symmetric grid, resampled to
    the CT as a whole. (A whole-grid prediction is no reference here: with instance norm the
    network's output depends on where the windows fall, corr. 0.6 between the two placements.)"""
    from sats.data.dataset import list_cases
    from sats.data.io import read_image
    from sats.geometry.grid import Roi, resample_to
    from sats.predict.inference import load_run, native_box, predict_case, sliding_window_probabilities

    run_dir, data = tiny_trained_run
    ct = read_image(list_cases(data, "Tr")[0].image)
    run = load_run(make_predicting_run(run_dir, ct, tmp_path / "run", fraction=0.03))
    pre = run.preprocessor(ct)
    nz, ny, nx = pre.image.shape
    roi = Roi((2, 6, 4), (nz, ny, nx - 4), "test")  # away from the origin on every axis
    part = predict_case(run, ct, pre, region=roi, precision="fp32", largest_component=False).probabilities.array
    whole = predict_case(run, ct, pre, roi="whole", precision="fp32", largest_component=False).probabilities.array
    box = native_box(roi, pre.grid, ct)
    outside = np.ones(ct.shape, bool)
    outside[box] = False
    assert outside.any() and np.all(part[outside] == 0.0)
    assert np.any(whole[outside] > 0), "the whole-body map is not zero there: the ROI is what zeroes it"
    prob, _ = sliding_window_probabilities(run.model, pre.image[roi.slices], run.patch_size, precision="fp32")
    on_grid = np.zeros(pre.image.shape, np.float32)
    on_grid[roi.slices] = prob
    expected = resample_to(pre.grid.with_array(on_grid), ct, order=1, default=0.0).array
    inner = tuple(slice(sl.start + 3, sl.stop - 3) for sl in box)  # off the ROI's faces, where zeros blend in
    assert expected[inner].max() > 0.5
    np.testing.assert_allclose(part[inner], expected[inner], atol=1e-5)


@pytest.mark.parametrize("case", sorted(NASOPHARYNX_BY_HAND))
def test_landmark_box_is_around_the_nasopharynx_read_by_hand(openkbp, case):
    """Not the code's own landmark: the roof and posterior wall read by hand (conftest.py)."""
    from sats.data.io import read_image
    from sats.geometry.preprocessing import Preprocessor

    split = "Ts" if "test" in case else "Tr"
    ct = read_image(openkbp / f"images{split}" / f"{case}_0000.nii.gz")
    pre = Preprocessor((3.0, 4.7, 4.7))(ct)
    lo, hi, source = landmark_box(ct, pre.grid, pre.plane)
    assert source == "landmarks"
    hand = NASOPHARYNX_BY_HAND[case]
    n, p = pre.plane.normal, pre.plane.point
    y, z = hand["posterior_wall_y"], hand["roof_z"]
    x = p[0] - (n[1] * (y - p[1]) + n[2] * (z - p[2])) / n[0]  # the point of the mid-sagittal plane there
    at = pre.grid.physical_to_index(np.array([x, y, z])) * np.array(pre.grid.spacing)  # grid mm, (z, y, x)
    # The box is the lumen widened by 45-50 mm: the hand-read roof and wall lie well inside it.
    assert np.all(at - lo >= 25.0) and np.all(hi - at >= 25.0), f"{case}: {at} not inside {lo}..{hi} by 25 mm"
    assert np.all(hi - lo <= 250.0)
