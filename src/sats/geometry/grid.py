"""The symmetric grid: the body, the grid every case is resampled onto, resampling, and
boxes on that grid.

One resampling takes a CT from its native grid to the **symmetric grid** (:func:`symmetric_grid`):
axes aligned with the mid-sagittal plane (x = plane normal, towards the patient's left), voxel
centres placed so that the plane is exactly the central sagittal plane, the target spacing,
and the extent cropped to the body (in z and y freely, in x symmetrically about the plane).
A left-right flip of the last array axis (x) is then the anatomical mirror
(:func:`sats.geometry.symmetry.mirror_lr`).

The symmetric grid is an ordinary grid in physical space, so its inverse is a resampling
onto the input grid (:func:`resample_to`): no transform bookkeeping. Without a plane
the plane defaults to the input grid's own central sagittal plane (what a naive flip
assumes). A :class:`Roi` is a box on this grid, symmetric about the central x plane, so
that the mirror of a crop is the crop of the mirror.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from sats.geometry.symmetry import Plane
from sats.geometry.volume import SatsError, Volume, from_sitk, to_sitk

BODY_HU = -500.0  # air/body threshold


def grid_centre_plane(volume: Volume) -> Plane:
    """The central sagittal plane of the grid: what a plain array flip mirrors about."""
    centre = volume.index_to_physical(np.array([(s - 1) / 2 for s in volume.shape]))
    return Plane(volume.direction[:, 0], centre)


def keep_largest_component(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """The largest connected region of a binary ``(z, y, x)`` mask (6- or 26-connected);
    the mask itself when it has at most one region."""
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    labels, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient: the largest 6-connected region above -500 HU (drops the couch and
    immobilisation devices when they do not touch the body)."""
    return keep_largest_component(hu > BODY_HU, connectivity=6)


def symmetric_grid(ct: Volume, spacing: tuple[float, float, float], plane: Plane | None = None, margin_mm: float = 5.0) -> Volume:
    """The output grid (geometry only, an empty uint8 array) for :func:`preprocess`.

    Args:
        ct: input CT in HU.
        spacing: target spacing (z, y, x) mm.
        plane: mid-sagittal plane; default the input grid's central sagittal plane.
        margin_mm: margin around the body's bounding box.
    """
    plane = plane or grid_centre_plane(ct)
    x_axis = plane.normal
    y_in = ct.direction[:, 1]
    y_axis = y_in - (y_in @ x_axis) * x_axis
    y_axis /= np.linalg.norm(y_axis)
    z_axis = np.cross(x_axis, y_axis)
    if z_axis @ ct.direction[:, 2] < 0:  # keep slices ascending like the input
        z_axis = -z_axis
        y_axis = -y_axis
    frame = np.stack([x_axis, y_axis, z_axis], axis=1)  # columns = new index axes (x, y, z)

    body = body_mask(ct.array)
    if not body.any():
        raise SatsError("no body found (no voxels above -500 HU): is this a CT in HU?")
    # Body surface voxels suffice for the extent; subsample for speed.
    idx = np.argwhere(body ^ ndimage.binary_erosion(body))
    if len(idx) > 200000:
        idx = idx[:: len(idx) // 200000 + 1]
    coords = (ct.index_to_physical(idx) - plane.point) @ frame  # (n, 3) in the plane frame, (x, y, z)
    lo = coords.min(axis=0) - margin_mm
    hi = coords.max(axis=0) + margin_mm
    half_x = max(abs(lo[0]), abs(hi[0]))
    sx, sy, sz = spacing[2], spacing[1], spacing[0]
    nx = int(np.ceil(2 * half_x / sx)) + 1
    nx += nx % 2  # even, like every patch size, so centred windows fall on whole voxels
    ny = int(np.ceil((hi[1] - lo[1]) / sy)) + 1
    nz = int(np.ceil((hi[2] - lo[2]) / sz)) + 1
    # Voxel centres symmetric about x = 0 (the plane): the flip is exact.
    start = np.array([-(nx - 1) / 2 * sx, lo[1], lo[2]])
    origin = plane.point + frame @ start
    return Volume(np.zeros((nz, ny, nx), np.uint8), spacing=spacing, origin=tuple(origin), direction=frame)


def resample_to(volume: Volume, reference: Volume, order: int = 1, default: float | None = None,
                device: str | None = None) -> Volume:
    """Resample ``volume`` onto the grid of ``reference`` (physical space, identity transform).

    Args:
        order: 0 nearest neighbour, 1 linear, 3 B-spline.
        default: value outside ``volume``; default its minimum (air for CT, 0 for masks).
        device: None for SimpleITK on the CPU; a torch device (e.g. "cuda") interpolates
            there with ``grid_sample`` instead (order 0 or 1), the same values within
            float32 rounding (:func:`resample_torch`).
    """
    fill = float(volume.array.min()) if default is None else float(default)
    if device is not None:
        return resample_torch(volume, reference, order, fill, device)
    interp = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}[order]
    image = to_sitk(volume.with_array(volume.array.astype(np.float32)))
    ref = to_sitk(reference.with_array(np.zeros(reference.shape, np.uint8)))
    out = sitk.Resample(image, ref, sitk.Transform(), interp, fill, sitk.sitkFloat32)
    return from_sitk(out)


def resample_torch(volume: Volume, reference: Volume, order: int, fill: float, device: str,
                   slab_voxels: int = 8_000_000) -> Volume:
    """:func:`resample_to` with ``torch.nn.functional.grid_sample`` on ``device``; float32.

    Follows ITK's rule: a point whose continuous index lies within half a voxel of the
    image (every axis in [-0.5, n - 0.5]) is interpolated, its neighbours clamped to the
    image; any other point gets ``fill``. Output slabs of about ``slab_voxels`` bound the
    memory of the sampling grid.
    """
    import torch
    import torch.nn.functional as F

    if order not in (0, 1):
        raise ValueError(f"resample_torch interpolates with order 0 or 1, not {order}")
    dev = torch.device(device)
    # (z, y, x) index of the reference -> (z, y, x) index of the volume, idx_v = A @ idx_r + b,
    # from the volumes' own geometry: the images of the origin and of the three unit steps.
    steps = volume.physical_to_index(reference.index_to_physical(np.vstack([np.zeros(3), np.eye(3)])))
    b = np.ascontiguousarray(steps[0])
    a = np.ascontiguousarray((steps[1:] - b).T)
    size_v = np.array(volume.shape, dtype=np.float64)
    src = torch.as_tensor(np.ascontiguousarray(volume.array, dtype=np.float32), device=dev)[None, None]
    a_t = torch.as_tensor(a, dtype=torch.float32, device=dev)
    b_t = torch.as_tensor(b, dtype=torch.float32, device=dev)
    half = torch.as_tensor(size_v - 1, dtype=torch.float32, device=dev)
    nz, ny, nx = reference.shape
    out = torch.empty((nz, ny, nx), dtype=torch.float32, device=dev)
    step = max(1, slab_voxels // max(ny * nx, 1))
    yy, xx = torch.meshgrid(torch.arange(ny, device=dev, dtype=torch.float32),
                            torch.arange(nx, device=dev, dtype=torch.float32), indexing="ij")
    for z0 in range(0, nz, step):
        zz = torch.arange(z0, min(z0 + step, nz), device=dev, dtype=torch.float32)
        idx = torch.stack(torch.broadcast_tensors(zz[:, None, None], yy[None], xx[None]), dim=-1)  # (k, ny, nx, 3) z, y, x
        src_idx = idx @ a_t.T + b_t
        inside = ((src_idx >= -0.5) & (src_idx <= half + 0.5)).all(dim=-1)
        # grid_sample wants (x, y, z) in [-1, 1] (align_corners: -1 and 1 are the end voxels' centres).
        norm = torch.where(half > 0, 2 * src_idx / half.clamp(min=1) - 1, torch.zeros_like(src_idx))
        sampled = F.grid_sample(src, norm.flip(-1)[None], mode="bilinear" if order == 1 else "nearest",
                                padding_mode="border", align_corners=True)[0, 0]
        out[z0:z0 + len(zz)] = torch.where(inside, sampled, torch.full_like(sampled, fill))
    return reference.with_array(out.cpu().numpy())


# --- boxes on the symmetric grid ------------------------------------------------------------


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
