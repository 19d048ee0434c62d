"""Where to look: the region of interest (ROI) that prediction runs the network over.

A head-and-neck planning CT holds the head, the neck and the shoulders, but a
nasopharyngeal GTV fills a few centimetres of it. Sliding the full network over the
whole body costs tens of windows; over the ROI it costs one to a few. The ROI lives on
the run's symmetric grid (z, y, x) and is always symmetric about the mid-sagittal plane
(the grid's central x plane), so the left-right mirror of the ROI crop is the crop of
the mirror and the Siamese branches, mirror TTA and the asymmetry map stay exact.

Sources, tried in order (:func:`find_roi`):

1. ``localiser``: the RUN's localiser (``localiser.pt``), a small U-Net that sees the
   whole aligned CT at 6 mm and was trained on the run's own labels at the end of
   ``sats train`` (:func:`fit_localiser`). Its strongest region (:func:`localiser_box`)
   must hold at most :data:`LOCALISER_MAX_ML` and, widened by :data:`LOCALISER_MARGIN_MM`,
   fit in :data:`MAX_ROI_MM`; otherwise it is implausible and the next source is used.
2. ``landmarks``: the nasopharyngeal lumen found after alignment, widened
   (:func:`sats.geometry.landmarks.landmark_box`).
3. ``body-top``: when no nasopharynx is found, a box on the midline at the top of the
   body (the same function).

The ROI is never empty and never the whole body; every source is widened to at least one
patch where the image allows it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from sats.geometry.grid import Roi, box_to_roi, whole_roi
from sats.geometry.landmarks import landmark_box
from sats.geometry.preprocessing import Preprocessed
from sats.geometry.volume import SatsError, Volume
from sats.model.run import load_state, save_state

__all__ = ["LOCALISER_SPACING_MM", "Localiser", "Roi", "find_roi", "fit_localiser", "load_localiser", "whole_roi"]

#: The localiser's isotropic grid: a whole head and neck is about 50 voxels a side.
LOCALISER_SPACING_MM = 6.0
#: Margin around the localiser's region, (z, y, x) mm: more than a 6 mm voxel's
#: uncertainty plus a GTV's partial-volume rim.
LOCALISER_MARGIN_MM = (32.0, 32.0, 32.0)
#: The largest ROI, (z, y, x) mm: a localiser region bigger than this is not a GTV.
MAX_ROI_MM = (240.0, 240.0, 240.0)
#: A localiser region holding more than this is not a GTV (the head alone is about 4 l).
LOCALISER_MAX_ML = 1000.0
#: Below this maximum probability the localiser has found nothing.
LOCALISER_MIN_P = 0.05
#: The localiser region: voxels at or above this fraction of its maximum probability.
RELATIVE = 0.5
LOCALISER_FORMAT = 1


# --- 1. the localiser ---------------------------------------------------------------------


class Localiser(nn.Module):
    """A small 3D U-Net (MONAI) on the whole aligned CT at :data:`LOCALISER_SPACING_MM`:
    ``(B, 1, D, H, W)`` normalised image to ``(B, 1, D, H, W)`` GTV logits, any size (padded
    to a multiple of 8 inside)."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        from monai.networks.nets import UNet

        super().__init__()
        self.channels = tuple(channels)
        self.net = UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=self.channels,
                        strides=(2,) * (len(channels) - 1), num_res_units=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2 ** (len(self.channels) - 1)
        size = x.shape[2:]
        pad = [p for s in reversed(size) for p in (0, (-s) % m)]
        y = self.net(F.pad(x, pad, value=float(x.min())))
        return y[..., : size[0], : size[1], : size[2]]


def coarse_shape(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[int, int, int]:
    """The size of the localiser grid covering an image of ``shape`` at ``spacing`` mm."""
    return tuple(max(4, int(round(n * s / LOCALISER_SPACING_MM))) for n, s in zip(shape, spacing))  # type: ignore[return-value]


def to_coarse(array: np.ndarray, spacing: tuple[float, ...], is_label: bool = False) -> torch.Tensor:
    """``(z, y, x)`` array on the run's grid -> ``(1, 1, d, h, w)`` on the localiser grid
    (area averaging). A label becomes 1 wherever a coarse voxel holds any tumour, so a
    region grown from it covers every tumour voxel."""
    x = torch.from_numpy(np.array(array, dtype=np.float32))[None, None]  # a writable copy
    out = F.interpolate(x, size=coarse_shape(array.shape, spacing), mode="area")
    return (out > 0).float() if is_label else out


#: Training crops of the localiser grid, (z, y, x) voxels: 192 mm cubes at 6 mm.
LOCALISER_CROP = (32, 32, 32)


def _crop(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, foreground: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A :data:`LOCALISER_CROP` crop of ``(1, 1, d, h, w)`` image and label, padded with
    the image minimum where the volume is smaller; centred on a tumour voxel if asked."""
    size = np.array(LOCALISER_CROP)
    shape = np.array(x.shape[2:])
    if foreground:
        centre = np.argwhere(y[0, 0].numpy() > 0)[int(rng.integers(int(y.sum())))] + rng.integers(-6, 7, 3)
    else:
        centre = rng.integers(0, shape)
    lo = np.clip(centre - size // 2, 0, np.maximum(shape - size, 0))
    sl = (..., *(slice(a, a + s) for a, s in zip(lo, size)))
    xc, yc = x[sl], y[sl]
    pad = [p for a in (2, 1, 0) for p in (0, int(size[a] - xc.shape[2 + a]))]
    return F.pad(xc, pad, value=float(x.min())), F.pad(yc, pad)


def fit_localiser(cases: list, spacing: tuple[float, float, float], seed: int = 0, iterations: int = 300,
                  batch: int = 2, lr: float = 1e-2, device: torch.device | str = "cpu") -> Localiser:
    """Train the localiser on preprocessed cases (objects with ``image`` and ``label`` on
    the run's grid): :data:`LOCALISER_CROP` crops of the coarse volumes, half of them
    centred on tumour, random left-right flips (x, the last axis), Dice + BCE, Adam with a
    poly decay. About a minute on 2 CPU cores.

    Trained this briefly it separates tumour from the rest (mean probability about 0.3
    inside, under 0.01 outside) without being calibrated, so :func:`localiser_box`
    thresholds relative to its maximum."""
    from sats.model.losses import SegmentationLoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ct = [np.asarray(c.image)[0] if np.ndim(c.image) == 4 else c.image for c in cases]  # the CT channel
    data = [(to_coarse(image, spacing), to_coarse(c.label, spacing, is_label=True)) for image, c in zip(ct, cases)]
    data = [(x, y) for x, y in data if y.any()]
    if not data:
        raise SatsError("no labelled case to train the localiser on")
    model = Localiser().to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = SegmentationLoss()
    for it in range(iterations):
        crops = [_crop(*data[int(rng.integers(len(data)))], rng, foreground=k % 2 == 0) for k in range(batch)]
        x, y = (torch.cat(t).to(device) for t in zip(*crops))
        if rng.random() < 0.5:  # left-right: x is the last axis
            x, y = x.flip(-1), y.flip(-1)
        for group in opt.param_groups:
            group["lr"] = lr * (1 - it / iterations) ** 0.9
        terms = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        (terms["dice"] + terms["ce"]).backward()
        opt.step()
    return model.eval()


def save_localiser(model: Localiser, path: Path) -> None:
    save_state(path, {"format": LOCALISER_FORMAT, "channels": list(model.channels), "model": model.state_dict()})


def load_localiser(path: Path, device: torch.device | str = "cpu") -> Localiser | None:
    """The localiser in ``path`` (weights only), or None when there is none."""
    if not Path(path).exists():
        return None
    state = load_state(path)
    try:
        model = Localiser(tuple(state["channels"]))
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError):
        raise SatsError(f"{path}: not a sats localiser") from None
    return model.to(device).eval()


@torch.no_grad()
def localiser_box(model: Localiser, image: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray] | None:
    """The localiser's strongest region as a (lo, hi) box in grid mm from voxel [0, 0, 0],
    (z, y, x): the connected voxels at or above half the maximum probability holding the
    most probability. None when the maximum is under :data:`LOCALISER_MIN_P` (no tumour)
    or the region holds more than :data:`LOCALISER_MAX_ML` (not a GTV)."""
    device = next(model.parameters()).device
    x = to_coarse(image, spacing).to(device)
    prob = torch.sigmoid(model(x))[0, 0].float().cpu().numpy()
    if prob.max() < LOCALISER_MIN_P:
        return None
    found = prob >= RELATIVE * prob.max()
    labels, n = ndimage.label(found)
    mass = ndimage.sum_labels(prob, labels, index=np.arange(1, n + 1))
    idx = np.argwhere(labels == int(np.argmax(mass)) + 1)
    step = np.array(image.shape) * np.array(spacing) / np.array(prob.shape)  # mm per coarse voxel
    if len(idx) * np.prod(step) / 1000.0 > LOCALISER_MAX_ML:
        return None
    return idx.min(axis=0) * step, (idx.max(axis=0) + 1) * step


# --- the ROI of a case -------------------------------------------------------------------------


def find_roi(ct: Volume, pre: Preprocessed, patch_size: tuple[int, int, int], localiser: Localiser | None) -> Roi:
    """The ROI for one case (see the module docstring for the rules).

    Args:
        ct: the input CT in HU (for the landmark search).
        pre: the case on the run's symmetric grid.
        patch_size: the network's window, (z, y, x) voxels.
        localiser: the run's localiser, or None to go straight to landmarks.
    """
    spacing = pre.grid.spacing
    if localiser is not None:
        box = localiser_box(localiser, pre.image, spacing)
        if box is not None:
            lo, hi = box[0] - np.array(LOCALISER_MARGIN_MM), box[1] + np.array(LOCALISER_MARGIN_MM)
            if np.all(hi - lo <= np.array(MAX_ROI_MM)):
                return box_to_roi(lo, hi, pre.grid, patch_size, "localiser")
    lo, hi, source = landmark_box(ct, pre.grid, pre.plane)
    return box_to_roi(lo, hi, pre.grid, patch_size, source)
