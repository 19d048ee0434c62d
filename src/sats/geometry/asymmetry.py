"""Unsupervised asymmetric-region selection (paper Sec. 3.1, "registration-based"): where
an aligned CT differs from its own left-right mirror, found without a label.

On the symmetric grid (:mod:`sats.geometry.grid`: the mid-sagittal plane is the central
sagittal plane and the last array axis is left-right) the mirror is ``mirror_lr(ct)``.
Normal anatomy is only roughly symmetric, so the mirror is first **registered
deformably** to the CT (:mod:`sats.geometry.reflection`) (SimpleITK's symmetric-forces demons, coarse to fine, the
displacement field smoothed at every iteration by a Gaussian of ``field_sigma_vox``
voxels of each level: the regularisation that keeps a tumour from being warped away). What registration cannot
explain is asymmetry:

* the **residual** ``|CT - warped mirror|`` in HU (air -> tissue where a mass fills the
  nasopharyngeal lumen), smoothed by ``smooth_mm``; and
* the **local volume change** of the deformation, ``|log det J|`` (a mass that the
  registration did partly absorb leaves a compression or expansion behind).

The soft score is ``max(residual / residual_hu, |log det J| / log_jacobian)``: 1 where
either cue reaches its scale. m_unsup is ``score >= threshold`` inside the body (deeper
than the skin, where couch and mask differences live), without regions smaller than
``min_ml``.

By default (``region="nasopharynx"``) all of this happens in the box around the
nasopharynx that prediction also looks in (:func:`sats.geometry.landmarks.landmark_box`: the lumen found
after alignment, widened by 45-50 mm, symmetric about the plane); outside it the score is
0. A head-and-neck CT is asymmetric in many places that say nothing about a GTV (mastoid
air cells, a turned neck, the shoulders, the couch side), and registering the whole body
costs several times as long. The registration sees the box widened by ``context_mm``:
demons pulls on a crop's faces, and on tumour-free phantoms a tight crop left 10 ml of
false asymmetry there. ``region="body"`` scores the whole grid. Like the label-based ``s XOR s'`` (``asym_region="union"`` in
:func:`sats.model.losses.asymmetric_mask`) it marks both members of an asymmetric pair: the
tumour and its healthy mirror partner, which are equally dissimilar pairs for the margin
loss. The defaults were chosen by precision and recall against the label-based regions
on training cases (BENCHMARKS.md, ``bench/asymmetry_eval.py``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from sats.geometry.grid import body_mask, box_to_roi, resample_to
from sats.geometry.landmarks import landmark_box
from sats.geometry.preprocessing import PlaneSettings, Preprocessed, Preprocessor
from sats.geometry.reflection import FIELD_SIGMA_VOX, HU_WINDOW, ITERATIONS, LEVELS, register_to_mirror
from sats.geometry.symmetry import mirror_lr
from sats.geometry.volume import SatsError, Volume, to_sitk

#: HU window of the residual: the registration's (air to dense soft tissue / thin bone).
RESIDUAL_WINDOW = HU_WINDOW


@dataclass
class AsymmetryConfig:
    """Settings of the unsupervised asymmetry map (distances in mm, intensities in HU)."""

    levels: tuple[int, ...] = LEVELS  # pyramid: shrink factors, coarse to fine (sats.geometry.reflection)
    iterations: tuple[int, ...] = ITERATIONS  # demons iterations per level
    field_sigma_vox: float = FIELD_SIGMA_VOX  # Gaussian smoothing of the displacement field, voxels of each level (regularisation)
    smooth_mm: float = 2.0  # smoothing of the residual before scoring
    residual_hu: float = 100.0  # residual that scores 1
    log_jacobian: float = 0.6  # |log det J| that scores 1 (a volume change of about x1.8)
    threshold: float = 1.0  # score at or above which a voxel is asymmetric
    min_ml: float = 0.3  # smaller connected regions are dropped
    skin_mm: float = 5.0  # ignore the outermost mm of the body (couch, mask, skin folds)
    region: str = "nasopharynx"  # where to look: "nasopharynx" (sats.geometry.landmarks.landmark_box) or "body"
    context_mm: float = 20.0  # the registration sees the region widened by this much (scoring stays inside)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AsymmetryMap:
    """The result on the aligned grid: ``score`` float32 and ``mask`` uint8, (z, y, x)."""

    score: np.ndarray
    mask: np.ndarray
    seconds: float



@dataclass
class Cues:
    """The two cues on the aligned grid, (z, y, x) float32: the smoothed residual in HU, the
    volume change ``|log det J|``, and ``inner``, the body deeper than ``skin_mm``."""

    residual: np.ndarray
    log_jacobian: np.ndarray
    inner: np.ndarray
    spacing: tuple[float, float, float]


#: Smallest analysis box (z, y, x voxels), where the grid allows: the coarsest pyramid level
#: (shrink 8) still sees a few voxels per axis.
MIN_REGION_VOX = (32, 32, 32)


def analysis_region(pre: Preprocessed, config: AsymmetryConfig | None = None, widen_mm: float = 0.0) -> tuple[slice, slice, slice]:
    """The box of the symmetric grid that is scored, (z, y, x) slices, symmetric about the
    central x plane (x = left-right), so that the mirror of the crop is the crop of the mirror."""
    return _regions(pre, config or AsymmetryConfig(), (widen_mm,))[0]


def _regions(pre: Preprocessed, cfg: AsymmetryConfig, widths_mm: tuple[float, ...]) -> list[tuple[slice, slice, slice]]:
    """:func:`analysis_region` widened by each of ``widths_mm``; the landmarks are found once."""
    if cfg.region == "body":
        return [tuple(slice(0, n) for n in pre.grid.shape)] * len(widths_mm)  # type: ignore[list-item]
    if cfg.region != "nasopharynx":
        raise SatsError(f"unknown asymmetry region {cfg.region!r} (use 'nasopharynx' or 'body')")
    lo, hi, _ = landmark_box(pre.grid, pre.grid, pre.plane)  # pre.grid is in HU here: it stands in for the CT
    return [box_to_roi(lo - w, hi + w, pre.grid, MIN_REGION_VOX, "asymmetry").slices for w in widths_mm]


def asymmetry_cues(pre: Preprocessed, config: AsymmetryConfig | None = None) -> Cues:
    """Register the mirror to the CT and measure what is left (see the module docstring).

    Args:
        pre: the CT on its symmetric grid **in HU** (:class:`sats.geometry.preprocessing.Preprocessor`
            with ``stats=None``): (z, y, x), the central sagittal plane is the mid-sagittal
            plane and the last axis is left-right.
    Returns:
        The cues on the whole grid; outside :func:`analysis_region` they are 0 and
        ``inner`` is False.
    """
    cfg = config or AsymmetryConfig()
    box, outer = _regions(pre, cfg, (0.0, cfg.context_mm))
    crop = _crop_cues(pre.grid.crop(outer), cfg)
    full = Cues(*(np.zeros(pre.grid.shape, a.dtype) for a in (crop.residual, crop.log_jacobian, crop.inner)),
                tuple(pre.grid.spacing))
    full.residual[outer], full.log_jacobian[outer], full.inner[outer] = crop.residual, crop.log_jacobian, crop.inner
    keep = np.zeros(pre.grid.shape, bool)
    keep[box] = True
    full.inner &= keep
    return full


def _crop_cues(aligned: Volume, cfg: AsymmetryConfig) -> Cues:
    hu = np.clip(np.asarray(aligned.array, np.float32), *RESIDUAL_WINDOW)
    body = body_mask(np.asarray(aligned.array))
    if not body.any():
        raise SatsError("no body found (no voxels above -500 HU): is this a CT in HU?")
    fixed = to_sitk(aligned.with_array(hu))
    moving = to_sitk(aligned.with_array(mirror_lr(hu)))  # flip along x, the left-right axis
    try:
        field = register_to_mirror(fixed, moving, cfg.levels, cfg.iterations, cfg.field_sigma_vox)
    except RuntimeError as exc:
        raise SatsError(f"registration of the CT to its mirror failed ({str(exc).strip().splitlines()[-1]})") from None
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))  # the transform takes the field over: pass a copy
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, RESIDUAL_WINDOW[0]))
    residual = ndimage.gaussian_filter(np.abs(hu - warped), [cfg.smooth_mm / s for s in aligned.spacing])
    jac = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field)).astype(np.float32)
    # Air inside the head (airway, sinuses) is body here: fill each axial slice's holes, so
    # that the skin margin keeps off the outline only, not off the airway a tumour fills.
    # (A body cut by the box's faces is not outline: the distance counts to background only.)
    solid = np.stack([ndimage.binary_fill_holes(sl) for sl in body])
    inner = ndimage.distance_transform_edt(solid, sampling=aligned.spacing) > cfg.skin_mm
    inner &= mirror_lr(inner)  # a partner cut off by the field of view is no evidence of asymmetry
    return Cues(residual.astype(np.float32), np.abs(np.log(np.clip(jac, 1e-3, None))), inner, tuple(aligned.spacing))


def score_and_mask(cues: Cues, config: AsymmetryConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The soft score (float32) and m_unsup (uint8) from the cues: the documented rule."""
    cfg = config or AsymmetryConfig()
    score = np.maximum(cues.residual / cfg.residual_hu, cues.log_jacobian / cfg.log_jacobian).astype(np.float32)
    score[~cues.inner] = 0.0
    mask = score >= cfg.threshold
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel()) * float(np.prod(cues.spacing)) / 1000.0
        keep = sizes >= cfg.min_ml
        keep[0] = False
        mask = keep[labels]
    return score, mask.astype(np.uint8)


def asymmetry_map(pre: Preprocessed, config: AsymmetryConfig | None = None) -> AsymmetryMap:
    """Unsupervised asymmetry of a CT on its symmetric grid: m_unsup and its soft score.

    Args:
        pre: the CT on its symmetric grid in HU (:class:`sats.geometry.preprocessing.Preprocessor`
            with ``stats=None``): (z, y, x), the central sagittal plane is the mid-sagittal
            plane, the last axis is left-right.
        config: settings (default :class:`AsymmetryConfig`).
    Returns:
        The soft score and m_unsup on ``pre.grid``.

    Example:
        >>> pre = Preprocessor((2.0, 2.0, 2.0))(ct)   # aligned, in HU
        >>> m = asymmetry_map(pre).mask     # 1 where the CT differs from its mirror
    """
    t0 = time.time()
    score, mask = score_and_mask(asymmetry_cues(pre, config), config)
    return AsymmetryMap(score, mask, time.time() - t0)


def precision_recall(mask: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Voxel-wise precision and recall (0-1) of ``mask`` against ``reference``; NaN where undefined."""
    m, r = mask > 0, reference > 0
    tp = float((m & r).sum())
    precision = tp / m.sum() if m.any() else float("nan")
    recall = tp / r.sum() if r.any() else float("nan")
    return precision, recall


#: Grid (z, y, x mm) on which ``sats asymmetry`` registers a CT to its mirror.
DEFAULT_SPACING = (2.0, 2.0, 2.0)


def asymmetry_on_input_grid(ct: Volume, spacing: tuple[float, float, float] = DEFAULT_SPACING,
                            config: AsymmetryConfig | None = None) -> tuple[Volume, Volume, float]:
    """m_unsup and the soft score of a CT in any orientation, on the CT's own grid.

    The CT is aligned (:func:`sats.geometry.preprocessing.estimate_plane`), resampled onto its symmetric
    grid at ``spacing`` (z, y, x mm), scored there (:func:`asymmetry_map`) and resampled back
    (the score linearly, the mask linearly then thresholded at 0.5).

    Returns:
        ``(mask uint8, score float32, seconds)``, both with ``ct``'s exact geometry.
    """
    t0 = time.time()
    pre = Preprocessor(spacing, None, PlaneSettings())(ct)
    result = asymmetry_map(pre, config)
    score = resample_to(pre.grid.with_array(result.score), ct, order=1, default=0.0)
    mask = resample_to(pre.grid.with_array(result.mask.astype(np.float32)), ct, order=1, default=0.0)
    return ct.with_array((mask.array >= 0.5).astype(np.uint8)), score, time.time() - t0
