"""Symmetric alignment: find a head CT's mid-sagittal plane and resample the CT so that
the plane becomes the central sagittal plane of the grid (then the left-right array flip
of :mod:`sats.symmetry` is the anatomical mirror).

**Atlas-free (default).** Register the CT to its own left-right mirror. If the head is
symmetric about a plane P (reflection R_P), and the mirror is the reflection R0 about the
grid's central plane, then the rigid transform T found by registering the CT (fixed) to
its mirror (moving) satisfies ``R0 o T = R_P``: the plane is read off R0 o T (normal =
the eigenvector of its linear part with eigenvalue -1, a point = the midpoint of any x
and R_P(x)). The metric is the correlation of HU restricted to a body mask (couch and
air excluded, metal clipped), multi-resolution; in trials here Mattes mutual information
drifted by degrees where correlation stayed within tenths.

**Atlas mode.** Affine registration to a symmetric atlas (the paper's way): the aligned
image lives in atlas space, whose central sagittal plane is the atlas's plane.

An :class:`Alignment` carries the plane in the input's physical space and, for atlas
mode, the affine ``transform`` mapping aligned-space points to input points; the
resampling in :mod:`sats.preprocessing` and back in :mod:`sats.inference` uses it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from sats.io import SatsError, Volume, to_sitk, write_text_atomic
from sats.preprocessing import body_mask, grid_centre_plane
from sats.symmetry import Plane, mirror_lr

#: HU window for registration: air to dense bone; metal streaks above it are clipped.
HU_WINDOW = (-400.0, 1500.0)
#: Below this symmetry score a plane estimate is reported as unreliable.
MIN_SYMMETRY = 0.5


@dataclass
class Alignment:
    """Result of :func:`find_plane`: the plane (input LPS mm) and symmetry scores."""

    plane: Plane
    score_before: float
    score_after: float
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.plane.to_dict(), "symmetry_before": self.score_before, "symmetry_after": self.score_after,
                "seconds": self.seconds, **self.extra}


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
    return Plane(n, mid - ((mid - mid) @ n) * n)


def _prepare(ct: Volume, shrink_mm: float) -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """Clipped float image and body mask, downsampled to about ``shrink_mm`` voxels."""
    body = body_mask(ct.array)
    if body.sum() < 1000:
        raise SatsError("too little body (fewer than 1000 voxels above -500 HU) to find a mid-sagittal plane")
    hu = np.clip(ct.array.astype(np.float32), *HU_WINDOW)
    image = to_sitk(ct.with_array(hu))
    mask = to_sitk(ct.with_array(ndimage.binary_erosion(body, iterations=1).astype(np.uint8)))
    factors = [max(1, int(round(shrink_mm / s))) for s in image.GetSpacing()]
    if any(f > 1 for f in factors):
        image = sitk.BinShrink(image, factors)
        mask = sitk.Cast(sitk.BinShrink(sitk.Cast(mask, sitk.sitkFloat32), factors) > 0.5, sitk.sitkUInt8)
    centroid = ct.index_to_physical(np.argwhere(body).mean(axis=0))
    return image, mask, centroid


def symmetry_score(ct: Volume, plane: Plane, mask: np.ndarray | None = None) -> float:
    """Normalised cross-correlation, within the body, between the CT and its reflection
    about ``plane`` (1 = perfectly symmetric)."""
    a, b = reflection_matrix(plane)
    image = to_sitk(ct.with_array(np.clip(ct.array.astype(np.float32), *HU_WINDOW)))
    t = sitk.AffineTransform(3)
    t.SetMatrix(a.ravel().tolist())
    t.SetTranslation(b.tolist())
    mirrored = sitk.GetArrayFromImage(sitk.Resample(image, image, t, sitk.sitkLinear, HU_WINDOW[0]))
    m = body_mask(ct.array) if mask is None else mask
    x, y = sitk.GetArrayFromImage(image)[m], mirrored[m]
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / max(np.sqrt((x * x).sum() * (y * y).sum()), 1e-9))


def find_plane(ct: Volume, shrink_levels: tuple[float, ...] = (8.0, 4.0, 2.0), iterations: int = 200) -> Alignment:
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
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    finest = shrink_levels[-1]
    reg.SetShrinkFactorsPerLevel([max(1, int(round(s / finest))) for s in shrink_levels])
    reg.SetSmoothingSigmasPerLevel([s / 2 if s > finest else 0.0 for s in shrink_levels])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    try:
        reg.Execute(image, mirrored)
    except RuntimeError as exc:
        raise SatsError(f"mid-sagittal plane registration failed ({str(exc).strip().splitlines()[-1]})") from None

    t_a = np.array(transform.GetMatrix()).reshape(3, 3)
    c = np.array(transform.GetCenter())
    t_b = np.array(transform.GetTranslation()) + c - t_a @ c
    # R_P = R0 o T.
    p_a, p_b = r0_a @ t_a, r0_a @ t_b + r0_b
    plane = plane_from_reflection(p_a, p_b, centroid)
    body = body_mask(ct.array)
    before = symmetry_score(ct, grid_plane, body)
    after = symmetry_score(ct, plane, body)
    return Alignment(plane, before, after, time.time() - t0,
                     {"iterations": reg.GetOptimizerIteration(), "metric": reg.GetMetricValue()})


def write_plane_json(alignment: Alignment, path: Path) -> None:
    write_text_atomic(path, json.dumps(alignment.to_dict(), indent=2))
