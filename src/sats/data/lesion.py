"""Lesion insertion: NPC-like GTVs grown into real head-and-neck CTs (``sats phantom --background``).

Real planning CTs are never exactly symmetric (teeth and metal, unequal muscles and
parotids, residual head rotation, fat, nodes). Inserting a synthetic GTV of known extent
into them gives a test bed whose only *label* is synthetic while the anatomy, its
asymmetries and the scanner's noise are real: lesion insertion, as in virtual imaging
trials. Every coordinate below is in the **head frame** of the aligned CT (mm; x = patient
right -> left with the mid-sagittal plane at x = 0, y = anterior -> posterior, z =
inferior -> superior), found by :mod:`sats.geometry.alignment`; the lesion is mapped back onto the
CT's own grid at the end, so the output keeps the input's exact geometry.

**1. Where.** The nasopharynx and its lateral walls: :func:`sats.geometry.landmarks.find_nasopharynx`.

**2. Growth.** Fast marching (SimpleITK) from the seed on a fine grid (half the CT's
finest spacing, 0.75-1.5 mm). The speed is zero in air (< -200 HU), in bone (> 200 HU)
and outside the nasopharyngeal region: above the roof + 12 mm (the skull base), below the
roof - 25 mm (the oropharynx), above the first bone met going up in each column (the
skull base, even where a coarse CT shows gaps in it), in front of the choanae, beyond
45 mm from the midline and, for a unilateral lesion, more than 2 mm across it. Elsewhere
it is a smooth log-normal random field times a drift towards a random mix of lateral
(parapharyngeal space), posterior (longus) and superior (skull base) directions. The
lesion is the earliest-reached set of the drawn volume (log-uniform, 5-60 ml by default),
so it is connected, irregular and confined to soft tissue. A bilateral lesion
(``bilateral_fraction``) starts from a chain of seeds along the posterior wall across the
midline, so part of it is mirrored by itself (the paper's Fig. 2b region A).

**3. Intensity.** The fine mask, box-averaged over a CT voxel, gives each CT voxel its
lesion fraction f (partial volume). Inside, HU = m + c + t, where m is the median HU of
muscle (0-120 HU) within 10 mm of the lesion in the original CT, c the contrast
(``tumor_contrast``, default drawn from 0-15 HU), and t correlated Gaussian texture, zero
mean over the lesion, whose standard deviation is that muscle's voxel-scale variation
(the robust spread of what a one-voxel Gaussian smoothing removes from muscle voxels away
from any edge, within 20, 40 or 80 mm of the lesion: the CT's own noise). The CT becomes
``(1 - f) * CT + f * lesion``; f is tapered to zero over voxels that were air or bone, so
those keep their values, and is 1 in the label's interior (its erosion), where the
texture's mean is zero: there the mean HU is exactly m + c. The label is f >= 0.5 on voxels that were soft tissue
(-400 < HU < 300), its largest 6-connected component: it never covers air or bone of the
original CT.

**4. Mass effect.** Outside the lesion the CT is resampled through a smooth displacement
field pointing away from the lesion, ``u = a (d / s) exp(1/2 - d^2 / 2 s^2)`` at distance d
(a = a quarter of the lesion's equivalent radius, 2-5 mm; s = 2.5 a; zero at the lesion
and far away, damped near bone): the mucosa next to the lesion is pushed into the airway,
which narrows smoothly instead of being overwritten at a hard edge.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from sats.data.io import read_image, write_image, write_text_atomic
from sats.geometry.grid import keep_largest_component, resample_to
from sats.geometry.landmarks import AIR_HU, BONE_HU, GROW_HU, WORK_SPACING, Nasopharynx, NoNasopharynx, find_nasopharynx
from sats.geometry.symmetry import Plane
from sats.geometry.volume import SatsError, Volume
from sats.hardware import available_cores

#: Muscle HU range used to measure the surrounding muscle.
MUSCLE_HU = (0.0, 120.0)


class SkipBackground(SatsError):
    """This background CT cannot take a lesion (the message says why); it is skipped."""


@dataclass
class LesionConfig:
    """Options of ``sats phantom --background`` (see the module docstring)."""

    tumor_contrast: float | None = None  # HU above muscle; None: drawn from contrast_range
    contrast_range: tuple[float, float] = (0.0, 15.0)
    bilateral_fraction: float = 0.2
    volume_ml: tuple[float, float] = (5.0, 60.0)  # drawn log-uniformly

    def __post_init__(self) -> None:
        lo, hi = self.volume_ml
        if not 0 < lo <= hi:
            raise SatsError(f"--volume-ml needs 0 < LO <= HI, got {lo} {hi}")
        if not self.contrast_range[0] <= self.contrast_range[1]:
            raise SatsError(f"--contrast-range needs LO <= HI, got {self.contrast_range[0]} {self.contrast_range[1]}")
        if not 0.0 <= self.bilateral_fraction <= 1.0:
            raise SatsError(f"--bilateral-fraction must be within 0..1, got {self.bilateral_fraction}")



# --- geometry helpers -----------------------------------------------------------------------


@dataclass
class HeadFrame:
    """The aligned CT's frame: head-frame point q <-> LPS point ``p = R q + t``."""

    rotation: np.ndarray  # columns: head x, y, z axes in LPS
    point: np.ndarray  # LPS of the head-frame origin (on the mid-sagittal plane)

    def to_lps(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(q, float) @ self.rotation.T + self.point

    def volume(self, array: np.ndarray, spacing, origin_q) -> Volume:
        """A head-frame grid (identity axes, ``origin_q`` in head mm) as a physical Volume."""
        return Volume(array, spacing=spacing, origin=tuple(self.to_lps(origin_q)), direction=self.rotation)


# --- 2-4. growth, intensity, mass effect ------------------------------------------------------


@dataclass
class InsertedLesion:
    """One background CT with its lesion: the new CT, the label and what was drawn."""

    ct: Volume
    label: Volume
    meta: dict


def _fast_march(speed: np.ndarray, seeds: list[tuple[int, int, int]], step: float) -> np.ndarray:
    """Arrival times (s, float32) from ``seeds`` (z, y, x indices) through ``speed`` (mm/s)."""
    image = sitk.GetImageFromArray(speed.astype(np.float32))
    image.SetSpacing((step, step, step))
    fm = sitk.FastMarchingImageFilter()
    fm.SetTrialPoints([(int(x), int(y), int(z)) for z, y, x in seeds])
    fm.SetStoppingValue(1e6)
    times = sitk.GetArrayFromImage(fm.Execute(image))  # float64; unreached voxels hold a huge value
    return np.where(times > 1e6, np.inf, times).astype(np.float32)


def _random_field(shape, sigma_vox: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth Gaussian random field with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return field / max(float(field.std()), 1e-6)


def arrival_times(
    hu_fine: np.ndarray,
    inside: np.ndarray,
    q: tuple[np.ndarray, np.ndarray, np.ndarray],
    seeds: list[tuple[int, int, int]],
    seed_q: np.ndarray,
    direction: np.ndarray,
    step: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Fast-marching arrival times (inf where unreachable) on a fine head-frame box.

    Args:
        hu_fine: CT resampled on the box, (z, y, x), HU.
        inside: voxels the lesion may enter (anatomical limits), same shape.
        q: head-frame x, y, z (mm) of the voxel centres, broadcastable to the shape.
        seeds: (z, y, x) indices to start from.
        seed_q: head-frame point (x, y, z) the drift is measured from.
        direction: unit vector (head frame) the growth drifts towards.
        step: the box's spacing, mm.
    """
    allowed = inside & (hu_fine > GROW_HU[0]) & (hu_fine < GROW_HU[1])
    drift = sum((q[a] - seed_q[a]) * direction[a] for a in range(3)) / 20.0
    speed = np.exp(0.5 * _random_field(hu_fine.shape, 4.0 / step, rng) + np.clip(0.8 * drift, -1.5, 1.5))
    return _fast_march(np.where(allowed, speed, 0.0), seeds, step)


def earliest(times: np.ndarray, n_voxels: int, seed: tuple[int, int, int]) -> np.ndarray:
    """The ``n_voxels`` earliest-reached voxels, as one 6-connected piece containing ``seed``."""
    finite = np.sort(times[np.isfinite(times)])
    if len(finite) == 0:
        return np.zeros(times.shape, bool)
    mask = times <= finite[min(n_voxels, len(finite)) - 1]
    labels, _ = ndimage.label(mask)
    return labels == labels[seed]


def _nearest_allowed(allowed: np.ndarray, index: np.ndarray, radius: int = 3) -> tuple[int, int, int] | None:
    """The allowed voxel nearest to ``index`` (z, y, x) within ``radius`` voxels."""
    c = np.round(index).astype(int)
    lo = np.maximum(c - radius, 0)
    hi = np.minimum(c + radius + 1, allowed.shape)
    if np.any(hi <= lo):
        return None
    local = np.argwhere(allowed[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]) + lo
    if len(local) == 0:
        return None
    return tuple(int(v) for v in local[np.argmin(((local - index) ** 2).sum(axis=1))])


def _posterior_wall_chain(npx: Nasopharynx, x_from: float, x_to: float) -> list[np.ndarray]:
    """Head-frame points just behind the lumen's posterior wall, every 3 mm from ``x_from``
    to ``x_to`` (for a lesion that crosses the midline)."""
    points = []
    for x in np.arange(x_from, x_to, 3.0 * np.sign(x_to - x_from)):
        near = npx.lumen[np.abs(npx.lumen[:, 0] - x) < 2.0]
        if len(near):
            top = near[near[:, 2] >= near[:, 2].max() - 6.0]
            p = top[np.argmax(top[:, 1])]
            points.append(p + np.array([0.0, 3.0, 0.0]))
    return points


@dataclass
class Draw:
    """What is drawn at random for one lesion (``rng`` order fixed: side, bilateral,
    volume, contrast, drift)."""

    side: str  # "left" | "right" (the patient's)
    bilateral: bool
    volume_ml: float
    contrast_hu: float
    direction: np.ndarray  # unit drift of the growth, head frame (x, y, z)

    @property
    def sign(self) -> float:
        """+1 for the patient's left (+x in LPS), -1 for the right."""
        return 1.0 if self.side == "left" else -1.0

    @classmethod
    def sample(cls, config: LesionConfig, rng: np.random.Generator) -> "Draw":
        side = str(rng.choice(["left", "right"]))
        sign = 1.0 if side == "left" else -1.0
        bilateral = bool(rng.random() < config.bilateral_fraction)
        lo, hi = config.volume_ml
        volume = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        contrast = float(config.tumor_contrast) if config.tumor_contrast is not None else float(rng.uniform(*config.contrast_range))
        w = rng.uniform([0.5, 0.2, 0.3], [1.0, 0.8, 0.8])  # lateral, posterior, superior
        direction = np.array([sign * w[0] * (0.3 if bilateral else 1.0), w[1], w[2]])
        return cls(side, bilateral, volume, contrast, direction / np.linalg.norm(direction))


def _head(ct: Volume) -> tuple[Volume, HeadFrame, Plane]:
    """The CT on the 2 mm head-frame grid, its frame and its mid-sagittal plane."""
    from sats.geometry.alignment import UnreliablePlane, aligned_volume
    from sats.geometry.preprocessing import PlaneSettings, estimate_plane

    # The landmark search needs the plane to a degree or so: the quick search will do.
    try:
        alignment = estimate_plane(ct, PlaneSettings(quick=True))
    except UnreliablePlane as exc:
        raise SkipBackground(f"not a head: symmetry score {exc.score:.2f} about the best mid-sagittal plane") from None
    except SatsError as exc:
        raise SkipBackground(f"alignment failed: {exc}") from None
    head, transform = aligned_volume(ct, alignment.plane, WORK_SPACING)
    frame = HeadFrame(np.array(transform.GetMatrix()).reshape(3, 3), np.array(transform.GetTranslation()))
    return head, frame, alignment.plane


def _grow(ct: Volume, frame: HeadFrame, npx: Nasopharynx, draw: Draw, rng: np.random.Generator) -> tuple[np.ndarray, Volume, tuple]:
    """Arrival times on a fine head-frame box around the nasopharynx (see the module
    docstring, 2.). Returns (times, the box as a Volume, the main seed's index)."""
    seed = npx.fossa[draw.side]
    step = float(np.clip(min(ct.spacing) / 2.0, 0.75, 1.5))
    lo_q = np.array([-60.0, seed[1] - 35.0, npx.roof_z - 45.0])
    size = np.ceil((np.array([60.0, seed[1] + 45.0, npx.roof_z + 15.0]) - lo_q) / step).astype(int) + 1  # (x, y, z)
    grid = frame.volume(np.zeros(tuple(size[::-1]), np.uint8), (step, step, step), lo_q)
    hu_fine = resample_to(ct, grid, order=1, default=-1024.0).array
    qx, qy, qz = ((lo_q[a] + np.arange(size[a]) * step).reshape([-1 if b == 2 - a else 1 for b in range(3)]) for a in range(3))
    inside = (qz <= npx.roof_z + 12.0) & (qz >= npx.roof_z - 25.0)  # below the skull base, above the oropharynx
    inside = inside & (qy >= npx.anterior_y - 3.0) & (np.abs(qx) <= 45.0)  # behind the choanae, medial to the parotids
    if not draw.bilateral:
        inside = inside & (draw.sign * qx >= -2.0)
    inside = np.broadcast_to(inside, hu_fine.shape)
    # Bone is a ceiling: nothing above the first bone met going up from below the roof
    # (the skull base stops the lesion even where a coarse CT shows gaps in it).
    inside = inside & ~np.logical_or.accumulate((hu_fine > GROW_HU[1]) & (qz >= npx.roof_z - 5.0), axis=0)
    allowed = inside & (hu_fine > GROW_HU[0]) & (hu_fine < GROW_HU[1])
    points = [seed] + (_posterior_wall_chain(npx, seed[0], -draw.sign * 12.0) if draw.bilateral else [])
    seeds = [i for i in (_nearest_allowed(allowed, ((p - lo_q) / step)[::-1]) for p in points) if i is not None]
    if not seeds or _nearest_allowed(allowed, ((seed - lo_q) / step)[::-1]) != seeds[0]:
        raise SkipBackground("no soft tissue at the lateral nasopharyngeal wall on the fine grid")
    return arrival_times(hu_fine, inside, (qx, qy, qz), seeds, seed, draw.direction, step, rng), grid, seeds[0]


def _label_of_volume(ct: Volume, times: np.ndarray, grid: Volume, seed: tuple, target_ml: float) -> tuple[np.ndarray, np.ndarray]:
    """(label, lesion fraction) on the CT's grid, the label of about ``target_ml``: the
    earliest-reached fine voxels, box-averaged over a CT voxel, >= 0.5 on soft tissue."""
    hu = ct.array.astype(np.float32)
    soft = (hu > AIR_HU) & (hu < BONE_HU)
    step = grid.spacing[0]
    box = [max(1, int(round(sp / step))) | 1 for sp in ct.spacing]  # odd, about one CT voxel
    n_voxels = int(round(target_ml * 1000.0 / step**3))
    for _ in range(4):
        pv = ndimage.uniform_filter(earliest(times, n_voxels, seed).astype(np.float32), size=box)
        fraction = np.clip(resample_to(grid.with_array(pv), ct, order=1, default=0.0).array, 0.0, 1.0)
        label = keep_largest_component((fraction >= 0.5) & soft, connectivity=6)  # one piece under any definition
        got_ml = float(label.sum()) * ct.voxel_volume_ml
        if got_ml > 0 and abs(got_ml / target_ml - 1.0) < 0.05:
            break
        n_voxels = int(round(n_voxels * target_ml / max(got_ml, 0.1 * target_ml)))
    return label, fraction


def insert_lesion(ct: Volume, config: LesionConfig, rng: np.random.Generator) -> InsertedLesion:
    """Grow one NPC-like GTV into a real head-and-neck CT (see the module docstring).

    Args:
        ct: CT in HU, any grid.
    Returns:
        The CT with the lesion (same grid and dtype), its label (uint8) and the metadata
        recorded in ``lesions.json``.
    Raises:
        SkipBackground: the CT cannot take a lesion (reason in the message).
    """
    head, frame, plane = _head(ct)
    try:
        npx = find_nasopharynx(head)
    except NoNasopharynx as exc:
        raise SkipBackground(str(exc)) from None
    draw = Draw.sample(config, rng)
    times, grid, seed = _grow(ct, frame, npx, draw, rng)
    label, fraction = _label_of_volume(ct, times, grid, seed, draw.volume_ml)
    got_ml = float(label.sum()) * ct.voxel_volume_ml
    lo, hi = config.volume_ml
    if not lo * 0.999 <= got_ml <= hi * 1.001:
        raise SkipBackground(f"lesion of {got_ml:.1f} ml outside {lo:g}-{hi:g} ml (too little soft tissue around the nasopharynx)")
    hu = ct.array.astype(np.float32)
    if not (ndimage.binary_dilation(label, np.ones((3, 3, 3), bool)) & (hu <= AIR_HU)).any():
        raise SkipBackground("the lesion does not reach the nasopharyngeal airway")
    new, stats = _paint(ct, hu, label, fraction, draw.contrast_hu, got_ml, rng)
    q_label = (ct.index_to_physical(np.argwhere(label)) - frame.point) @ frame.rotation  # head frame
    meta = {
        "plane": plane.to_dict(),
        "seed": [round(float(v), 2) for v in frame.to_lps(npx.fossa[draw.side])],
        "side": draw.side,
        "volume_ml": round(got_ml, 2),
        "contrast_hu": round(draw.contrast_hu, 2),
        "bilateral": draw.bilateral,
        "contralateral_fraction": round(float((draw.sign * q_label[:, 0] < 0).mean()), 3),
        "nasopharynx_roof": [round(float(v), 2) for v in frame.to_lps([0.0, npx.posterior_wall_y, npx.roof_z])],
        **stats,
    }
    return InsertedLesion(ct.with_array(new), ct.with_array(label.astype(np.uint8)), meta)


def _muscle_shell(hu: np.ndarray, label: np.ndarray, spacing, radius_mm: float = 10.0) -> np.ndarray:
    distance = ndimage.distance_transform_edt(~label, sampling=spacing)
    return (distance > 0) & (distance <= radius_mm) & (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1])


def surrounding_muscle(hu: np.ndarray, label: np.ndarray, spacing, radius_mm: float = 10.0) -> np.ndarray:
    """HU of muscle-range voxels (MUSCLE_HU) within ``radius_mm`` outside ``label``."""
    return hu[_muscle_shell(hu, label, spacing, radius_mm)]


def _paint(ct: Volume, hu: np.ndarray, label: np.ndarray, fraction: np.ndarray, contrast: float, volume_ml: float,
           rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Mass effect, then the lesion's intensity blended in by its partial-volume fraction."""
    muscle = surrounding_muscle(hu, label, ct.spacing)
    if muscle.size < 20:
        raise SkipBackground("too little muscle around the lesion to set its intensity")
    muscle_hu = float(np.median(muscle))
    # The CT's own voxel-scale variation in that muscle: the robust spread of what a
    # one-voxel Gaussian smoothing removes (noise and fine texture, not anatomy).
    # Measured away from edges (whole 3x3x3 neighbourhood in the muscle range), in the
    # nearest 20, 40 or 80 mm that hold at least 50 such voxels.
    flat_muscle = ndimage.binary_erosion((hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1]), np.ones((3, 3, 3), bool))
    residual = hu - ndimage.gaussian_filter(hu, 1.0)
    texture_sd = 10.0  # a typical value, should no flat muscle be near
    for radius in (20.0, 40.0, 80.0):
        r = residual[_muscle_shell(hu, label, ct.spacing, radius) & flat_muscle]
        if r.size >= 50:
            texture_sd = float(np.clip(1.4826 * np.median(np.abs(r - np.median(r))), 2.0, 30.0))
            break

    # Mass effect: push the tissue around the lesion outwards (into the airway).
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    a = float(np.clip(0.25 * radius, 2.0, 5.0))
    s = 2.5 * a
    distance = ndimage.distance_transform_edt(~label, sampling=ct.spacing)
    pad = [int(np.ceil(4 * s / sp)) + 1 for sp in ct.spacing]
    nz = np.argwhere(label)
    box = tuple(slice(max(0, lo - p), min(n, hi + p + 1)) for lo, hi, p, n in zip(nz.min(0), nz.max(0), pad, hu.shape))
    d = distance[box]
    grads = np.gradient(d, *ct.spacing)
    norm = np.sqrt(sum(g * g for g in grads)) + 1e-6
    bone = ndimage.gaussian_filter((hu[box] > BONE_HU).astype(np.float32), 1.5)
    magnitude = a * (d / s) * np.exp(0.5 - d * d / (2 * s * s)) * np.clip(1.0 - 2.0 * bone, 0.0, 1.0)
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in d.shape], indexing="ij")
    coords = [g - magnitude * gr / norm / sp for g, gr, sp in zip(grid, grads, ct.spacing)]
    warped = hu.copy()
    warped[box] = ndimage.map_coordinates(hu[box], coords, order=1, mode="nearest")

    # Partial volume: the lesion fraction, tapered to zero over air and bone of the original.
    soft_weight = np.clip((hu - AIR_HU) / (GROW_HU[0] - AIR_HU), 0, 1) * np.clip((BONE_HU - hu) / (BONE_HU - GROW_HU[1]), 0, 1)
    # The label's interior (its 6-connected erosion) is wholly lesion, with the drawn mean.
    interior = ndimage.binary_erosion(label)
    f = np.where(interior, 1.0, fraction * soft_weight)
    texture = _random_field(hu.shape, 0.7, rng)
    texture -= texture[interior].mean() if interior.any() else texture[label].mean()
    lesion = muscle_hu + contrast + texture_sd * texture
    out = (1.0 - f) * warped + f * lesion
    info = np.iinfo(ct.array.dtype) if np.issubdtype(ct.array.dtype, np.integer) else None
    out = np.clip(np.rint(out), info.min, info.max).astype(ct.array.dtype) if info else out.astype(ct.array.dtype)
    stats = {"muscle_hu": round(muscle_hu, 2), "texture_sd_hu": round(texture_sd, 2), "mass_effect_mm": round(a, 2)}
    return out, stats


# --- the dataset -------------------------------------------------------------------------------


def background_pools(background: Path) -> tuple[list[Path], list[Path] | None]:
    """(training pool, test pool) of background CTs. A dataset's ``imagesTr`` and
    ``imagesTs`` stay apart (test cases come from its test split); a plain folder of CTs
    is one pool (test pool None)."""
    from sats.data.io import collect_inputs

    background = Path(background)
    if not background.is_dir():
        raise SatsError(f"{background}: not a folder of CT images or a dataset")

    def images(folder: Path) -> list[Path]:
        try:
            return [p for _, p in collect_inputs(folder)[0]]
        except SatsError:
            return []

    if (background / "imagesTr").is_dir():
        train = images(background / "imagesTr")
        test = images(background / "imagesTs") if (background / "imagesTs").is_dir() else []
        if not train and not test:
            raise SatsError(f"{background}: no CT images in imagesTr or imagesTs")
        return train, (test or None)
    pool = images(background)
    if not pool:
        raise SatsError(f"{background}: no CT images (.nii.gz, .nii, .nrrd, .mha or DICOM series)")
    return pool, None


def _source_rng(seed: int, name: str) -> np.random.Generator:
    import zlib

    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _insert_job(job: tuple[Path, int, LesionConfig]) -> tuple[str, InsertedLesion | str]:
    """Worker: one background CT -> its lesion, or the reason it was skipped."""
    path, seed, config = job
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one process per core instead
    try:
        ct = read_image(path)
        from sats.data.dataset import check_ct

        check_ct(ct, path.name)
        return path.name, insert_lesion(ct, config, _source_rng(seed, path.name))
    except SatsError as exc:
        return path.name, str(exc).replace(f"{path}: ", "")


def write_lesion_dataset(
    out: Path,
    background: Path,
    n_train: int,
    n_test: int,
    seed: int,
    config: LesionConfig | None = None,
    console=None,
    workers: int | None = None,
) -> dict:
    """Write ``n_train`` + ``n_test`` cases (nnU-Net raw layout) of real CTs from
    ``background`` with one inserted GTV each, plus ``lesions.json`` and ``skipped.json``.
    Test cases come from the dataset's imagesTs, topped up from imagesTr CTs that no
    training case uses when too few test CTs take a lesion; training cases come from
    imagesTr only.

    Candidates are taken in a seeded random order; each lesion depends only on (seed,
    source file name), so the output is the same whatever the number of workers.

    The dataset is written whole or not at all: into a hidden folder beside ``out``, renamed
    to ``out`` (which must be new or empty) at the end. When a split that was asked for
    gets no case at all (too few usable background CTs), nothing is written and a
    SatsError says how many background CTs could take a lesion.
    Returns a summary: {"train": n, "test": n, "skipped": n, "usable": n, "backgrounds": n}.
    """
    config = config or LesionConfig()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SatsError(f"{out}: exists and is not empty; give a new folder (a test bed is written whole or not at all)")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        lesions, skipped, counts, total = _insert_lesions(staging, background, n_train, n_test, seed, config, console, workers)
        empty = [split for split, key, wanted in (("training", "Tr", n_train), ("test", "Ts", n_test)) if wanted and not counts[key]]
        if empty:
            reasons = sorted({r for r in skipped.values() if not r.startswith("not needed")})[:2]
            raise SatsError(f"{background}: {len(lesions)} of {total} background CT(s) could take a lesion, so no "
                            f"{' and no '.join(empty)} case could be written; nothing written"
                            + (f" (reasons include: {'; '.join(reasons)})" if reasons else ""))
        _write_lesion_metadata(staging, background, seed, config, counts["Tr"], lesions, skipped)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"train": counts["Tr"], "test": counts["Ts"], "skipped": len(skipped), "usable": len(lesions), "backgrounds": total}


def _insert_lesions(out: Path, background: Path, n_train: int, n_test: int, seed: int, config: LesionConfig, console,
                    workers: int | None) -> tuple[dict, dict, dict, int]:
    """The insertion loop of :func:`write_lesion_dataset`, writing the cases into ``out``:
    (lesions, skipped, counts per split, number of background CTs)."""
    from sats.progress import progress_bar

    train_pool, test_pool = background_pools(background)
    order = np.random.default_rng(seed)
    train_pool = [train_pool[i] for i in order.permutation(len(train_pool))]
    if test_pool is not None:
        # Test cases from the dataset's test split; should too few of those take a lesion,
        # the rest come from training CTs left over (never the other way round).
        test_pool = [test_pool[i] for i in order.permutation(len(test_pool))]
        plan = [("Ts", test_pool, n_test), ("Tr", train_pool, n_train), ("Ts", train_pool, n_test)]
    else:  # one pool: test cases first, then training cases, from disjoint CTs
        plan = [("Ts", train_pool, n_test), ("Tr", train_pool, n_train)]
    workers = workers or min(4, available_cores())
    lesions: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    used: set[str] = set()
    counts = {"Tr": 0, "Ts": 0}
    progress = progress_bar(console, info=True)
    # Spawned, not forked, workers: a fork taken after SimpleITK's or torch's thread pools
    # have run (a registration, a training) can inherit a held lock and hang for ever.
    spawn = multiprocessing.get_context("spawn")
    with progress, ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
        for split, candidates, wanted in plan:
            if counts[split] >= wanted:
                continue
            task = progress.add_task(f"lesions {split}", total=wanted, completed=counts[split], info="")
            queue = [p for p in candidates if p.name not in used and p.name not in skipped]
            futures = [pool.submit(_insert_job, (p, seed, config)) for p in queue[: 2 * workers]]
            nxt = len(futures)
            for future in _in_order(futures):
                if counts[split] >= wanted:
                    break
                name, result = future.result()
                if isinstance(result, str):
                    skipped[name] = result
                else:
                    case_id = f"npc_{counts[split]:03d}" if split == "Tr" else f"npc_test_{counts[split]:03d}"
                    write_image(result.ct, out / f"images{split}" / f"{case_id}_0000.nii.gz")
                    write_image(result.label, out / f"labels{split}" / f"{case_id}.nii.gz")
                    lesions[case_id] = {"source": name, **result.meta}
                    used.add(name)
                    counts[split] += 1
                    progress.advance(task)
                progress.update(task, info=f"{len(skipped)} skipped")
                if nxt < len(queue):
                    futures.append(pool.submit(_insert_job, (queue[nxt], seed, config)))
                    nxt += 1
            for f in futures:
                f.cancel()
    everything = {p.name for p in train_pool + (test_pool or [])}
    for name in sorted(everything - used - set(skipped)):
        skipped[name] = "not needed: enough cases were written from earlier candidates"
    return lesions, skipped, counts, len(everything)


def _write_lesion_metadata(out: Path, background: Path, seed: int, config: LesionConfig, n_train: int,
                           lesions: dict, skipped: dict) -> None:
    """dataset.json, lesions.json and skipped.json of a lesion test bed."""
    meta = {
        "name": "SATs real-anatomy test bed",
        "description": f"Real head-and-neck CTs from {Path(background).resolve()} with one inserted NPC-like GTV each "
                       f"(sats phantom --background, seed {seed}); the label is the inserted GTV alone.",
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "GTV": 1},
        "numTraining": n_train, "file_ending": ".nii.gz",
        "lesion_insertion": {"seed": seed, "background": str(Path(background).resolve()), **asdict(config)},
    }
    write_text_atomic(out / "dataset.json", json.dumps(meta, indent=2))
    write_text_atomic(out / "lesions.json", json.dumps(lesions, indent=2))
    write_text_atomic(out / "skipped.json", json.dumps(dict(sorted(skipped.items())), indent=2))


def _in_order(futures: list):
    """Iterate over a list of futures in list order while the list grows."""
    i = 0
    while i < len(futures):
        yield futures[i]
        i += 1
