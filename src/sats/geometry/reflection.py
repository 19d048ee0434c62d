"""Reflective registration: a CT on its symmetric grid registered deformably to its own mirror.

On the symmetric grid (:mod:`sats.geometry.grid`) the mirror is ``mirror_lr(ct)`` (x, the
last axis, is left-right). Normal anatomy is only roughly symmetric, so the mirror is
registered to the CT (SimpleITK's symmetric-forces demons, coarse to fine, the
displacement field smoothed at every iteration: the regularisation that keeps a tumour
from being warped away). What the warp W cannot explain is asymmetry. Two users:

* :mod:`sats.geometry.asymmetry`, the label-free asymmetric region m_unsup, from the
  residual ``|I - W(M(I))|`` and the warp's volume change;
* the ``fusion="registered"`` networks (:mod:`sats.model.network`), which take ``W(M(I))`` as
  a second input channel (Raina et al.'s reflective registration), from
  :func:`registered_mirror` through :class:`sats.geometry.preprocessing.Preprocessor`.

The registration sees HU clipped to :data:`HU_WINDOW`; the warped mirror is the unclipped one.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from sats.geometry.symmetry import mirror_lr
from sats.geometry.volume import SatsError, Volume, to_sitk

#: HU window the registration sees: air to dense soft tissue / thin bone. Bone and metal
#: above it would dominate the match with tiny misregistrations.
HU_WINDOW = (-500.0, 300.0)
#: Demons pyramid (shrink factors, coarse to fine), iterations per level, and the field's
#: smoothing in voxels of each level (sats.geometry.asymmetry chose them; BENCHMARKS.md).
LEVELS, ITERATIONS, FIELD_SIGMA_VOX = (8, 4, 2, 1), (100, 60, 30, 10), 1.0


def register_to_mirror(fixed: sitk.Image, moving: sitk.Image, levels: tuple[int, ...] = LEVELS,
                       iterations: tuple[int, ...] = ITERATIONS, field_sigma_vox: float = FIELD_SIGMA_VOX) -> sitk.Image:
    """Displacement field (fixed grid, vector float64, mm) taking fixed points into the moving
    image: symmetric-forces demons, coarse to fine (shrink factors ``levels``, ``iterations``
    each), the field smoothed by ``field_sigma_vox`` voxels of each level at every iteration."""
    field = None
    for shrink, iters in zip(levels, iterations):
        f, m = fixed, moving
        if shrink > 1:  # smooth before subsampling: a coarse level sees shapes, not noise
            sigma = 0.5 * shrink * min(fixed.GetSpacing())
            f = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, sigma), [shrink] * 3)
            m = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, sigma), [shrink] * 3)
        init = (sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
                if field is not None else sitk.Image(f.GetSize(), sitk.sitkVectorFloat64, 3))
        init.CopyInformation(f)
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iters)
        demons.SetUseImageSpacing(False)  # the smoothing below is in voxels of each level
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(field_sigma_vox)
        field = demons.Execute(f, m, init)
    assert field is not None
    if field.GetSize() != fixed.GetSize():
        field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return field


def registered_mirror(hu: Volume) -> np.ndarray:
    """``W(M(I))``: the mirror of a CT on its symmetric grid (``hu``, HU, (z, y, x); the
    last axis is left-right), registered deformably to the CT. float32 HU, same grid; air
    outside the mirror's grid."""
    image = np.asarray(hu.array, np.float32)
    fixed = to_sitk(hu.with_array(np.clip(image, *HU_WINDOW)))
    moving_clipped = to_sitk(hu.with_array(mirror_lr(np.clip(image, *HU_WINDOW))))
    try:
        field = register_to_mirror(fixed, moving_clipped)
    except RuntimeError as exc:
        raise SatsError(f"registration of the CT to its mirror failed ({str(exc).strip().splitlines()[-1]})") from None
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))  # the transform takes the field over: pass a copy
    moving = to_sitk(hu.with_array(mirror_lr(image)))
    return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1024.0)).astype(np.float32)
