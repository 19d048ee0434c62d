"""Symmetric alignment: find a head CT's mid-sagittal plane and resample the CT so that
the plane becomes the central sagittal plane of the grid (then the left-right array flip
of :mod:`sats.geometry.symmetry` is the anatomical mirror).

**Atlas-free (default).** The plane about which the CT best matches its own reflection:
normalised cross-correlation of HU (air to bone, metal clipped) at body voxels deeper
than a few mm (couch, air, skin outline and a cut field of view left out), its three
parameters (two tilts, one offset) optimised coarse to fine (:func:`find_plane`). The
registration formulation is also here (:func:`find_plane_registration`): if the head is
symmetric about P (reflection R_P) and the mirror is the reflection R0 about the grid's
central plane, the rigid T found by registering the CT to its mirror satisfies
``R0 o T = R_P``, and the plane is read off R0 o T. BENCHMARKS.md compares the two.

**Atlas mode.** Affine registration to a symmetric atlas (the paper's way): the aligned
image lives in atlas space, whose central sagittal plane is the atlas's plane.

In every mode the result is an :class:`Alignment`: the plane in the input's physical
(LPS mm) space with symmetry scores before and after. The resampling onto the symmetric
grid (:func:`sats.geometry.grid.symmetric_grid`) and back onto the input grid
(:func:`sats.geometry.grid.resample_to`) needs only that plane, so the alignment is
invertible by construction; :func:`aligned_volume` also returns the rigid transform
from the aligned frame to the input.

This module holds the searches; which one runs, and what happens when its plane cannot be
trusted, is decided in one place: :func:`sats.geometry.preprocessing.estimate_plane`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from sats.geometry.grid import body_mask, grid_centre_plane, resample_to, symmetric_grid
from sats.geometry.symmetry import Plane, mirror_lr
from sats.geometry.volume import SatsError, Volume, from_sitk, itk_reason, to_sitk

#: HU window for registration: air to dense bone; metal streaks above it are clipped.
HU_WINDOW = (-400.0, 1500.0)
#: Below this symmetry score a plane estimate is reported as unreliable.
MIN_SYMMETRY = 0.3


class UnreliablePlane(SatsError):
    """The best plane found still leaves the CT far from symmetric (not a head, or a scan
    cut so that no symmetric anatomy is left). ``score`` is that plane's symmetry score."""

    def __init__(self, message: str, score: float = math.nan) -> None:
        super().__init__(message)
        self.score = score


@dataclass
class Alignment:
    """The mid-sagittal plane of one CT and how it was found: the plane object of sats.

    Attributes:
        plane: the plane in the CT's physical space (LPS mm).
        score_before, score_after: symmetry (:func:`symmetry_score`, 1 = symmetric) about the
            grid's central sagittal plane and about ``plane``; NaN where not measured.
        seconds: time the search took.
        source: how the plane was found: "symmetry" (:func:`find_plane`), "registration"
            (:func:`find_plane_registration`), "atlas" (:func:`plane_from_atlas`) or
            "grid-centre" (no alignment, or an unreliable plane replaced; ``reason`` says which).
        reason: why the grid's central plane stands in; None otherwise.

    ``to_dict``/``from_dict`` are its one serialised form (the training cache, the
    ablation's test planes, ``sats align --plane-json``).
    """

    plane: Plane
    score_before: float
    score_after: float
    seconds: float
    source: str = "symmetry"
    reason: str | None = None

    def to_dict(self) -> dict:
        return {**self.plane.to_dict(), "symmetry_before": self.score_before, "symmetry_after": self.score_after,
                "seconds": self.seconds, "source": self.source, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> Alignment:
        """Inverse of :meth:`to_dict`; a bare plane ``{"normal", "point"}`` (older files) reads as found by symmetry."""
        return cls(Plane.from_dict(d), float(d.get("symmetry_before", math.nan)), float(d.get("symmetry_after", math.nan)),
                   float(d.get("seconds", 0.0)), str(d.get("source", "symmetry")), d.get("reason"))

    @classmethod
    def grid_centre(cls, ct: Volume, reason: str) -> Alignment:
        """The grid's central sagittal plane standing in for the mid-sagittal plane (what a plain flip mirrors about)."""
        return cls(grid_centre_plane(ct), math.nan, math.nan, 0.0, "grid-centre", reason)


def reflection_matrix(plane: Plane) -> tuple[np.ndarray, np.ndarray]:
    """``(A, b)`` with ``R(x) = A x + b`` the reflection about ``plane`` (LPS mm)."""
    n = plane.normal
    a = np.eye(3) - 2 * np.outer(n, n)
    b = 2 * (plane.point @ n) * n
    return a, b


def plane_from_reflection(a: np.ndarray, b: np.ndarray, near: np.ndarray) -> Plane:
    """Nearest reflection's plane for an (approximately) reflective affine map ``A x + b``."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    n = v[:, int(np.argmin(w))]  # eigenvalue closest to -1
    mid = (near + (a @ near + b)) / 2  # the midpoint of x and R(x) lies on the plane
    return Plane(n, mid)


#: The registration mask keeps the body deeper than this (mm): the skin outline is where
#: the couch, immobilisation masks and a field of view cut through the head touch it.
SKIN_MARGIN_MM = 6.0


def head_mask(ct: Volume) -> np.ndarray:
    """Body voxels deeper than SKIN_MARGIN_MM below the body surface."""
    body = body_mask(ct.array)
    depth = ndimage.distance_transform_edt(body, sampling=ct.spacing)
    return depth > SKIN_MARGIN_MM


def _prepare(ct: Volume, shrink_mm: float) -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """Clipped float image and head mask, downsampled to about ``shrink_mm`` voxels."""
    mask_array = head_mask(ct)
    if mask_array.sum() < 1000:
        raise SatsError("too little body (fewer than 1000 voxels above -500 HU) to find a mid-sagittal plane")
    hu = np.clip(ct.array.astype(np.float32), *HU_WINDOW)
    image = to_sitk(ct.with_array(hu))
    mask = to_sitk(ct.with_array(mask_array.astype(np.uint8)))
    factors = [max(1, int(round(shrink_mm / s))) for s in image.GetSpacing()]
    if any(f > 1 for f in factors):
        image = sitk.BinShrink(image, factors)
        mask = sitk.Cast(sitk.BinShrink(sitk.Cast(mask, sitk.sitkFloat32), factors) > 0.5, sitk.sitkUInt8)
    centroid = ct.index_to_physical(np.argwhere(mask_array).mean(axis=0))
    return image, mask, centroid


class _MirrorSampler:
    """Normalised cross-correlation between a smoothed volume at fixed points and at their
    reflections, the points' values outside the volume taken as HU_WINDOW[0]."""

    def __init__(self, smooth: np.ndarray, vol: Volume, points: np.ndarray, device: str | torch.device):
        self.device = torch.device(device)
        # Sample (value - air) with zero padding: outside reads as air; NCC ignores the shift.
        self.volume = torch.as_tensor(smooth - HU_WINDOW[0], dtype=torch.float32, device=self.device)[None, None]
        self.points = torch.as_tensor(points, dtype=torch.float64, device=self.device)
        # grid_sample's coordinates: (x, y, z) index order, scaled to [-1, 1] (align_corners=True).
        size_xyz = np.array(vol.shape[::-1], float)
        self.to_index = vol.direction / np.asarray(vol.spacing[::-1])[None, :]  # p -> ijk: (p - o) @ this
        self.origin = np.asarray(vol.origin, float)
        self.scale = 2.0 / np.maximum(size_xyz - 1, 1)
        here = self._sample(np.eye(3), np.zeros(3))
        self.here = here - here.mean()
        self.here_norm = float(torch.sqrt((self.here * self.here).sum()))

    def _sample(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        w = a.T @ self.to_index * self.scale[None, :]  # normalised = p @ w + c
        c = (b - self.origin) @ self.to_index * self.scale - 1.0
        grid = self.points @ torch.as_tensor(w, device=self.device) + torch.as_tensor(c, device=self.device)
        grid = grid.to(torch.float32)[None, None, None]
        values = torch.nn.functional.grid_sample(self.volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return values.reshape(-1).to(torch.float64)

    def ncc(self, a: np.ndarray, b: np.ndarray) -> float:
        there = self._sample(a, b)
        there = there - there.mean()
        return float((self.here * there).sum() / max(self.here_norm * float(torch.sqrt((there * there).sum())), 1e-9))


def symmetry_score(ct: Volume, plane: Plane, mask: np.ndarray | None = None, device: str | torch.device = "cpu") -> float:
    """Normalised cross-correlation, within the body (or ``mask``), between the CT and its
    reflection about ``plane`` (1 = perfectly symmetric); HU clipped to HU_WINDOW, linear
    interpolation, HU_WINDOW[0] outside the grid."""
    m = body_mask(ct.array) if mask is None else mask
    points = ct.index_to_physical(np.argwhere(m))
    hu = np.clip(ct.array.astype(np.float32), *HU_WINDOW)
    return _MirrorSampler(hu, ct, points, device).ncc(*reflection_matrix(plane))


def _execute(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image, what: str) -> None:
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise SatsError(f"{what} failed ({itk_reason(exc)})") from None


def _affine_parts(transform) -> tuple[np.ndarray, np.ndarray]:
    """``(A, b)`` with ``T(x) = A x + b`` for a centred ITK matrix-offset transform."""
    a = np.array(transform.GetMatrix()).reshape(3, 3)
    c = np.array(transform.GetCenter())
    return a, np.array(transform.GetTranslation()) + c - a @ c


def find_plane_registration(ct: Volume, shrink_levels: tuple[float, ...] = (8.0, 4.0, 2.0), iterations: int = 100) -> Alignment:
    """Estimate the mid-sagittal plane of a head CT by registering it to its own mirror.

    Args:
        ct: CT in HU, any grid.
        shrink_levels: voxel size in mm of each resolution level, coarse to fine.
    Returns:
        The plane in the input's LPS mm and the symmetry score before (about the grid's
        central plane) and after (about the found plane).
    """
    t0 = time.time()
    grid_plane = grid_centre_plane(ct)
    r0_a, r0_b = reflection_matrix(grid_plane)
    image, mask, centroid = _prepare(ct, shrink_levels[-1])
    # The mirror: the same array flipped along the left-right axis, same geometry, i.e.
    # the CT reflected about the grid's central sagittal plane (R0).
    mirrored = sitk.GetImageFromArray(mirror_lr(sitk.GetArrayFromImage(image)))
    mirrored.CopyInformation(image)
    mirrored_mask = sitk.GetImageFromArray(mirror_lr(sitk.GetArrayFromImage(mask)))
    mirrored_mask.CopyInformation(mask)

    # Start from the plane through the body centroid parallel to the grid's plane.
    start = Plane(grid_plane.normal, centroid)
    s_a, s_b = reflection_matrix(start)
    # T0 = R0^-1 o R_start = R0 o R_start (reflections are involutions).
    t_a, t_b = r0_a @ s_a, r0_a @ s_b + r0_b
    transform = sitk.Euler3DTransform()
    transform.SetCenter(centroid.tolist())
    transform.SetMatrix(t_a.ravel().tolist())
    transform.SetTranslation((t_a @ centroid + t_b - centroid).tolist())

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(mask)
    reg.SetMetricMovingMask(mirrored_mask)
    # Fixed-seed random samples on the coarse levels (fast, deterministic); every voxel
    # on the finest, where sampling noise would otherwise limit the accuracy.
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel([0.25] * (len(shrink_levels) - 1) + [1.0], seed=7)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    finest = shrink_levels[-1]
    reg.SetShrinkFactorsPerLevel([max(1, int(round(s / finest))) for s in shrink_levels])
    reg.SetSmoothingSigmasPerLevel([s / 2 if s > finest else 0.0 for s in shrink_levels])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    _execute(reg, image, mirrored, "mid-sagittal plane registration")
    t_a, t_b = _affine_parts(transform)
    # R_P = R0 o T.
    p_a, p_b = r0_a @ t_a, r0_a @ t_b + r0_b
    plane = plane_from_reflection(p_a, p_b, centroid)
    body = body_mask(ct.array)
    before = symmetry_score(ct, grid_plane, body)
    after = symmetry_score(ct, plane, body)
    return Alignment(plane, before, after, time.time() - t0, "registration")


def _plane_params(ct: Volume, start: Plane, params: np.ndarray) -> Plane:
    """Plane from (tilt towards y, tilt towards z, shift along x in mm) about ``start``,
    in the grid's axes: normal = x + a y + b z, point = start point + shift x."""
    ex, ey, ez = ct.direction[:, 0], ct.direction[:, 1], ct.direction[:, 2]
    return Plane(ex + params[0] * ey + params[1] * ez, start.point + params[2] * ex)


def find_plane(ct: Volume, levels_mm: tuple[float, ...] = (6.0, 3.0, 1.5), n_points: int = 60000,
               device: str | torch.device = "cpu") -> Alignment:
    """Estimate the mid-sagittal plane of a head CT: the plane about which the CT best
    matches its own mirror.

    The CT's reflection about a candidate plane is compared with the CT itself by
    normalised cross-correlation of HU (clipped to HU_WINDOW) at body voxels deeper than
    SKIN_MARGIN_MM (couch, air and the skin outline excluded); the plane's three degrees
    of freedom (two tilts, one offset) are optimised coarse to fine on Gaussian-smoothed
    copies of the CT (Powell's method), starting from a small grid of tilts through the
    body centroid. :func:`find_plane_registration` (SimpleITK: register the CT to its
    mirror with a 6-parameter rigid transform) gives the same plane in principle; measured
    (BENCHMARKS.md) it was as repeatable on real CTs and more precise on phantoms, but about
    2.6 times slower on real CTs and too slow for 512 x 512 x 150 scans at full sampling,
    so this search is the default.

    The mirror samples are drawn with ``torch.nn.functional.grid_sample`` on ``device``
    (a GPU when given), which is where the time goes: a few hundred evaluations of the cost.

    Returns:
        The plane in the input's LPS mm and the symmetry score before (about the grid's
        central plane) and after (about the found plane).
    """
    from scipy.optimize import minimize

    t0 = time.time()
    levels = {}  # shrink factors -> (volume, clipped HU): levels of similar resolution share one
    full = ct.with_array(ct.array.astype(np.float32))
    image = to_sitk(full)

    def level_volume(res_mm: float) -> tuple[Volume, np.ndarray]:
        factors = tuple(max(1, int(round(res_mm / sp))) for sp in ct.spacing[::-1])
        if factors not in levels:
            vol = from_sitk(sitk.BinShrink(image, list(factors))) if any(f > 1 for f in factors) else full
            levels[factors] = (vol, np.clip(vol.array, *HU_WINDOW))
        return levels[factors]

    # Sample points: head-mask voxels of the coarsest working grid, jittered within their
    # voxel (no grid aliasing), fixed seed (the estimate is deterministic).
    coarse, _ = level_volume(max(levels_mm[0] / 2, levels_mm[-1]))
    mask = head_mask(coarse)
    if mask.sum() * coarse.voxel_volume_ml < 3.0:
        raise SatsError("too little body (under 3 ml above -500 HU) to find a mid-sagittal plane")
    idx = np.argwhere(mask)
    rng = np.random.default_rng(0)
    idx = idx[rng.choice(len(idx), min(n_points, len(idx)), replace=False)]
    points = coarse.index_to_physical(idx + rng.uniform(-0.5, 0.5, idx.shape))
    start = Plane(ct.direction[:, 0], points.mean(axis=0))

    params = np.zeros(3)
    for level, sigma_mm in enumerate(levels_mm):
        vol, hu = level_volume(max(sigma_mm / 2, levels_mm[-1]))
        smooth = ndimage.gaussian_filter(hu, [sigma_mm / s for s in vol.spacing])
        # Coarse levels need fewer points: a quarter per halving of the smoothing.
        pts = points[: max(5000, n_points // 4 ** (len(levels_mm) - 1 - level))]
        sampler = _MirrorSampler(smooth, vol, pts, device)

        def cost(p: np.ndarray) -> float:
            return -sampler.ncc(*reflection_matrix(_plane_params(ct, start, p)))

        if level == 0:
            # A coarse grid of tilts (up to about 20 degrees) guards against local optima.
            tilts = np.tan(np.radians([-20, -10, 0, 10, 20]))
            grid = [np.array([a, b, 0.0]) for a in tilts for b in tilts]
            params = min(grid, key=cost)
        step = sigma_mm
        res = minimize(cost, params, method="Powell",
                       options={"xtol": 1e-2, "ftol": 1e-5, "maxfev": 200, "direc": np.diag([0.02, 0.02, step])})
        params = res.x
    plane = _plane_params(ct, start, params)
    vol, _ = level_volume(levels_mm[-1])
    body = body_mask(vol.array)
    return Alignment(plane, symmetry_score(vol, grid_centre_plane(ct), body, device),
                     symmetry_score(vol, plane, body, device),
                     time.time() - t0, "symmetry")


def aligned_volume(ct: Volume, plane: Plane, spacing: tuple[float, float, float] | None = None) -> tuple[Volume, sitk.AffineTransform]:
    """The CT resampled into its head frame: identity direction, the mid-sagittal plane at
    x = 0 and exactly on the central sagittal plane of the grid.

    Returns the aligned volume and the rigid transform mapping aligned-space points to
    input points (ITK's resampling convention; ``GetInverse()`` maps back).
    """
    grid = symmetric_grid(ct, spacing or ct.spacing, plane)
    frame = grid.direction
    hu = resample_to(ct, grid, order=1, default=-1024.0)
    # Head-frame coordinates q = F^T (p - point); the aligned grid is the symmetric grid
    # expressed in q, so its direction is the identity.
    origin_q = frame.T @ (np.asarray(grid.origin) - plane.point)
    aligned = Volume(np.rint(hu.array).astype(np.int16) if np.issubdtype(ct.array.dtype, np.integer) else hu.array,
                     spacing=grid.spacing, origin=tuple(origin_q), direction=np.eye(3))
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(frame.ravel().tolist())
    transform.SetTranslation(plane.point.tolist())
    return aligned, transform


def _register_to_atlas(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, transform, iterations: int) -> None:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    _execute(reg, fixed, moving, "atlas registration")


def plane_from_atlas(ct: Volume, atlas: Volume, iterations: int = 200) -> Alignment:
    """Affine registration of the CT (moving) to a symmetric atlas (fixed); the plane is
    the image of the atlas's central sagittal plane in the CT's space.

    Less precise than :func:`find_plane`: the affine's shear and scaling fit anatomy that
    differs from the atlas and tilt the mapped plane (2.8 deg on a test phantom against
    a two-case phantom atlas, tests/test_alignment.py)."""
    t0 = time.time()
    atlas_plane = grid_centre_plane(atlas)
    fixed, fixed_mask, _ = _prepare(atlas, 4.0)
    moving, moving_mask, centroid = _prepare(ct, 4.0)
    affine = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.GEOMETRY)
    _register_to_atlas(fixed, moving, fixed_mask, affine, iterations)
    a, b = _affine_parts(affine)
    # Atlas point q -> CT point a q + b. A plane's normal maps by the inverse transpose.
    normal = np.linalg.inv(a).T @ atlas_plane.normal
    point = a @ atlas_plane.point + b
    plane = Plane(normal, point)
    body = body_mask(ct.array)
    return Alignment(plane, symmetry_score(ct, grid_centre_plane(ct), body), symmetry_score(ct, plane, body),
                     time.time() - t0, "atlas")
