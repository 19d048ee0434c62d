"""Preprocessing shared by training and prediction, and the one home of the mid-sagittal plane.

:class:`Preprocessor` takes a CT (HU, any grid) to its case on the **symmetric grid**
(:mod:`sats.geometry.grid`: the mid-sagittal plane is the central sagittal plane, the last
axis is left-right, so :func:`sats.geometry.symmetry.mirror_lr` is the anatomical mirror)
at the run's spacing, normalised. Training (labelled and unlabelled CTs), prediction,
``sats asymmetry``, the ablation's test cases, ``sats align``, ``sats make-atlas`` and the
lesion test bed all find their plane through :func:`estimate_plane`, with one policy for a
plane that cannot be trusted (:class:`PlaneSettings`):

* ``on_unreliable="raise"`` (default): :class:`sats.geometry.alignment.UnreliablePlane`.
  Prediction refuses the CT with that reason; training leaves the case out and says so.
* ``on_unreliable="grid-centre"``: the grid's central sagittal plane stands in (what a
  plain flip mirrors about) and :attr:`Alignment.reason` says why; the ablation scores
  every test case this way rather than hide a failure.

The plane is an :class:`sats.geometry.alignment.Alignment`; ``to_dict``/``from_dict`` are its
one serialised form.

CT intensities are normalised as nnU-Net does for CT: clip to the 0.5 / 99.5 percentiles
of foreground (label) HU over the training set, then subtract their mean and divide by
their standard deviation.

Example:
    >>> pre = Preprocessor((3.0, 1.6, 1.6), stats)(ct)       # doctest: +SKIP
    >>> pre.image.shape, pre.alignment.source                # (z, y, x) on the symmetric grid
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from sats.geometry.alignment import MIN_SYMMETRY, Alignment, UnreliablePlane, aligned_volume, find_plane, find_plane_registration, plane_from_atlas
from sats.geometry.grid import resample_to, symmetric_grid
from sats.geometry.symmetry import Plane, mirror_lr
from sats.geometry.volume import SatsError, Volume, validate_options

AlignMode = Literal["self", "atlas", "none"]
PlaneMethod = Literal["symmetry", "registration"]
UnreliablePolicy = Literal["raise", "grid-centre"]


@dataclass
class IntensityStats:
    """CT normalisation constants from training foreground voxels (HU)."""

    clip_low: float
    clip_high: float
    mean: float
    std: float

    def normalise(self, hu: np.ndarray) -> np.ndarray:
        out = np.clip(hu.astype(np.float32), self.clip_low, self.clip_high)
        return (out - self.mean) / max(self.std, 1e-6)

    def to_dict(self) -> dict:
        return asdict(self)


def intensity_stats(samples: list[np.ndarray]) -> IntensityStats:
    """Statistics of foreground HU samples pooled over cases."""
    values = np.concatenate([s.ravel() for s in samples if s.size]).astype(np.float64)
    if values.size == 0:
        raise SatsError("no foreground voxels in the training labels: cannot compute intensity statistics")
    lo, hi = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, lo, hi)
    return IntensityStats(float(lo), float(hi), float(clipped.mean()), float(clipped.std()))


def foreground_samples(ct: Volume, label: Volume, n: int = 10000, seed: int = 0) -> np.ndarray:
    """Up to ``n`` HU values from inside the label (random, reproducible)."""
    values = ct.array[label.array > 0]
    if values.size > n:
        values = np.random.default_rng(seed).choice(values, n, replace=False)
    return values.astype(np.float32)


# --- the mid-sagittal plane ------------------------------------------------------------------


@dataclass(frozen=True)
class PlaneSettings:
    """How a CT's mid-sagittal plane is found.

    Attributes:
        mode: "self" (the CT against its own mirror), "atlas" (affine registration to the
            symmetric atlas image at ``atlas``) or "none" (the grid's central sagittal plane).
        atlas: path of the atlas image (mode "atlas").
        method: mode "self": "symmetry" (the plane search, default) or "registration"
            (rigid registration of the CT to its mirror).
        on_unreliable: "raise" or "grid-centre" (see the module docstring).
        quick: a coarser search (two levels, 20k points; about five times faster, good to a
            degree or so), for the landmark search of the lesion test bed.
    """

    mode: AlignMode = "self"
    atlas: str | None = None
    method: PlaneMethod = field(default="symmetry", metadata={"option": "--method"})
    on_unreliable: UnreliablePolicy = "raise"
    quick: bool = False

    def __post_init__(self) -> None:
        validate_options(self)
        if (self.mode == "atlas") != (self.atlas is not None):
            raise SatsError("an atlas image goes with mode 'atlas', and only with it")

    @classmethod
    def of(cls, align: bool, atlas: str | None, on_unreliable: UnreliablePolicy = "raise") -> PlaneSettings:
        """From a training configuration's ``align`` and ``atlas`` (``TrainConfig``, a RUN's config)."""
        mode: AlignMode = "none" if not align else ("atlas" if atlas else "self")
        return cls(mode, str(Path(atlas).resolve()) if mode == "atlas" else None, on_unreliable=on_unreliable)

    @property
    def key(self) -> str:
        """What the case caches are keyed by: "none", "self" or "atlas:/path"."""
        return f"atlas:{self.atlas}" if self.mode == "atlas" else self.mode


@functools.lru_cache(maxsize=4)
def _atlas_image(path: str, mtime_ns: int) -> Volume:
    from sats.data.io import read_image

    return read_image(path)


def read_atlas(path: str) -> Volume:
    """The atlas image at ``path``, read once per process (and again when the file changes)."""
    if not Path(path).exists():
        raise SatsError(f"{path}: the symmetric atlas is missing (the model was aligned with it)")
    return _atlas_image(str(path), os.stat(path).st_mtime_ns)


def estimate_plane(ct: Volume, settings: PlaneSettings | None = None, device: str = "cpu") -> Alignment:
    """The mid-sagittal plane of ``ct`` (HU, any grid) as ``settings`` say; the only caller
    of the plane searches of :mod:`sats.geometry.alignment`.

    A plane whose symmetry score is under :data:`sats.geometry.alignment.MIN_SYMMETRY` is
    unreliable: an :class:`UnreliablePlane`, or with ``on_unreliable="grid-centre"`` the
    grid's central plane with the reason. ``device`` runs the symmetry search's sampling
    there (a GPU when prediction uses one).
    """
    s = settings or PlaneSettings()
    if s.mode == "none":
        return Alignment.grid_centre(ct, "alignment off")
    if s.mode == "atlas":
        found = plane_from_atlas(ct, read_atlas(s.atlas))  # type: ignore[arg-type]
    elif s.method == "registration":
        found = find_plane_registration(ct)
    else:
        found = find_plane(ct, **({"levels_mm": (6.0, 3.0), "n_points": 20000} if s.quick else {}), device=device)
    if found.score_after >= MIN_SYMMETRY:
        return found
    why = (f"mid-sagittal plane unreliable: symmetry score {found.score_after:.2f} after alignment "
           f"(below {MIN_SYMMETRY}); is this a head CT? (for other images, train with --no-align)")
    if s.on_unreliable == "raise":
        raise UnreliablePlane(why, found.score_after)
    return Alignment.grid_centre(ct, why)


# --- the case on its symmetric grid ----------------------------------------------------------


@dataclass
class Preprocessed:
    """A case on its symmetric grid: ``image`` float32 (z, y, x), normalised (HU where no
    statistics were given), ``label`` uint8 or None, ``grid`` the geometry (a Volume whose
    array is ``image``), ``alignment`` the plane it was resampled about, and ``mirror_reg``
    the mirror registered to the image (:func:`sats.geometry.reflection.registered_mirror`,
    normalised alike) where asked for."""

    image: np.ndarray
    label: np.ndarray | None
    grid: Volume
    alignment: Alignment
    mirror_reg: np.ndarray | None = None

    @property
    def plane(self) -> Plane:
        return self.alignment.plane

    @property
    def channels(self) -> np.ndarray:
        """The network's view of the case, (C, z, y, x): the image, and the registered mirror where there is one."""
        return self.image[None] if self.mirror_reg is None else np.stack([self.image, self.mirror_reg])


def preprocess(
    ct: Volume,
    spacing: tuple[float, float, float],
    stats: IntensityStats | None,
    label: Volume | None = None,
    plane: Plane | Alignment | None = None,
    device: str | None = None,
) -> Preprocessed:
    """Native CT (HU) -> image on the symmetric grid about a **given** plane (and the label,
    resampled linearly and thresholded at 0.5); finding the plane is :class:`Preprocessor`'s
    job. ``plane`` None: the grid's central plane. ``stats=None`` leaves HU unnormalised.
    ``device``: where the CT is resampled (:func:`resample_to`; None: SimpleITK on the CPU)."""
    if not isinstance(plane, Alignment):
        plane = Alignment.grid_centre(ct, "no plane given") if plane is None else Alignment(plane, np.nan, np.nan, 0.0, "given")
    grid = symmetric_grid(ct, spacing, plane.plane)
    hu = resample_to(ct, grid, order=1, default=-1024.0, device=device).array
    image = (stats.normalise(hu) if stats is not None else hu).astype(np.float32)
    lab = None
    if label is not None:
        lab = (resample_to(label, grid, order=1, default=0.0).array >= 0.5).astype(np.uint8)
    return Preprocessed(image, lab, grid.with_array(image), plane)


@dataclass
class Preprocessor:
    """A CT (HU, any grid) -> its case on the symmetric grid: the plane (:func:`estimate_plane`),
    the resampling at ``spacing`` (z, y, x) mm and the normalisation (``stats``; None keeps HU).

    ``device``: where the symmetry search samples and (on CUDA) where the CT is resampled;
    on the CPU SimpleITK's threads resample faster. ``registered_mirror``: also the mirror
    registered to the CT (:func:`sats.geometry.reflection.registered_mirror`, a few seconds),
    for the ``fusion="registered"`` networks.

    Example:
        >>> prep = Preprocessor((3.0, 1.6, 1.6), stats, PlaneSettings("self"))   # doctest: +SKIP
        >>> case = prep(ct, label=gtv)        # aligns, resamples, normalises
        >>> again = prep(ct, alignment=case.alignment)   # a stored plane: no search
    """

    spacing: tuple[float, float, float]
    stats: IntensityStats | None = None
    planes: PlaneSettings = field(default_factory=PlaneSettings)
    device: str = "cpu"
    registered_mirror: bool = False

    def find_plane(self, ct: Volume) -> Alignment:
        return estimate_plane(ct, self.planes, self.device)

    def __call__(self, ct: Volume, label: Volume | None = None, alignment: Alignment | None = None,
                 mirror_hu: np.ndarray | None = None) -> Preprocessed:
        """``alignment``: a plane found before (no search); ``mirror_hu``: the registered mirror
        in HU on this case's grid, computed before (no registration)."""
        alignment = alignment or self.find_plane(ct)
        resample_on = self.device if self.device.startswith("cuda") else None
        pre = preprocess(ct, self.spacing, None, label, alignment, device=resample_on)
        if self.registered_mirror:
            from sats.geometry.reflection import registered_mirror

            pre.mirror_reg = registered_mirror(pre.grid) if mirror_hu is None else np.asarray(mirror_hu, np.float32)
        if self.stats is not None:
            pre.image = self.stats.normalise(pre.image).astype(np.float32)
            pre.grid = pre.grid.with_array(pre.image)
            if pre.mirror_reg is not None:
                pre.mirror_reg = self.stats.normalise(pre.mirror_reg).astype(np.float32)
        return pre


def make_atlas(cts: list[Volume], spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)) -> Volume:
    """A symmetric atlas: each CT aligned on its own plane (:func:`estimate_plane`, an
    unreliable plane refused), resampled onto one head-frame grid, averaged with its mirror
    (x, the last axis, is left-right). HU (float32), identity direction, plane at x = 0."""
    if not cts:
        raise SatsError("make-atlas needs at least one CT")
    aligned = [aligned_volume(ct, estimate_plane(ct).plane, spacing)[0] for ct in cts]
    # A common grid covering the union of the aligned extents, symmetric about x = 0.
    lo = np.min([np.asarray(v.origin) for v in aligned], axis=0)
    hi = np.max([np.asarray(v.origin) + (np.array(v.shape[::-1]) - 1) * np.array(v.spacing[::-1]) for v in aligned], axis=0)
    half_x = max(abs(lo[0]), abs(hi[0]))
    size_xyz = np.ceil((np.array([2 * half_x, hi[1] - lo[1], hi[2] - lo[2]])) / np.array(spacing[::-1])).astype(int) + 1
    size_xyz[0] += size_xyz[0] % 2
    origin = np.array([-(size_xyz[0] - 1) / 2 * spacing[2], lo[1], lo[2]])
    reference = Volume(np.zeros(tuple(size_xyz[::-1]), np.uint8), spacing=spacing, origin=tuple(origin))
    total = np.zeros(reference.shape, np.float32)
    for v in aligned:
        total += resample_to(v, reference, order=1, default=-1024.0).array
    mean = total / len(aligned)
    return reference.with_array(((mean + mirror_lr(mean)) / 2).astype(np.float32))
