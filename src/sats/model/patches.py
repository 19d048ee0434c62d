"""Training patches: sampling and augmentation that keep the mirror meaningful.

Volumes arrive on the symmetric grid (:mod:`sats.geometry.preprocessing`): the mid-sagittal plane is
the central sagittal plane, so flipping the last (left-right) axis of a window that is
centred on that plane gives the mirrored anatomy. Every patch is therefore taken
**centred in x on the volume's centre**; only z and y are random. The mirrored branch's
input is then simply ``mirror_lr(patch)``, computed after augmentation so both branches
see the same augmented anatomy.

Augmentations (each commutes with the left-right flip, so the mirror stays exact):

* spatial, one affine resampling: isotropic scaling (0.85-1.25) and rotation about the
  left-right axis only (nodding, +-15 deg), both about a centre on the mid-sagittal
  plane. Yaw or roll would tilt the plane and break the mirror correspondence.
* a left-right flip of the whole sample (tumour side swapped): anatomy stays symmetric.
* intensity, on the patch before mirroring: Gaussian noise, multiplicative brightness,
  contrast, gamma (nnU-Net's probabilities and ranges, roughly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sats.geometry.symmetry import mirror_lr


@dataclass
class CaseArrays:
    """One preprocessed training case: ``image`` float32, (z, y, x) or with channels
    (C, z, y, x) (the CT and its registered mirror: ``fusion="registered"``), and ``label``
    uint8 (z, y, x), on a grid symmetric about the central x plane. ``fg`` lists the voxel indices (n, 3) that
    foreground sampling centres on: the tumour, or m_unsup for an unlabelled case.

    ``asym`` is the unsupervised asymmetric region m_unsup (:mod:`sats.geometry.asymmetry`), uint8,
    where the run uses it; ``labelled`` is False for an unlabelled CT, whose ``label`` is
    all zeros and never enters the segmentation loss."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    fg: np.ndarray
    asym: np.ndarray | None = None
    labelled: bool = True


@dataclass
class AugmentConfig:
    enabled: bool = True
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.85, 1.25)
    p_rotate: float = 0.2
    max_rotate_deg: float = 15.0
    p_flip: float = 0.5
    p_noise: float = 0.1
    noise_var: tuple[float, float] = (0.0, 0.1)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.15
    gamma: tuple[float, float] = (0.7, 1.5)


def sample_patch(
    case: CaseArrays,
    patch: tuple[int, int, int],
    rng: np.random.Generator,
    force_foreground: bool,
    augment: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One (image, label, asym) patch of shape ``patch`` (z, y, x), centred in x on the
    plane; ``asym`` is the same window of ``case.asym`` (None without one). A case image
    with channels gives a (C, z, y, x) patch, every channel transformed alike (the
    intensity augmentation draws once for the whole stack, so channels stay comparable).

    Regions outside the volume read as the image minimum (air) and label 0.
    """
    shape = np.array(case.label.shape)
    p = np.array(patch)
    centre = np.empty(3)
    if force_foreground and len(case.fg):
        centre[:2] = case.fg[rng.integers(len(case.fg))][:2]
    else:
        # Like nnU-Net: a patch may hang over the border by up to half its size.
        for a in range(2):
            lo = min(p[a] / 2 - 0.5, (shape[a] - 1) / 2)
            hi = max(shape[a] - p[a] / 2 - 0.5, (shape[a] - 1) / 2)
            centre[a] = rng.uniform(lo, hi)
    centre[2] = (shape[2] - 1) / 2  # the mid-sagittal plane
    if (shape[2] - p[2]) % 2:
        raise ValueError(f"x size {shape[2]} and patch x {p[2]} must have the same parity for a centred crop")
    centre[:2] = np.round(centre[:2])

    matrix = np.eye(3)
    if augment.enabled and rng.random() < augment.p_rotate:
        a = np.radians(rng.uniform(-augment.max_rotate_deg, augment.max_rotate_deg))
        # Rotation in the (z, y) plane = about the left-right axis.
        matrix = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ matrix
    if augment.enabled and rng.random() < augment.p_scale:
        matrix = matrix * rng.uniform(*augment.scale)
    out_centre = (p - 1) / 2
    offset = centre - matrix @ out_centre
    air = float(case.image.min())
    channels = [case.image] if case.image.ndim == 3 else list(case.image)
    masks = [case.label] + ([case.asym] if case.asym is not None else [])
    if np.allclose(matrix, np.eye(3)):
        channels = [_crop(c, centre, p, air) for c in channels]
        masks = [_crop(m, centre, p, 0) for m in masks]
    else:
        channels = [ndimage.affine_transform(c, matrix, offset, output_shape=tuple(p), order=1, mode="constant",
                                             cval=air).astype(np.float32) for c in channels]
        masks = [(ndimage.affine_transform(m.astype(np.float32), matrix, offset, output_shape=tuple(p), order=1,
                                           mode="constant", cval=0.0) >= 0.5).astype(np.uint8) for m in masks]
    image = channels[0] if case.image.ndim == 3 else np.stack(channels)
    if augment.enabled and rng.random() < augment.p_flip:  # along x, the left-right axis
        image, masks = mirror_lr(image), [mirror_lr(m) for m in masks]
    if augment.enabled:
        image = _intensity(image, rng, augment)
    return image, masks[0], (masks[1] if len(masks) > 1 else None)


def _crop(array: np.ndarray, centre: np.ndarray, size: np.ndarray, fill: float) -> np.ndarray:
    """Window of ``size`` whose centre is ``centre`` (voxel units, may be half-integer), padded with ``fill``."""
    start = np.round(centre - (size - 1) / 2).astype(int)
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, array.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = array[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


def _intensity(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    if rng.random() < cfg.p_noise:
        image = image + rng.normal(0.0, np.sqrt(rng.uniform(*cfg.noise_var)), image.shape).astype(np.float32)
    if rng.random() < cfg.p_brightness:
        image = image * np.float32(rng.uniform(*cfg.brightness))
    if rng.random() < cfg.p_contrast:
        lo, hi, mean = image.min(), image.max(), image.mean()
        image = np.clip((image - mean) * np.float32(rng.uniform(*cfg.contrast)) + mean, lo, hi)
    if rng.random() < cfg.p_gamma:
        lo, hi = image.min(), image.max()
        span = max(hi - lo, 1e-6)
        image = ((image - lo) / span) ** np.float32(rng.uniform(*cfg.gamma)) * span + lo
    return image.astype(np.float32)
