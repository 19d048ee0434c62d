"""Sliding-window inference on the symmetric grid (used by validation and prediction)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from sats.symmetry import mirror_lr


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for, a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"unknown precision {precision!r} (fp32 or bf16)")
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
    progress: bool = False,
) -> np.ndarray:
    """Tumour probabilities for a whole preprocessed image.

    Windows are weighted by a Gaussian (sigma = patch / 8) and accumulated on the CPU in
    float32, so memory is bounded by the image, not the number of windows.

    Args:
        predictor: maps a batch ``(N, 1, D, H, W)`` to logits ``(N, 1, D, H, W)``.
        image: normalised image (z, y, x).
        tta: also predict the left-right mirrored image and average the probabilities
            (flipped back along the left-right axis).
    Returns:
        float32 probabilities (z, y, x).
    """
    device = torch.device(device)
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None]  # a writable copy
    air = float(image.min())

    def run(inp: torch.Tensor) -> torch.Tensor:
        def wrapped(batch: torch.Tensor) -> torch.Tensor:
            with autocast(device, precision):
                return predictor(batch.to(device)).float()

        return sliding_window_inference(
            inp, roi_size=patch_size, sw_batch_size=1, predictor=wrapped, overlap=overlap,
            mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=air,
            sw_device=device, device=torch.device("cpu"), progress=progress,
        )

    prob = torch.sigmoid(run(x))
    if tta:
        prob = (prob + mirror_lr(torch.sigmoid(run(mirror_lr(x))))) / 2
    return prob[0, 0].numpy().astype(np.float32)
