"""Inference: sliding windows on the symmetric grid, then back to the input's exact grid.

Pipeline of :func:`predict_case`: read -> the training run's preprocessing (plane,
spacing, normalisation) -> sliding-window inference with Gaussian weighting (sigma =
patch / 8), optional mirror test-time augmentation -> probabilities resampled linearly
onto the input grid -> threshold 0.5. The mask has the input's size, spacing, origin and
direction.

The CT and its left-right mirror can run side by side as the two channels of one
sliding window: window w of the mirror then holds the anatomical mirror partners of
window w of the CT, which gives mirror TTA and the asymmetry map
``||g(E) - g(E')||`` (what the model finds asymmetric) in the same pass.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from sats.io import SatsError, Volume, read_image
from sats.network import NetworkPlan, SATsNet
from sats.preprocessing import IntensityStats, Preprocessed, preprocess, resample_to
from sats.symmetry import mirror_lr


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for, a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise SatsError(f"unknown precision {precision!r} (fp32 or bf16)")
    return nullcontext()


@torch.no_grad()
def sliding_window_probabilities(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    patch_size: tuple[int, int, int],
    overlap: float = 0.5,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    tta: bool = False,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tumour probabilities (and optionally the asymmetry map) for a preprocessed image.

    Windows are accumulated on the CPU in float32 (MONAI's ``sliding_window_inference``
    with ``device=cpu``), so memory grows with the image, not with the number of windows.

    Args:
        predictor: maps ``(N, 1, D, H, W)`` to ``(logits (N, 1, D, H, W), E (N, C, D, H, W))``.
        image: normalised image (z, y, x) on the symmetric grid.
        tta: average with the prediction of the left-right mirror, flipped back.
        head: the projection head g; when given, also return ``||g(E) - g(E')||`` per voxel.
    Returns:
        ``(probabilities, asymmetry)``, float32 arrays (z, y, x); asymmetry is None without ``head``.
    """
    device = torch.device(device)
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None]  # a writable copy
    siamese = tta or head is not None
    if siamese:
        x = torch.cat([x, mirror_lr(x)], dim=1)  # channel 1: the mirror, windowed alongside

    def windows(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device)
        n = batch.shape[0]
        with autocast(device, precision):
            inp = torch.cat([batch[:, :1], batch[:, 1:]], dim=0) if siamese else batch
            logits, e = predictor(inp)
            outputs = [logits[:n]]
            if siamese:
                outputs.append(logits[n:])
            if head is not None:
                g = head(e)
                outputs.append((g[:n] - g[n:]).float().norm(dim=1, keepdim=True))
        return torch.cat(outputs, dim=1).float()

    out = sliding_window_inference(
        x, roi_size=patch_size, sw_batch_size=1, predictor=windows, overlap=overlap,
        mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=float(image.min()),
        sw_device=device, device=torch.device("cpu"), progress=progress,
    )[0]
    prob = torch.sigmoid(out[0])
    if tta:
        prob = (prob + mirror_lr(torch.sigmoid(out[1]))) / 2
    asym = out[2].numpy() if head is not None else None
    return prob.numpy().astype(np.float32), asym


@dataclass
class LoadedRun:
    """A trained RUN folder: the model and the preprocessing it was trained with."""

    model: SATsNet
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    stats: IntensityStats
    config: dict

    @property
    def has_head(self) -> bool:
        return self.model.head is not None


def load_run(run: Path, device: torch.device | str = "cpu") -> LoadedRun:
    """Load ``config.json`` and ``model.pt`` of a RUN folder (weights only, never pickles)."""
    from sats.training import _check_format, _read_config, config_from_dict

    run = Path(run)
    if not run.is_dir():
        raise SatsError(f"{run}: no such RUN folder")
    config = _read_config(run)
    weights = run / "model.pt"
    if not weights.exists():
        raise SatsError(f"{run}: no model.pt (training not finished?)")
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise SatsError(f"{weights}: cannot load weights ({type(exc).__name__})") from None
    _check_format(state, weights)
    cfg = config_from_dict(config["train"])
    plan = NetworkPlan.from_dict(config["plan"])
    model = SATsNet(plan, residual=cfg.residual, projection_head=cfg.projection_head, head_channels=cfg.head_channels)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise SatsError(f"{weights}: weights do not match the network in config.json") from None
    return LoadedRun(model.to(device).eval(), tuple(plan.patch_size), tuple(config["spacing"]), IntensityStats(**config["intensity"]), config)


def check_ct(volume: Volume, name: str) -> None:
    """Refuse images that are not CT in HU (a clear message rather than a silent bad mask)."""
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if lo > -500 or hi < 100:
        raise SatsError(f"{name}: intensities {lo:.0f}..{hi:.0f} do not look like CT in HU (expect air near -1000)")
    if min(volume.shape) < 2:
        raise SatsError(f"{name}: a 3D CT is needed, got size {volume.shape[::-1]} (x, y, z)")


@dataclass
class Prediction:
    """Outputs for one case on the input's grid."""

    mask: Volume  # uint8 {0, 1}
    probabilities: Volume  # float32 [0, 1]
    asymmetry: Volume | None  # float32, ||g(E) - g(E')||
    seconds: float


def preprocess_for(run: LoadedRun, ct: Volume) -> Preprocessed:
    return preprocess(ct, run.spacing, run.stats)


def predict_case(
    run: LoadedRun,
    ct: Volume,
    pre: Preprocessed | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    overlap: float = 0.5,
    tta: bool = False,
    asymmetry_map: bool = False,
    progress: bool = False,
) -> Prediction:
    """Predict one CT (HU, any grid); the outputs share the CT's exact geometry."""
    import time

    t0 = time.time()
    if asymmetry_map and not run.has_head:
        raise SatsError("--asymmetry-map needs a model trained with the projection head")
    pre = pre or preprocess_for(run, ct)
    model = run.model
    prob, asym = sliding_window_probabilities(
        model.encoder_decoder, pre.image, run.patch_size, overlap=overlap, device=device, precision=precision,
        tta=tta, head=model.head if asymmetry_map else None, progress=progress,
    )
    prob_native = resample_to(pre.grid.with_array(prob), ct, order=1, default=0.0)
    mask = ct.with_array((prob_native.array >= 0.5).astype(np.uint8))
    asym_native = resample_to(pre.grid.with_array(asym), ct, order=1, default=0.0) if asym is not None else None
    return Prediction(mask, prob_native, asym_native, time.time() - t0)


def prefetch(items: list, load: Callable, workers: int = 1) -> Iterator[tuple[object, Future]]:
    """Yield ``(item, future)`` with the next item's ``load`` already running in a thread,
    so reading and preprocessing the next case overlaps inference of the current one."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(load, items[0])] if items else []
        for i, item in enumerate(items):
            if i + 1 < len(items):
                futures.append(pool.submit(load, items[i + 1]))
            yield item, futures[i]
