"""The left-right mirror, stated once.

Arrays are ``(z, y, x)`` (tensors ``(B, C, z, y, x)``) and in LPS the x axis runs from the
patient's right to left, so **the last axis is left-right** everywhere in sats. A flip
along it, done on a volume whose mid-sagittal plane is the central sagittal plane of the
grid (see :mod:`sats.geometry.alignment`), maps every voxel to its anatomical mirror partner.
The mirror is its own inverse.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

#: Index of the left-right (patient right -> left, LPS x) axis in every array and tensor.
LR_AXIS = -1

T = TypeVar("T", np.ndarray, torch.Tensor)


def mirror_lr(x: T, lr_axis: int = LR_AXIS) -> T:
    """Flip ``x`` along its left-right axis (the last axis by default).

    Example:
        >>> mirror_lr(np.array([[1, 2, 3]]))
        array([[3, 2, 1]])
    """
    if isinstance(x, torch.Tensor):
        return torch.flip(x, dims=(lr_axis,))
    return np.flip(x, axis=lr_axis).copy()


class Plane:
    """A mid-sagittal plane in physical LPS mm: unit ``normal`` (x, y, z) and a ``point`` on it.

    The normal is oriented towards the patient's left (+x in LPS) so that two estimates of
    the same plane compare directly.
    """

    def __init__(self, normal, point) -> None:
        n = np.asarray(normal, dtype=np.float64)
        n = n / np.linalg.norm(n)
        self.normal = -n if n[0] < 0 else n
        self.point = np.asarray(point, dtype=np.float64)

    def to_dict(self) -> dict:
        return {"normal": [float(v) for v in self.normal], "point": [float(v) for v in self.point]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plane":
        return cls(d["normal"], d["point"])

    def signed_distance(self, xyz: np.ndarray) -> np.ndarray:
        """Signed distance in mm of LPS points ``(..., 3)``; positive on the patient's left."""
        return (np.asarray(xyz) - self.point) @ self.normal

    def angle_to(self, other: "Plane") -> float:
        """Angle between the two normals in degrees."""
        return float(np.degrees(np.arccos(np.clip(abs(self.normal @ other.normal), 0.0, 1.0))))

    def __repr__(self) -> str:
        return f"Plane(normal={np.round(self.normal, 4).tolist()}, point={np.round(self.point, 2).tolist()})"
