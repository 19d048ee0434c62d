"""Lesion insertion into real (and phantom) head CTs: `sats phantom --background`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from sats.cli import app
from sats.data.dataset import check_dataset
from sats.data.io import read_image, write_image
from sats.geometry.volume import SatsError, Volume
from sats.data.lesion import (
    LesionConfig,
    SkipBackground,
    insert_lesion,
    write_lesion_dataset,
)
from sats.data.phantom import PhantomConfig, make_case
from sats.geometry.landmarks import AIR_HU, BONE_HU, NoNasopharynx
from conftest import NASOPHARYNX_BY_HAND

runner = CliRunner()


def _phantom_ct(index: int) -> Volume:
    """A tumour-free analytic head: a background with a known nasopharynx."""
    return make_case(3, index, "Tr", PhantomConfig(tumor_free=True)).ct


@pytest.fixture(scope="module")
def inserted():
    ct = _phantom_ct(0)
    return ct, insert_lesion(ct, LesionConfig(tumor_contrast=8.0, volume_ml=(10.0, 20.0)), np.random.default_rng(5))


def test_lesion_is_one_piece_of_the_drawn_size_in_soft_tissue_next_to_the_airway(inserted):
    ct, lesion = inserted
    label = lesion.label.array.astype(bool)
    hu = ct.array.astype(np.float32)
    assert lesion.label.same_geometry(ct) is None and lesion.ct.same_geometry(ct) is None
    assert lesion.ct.array.dtype == ct.array.dtype
    _, n = ndimage.label(label)  # 6-connectivity
    assert n == 1
    ml = label.sum() * ct.voxel_volume_ml
    assert 10.0 * 0.999 <= ml <= 20.0 * 1.001
    assert lesion.meta["volume_ml"] == pytest.approx(ml, abs=0.01)
    # Never over air or bone of the original CT.
    assert hu[label].min() > AIR_HU and hu[label].max() < BONE_HU
    # Touches the airway: some voxel next to the lesion was air.
    assert (ndimage.binary_dilation(label, np.ones((3, 3, 3), bool)) & (hu <= AIR_HU)).any()
    # At the nasopharynx of the analytic head: its lumen is at canonical (0, +4, +3) mm;
    # the lesion's centroid is within 30 mm of it.
    pose_case = make_case(3, 0, "Tr", PhantomConfig(tumor_free=True))
    centroid = ct.index_to_physical(np.argwhere(label).mean(axis=0))
    nasopharynx = np.asarray(pose_case.pose["point"])
    assert np.linalg.norm(centroid - nasopharynx) < 30.0
    # The seed recorded in LPS mm lies in the lesion's neighbourhood.
    assert np.linalg.norm(np.asarray(lesion.meta["seed"]) - centroid) < 30.0


def test_lesion_hu_follow_the_requested_contrast_against_surrounding_muscle(inserted):
    ct, lesion = inserted
    label = lesion.label.array.astype(bool)
    core = ndimage.binary_erosion(label)  # inside the partial-volume rim
    assert core.sum() > 50
    # The reference is measured here, not by the lesion module: the median of the original CT's
    # muscle-range voxels (0-120 HU) within 10 mm outside the lesion.
    hu = ct.array.astype(np.float32)
    distance = ndimage.distance_transform_edt(~label, sampling=ct.spacing)
    muscle = float(np.median(hu[(distance > 0) & (distance <= 10.0) & (hu >= 0.0) & (hu <= 120.0)]))
    assert 35.0 <= muscle <= 60.0  # the phantom's soft tissue, mucosa and muscles there (sats.data.phantom)
    assert lesion.meta["muscle_hu"] == pytest.approx(muscle, abs=0.5)
    mean = float(lesion.ct.array[core].astype(np.float32).mean())
    assert mean - muscle == pytest.approx(8.0, abs=1.0)
    # Texture, not a stamped constant.
    assert lesion.ct.array[core].std() > 2.0


def test_mass_effect_narrows_the_airway_next_to_the_lesion(inserted):
    ct, lesion = inserted
    label = lesion.label.array.astype(bool)
    near = (ndimage.distance_transform_edt(~label, sampling=ct.spacing) <= 10.0) & ~label
    before = int((ct.array[near] <= AIR_HU).sum())
    after = int((lesion.ct.array[near] <= AIR_HU).sum())
    assert before > 0 and after < before
    # Smooth: far from the lesion the CT is untouched.
    far = ndimage.distance_transform_edt(~label, sampling=ct.spacing) > 60.0
    assert np.array_equal(lesion.ct.array[far], ct.array[far])


def test_insertion_is_deterministic_per_seed():
    ct = _phantom_ct(0)
    config = LesionConfig(volume_ml=(5.0, 8.0))
    a = insert_lesion(ct, config, np.random.default_rng(11))
    b = insert_lesion(ct, config, np.random.default_rng(11))
    assert np.array_equal(a.ct.array, b.ct.array) and np.array_equal(a.label.array, b.label.array)
    assert a.meta == b.meta


def test_a_head_cut_above_the_skull_base_is_skipped_with_a_reason():
    case = make_case(3, 0, "Tr", PhantomConfig(tumor_free=True))
    ct = case.ct
    # Keep only the slices more than 30 mm above the nasopharynx (canonical z): brain and vault.
    z_mm = ct.index_to_physical(np.array([[k, 0, 0] for k in range(ct.shape[0])]))[:, 2]
    keep = z_mm > case.pose["point"][2] + 30.0
    cut = Volume(np.ascontiguousarray(ct.array[keep]), spacing=ct.spacing,
                 origin=tuple(ct.index_to_physical(np.array([np.argmax(keep), 0, 0]))), direction=ct.direction)
    with pytest.raises(SkipBackground) as info:
        insert_lesion(cut, LesionConfig(), np.random.default_rng(0))
    assert str(info.value)  # one line saying why


def test_a_thorax_ct_is_skipped_with_a_reason(lung_dicom):
    ct = read_image(lung_dicom / "ct")
    with pytest.raises(SkipBackground) as info:
        insert_lesion(ct, LesionConfig(), np.random.default_rng(0))
    assert "\n" not in str(info.value) and str(info.value)


def test_dataset_from_a_folder_is_deterministic_checks_and_lists_skips(tmp_path):
    backgrounds = tmp_path / "cts"
    for i in (0, 1):
        write_image(_phantom_ct(i), backgrounds / f"head{i}.nii.gz")
    block = np.full((30, 60, 60), -1000, np.int16)
    block[5:25, 10:50, 10:50] = 40  # a box of soft tissue with a bone core: CT, but no head
    block[12:18, 25:35, 25:35] = 700
    write_image(Volume(block, spacing=(2.5, 2.0, 2.0)), backgrounds / "block.nii.gz")
    config = LesionConfig(volume_ml=(5.0, 8.0))
    first = write_lesion_dataset(tmp_path / "a", backgrounds, n_train=1, n_test=1, seed=4, config=config, workers=1)
    second = write_lesion_dataset(tmp_path / "b", backgrounds, n_train=1, n_test=1, seed=4, config=config, workers=2)
    assert first == second
    for split, case in (("Tr", "npc_000"), ("Ts", "npc_test_000")):
        for kind, name in (("images", f"{case}_0000.nii.gz"), ("labels", f"{case}.nii.gz")):
            a = read_image(tmp_path / "a" / f"{kind}{split}" / name).array
            b = read_image(tmp_path / "b" / f"{kind}{split}" / name).array
            assert np.array_equal(a, b)
    lesions = json.loads((tmp_path / "a" / "lesions.json").read_text())
    skipped = json.loads((tmp_path / "a" / "skipped.json").read_text())
    assert set(lesions) == {"npc_000", "npc_test_000"}
    sources = {v["source"] for v in lesions.values()}
    assert sources == {"head0.nii.gz", "head1.nii.gz"}  # each background once, test and train disjoint
    assert set(skipped) == {"block.nii.gz"} and skipped["block.nii.gz"]
    for entry in lesions.values():
        assert entry["side"] in ("left", "right")
        assert set(entry["plane"]) == {"normal", "point"} and len(entry["seed"]) == 3
        assert 5.0 * 0.999 <= entry["volume_ml"] <= 8.0 * 1.001
        assert 0.0 <= entry["contrast_hu"] <= 15.0
    report = check_dataset(tmp_path / "a")
    assert report.problems == []


def test_cli_refuses_analytic_options_with_background(tmp_path):
    result = runner.invoke(app, ["phantom", str(tmp_path / "o"), "--background", str(tmp_path), "--size", "paper"])
    assert result.exit_code == 1 and "--size" in result.output
    result = runner.invoke(app, ["phantom", str(tmp_path / "o"), "--volume-ml", "5", "10"])
    assert result.exit_code == 1 and "--background" in result.output


@pytest.mark.parametrize("case", ["kbp_train_112", "kbp_test_276"])
def test_real_openkbp_ct_gets_a_lesion_at_the_nasopharynx(openkbp, case):
    split = "Ts" if "test" in case else "Tr"
    ct = read_image(openkbp / f"images{split}" / f"{case}_0000.nii.gz")
    lesion = insert_lesion(ct, LesionConfig(), np.random.default_rng(2))
    label = lesion.label.array.astype(bool)
    hu = ct.array.astype(np.float32)
    assert 5.0 * 0.999 <= label.sum() * ct.voxel_volume_ml <= 60.0 * 1.001
    assert hu[label].min() > AIR_HU and hu[label].max() < BONE_HU
    assert (ndimage.binary_dilation(label, np.ones((3, 3, 3), bool)) & (hu <= AIR_HU)).any()
    # The nasopharynx it found is the one read by hand (tests/conftest.py), to about two
    # voxels, and the lesion lies within 40 mm of that roof.
    hand = NASOPHARYNX_BY_HAND[case]
    found = np.asarray(lesion.meta["nasopharynx_roof"])  # LPS (x, y, z) of (midline, posterior wall, roof)
    assert abs(found[2] - hand["roof_z"]) <= 6.0, f"roof at z {found[2]:.0f} mm, by hand {hand['roof_z']:.0f}"
    assert abs(found[1] - hand["posterior_wall_y"]) <= 9.0, f"posterior wall at y {found[1]:.0f} mm, by hand {hand['posterior_wall_y']:.0f}"
    centroid = ct.index_to_physical(np.argwhere(label).mean(axis=0))
    assert abs(centroid[2] - hand["roof_z"]) < 40.0 and abs(centroid[1] - hand["posterior_wall_y"]) < 40.0


def test_the_nasopharynx_search_refuses_an_empty_head():
    head = Volume(np.full((40, 60, 60), 40, np.int16), spacing=(2.0, 2.0, 2.0), origin=(-59.0, -59.0, -39.0))
    with pytest.raises(NoNasopharynx):
        from sats.geometry.landmarks import find_nasopharynx

        find_nasopharynx(head)


def test_a_contrast_range_draws_within_it_and_keeps_the_other_draws():
    # A faint test bed (--contrast-range 0 5) must hold the same lesions as the default one
    # (same seed) but for their contrast: the range replaces the draw, not the rng order.
    from sats.data.lesion import Draw

    faint = [Draw.sample(LesionConfig(contrast_range=(0.0, 5.0)), np.random.default_rng(s)) for s in range(40)]
    usual = [Draw.sample(LesionConfig(), np.random.default_rng(s)) for s in range(40)]
    assert all(0.0 <= d.contrast_hu <= 5.0 for d in faint)
    assert max(d.contrast_hu for d in usual) > 5.0
    assert [(d.side, d.bilateral, d.volume_ml) for d in faint] == [(d.side, d.bilateral, d.volume_ml) for d in usual]
    assert all(np.allclose(a.direction, b.direction) for a, b in zip(faint, usual))
    with pytest.raises(SatsError, match="contrast-range"):
        LesionConfig(contrast_range=(5.0, 1.0))


def test_too_few_usable_backgrounds_fail_with_one_line_and_write_nothing(tmp_path):
    # One head and one CT that is not a head: the head goes to the test split, so no
    # training case can be written. The command must say so, exit non-zero and leave no dataset.
    backgrounds = tmp_path / "cts"
    write_image(_phantom_ct(0), backgrounds / "head0.nii.gz")
    block = np.full((30, 60, 60), -1000, np.int16)
    block[5:25, 10:50, 10:50] = 40
    block[12:18, 25:35, 25:35] = 700
    write_image(Volume(block, spacing=(2.5, 2.0, 2.0)), backgrounds / "block.nii.gz")
    out = tmp_path / "bed"
    result = runner.invoke(app, ["phantom", str(out), "--background", str(backgrounds), "--cases", "3", "--test-cases", "2",
                                 "--seed", "4", "--volume-ml", "5", "8"])
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 or "error:" in message.splitlines()[-1]
    assert "1 of 2 background CT(s) could take a lesion" in message and "no training case" in message
    assert not out.exists() and not list(tmp_path.glob(".bed*"))  # nothing written, no leftovers
    # A folder that is not empty is refused before any work.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["phantom", str(out), "--background", str(backgrounds), "--cases", "1", "--test-cases", "0"])
    assert result.exit_code == 1 and "not empty" in result.output and (out / "notes.txt").read_text() == "mine"
