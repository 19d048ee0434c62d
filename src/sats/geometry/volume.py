"""The in-memory volume, the user-facing error, and the SimpleITK boundary.

Axis convention (the only place it is converted):

* **array space** is ``(z, y, x)``: ``Volume.array[k, j, i]``; ``Volume.spacing`` is
  ``(z, y, x)`` in mm, like the array shape.
* **physical space** is DICOM/ITK LPS in mm, written ``(x, y, z)``: ``Volume.origin``
  (centre of voxel ``[0, 0, 0]``) and every physical point in this project.
* ``Volume.direction`` is ITK's 3x3 matrix: column ``c`` is the unit LPS vector along
  image index ``c`` with ITK's index order ``(i, j, k) = (x, y, z)`` array axes.

SimpleITK speaks ``(x, y, z)`` for sizes and spacing; :func:`to_sitk` and
:func:`from_sitk` are the boundary and the rest of the package never reorders axes.
This module imports no other part of sats, so every reader (files, DICOM) can use it.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import SimpleITK as sitk


class SatsError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


def itk_reason(exc: Exception) -> str:
    """The reason in an ITK/GDCM exception message: its last non-empty line (the first
    lines are a file/line banner)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def allowed_values(annotation) -> tuple | None:
    """The values a ``Literal`` annotation allows; None for any other annotation."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def validate_options(obj) -> None:
    """Raise a SatsError for the first ``Literal`` field of a dataclass whose value is outside its set."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        allowed = allowed_values(hints[f.name])
        value = getattr(obj, f.name)
        if allowed is not None and value not in allowed:
            name = f.metadata.get("option", f.name)  # the CLI flag where the field has one
            raise SatsError(f"{name} must be one of {', '.join(map(str, allowed))}, not {value!r}")


@contextmanager
def about(source: object) -> Iterator[None]:
    """Name the input a :class:`SatsError` raised inside concerns, once.

    Example:
        >>> with about("ct_001.nii.gz"):  # doctest: +SKIP
        ...     estimate_plane(ct)  # "ct_001.nii.gz: mid-sagittal plane unreliable: ..."
    """
    try:
        yield
    except SatsError as exc:
        name = str(source)
        if str(exc).startswith(name):
            raise
        raise SatsError(f"{name}: {exc}") from None


@dataclass
class Volume:
    """A 3D image with its geometry.

    Attributes:
        array: voxel values, shape ``(z, y, x)``. CT in HU, labels as integers.
        spacing: voxel size in mm, ``(z, y, x)`` like the array.
        origin: LPS position in mm of the centre of voxel ``[0, 0, 0]``, ``(x, y, z)``.
        direction: 3x3 direction cosines (ITK convention, columns = index axes i, j, k,
            i.e. array axes x, y, z).

    Example:
        >>> v = Volume(np.zeros((2, 3, 4)), spacing=(3.0, 1.0, 1.0))
        >>> v.shape, v.voxel_volume_ml
        ((2, 3, 4), 0.003)
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise SatsError(f"expected a 3D volume, got an array of shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry around another array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def crop(self, box: tuple[slice, slice, slice]) -> Volume:
        """The sub-volume ``array[box]`` ((z, y, x) slices, step 1) with its own origin: same points in space."""
        start = np.array([sl.indices(n)[0] for sl, n in zip(box, self.shape)], float)
        return Volume(self.array[box], self.spacing, tuple(self.index_to_physical(start)), self.direction.copy())

    def index_to_physical(self, zyx: np.ndarray) -> np.ndarray:
        """Map array indices ``(..., 3)`` in (z, y, x) order to LPS points ``(..., 3)`` (x, y, z) mm."""
        ijk = np.asarray(zyx, dtype=np.float64)[..., ::-1]
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing[::-1])) @ self.direction.T

    def physical_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`index_to_physical`: LPS points (x, y, z) to continuous (z, y, x) indices."""
        d = np.asarray(xyz, dtype=np.float64) - np.asarray(self.origin)
        ijk = (d @ self.direction) / np.asarray(self.spacing[::-1])
        return ijk[..., ::-1]

    def same_geometry(self, other: Volume, tol_mm: float = 1e-3) -> str | None:
        """None when both volumes share grid and geometry, else a short description of the difference."""
        if self.shape != other.shape:
            return f"size {self.shape[::-1]} vs {other.shape[::-1]} (x, y, z)"
        if not np.allclose(self.spacing, other.spacing, atol=tol_mm, rtol=0):
            return f"spacing {_fmt(self.spacing[::-1])} vs {_fmt(other.spacing[::-1])} mm (x, y, z)"
        if not np.allclose(self.origin, other.origin, atol=tol_mm, rtol=0):
            return f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} mm"
        if not np.allclose(self.direction, other.direction, atol=1e-5, rtol=0):
            return "direction cosines differ"
        return None


def _fmt(t) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in t) + ")"


def to_sitk(volume: Volume) -> sitk.Image:
    """Volume -> SimpleITK image, geometry kept exactly."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(d) for d in volume.direction.ravel()))
    return image


def from_sitk(image: sitk.Image) -> Volume:
    """SimpleITK image -> Volume, geometry kept exactly."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SatsError(
            f"expected a 3D single-channel image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    return Volume(
        sitk.GetArrayFromImage(image),
        spacing=image.GetSpacing()[::-1],
        origin=image.GetOrigin(),
        direction=np.array(image.GetDirection()).reshape(3, 3),
    )
