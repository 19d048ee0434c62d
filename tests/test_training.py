"""Training: patches keep the mirror, resume is exact, DDP ranks agree, RUN folder contents."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from sats.data.dataset import split_folds
from sats.data.io import write_image
from sats.geometry.symmetry import mirror_lr
from sats.geometry.volume import Volume
from sats.model.config import build
from sats.model.patches import AugmentConfig, CaseArrays, sample_patch
from sats.model.training import train

REPO = Path(__file__).resolve().parents[1]


def make_tiny_dataset(root: Path, n: int = 5, seed: int = 0) -> Path:
    """Symmetric ellipsoid 'heads' with a bright one-sided blob as tumour; 16 x 40 x 40 voxels."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    z, y, x = np.mgrid[:16, :40, :40].astype(np.float32)
    for i in range(n):
        head = ((z - 7.5) / 9) ** 2 + ((y - 19.5) / 17) ** 2 + ((x - 19.5) / 16) ** 2 < 1
        side = 1 if i % 2 else -1
        cz, cy, cx = rng.uniform(6, 9), rng.uniform(15, 24), 19.5 + side * rng.uniform(5, 9)
        tumour = ((z - cz) / 3) ** 2 + ((y - cy) / 4) ** 2 + ((x - cx) / 4) ** 2 < 1
        ct = np.where(head, 40.0, -1000.0) + np.where(tumour, 150.0, 0.0) + rng.normal(0, 10, head.shape)
        geo = dict(spacing=(3.0, 1.6, 1.6), origin=(-30.0, -20.0, 10.0))
        write_image(Volume(ct.astype(np.int16), **geo), root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        write_image(Volume(tumour.astype(np.uint8), **geo), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "GTV": 1}, "numTraining": n, "file_ending": ".nii.gz",
    }))
    return root


def tiny_config(**kw):
    base = dict(patch_size=(16, 32, 32), spacing=(3.0, 1.6, 1.6), base_features=4, max_features=16,
                stage1_epochs=1, stage2_epochs=1, iters_per_epoch=2, val_overlap=0.25, augment=True,
                align=False)  # the tiny volumes are featureless ellipsoids, not heads
    return build("cpu", **{**base, **kw})


def test_patches_are_centred_on_the_plane_so_the_mirror_is_exact() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 30, 24)).astype(np.float32)
    image = (image + mirror_lr(image)) / 2  # symmetric about the central x plane
    case = CaseArrays("c", image, np.zeros(image.shape, np.uint8), np.zeros((0, 3), int))
    no_aug = AugmentConfig(enabled=False)
    for _ in range(5):
        patch, _, _ = sample_patch(case, (8, 16, 16), rng, False, no_aug)
        np.testing.assert_array_equal(patch, mirror_lr(patch))
    spatial = AugmentConfig(p_scale=1.0, p_rotate=1.0, p_flip=0.0, p_noise=0, p_brightness=0, p_contrast=0, p_gamma=0)
    for _ in range(5):
        patch, _, _ = sample_patch(case, (8, 16, 16), rng, False, spatial)
        np.testing.assert_allclose(patch, mirror_lr(patch), atol=1e-5)


def test_off_centre_crop_would_not_be_the_mirror() -> None:
    """The property above is not automatic: a window off the plane, flipped, is other anatomy."""
    rng = np.random.default_rng(1)
    image = rng.normal(size=(8, 16, 24)).astype(np.float32)
    image = (image + mirror_lr(image)) / 2
    window = image[:, :, 2:18]
    assert not np.allclose(window, mirror_lr(window))


def test_forced_foreground_patches_contain_tumour() -> None:
    rng = np.random.default_rng(0)
    label = np.zeros((20, 60, 24), np.uint8)
    label[15:18, 50:55, 3:6] = 1
    case = CaseArrays("c", np.zeros(label.shape, np.float32), label, np.argwhere(label))
    hits = [sample_patch(case, (8, 16, 16), rng, True, AugmentConfig(enabled=False))[1].any() for _ in range(10)]
    assert all(hits)


def test_split_folds_is_a_partition_fixed_by_seed() -> None:
    ids = [f"c{i}" for i in range(11)]
    vals = [split_folds(ids, 5, k)[1] for k in range(5)]
    assert sorted(sum(vals, [])) == sorted(ids)
    assert split_folds(ids, 5, 2) == split_folds(list(reversed(ids)), 5, 2)
    assert split_folds(ids, 5, "all") == (sorted(ids), [])


def test_train_writes_a_usable_run_folder(tmp_path) -> None:
    data = make_tiny_dataset(tmp_path / "data")
    result = train(data, tmp_path / "run", tiny_config(), device="cpu")
    run = tmp_path / "run"
    for name in ("config.json", "model.pt", "checkpoint.pt", "log.csv", "curves.png"):
        assert (run / name).exists(), name
    log = (run / "log.csv").read_text().splitlines()
    assert log[0].split(",")[:8] == ["epoch", "stage", "lr", "lr_head", "loss", "dice", "ce", "margin"]
    assert len(log) == 3 and result.epochs == 2
    stage2 = dict(zip(log[0].split(","), log[2].split(",")))
    assert float(stage2["margin"]) > 0 and float(stage2["lr_head"]) > float(stage2["lr"])
    state = torch.load(run / "model.pt", weights_only=True)
    assert any(k.startswith("head.") for k in state["model"])


def test_resume_continues_exactly(tmp_path) -> None:
    torch.use_deterministic_algorithms(True)
    try:
        data = make_tiny_dataset(tmp_path / "data")
        cfg = tiny_config(stage1_epochs=2, stage2_epochs=0)
        train(data, tmp_path / "a", cfg, device="cpu")
        # Interrupted after one epoch, then resumed.
        run_b = tmp_path / "b"
        train(data, run_b, cfg, device="cpu", max_epochs=1)
        train(data, run_b, cfg, resume=True, device="cpu")
        a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]
        b = torch.load(run_b / "model.pt", weights_only=True)["model"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    finally:
        torch.use_deterministic_algorithms(False)


DDP_SCRIPT = r"""
import hashlib, json, os, sys
from pathlib import Path
import torch
import sats.data.io
import sats.model.training
from sats.model.config import build
from sats.model.training import train

rank = int(os.environ["RANK"])
writes = []
enter = sats.data.io.atomic_path.__enter__
def logged(self):
    writes.append(str(self.path))
    return enter(self)
sats.data.io.atomic_path.__enter__ = logged

drawn = []  # a digest of every training patch this rank drew
stream = sats.model.training.PatchStream.__iter__
def drawing(self):
    for item in stream(self):
        drawn.append(hashlib.sha256(item[0].numpy().tobytes()).hexdigest())
        yield item
sats.model.training.PatchStream.__iter__ = drawing

cfg = build("cpu", **json.loads(sys.argv[3]))
result = train(Path(sys.argv[1]), Path(sys.argv[2]), cfg, device="cpu")
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in result.model.parameters())).hexdigest()
Path(sys.argv[2]).parent.joinpath(f"rank{rank}.json").write_text(json.dumps({"digest": digest, "writes": writes, "patches": drawn}))
"""


def test_ddp_two_cpu_ranks_agree_and_only_rank0_writes(tmp_path) -> None:
    data = make_tiny_dataset(tmp_path / "data")
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    overrides = dict(patch_size=[16, 32, 32], spacing=[3.0, 1.6, 1.6], base_features=4, max_features=16,
                     stage1_epochs=1, stage2_epochs=1, iters_per_epoch=2, val_overlap=0.25, align=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
           str(script), str(data), str(tmp_path / "run"), json.dumps(overrides)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # Each rank trains on its own patches (2 epochs x 2 iterations x batch 2) ...
    assert len(r0["patches"]) == len(r1["patches"]) == 2 * 2 * 2
    assert not set(r0["patches"]) & set(r1["patches"]), "the ranks drew the same patches"
    # ... and still ends with the same weights: the gradients were averaged between them.
    assert r0["digest"] == r1["digest"], "ranks diverged"
    assert r1["writes"] == [] and any(w.endswith("model.pt") for w in r0["writes"])
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # one header + one row per epoch, written once


def test_a_ct_that_cannot_be_aligned_is_left_out_not_fatal(tmp_path, monkeypatch) -> None:
    from sats.geometry.alignment import Alignment
    from sats.geometry.grid import grid_centre_plane
    import sats.geometry.preprocessing as preprocessing

    data = make_tiny_dataset(tmp_path / "data")
    calls = []

    def flaky(ct, **kw):  # the plane search: the second training CT's best plane scores 0.20, under the threshold
        calls.append(1)
        return Alignment(grid_centre_plane(ct), 0.9, 0.2 if len(calls) == 2 else 0.9, 0.0)  # the featureless toys score too low

    monkeypatch.setattr(preprocessing, "find_plane", flaky)
    cfg = tiny_config(align=True, fold="all")
    train(data, tmp_path / "run", cfg, device="cpu", cache=tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert list(meta["left_out"]) == ["case_001"] and "unreliable" in meta["left_out"]["case_001"]
    assert "case_001" not in config["train_ids"] and len(config["train_ids"]) == 4
    assert not (tmp_path / "cache" / "case_001_image.npy").exists()
    # A second run reads the cache and leaves the same case out without aligning again.
    calls.clear()
    train(data, tmp_path / "run2", tiny_config(align=True, fold="all"), device="cpu", cache=tmp_path / "cache")
    assert not calls and "case_001" not in json.loads((tmp_path / "run2" / "config.json").read_text())["train_ids"]


def test_bf16_training_only_where_the_cpu_computes_it(monkeypatch) -> None:
    import sats.model.training as tr

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: False)
    assert not tr.uses_bf16(True, cpu) and tr.uses_bf16(True, cuda)
    monkeypatch.setattr(tr, "cpu_has_native_bf16", lambda: True)
    assert tr.uses_bf16(True, cpu) and not tr.uses_bf16(False, cpu) and not tr.uses_bf16(False, cuda)
