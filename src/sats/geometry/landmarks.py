"""Anatomical landmarks: where the nasopharynx is in an aligned head CT.

Used where a region must be found without a label: the lesion test bed grows its GTVs from
the fossae of Rosenmüller found here (:mod:`sats.data.lesion`), prediction falls back to a
box around the lumen when the RUN's localiser finds nothing (:mod:`sats.predict.roi`),
and the label-free asymmetry map is scored in that box (:mod:`sats.geometry.asymmetry`).

Coordinates are in the **head frame** of the aligned CT (mm; x = patient right -> left with
the mid-sagittal plane at x = 0, y = anterior -> posterior, z = inferior -> superior).
:func:`find_nasopharynx` works on a 2 mm grid (:data:`WORK_SPACING`):

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from sats.geometry.grid import body_mask, resample_to
from sats.geometry.symmetry import Plane
from sats.geometry.volume import SatsError, Volume

#: Working grid of the landmark search (z, y, x) mm.
WORK_SPACING = (2.0, 2.0, 2.0)
#: Below: air. Above: bone. Between: soft tissue (fat, muscle, mucosa, glands).
AIR_HU = -400.0
BONE_HU = 300.0
#: HU range the lesion may grow through (stricter than the label's air/bone limits, so
#: the partial-volume rim stays off air and bone).
GROW_HU = (-200.0, 200.0)

#: Margin around the nasopharyngeal lumen for :func:`landmark_box`, (z, y, x) mm: an NPC GTV
#: grows from the lumen's walls into the parapharyngeal space, the skull base and down
#: the posterior wall; 60 ml is about 50 mm across.
NPC_MARGIN_MM = (45.0, 45.0, 50.0)
#: The last fallback, (z, y, x) mm: the top ``z`` of the body (the nasopharynx lies 60-120
#: mm below the vertex, nearer the top in scans cut through the head), ``y`` about the
#: head's centre, ``x`` about the midline.
BODY_TOP_MM = (150.0, 160.0, 140.0)


class NoNasopharynx(SatsError):
    """The landmark search did not find a nasopharynx it trusts (the message says why)."""


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


def _disk(radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    r = [int(np.ceil(radius_mm / s)) for s in spacing]
    g = np.mgrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1].astype(float)
    return (g[0] * spacing[0]) ** 2 + (g[1] * spacing[1]) ** 2 <= radius_mm**2


def enclosed_air(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Air inside the patient's outline in each axial slice (after a 3 mm closing); the
    patient is the largest connected body of tissue, so a couch or mask is left out."""
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


def _find_roof(hu: np.ndarray, air: np.ndarray, xs: np.ndarray, zs: np.ndarray, spacing) -> list[dict]:
    """The pharyngeal slices from the floor to the roof of the nasopharynx (see the module
    docstring); NoNasopharynx with the reasons of the three highest airways otherwise."""
    runs = _airway_runs(_pharyngeal_slices(hu, air, xs, spacing), spacing[1])
    if not runs:
        raise NoNasopharynx("no pharyngeal airway (midline air with soft tissue and then bone behind it)")
    reasons = []
    for full in sorted(runs, key=lambda r: -r[-1]["k"]):  # the highest airway that passes
        # An airway can run on above the roof (into the back of the nasal cavity): each of
        # its slices, from the top down, is tried as the roof.
        for end in range(len(full), 0, -1):
            if zs[full[-1]["k"]] - zs[full[end - 1]["k"]] > 20.0:
                break  # more would be the oropharynx of a scan cut above the nasopharynx
            why = _check_run(full[:end], hu, air, xs, spacing)
            if why is None:
                return full[:end]
            if end == len(full):
                reasons.append(f"airway at z {zs[full[0]['k']]:.0f}..{zs[full[-1]['k']]:.0f} mm: {why}")
    raise NoNasopharynx("; ".join(reasons[:3]))


def nasopharynx_in_view(head: Volume) -> str | None:
    """None when the aligned CT shows a nasopharynx, else why not (one line).

    Looser than :func:`find_nasopharynx`, which also needs the lumen's lateral walls to grow
    a lesion from: here the roof of the airway must pass the checks of the module docstring
    (a head, the skull base above, the choanae in front) in the CT or in its left-right
    symmetrised copy (the lower HU of each voxel and its mirror partner across x = 0, so a
    tumour filling one side of the lumen leaves the other side's air). A thorax, or a head
    cut above the skull base, has no such airway.

    Args:
        head: CT in HU on a head-frame grid symmetric about x = 0 (:func:`head_frame`).
    """
    hu = head.array.astype(np.float32)
    xs = head.origin[0] + np.arange(hu.shape[2]) * head.spacing[2]
    zs = head.origin[2] + np.arange(hu.shape[0]) * head.spacing[0]
    first = None
    for view in (hu, np.minimum(hu, hu[..., ::-1])):  # x is left-right: [..., ::-1] mirrors it
        try:
            _find_roof(view, enclosed_air(view, head.spacing), xs, zs, head.spacing)
            return None
        except NoNasopharynx as exc:
            first = first or str(exc)
    return first


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
    run = _find_roof(hu, air, xs, zs, head.spacing)
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


# --- the box prediction and the asymmetry map look in ----------------------------------------


def head_frame(ct: Volume, grid: Volume, plane: Plane) -> Volume:
    """The CT (HU) in its head frame at :data:`WORK_SPACING` over the symmetric grid's extent:
    identity direction, x = 0 on the mid-sagittal plane and on the central sagittal plane of
    the grid (so ``[..., ::-1]`` is the left-right mirror), what :func:`find_nasopharynx` reads.

    Args:
        ct: the CT in HU (any grid covering the symmetric grid; the grid itself will do).
        grid: the symmetric grid (:func:`sats.geometry.grid.symmetric_grid`) about ``plane``.
    """
    extent = (np.array(grid.shape) - 1) * np.array(grid.spacing)  # (z, y, x) mm
    n = (extent / np.array(WORK_SPACING)).astype(int) + 1
    n[2] += n[2] % 2
    start = np.array([0.0, 0.0, (extent[2] - (n[2] - 1) * WORK_SPACING[2]) / 2])  # centred in x: symmetric
    origin = grid.index_to_physical(start / np.array(grid.spacing))
    frame = Volume(np.zeros(tuple(n), np.uint8), WORK_SPACING, tuple(origin), grid.direction)
    head_origin_q = grid.direction.T @ (np.asarray(origin) - plane.point)
    return Volume(resample_to(ct, frame, order=1, default=-1024.0).array, WORK_SPACING, tuple(head_origin_q), np.eye(3))


def landmark_box(ct: Volume, grid: Volume, plane: Plane) -> tuple[np.ndarray, np.ndarray, str]:
    """Where to look on a symmetric grid: ``(lo, hi, source)`` in grid mm from voxel [0, 0, 0],
    (z, y, x). ``source`` "landmarks": the nasopharyngeal lumen widened by :data:`NPC_MARGIN_MM`;
    "body-top": when no nasopharynx is found, a :data:`BODY_TOP_MM` box on the midline at
    the top of the body.

    Args:
        ct: the CT in HU (any grid covering the symmetric grid; the grid itself will do).
        grid: the symmetric grid (:func:`sats.geometry.grid.symmetric_grid`) about ``plane``.
        plane: the mid-sagittal plane.
    """
    head = head_frame(ct, grid, plane)
    # Head-frame mm (x, y, z) -> grid mm (z, y, x) from the symmetric grid's voxel [0, 0, 0].
    grid_origin_q = grid.direction.T @ (np.asarray(grid.origin) - plane.point)

    def to_grid(q: np.ndarray) -> np.ndarray:
        return (np.asarray(q, float) - grid_origin_q)[::-1]

    try:
        npx = find_nasopharynx(head)
        lo, hi = to_grid(npx.lumen.min(axis=0)), to_grid(npx.lumen.max(axis=0))
        return lo - np.array(NPC_MARGIN_MM), hi + np.array(NPC_MARGIN_MM), "landmarks"
    except NoNasopharynx:
        pass
    body = head.array > -500
    if not body.any():
        raise SatsError("no body found (no voxels above -500 HU): is this a CT in HU?")
    sz, sy, sx = head.spacing
    top = int(np.nonzero(body.any(axis=(1, 2)))[0].max())
    z0 = max(0, top - int(BODY_TOP_MM[0] / sz))
    ys = np.nonzero(body[z0: top + 1].any(axis=(0, 2)))[0]
    centre_q = np.array([0.0, head.origin[1] + (ys.min() + ys.max()) / 2 * sy, head.origin[2] + top * sz - BODY_TOP_MM[0] / 2])
    half = np.array(BODY_TOP_MM[::-1]) / 2
    return to_grid(centre_q - half), to_grid(centre_q + half), "body-top"
