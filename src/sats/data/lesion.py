"""Lesion insertion: NPC-like GTVs grown into real head-and-neck CTs (``sats phantom --background``).

Real planning CTs are never exactly symmetric (teeth and metal, unequal muscles and
parotids, residual head rotation, fat, nodes). Inserting a synthetic GTV of known extent
into them gives a test bed whose only *label* is synthetic while the anatomy, its
asymmetries and the scanner's noise are real: lesion insertion, as in virtual imaging
trials. Every coordinate below is in the **head frame** of the aligned CT (mm; x = patient
right -> left with the mid-sagittal plane at x = 0, y = anterior -> posterior, z =
inferior -> superior), found by :mod:`sats.geometry.alignment`; the lesion is mapped back onto the
CT's own grid at the end, so the output keeps the input's exact geometry.

**1. Landmarks: where is the nasopharynx?** (:func:`find_nasopharynx`, on a 2 mm grid)

* *Enclosed air*: in every axial slice, air (< -400 HU) inside the patient's outline (the
  largest connected body of tissue, so not a couch or mask) after a 3 mm closing
  (airway, nasal cavity, sinuses, oral cavity; not the air around the head).
* *Pharyngeal slices*: the most posterior enclosed air within 6 mm of the midline has
  4-40 mm of soft tissue behind it (posterior pharyngeal wall, longus muscles) and then
  bone (clivus, atlas, axis), and the lumen there is 8-45 mm wide (wider is a gap where
  the field of view was cut).
* *Airways*: runs of pharyngeal slices (gaps of one slice, the posterior wall moving less
  than 8 mm between slices). From the highest run down, and within a run from its top
  slice down to 20 mm below it (an airway can run on into the back of the nasal cavity),
  the first top that passes every check below is the roof of the nasopharynx. A CT where
  none passes is skipped, with the reasons of the three highest runs.
* *Checks* (:func:`_check_run`, in this order), each against a look-alike:

  - the airway is at least 6 mm high;
  - no bone directly below it, and bone is under 10 % of the voxels around it (a sinus);
  - bone within 25 mm above it (the skull base), and 30 mm or more out on both sides
    within 35 mm above (petrous bones, condyles);
  - the scan goes on for 40 mm above the roof (the skull base is in it), and is 80-300 mm
    wide at the roof and there (a head: not the shoulders, not a cut field of view);
  - 150 mm3 of bone 35-65 mm out on both sides beside the roof (mandibular rami,
    condyles, pterygoid plates; the neck below the mandible has none);
  - bone 25 mm or more behind the posterior wall across 60 % of the 80 mm around the
    midline (the cranium; at the level of the axis only a spinous process is there);
  - the choanae in front of the roof: air is at least 5 % of the 40 x 40 mm in front,
    and 12 % where soft tissue fills more than 35 % of the 30 x 30 mm right in front
    (the tongue, in front of the oropharynx);
  - at least 3 ml of air in front of the airway (the nasal cavity) that goes on above
    the roof.

  The thresholds were set by looking at the accepted and skipped CTs of OpenKBP
  (BENCHMARKS.md, lesion insertion); every accepted lesion there was looked at.
* *The wall*: the soft tissue next to the upper 12 mm of the lumen, within 12 mm of its
  posterior wall: its most lateral point on each side, 4-30 mm from the midline, is the
  fossa of Rosenmüller, where the lesion starts.

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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from sats.hardware import available_cores
from sats.data.io import SatsError, Volume, read_image, write_image, write_text_atomic
from sats.geometry.symmetry import Plane

#: Working grid of the landmark search (z, y, x) mm.
WORK_SPACING = (2.0, 2.0, 2.0)
#: Below: air. Above: bone. Between: soft tissue (fat, muscle, mucosa, glands).
AIR_HU = -400.0
BONE_HU = 300.0
#: HU range the lesion may grow through (stricter than the label's air/bone limits, so
#: the partial-volume rim stays off air and bone).
GROW_HU = (-200.0, 200.0)
#: Muscle HU range used to measure the surrounding muscle.
MUSCLE_HU = (0.0, 120.0)


class SkipBackground(SatsError):
    """This background CT cannot take a lesion (the message says why); it is skipped."""


class NoNasopharynx(SkipBackground):
    """The landmark search did not find a nasopharynx it trusts (the message says why)."""


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


@dataclass
class Nasopharynx:
    """What :func:`find_nasopharynx` found, in head-frame mm (x, y, z).

    Attributes:
        roof_z, floor_z: top and bottom of the lumen used.
        posterior_wall_y: the posterior wall at mid-height.
        anterior_y: the lumen's anterior limit (the choanae) in its posterior 20 mm.
        lumen: head-frame points (n, 3) of the lumen's air voxels.
        fossa: {"left": point, "right": point}, the soft-tissue seed on each lateral wall.
    """

    roof_z: float
    floor_z: float
    posterior_wall_y: float
    anterior_y: float
    lumen: np.ndarray
    fossa: dict = field(default_factory=dict)


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


def _disk(radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    r = [int(np.ceil(radius_mm / s)) for s in spacing]
    g = np.mgrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1].astype(float)
    return (g[0] * spacing[0]) ** 2 + (g[1] * spacing[1]) ** 2 <= radius_mm**2


def enclosed_air(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Air inside the patient's outline in each axial slice (after a 3 mm closing); the
    patient is the largest connected body of tissue, so a couch or mask is left out."""
    from sats.geometry.preprocessing import body_mask

    tissue = body_mask(hu)
    disk = _disk(3.0, spacing[1:])
    out = np.zeros_like(tissue)
    for k in range(hu.shape[0]):
        if tissue[k].sum() < 50:
            continue
        closed = ndimage.binary_closing(tissue[k], disk, border_value=0)
        out[k] = ndimage.binary_fill_holes(closed) & (hu[k] <= AIR_HU)
    return out


# --- 1. landmarks -----------------------------------------------------------------------------


def _pharyngeal_slices(hu: np.ndarray, air: np.ndarray, xs: np.ndarray, spacing) -> list[dict | None]:
    """Per axial slice: the posterior pharyngeal airway, or None (see the module docstring)."""
    bone = hu > BONE_HU
    band = np.abs(xs) <= 6.0
    rows: list[dict | None] = []
    for k in range(hu.shape[0]):
        mid = air[k][:, band].any(axis=1)
        if not mid.any():
            rows.append(None)
            continue
        yp = int(np.nonzero(mid)[0].max())
        behind = np.nonzero(bone[k][yp + 1:, band].mean(axis=1) >= 0.3)[0]
        if len(behind) == 0:
            rows.append(None)
            continue
        wall = (behind[0] + 1) * spacing[1]
        labels, _ = ndimage.label(air[k])
        hit = labels[yp, band]
        comp = labels == hit[hit > 0][0]
        comp[: max(0, yp - int(round(20 / spacing[1])))] = False  # the posterior 20 mm
        cols = np.nonzero(comp[max(0, yp - int(round(10 / spacing[1]))): yp + 1].any(axis=0))[0]
        width = (cols.max() - cols.min() + 1) * spacing[2]
        # A lumen wider than 45 mm behind is not a pharynx (e.g. a gap where the field of
        # view was cut between two blocks of tissue).
        if 4.0 <= wall <= 40.0 and 8.0 <= width <= 45.0:
            rows.append({"k": k, "yp": yp, "wall": wall, "width": width, "lumen": comp})
        else:
            rows.append(None)
    return rows


def _runs(indices, gap: int = 1) -> list[list[int]]:
    """Split sorted indices into runs whose steps are at most ``gap``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i - runs[-1][-1] <= gap:
            runs[-1].append(int(i))
        else:
            runs.append([int(i)])
    return runs


def _airway_runs(rows: list[dict | None], sy: float) -> list[list[dict]]:
    """Pharyngeal slices grouped into runs: gaps of at most one slice, posterior wall
    moving less than 8 mm between neighbours."""
    runs: list[list[dict]] = []
    for r in rows:
        if r is None:
            continue
        last = runs[-1][-1] if runs else None
        if last and r["k"] - last["k"] <= 2 and abs(r["yp"] - last["yp"]) * sy < 8.0:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def _check_run(run: list[dict], hu: np.ndarray, air: np.ndarray, xs: np.ndarray, spacing) -> str | None:
    """Why ``run`` is not the nasopharynx, or None when every check passes."""
    sz, sy, _ = spacing
    nz = hu.shape[0]
    mm_z, mm_y = (lambda v: int(round(v / sz))), (lambda v: int(round(v / sy)))
    top, bottom = run[-1]["k"], run[0]["k"]
    yp = run[-1]["yp"]
    bone = hu > BONE_HU
    if (top - bottom + 1) * sz < 6.0:
        return f"airway only {(top - bottom + 1) * sz:.0f} mm high"
    below = bone[max(0, bottom - mm_z(10)): bottom, max(0, run[0]["yp"] - mm_y(12)): run[0]["yp"] + 1][:, :, np.abs(xs) <= 6]
    if below.size and below.mean() > 0.25:
        return "bone below it (a sinus)"
    lumen = np.zeros(hu.shape, bool)
    for r in run:
        lumen[r["k"]] = r["lumen"]
    ring = ndimage.binary_dilation(lumen, iterations=2) & ~lumen
    if (hu[ring] > GROW_HU[1]).mean() > 0.10:  # measured: <= 0.07 at the nasopharynx, 0.14 at a sphenoid sinus
        return "walled by bone (a sinus)"
    above = bone[top + 1: top + 1 + mm_z(25), max(0, yp - mm_y(15)): yp + mm_y(5) + 1][:, :, np.abs(xs) <= 12]
    if above.sum() < 3:
        return "no skull base within 25 mm above"
    cols = np.nonzero((hu[top] > AIR_HU).any(axis=0))[0]
    out = max(30.0, 0.5 * min(-xs[cols.min()], xs[cols.max()])) if len(cols) else 30.0
    base = bone[top: top + mm_z(35) + 1, max(0, yp - mm_y(30)): yp + mm_y(40) + 1]
    if base[:, :, xs >= out].sum() < 3 or base[:, :, xs <= -out].sum() < 3:
        return f"no skull base (petrous bone, condyles) {out:.0f} mm out on both sides within 35 mm above"
    k_up = top + mm_z(20)
    if top + mm_z(40) >= nz or (hu[k_up, max(0, yp - mm_y(40)): yp + mm_y(40)][:, np.abs(xs) <= 30] > AIR_HU).mean() < 0.5:
        return "the scan is cut less than 40 mm above (the skull base must be in it)"
    for k in (top, top + mm_z(40)):  # a head is 80-300 mm wide; shoulders or a cut field of view are not
        cols = np.nonzero((hu[k] > AIR_HU).any(axis=0))[0]
        width = xs[cols.max()] - xs[cols.min()] if len(cols) else 0.0
        if not 80.0 <= width <= 300.0:
            return f"tissue {width:.0f} mm wide at z {k * sz:.0f} mm of the grid (not a head)"
    # Beside the roof: the mandibular rami and condyles, the pterygoid plates (the neck
    # below the mandible has no bone that far out at the level of the pharynx).
    side_bone = bone[max(0, top - mm_z(4)): top + mm_z(4) + 1, max(0, yp - mm_y(40)): yp + mm_y(10) + 1]
    lateral = [side_bone[:, :, (sign * xs >= 35) & (sign * xs <= 65)].sum() * np.prod(spacing) for sign in (1, -1)]
    if min(lateral) < 150.0:
        return "no mandible beside it (bone 35-65 mm out on both sides: the neck, not the nasopharynx)"
    # Behind the roof lies the cranium: bone (occipital, petrous) spanning the back of the
    # head; at the level of the axis there is only a spinous process in the neck muscles.
    behind = bone[max(0, top - mm_z(4)): top + mm_z(4) + 1, yp + mm_y(25):].any(axis=(0, 1))
    if behind[np.abs(xs) <= 40].mean() < 0.6:
        return "no skull behind its top (the level of the neck, not the skull base)"
    # At the roof the choanae and the nasal cavity are in front (at the oropharynx: the tongue).
    choanae = hu[max(0, top - 1): top + 1, max(0, yp - mm_y(60)): max(0, yp - mm_y(20))][:, :, np.abs(xs) <= 20]
    front = hu[max(0, top - 1): top + 1, max(0, yp - mm_y(40)): max(0, yp - mm_y(10))][:, :, np.abs(xs) <= 15]
    air_front = (choanae <= AIR_HU).mean() if choanae.size else 0.0
    tongue = ((front > -100) & (front < 150)).mean() if front.size else 1.0
    if air_front < 0.05 or (air_front < 0.12 and tongue > 0.35):
        return f"soft tissue in front of its top ({100 * tongue:.0f} %; air {100 * air_front:.0f} %): the tongue, not the choanae"
    # The nasal cavity: air in front of the pharynx, continuing above the roof.
    front = (slice(max(0, yp - mm_y(80)), max(0, yp - mm_y(15))), np.abs(xs) <= 25)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    nasal = air[max(0, bottom - mm_z(5)): top + mm_z(20) + 1, front[0]][:, :, front[1]].sum() * voxel_ml
    upper = air[top + mm_z(4): top + mm_z(20) + 1, front[0]][:, :, front[1]].sum() * voxel_ml
    if nasal < 3.0 or upper < 0.2:
        return f"no nasal cavity in front ({nasal:.1f} ml) reaching above the roof ({upper:.1f} ml)"
    return None


def find_nasopharynx(head: Volume) -> Nasopharynx:
    """Locate the nasopharyngeal lumen and its lateral walls in an aligned CT.

    Args:
        head: CT in HU on a head-frame grid (identity direction, x = 0 on the mid-sagittal
            plane), e.g. :func:`sats.geometry.alignment.aligned_volume` at ``WORK_SPACING``.
    Raises:
        NoNasopharynx: with the reason, when any step or check fails.
    """
    hu = head.array.astype(np.float32)
    sz, sy, sx = head.spacing
    nz, ny, nx = hu.shape
    xs = head.origin[0] + np.arange(nx) * sx
    ys = head.origin[1] + np.arange(ny) * sy
    zs = head.origin[2] + np.arange(nz) * sz
    air = enclosed_air(hu, head.spacing)
    runs = _airway_runs(_pharyngeal_slices(hu, air, xs, head.spacing), sy)
    if not runs:
        raise NoNasopharynx("no pharyngeal airway (midline air with soft tissue and then bone behind it)")
    reasons = []
    found = None
    for full in sorted(runs, key=lambda r: -r[-1]["k"]):  # the highest airway that passes
        # An airway can run on above the roof (into the back of the nasal cavity): each of
        # its slices, from the top down, is tried as the roof.
        for end in range(len(full), 0, -1):
            if zs[full[-1]["k"]] - zs[full[end - 1]["k"]] > 20.0:
                break  # more would be the oropharynx of a scan cut above the nasopharynx
            why = _check_run(full[:end], hu, air, xs, head.spacing)
            if why is None:
                found = full[:end]
                break
            if end == len(full):
                reasons.append(f"airway at z {zs[full[0]['k']]:.0f}..{zs[full[-1]['k']]:.0f} mm: {why}")
        if found:
            break
    if found is None:
        raise NoNasopharynx("; ".join(reasons[:3]))
    run = found
    top, bottom = run[-1]["k"], run[0]["k"]
    # The fossae of Rosenmueller: the lateral recesses of the upper, posterior lumen.
    upper = [r for r in run if zs[r["k"]] >= zs[top] - 12.0]
    lumen = np.zeros(hu.shape, bool)
    for r in upper:
        lumen[r["k"]] = r["lumen"]
        lumen[r["k"], : max(0, r["yp"] - int(round(12 / sy)))] = False
    reach = np.abs(xs[np.nonzero(lumen.any(axis=(0, 1)))[0]]).max()
    if reach > 30.0:
        raise NoNasopharynx(f"the upper nasopharyngeal lumen reaches {reach:.0f} mm from the midline (a cut field of view?)")
    soft = (hu > GROW_HU[0]) & (hu < GROW_HU[1])
    wall = ndimage.binary_dilation(lumen, ndimage.generate_binary_structure(3, 1)) & soft
    wall[: upper[0]["k"]] = False
    wall[top + 1:] = False
    idx = np.argwhere(wall)
    if len(idx) == 0:
        raise NoNasopharynx("no soft tissue around the nasopharyngeal lumen")
    fossa = {}
    for name, side in (("left", 1), ("right", -1)):
        j = int(np.argmax(side * xs[idx[:, 2]]))
        k, y, x = idx[j]
        if side * xs[x] < 4.0:
            raise NoNasopharynx(f"no lateral wall on the {name} (lumen reaches only {side * xs[x]:.0f} mm from the midline)")
        fossa[name] = np.array([xs[x], ys[y], zs[k]])
    pts = np.argwhere(lumen)
    lumen_mm = np.column_stack([xs[pts[:, 2]], ys[pts[:, 1]], zs[pts[:, 0]]])
    mid = run[len(run) // 2]
    return Nasopharynx(
        roof_z=float(zs[top]), floor_z=float(zs[bottom]), posterior_wall_y=float(ys[mid["yp"]]),
        anterior_y=float(lumen_mm[:, 1].min()), lumen=lumen_mm, fossa=fossa,
    )


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
    from sats.geometry.alignment import MIN_SYMMETRY, aligned_volume, find_plane

    # The landmark search needs the plane to a degree or so: two levels and 20k points
    # are about five times faster than the default search.
    try:
        alignment = find_plane(ct, levels_mm=(6.0, 3.0), n_points=20000)
    except SatsError as exc:
        raise SkipBackground(f"alignment failed: {exc}") from None
    if alignment.score_after < MIN_SYMMETRY:
        raise SkipBackground(f"not a head: symmetry score {alignment.score_after:.2f} about the best mid-sagittal plane")
    head, transform = aligned_volume(ct, alignment.plane, WORK_SPACING)
    frame = HeadFrame(np.array(transform.GetMatrix()).reshape(3, 3), np.array(transform.GetTranslation()))
    return head, frame, alignment.plane


def _grow(ct: Volume, frame: HeadFrame, npx: Nasopharynx, draw: Draw, rng: np.random.Generator) -> tuple[np.ndarray, Volume, tuple]:
    """Arrival times on a fine head-frame box around the nasopharynx (see the module
    docstring, 2.). Returns (times, the box as a Volume, the main seed's index)."""
    from sats.geometry.preprocessing import resample_to

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
    from sats.geometry.preprocessing import resample_to

    hu = ct.array.astype(np.float32)
    soft = (hu > AIR_HU) & (hu < BONE_HU)
    step = grid.spacing[0]
    box = [max(1, int(round(sp / step))) | 1 for sp in ct.spacing]  # odd, about one CT voxel
    n_voxels = int(round(target_ml * 1000.0 / step**3))
    for _ in range(4):
        pv = ndimage.uniform_filter(earliest(times, n_voxels, seed).astype(np.float32), size=box)
        fraction = np.clip(resample_to(grid.with_array(pv), ct, order=1, default=0.0).array, 0.0, 1.0)
        label = _largest_component((fraction >= 0.5) & soft)
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
    npx = find_nasopharynx(head)
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


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)  # 6-connectivity: one piece under any definition
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


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
    Returns a summary: {"train": n, "test": n, "skipped": n}.
    """
    from sats.progress import progress_bar

    config = config or LesionConfig()
    out = Path(out)
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
    _write_lesion_metadata(out, background, seed, config, counts["Tr"], lesions, skipped)
    return {"train": counts["Tr"], "test": counts["Ts"], "skipped": len(skipped)}


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
