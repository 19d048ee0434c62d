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
2. ``landmarks``: the nasopharyngeal lumen found after alignment
   (:func:`sats.data.lesion.find_nasopharynx`), widened by :data:`NPC_MARGIN_MM`.
3. ``body-top``: when no nasopharynx is found, a box of :data:`BODY_TOP_MM` on the
   midline at the top of the body.

The ROI is never empty and never the whole body; every source is widened to at least one
patch where the image allows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from sats.data.io import SatsError, Volume
from sats.geometry.preprocessing import Preprocessed

__all__ = ["LOCALISER_SPACING_MM", "Localiser", "Roi", "find_roi", "fit_localiser", "load_localiser", "whole_roi"]

#: The localiser's isotropic grid: a whole head and neck is about 50 voxels a side.
LOCALISER_SPACING_MM = 6.0
#: Margin around the localiser's region, (z, y, x) mm: more than a 6 mm voxel's
#: uncertainty plus a GTV's partial-volume rim.
LOCALISER_MARGIN_MM = (32.0, 32.0, 32.0)
#: Margin around the nasopharyngeal lumen for the landmark ROI, (z, y, x) mm: an NPC GTV
#: grows from the lumen's walls into the parapharyngeal space, the skull base and down
#: the posterior wall; 60 ml is about 50 mm across.
NPC_MARGIN_MM = (45.0, 45.0, 50.0)
#: The largest ROI, (z, y, x) mm: a localiser region bigger than this is not a GTV.
MAX_ROI_MM = (240.0, 240.0, 240.0)
#: A localiser region holding more than this is not a GTV (the head alone is about 4 l).
LOCALISER_MAX_ML = 1000.0
#: Below this maximum probability the localiser has found nothing.
LOCALISER_MIN_P = 0.05
#: The localiser region: voxels at or above this fraction of its maximum probability.
RELATIVE = 0.5
#: The last fallback, (z, y, x) mm: the top ``z`` of the body (the nasopharynx lies 60-120
#: mm below the vertex, nearer the top in scans cut through the head), ``y`` about the
#: head's centre, ``x`` about the midline.
BODY_TOP_MM = (150.0, 160.0, 140.0)
LOCALISER_FORMAT = 1


@dataclass(frozen=True)
class Roi:
    """A box on the symmetric grid: ``start`` inclusive, ``stop`` exclusive, (z, y, x)
    voxels; ``source`` says which rule found it (see the module docstring)."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    source: str

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def miss_fraction(self, label: np.ndarray) -> float:
        """The fraction of the label's voxels (same grid) outside the ROI; 0 for an empty label."""
        total = int(np.count_nonzero(label))
        return 0.0 if total == 0 else 1.0 - int(np.count_nonzero(label[self.slices])) / total


def whole_roi(shape: tuple[int, int, int]) -> Roi:
    """The whole grid (``--roi whole``)."""
    return Roi((0, 0, 0), tuple(int(s) for s in shape), "whole")  # type: ignore[arg-type]


def _span(lo: float, hi: float, n: int, min_len: int) -> tuple[int, int]:
    """[lo, hi) clipped to [0, n), grown about its centre to at least ``min(min_len, n)``."""
    length = max(int(min(np.ceil(hi), n) - max(np.floor(lo), 0)), min(min_len, n))
    a = int(round(float(np.clip((lo + hi) / 2, 0, n)) - length / 2))
    a = min(max(a, 0), n - length)
    return a, a + length


def box_to_roi(lo_mm: np.ndarray, hi_mm: np.ndarray, grid: Volume, patch: tuple[int, int, int], source: str) -> Roi:
    """A box in grid mm from voxel [0, 0, 0], (z, y, x), as a :class:`Roi`: clipped to the
    grid, at least ``patch`` where the grid allows, and symmetric about the central x plane
    (x is the left-right axis; the symmetric grid's x size is even)."""
    spacing = np.array(grid.spacing)
    lo, hi = np.asarray(lo_mm) / spacing, np.asarray(hi_mm) / spacing + 1
    (z0, z1), (y0, y1) = (_span(lo[a], hi[a], grid.shape[a], patch[a]) for a in (0, 1))
    nx = grid.shape[2]
    half = max(nx / 2 - lo[2], hi[2] - nx / 2, min(patch[2], nx) / 2)
    half = int(min(np.ceil(half), nx // 2)) if nx > 1 else 1
    x0, x1 = (nx // 2 - half, nx // 2 + half) if nx > 1 else (0, 1)
    return Roi((z0, y0, x0), (z1, y1, x1), source)


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
    data = [(to_coarse(c.image, spacing), to_coarse(c.label, spacing, is_label=True)) for c in cases]
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
    from sats.model.run import _save

    _save(path, {"format": LOCALISER_FORMAT, "channels": list(model.channels), "model": model.state_dict()})


def load_localiser(path: Path, device: torch.device | str = "cpu") -> Localiser | None:
    """The localiser in ``path`` (weights only), or None when there is none."""
    from sats.model.run import _load

    if not Path(path).exists():
        return None
    state = _load(path)
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


# --- 2-3. landmarks ---------------------------------------------------------------------------


def landmark_box(ct: Volume, pre: Preprocessed) -> tuple[np.ndarray, np.ndarray, str]:
    """(lo, hi, source) in grid mm: around the nasopharyngeal lumen, or the top of the body."""
    from sats.data.lesion import WORK_SPACING, SkipBackground, find_nasopharynx
    from sats.geometry.preprocessing import resample_to

    # The CT in its head frame at WORK_SPACING over the symmetric grid's extent (same axes,
    # x = 0 on the plane): the frame find_nasopharynx reads.
    grid = pre.grid
    extent = (np.array(grid.shape) - 1) * np.array(grid.spacing)  # (z, y, x) mm
    n = (extent / np.array(WORK_SPACING)).astype(int) + 1
    n[2] += n[2] % 2
    start = np.array([0.0, 0.0, (extent[2] - (n[2] - 1) * WORK_SPACING[2]) / 2])  # centred in x: symmetric
    origin = grid.index_to_physical(start / np.array(grid.spacing))
    frame = Volume(np.zeros(tuple(n), np.uint8), WORK_SPACING, tuple(origin), grid.direction)
    head_origin_q = grid.direction.T @ (np.asarray(origin) - pre.plane.point)
    head = Volume(resample_to(ct, frame, order=1, default=-1024.0).array, WORK_SPACING, tuple(head_origin_q), np.eye(3))
    # Head-frame mm (x, y, z) -> grid mm (z, y, x) from the symmetric grid's voxel [0, 0, 0].
    grid_origin_q = grid.direction.T @ (np.asarray(grid.origin) - pre.plane.point)

    def to_grid(q: np.ndarray) -> np.ndarray:
        return (np.asarray(q, float) - grid_origin_q)[::-1]

    try:
        npx = find_nasopharynx(head)
        lo, hi = to_grid(npx.lumen.min(axis=0)), to_grid(npx.lumen.max(axis=0))
        return lo - np.array(NPC_MARGIN_MM), hi + np.array(NPC_MARGIN_MM), "landmarks"
    except SkipBackground:
        pass
    body = head.array > -500
    if not body.any():
        raise SatsError("no body found (no voxels above -500 HU): is this a CT in HU?")
    sz, sy, sx = head.spacing
    top = int(np.nonzero(body.any(axis=(1, 2)))[0].max())
    z0 = max(0, top - int(BODY_TOP_MM[0] / sz))
    ys = np.nonzero(body[z0: top + 1].any(axis=(0, 2)))[0]
    centre_q = np.array([0.0, head.origin[1] + (ys.min() + ys.max()) / 2 * sy, head.origin[2] + top * sz - BODY_TOP_MM[0] / 2])
    half = np.array(BODY_TOP_MM[::-1]) / 2
    return to_grid(centre_q - half), to_grid(centre_q + half), "body-top"


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
    lo, hi, source = landmark_box(ct, pre)
    return box_to_roi(lo, hi, pre.grid, patch_size, source)
