"""Synthetic head-and-neck planning CT with a nasopharyngeal GTV: the embedded dataset.

Each case is an analytic head, bilaterally symmetric about its mid-sagittal plane, built
in a canonical head frame (LPS mm: x patient right -> left, y anterior -> posterior,
z inferior -> superior; origin at the nasopharynx, plane x = 0) and sampled on a CT grid
through a random rigid pose (yaw about z, roll about y, shift). The couch stays fixed to
the grid, as in a scanner. A GTV grows from one fossa of Rosenmüller (lateral wall of the
nasopharynx) into its neighbours with little contrast against muscle; some tumours cross
the midline, so part of them is symmetric (the paper's Fig. 2b region A).

Structures and non-contrast HU (before blur and noise; ``s`` = head scale, 1 by default):

==============================  =========================  =====================================
structure                       HU                          where (canonical frame, mm x s)
==============================  =========================  =====================================
air (outside, airway, sinuses)  -1000                       nasopharynx lumen at (0, +4, +3)
couch (grid-fixed)              -700 core, +250 shells      posterior slab under the head
skin / subcutaneous fat         -100                        outer 4 mm of the body
soft tissue (background)        +35                         inside the body
brain                           +32                         above the skull base
skull vault, cortical bone      +1000                       6 mm shell above z = +18, and
                                                            behind y = +30 down to z = -6
                                                            (occipital bone, posterior fossa)
skull base, clivus              +650                        plate z = +14..+22, clivus posterior
mastoid / petrous bone          +900                        x = +-44, y = +28
maxilla, hard palate            +700                        plate z = -12..-7, anterior
mandible (cortex / marrow)      +1100 / +350                rami x = +-44 up to the condyles
                                                            (z = +18), body anterior
cervical spine (C1-C2)          +800 cortex, +300 marrow    y = +36, z < -6; cord +35
nasal septum                    +300                        x = 0, nasal cavity
turbinates, mucosa              +45                         nasal cavity, 2.5 mm airway lining
longus capitis / colli          +50                         x = +-8, y = +18
pharyngeal constrictor          +52                         3 mm ring around the airway
medial / lateral pterygoid      +55 / +52                   x = +-24 / +-32
masseter                        +52                         lateral to the mandible rami
tongue                          +60                         below the palate
parapharyngeal fat              -100                        x = +-19, y = +4
parotid gland                   -10                         x = +-46, y = +14
internal carotid / jugular      +40 (unenhanced blood)      x = +-21 / +-28, y = +20 / +26
eyes (vitreous / lens)          +10 / +80, orbital fat -80  z = +35, anterior
GTV                             muscle + ``tumor_contrast``  from the fossa of Rosenmüller
==============================  =========================  =====================================

Then a 0.7 mm Gaussian blur (scanner resolution, partial volume), Gaussian noise of
``noise`` HU, lightly correlated, and int16 storage clipped to [-1024, 3071].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from sats.data.io import write_image, write_text_atomic
from sats.geometry.volume import SatsError, Volume

MUSCLE_HU = 50.0


@dataclass
class PhantomConfig:
    """Options of the phantom generator (see the module docstring for the anatomy)."""

    tumor_contrast: float = 12.0  # GTV HU minus muscle HU
    bilateral_fraction: float = 0.25  # share of tumours crossing the midline
    max_angle: float = 10.0  # largest |yaw| and |roll|, degrees
    max_shift: float = 10.0  # largest shift per axis, mm
    noise: float = 20.0  # noise standard deviation, HU
    size: str = "default"  # "default" (CPU-sized) or "paper"
    tumor_free: bool = False


@dataclass
class PhantomCase:
    """One generated case: CT (int16 HU), label (uint8 GTV) and the true pose/plane."""

    case_id: str
    ct: Volume
    label: Volume
    pose: dict = field(default_factory=dict)


def _rotation(yaw_deg: float, roll_deg: float) -> np.ndarray:
    """Yaw about the cranio-caudal z axis, then roll about the antero-posterior y axis."""
    a, b = np.radians(yaw_deg), np.radians(roll_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return ry @ rz


class _Painter:
    """Paints structures into an HU array from canonical coordinates (x, y, z) mm."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, scale: float) -> None:
        self.x, self.y, self.z, self.s = x, y, z, scale
        self.hu = np.full(x.shape, -1000.0, dtype=np.float32)

    def ellipsoid(self, c, r, mirror: bool = False) -> np.ndarray:
        s = self.s
        out = None
        for sign in ((1, -1) if mirror else (1,)):
            q = (((self.x - sign * c[0] * s) / (r[0] * s)) ** 2 + ((self.y - c[1] * s) / (r[1] * s)) ** 2
                 + ((self.z - c[2] * s) / (r[2] * s)) ** 2)
            m = q < 1
            out = m if out is None else out | m
        return out

    def tube(self, c, r, z_range, mirror: bool = False) -> np.ndarray:
        """Vertical elliptic cylinder centred at (c[0], c[1]), between z_range (mm x s)."""
        s = self.s
        zin = (self.z > z_range[0] * s) & (self.z < z_range[1] * s)
        out = None
        for sign in ((1, -1) if mirror else (1,)):
            m = (((self.x - sign * c[0] * s) / (r[0] * s)) ** 2 + ((self.y - c[1] * s) / (r[1] * s)) ** 2) < 1
            out = m if out is None else out | m
        return out & zin

    def paint(self, mask: np.ndarray, hu: float) -> None:
        self.hu[mask] = hu


def _anatomy(p: _Painter, tumour: np.ndarray | None, airway_shift: float, contrast: float) -> np.ndarray | None:
    """Paint the head in order: later structures overwrite earlier ones. Returns the GTV
    as painted (the tumour less the dense bone it leaves standing and anything outside
    the body)."""
    x, y, z, s = p.x, p.y, p.z, p.s
    # Body: head ellipsoid above the neck, neck cylinder below.
    head = p.ellipsoid((0, 2, 8), (60, 66, 95))
    neck = p.tube((0, 10), (50, 52), (-200, -20))
    body = head | neck
    p.paint(body, -100.0)  # subcutaneous fat
    inner = p.ellipsoid((0, 2, 8), (56, 62, 91)) | p.tube((0, 10), (46, 48), (-200, -20))
    p.paint(inner, 35.0)
    # Brain and skull vault above the skull base.
    vault = p.ellipsoid((0, 6, 26), (52, 58, 70)) & (z > 18 * s)
    p.paint(vault, 1000.0)
    p.paint(p.ellipsoid((0, 6, 26), (46, 52, 64)) & (z > 22 * s), 32.0)
    # Occipital bone around the posterior fossa (cerebellum), down to the foramen magnum.
    p.paint(p.ellipsoid((0, 6, 26), (52, 58, 70)) & (y > 30 * s) & (z > -6 * s) & (z <= 22 * s), 1000.0)
    p.paint(p.ellipsoid((0, 6, 26), (46, 52, 64)) & (y > 30 * s) & (z > -2 * s) & (z <= 22 * s), 32.0)
    # Skull base plate and clivus.
    p.paint(p.ellipsoid((0, 10, 18), (44, 40, 5)), 650.0)
    clivus = p.ellipsoid((0, 22, 6), (9, 6, 16))
    p.paint(clivus, 650.0)
    p.paint(p.ellipsoid((44, 28, 10), (9, 12, 9), mirror=True), 900.0)  # mastoid / petrous
    # Orbits and eyes.
    p.paint(p.ellipsoid((31, -46, 34), (15, 14, 13), mirror=True), -80.0)
    p.paint(p.ellipsoid((31, -48, 34), (11, 11, 11), mirror=True), 10.0)
    p.paint(p.ellipsoid((31, -58, 34), (4, 2, 4), mirror=True), 80.0)
    # Maxilla / hard palate, maxillary sinuses, nasal cavity with septum and turbinates.
    p.paint(p.ellipsoid((0, -32, -10), (30, 28, 3.5)), 700.0)
    p.paint(p.ellipsoid((27, -36, 8), (14, 13, 14), mirror=True), 700.0)
    p.paint(p.ellipsoid((27, -36, 8), (11, 10, 11), mirror=True), -1000.0)
    nasal = p.ellipsoid((0, -36, 6), (13, 26, 13))
    p.paint(nasal, -1000.0)
    p.paint(p.ellipsoid((10, -34, 2), (4, 18, 3), mirror=True) | p.ellipsoid((11, -34, 10), (3, 16, 2.5), mirror=True), 45.0)
    p.paint(nasal & (np.abs(x) < 1.2 * s), 300.0)  # septum
    # Tongue below the palate; mandible rami and body; masseters.
    p.paint(p.ellipsoid((0, -24, -26), (24, 26, 13)), 60.0)
    ramus = p.tube((43, 2), (5, 11), (-55, -2), mirror=True) | p.ellipsoid((44, 4, 8), (5, 6, 10), mirror=True)  # + condyle
    mand_body = p.ellipsoid((0, -26, -48), (40, 34, 7)) & ~p.ellipsoid((0, -22, -48), (33, 28, 8))
    p.paint(p.tube((50, 2), (6, 14), (-50, -5), mirror=True), 52.0)  # masseter
    p.paint(ramus | mand_body, 1100.0)
    p.paint(p.tube((43, 2), (3, 8), (-52, -5), mirror=True) | (p.ellipsoid((0, -26, -48), (38, 32, 4)) & ~p.ellipsoid((0, -22, -48), (35, 30, 8))), 350.0)
    # Parotids, pterygoids, parapharyngeal fat, vessels.
    p.paint(p.ellipsoid((46, 14, -12), (8, 13, 18), mirror=True), -10.0)
    p.paint(p.ellipsoid((24, -4, -8), (6, 10, 16), mirror=True), 55.0)  # medial pterygoid
    p.paint(p.ellipsoid((32, -6, 8), (7, 10, 6), mirror=True), 52.0)  # lateral pterygoid
    p.paint(p.ellipsoid((19, 4, -2), (5, 8, 16), mirror=True), -100.0)  # parapharyngeal fat
    p.paint(p.tube((21, 20), (2.8, 2.8), (-200, 14), mirror=True), 40.0)  # internal carotid
    p.paint(p.tube((28, 26), (4.5, 4.5), (-200, 10), mirror=True), 40.0)  # internal jugular
    # Cervical spine and cord; longus muscles in front of it.
    spine = p.tube((0, 38), (13, 11), (-200, -8))
    p.paint(spine, 800.0)
    p.paint(p.tube((0, 38), (11, 9), (-200, -8)), 300.0)
    p.paint(p.tube((0, 53), (7, 6), (-200, -8)), 35.0)  # cord in its canal
    p.paint(p.ellipsoid((0, 53, -2), (10, 12, 6)) & ~spine, 35.0)  # foramen magnum region
    p.paint(p.ellipsoid((8, 20, -14), (5, 4, 26), mirror=True), 50.0)  # longus capitis / colli
    # Pharynx: constrictor ring, mucosa, then the airway (nasopharynx + oropharynx + choanae).
    ax = airway_shift * s
    lumen = ((((x - ax) / (14 * s)) ** 2 + ((y - 4 * s) / (7 * s)) ** 2 + ((z - 3 * s) / (10 * s)) ** 2) < 1)
    lumen |= ((((x - ax) / (10 * s)) ** 2 + ((y - 8 * s) / (5.5 * s)) ** 2) < 1) & (z < -2 * s) & (z > -200 * s)
    lumen |= p.ellipsoid((0, -12, 5), (11, 9, 7))  # choanae into the nasal cavity
    fossa = ((((np.abs(x - ax) - 14 * s) / (3.5 * s)) ** 2 + ((y - 9 * s) / (3.5 * s)) ** 2 + ((z - 6 * s) / (5 * s)) ** 2) < 1)
    lumen |= fossa
    grown = ndimage.binary_dilation(lumen, iterations=2) if lumen.any() else lumen
    p.paint(ndimage.binary_dilation(grown, iterations=1) & ~lumen, 52.0)  # constrictor
    p.paint(grown & ~lumen, 45.0)  # mucosa
    p.paint(lumen, -1000.0)
    p.paint(p.ellipsoid((17, 4, 3), (3, 3, 4), mirror=True), 80.0)  # torus tubarius (cartilage)
    if tumour is not None:
        # Low contrast against muscle; the tumour fills airway, fat and muscle it invades,
        # and erodes bone less often (it keeps dense cortical bone).
        tumour = tumour & ~(p.hu > 600) & body
        p.paint(tumour, MUSCLE_HU + contrast)
    # The body outline bounds everything.
    p.paint(~body, -1000.0)
    return tumour


def _tumour(p: _Painter, rng: np.random.Generator, side: int, bilateral: bool) -> tuple[np.ndarray, float]:
    """Irregular GTV from the fossa of Rosenmüller on ``side`` (+1 = patient left)."""
    s = p.s
    centre = np.array([side * 13.0, 9.0, 5.0])
    blobs = [(centre, np.array([11.0, 10.0, 14.0]))]
    n = rng.integers(4, 8)
    for _ in range(n):
        # Random walk outward: laterally into the parapharyngeal space and pterygoids,
        # posteriorly into the longus, up towards the skull base.
        step = np.array([side * rng.uniform(3, 11), rng.uniform(-6, 9), rng.uniform(-10, 7)])
        c = blobs[rng.integers(len(blobs))][0] + step
        blobs.append((c, rng.uniform([7, 6, 9], [15, 12, 18])))
    if bilateral:
        roof = np.array([0.0, 11.0, 9.0])
        blobs.append((roof, np.array([rng.uniform(16, 22), 8.0, 9.0])))
        blobs.append((np.array([-side * 12.0, 10.0, 5.0]), rng.uniform([5, 5, 6], [9, 8, 10])))
    field = np.full(p.x.shape, np.inf, dtype=np.float32)
    for c, r in blobs:
        q = np.sqrt(((p.x - c[0] * s) / (r[0] * s)) ** 2 + ((p.y - c[1] * s) / (r[1] * s)) ** 2 + ((p.z - c[2] * s) / (r[2] * s)) ** 2)
        field = np.minimum(field, q)
    # A smooth random perturbation makes the border irregular.
    bumps = ndimage.gaussian_filter(rng.normal(size=p.x.shape).astype(np.float32), sigma=3.0)
    bumps /= max(float(bumps.std()), 1e-6)
    mask = field + 0.12 * bumps < 1.0
    # Displace the airway away from the tumour's side in proportion to its lateral extent.
    shift = -side * 0.25 * min(float(np.abs(p.x[mask]).max()) if mask.any() else 0.0, 30.0 * s) / s if not bilateral else 0.0
    return mask, shift


def grid_for(config: PhantomConfig, rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float], float]:
    """Grid size (z, y, x), spacing (z, y, x) mm and head scale for a case."""
    dz = float(rng.uniform(2.5, 3.0))
    dxy = float(rng.uniform(0.8, 1.0))
    if config.size == "default":
        return (56, 144, 144), (dz, dxy, dxy), 0.95 * dxy  # head scaled to the field of view
    if config.size == "paper":
        return (150, 512, 512), (dz, dxy, dxy), 1.3
    raise SatsError(f"unknown phantom size {config.size!r} (default or paper)")


def make_case(seed: int, index: int, split: str = "Tr", config: PhantomConfig | None = None, case_id: str | None = None) -> PhantomCase:
    """Generate one case, determined by (seed, split, index) alone."""
    config = config or PhantomConfig()
    rng = np.random.default_rng([seed, 0 if split == "Tr" else 1, index])
    shape, spacing, scale = grid_for(config, rng)
    yaw, roll = rng.uniform(-config.max_angle, config.max_angle, size=2)
    shift = rng.uniform(-config.max_shift, config.max_shift, size=3)
    rot = _rotation(yaw, roll)
    grid_centre = np.array([1.5, -12.0, -95.0])  # arbitrary scanner coordinates
    translation = grid_centre + shift  # where the nasopharynx lands
    origin = grid_centre - (np.array(shape[::-1]) - 1) / 2 * np.array(spacing[::-1])

    # Canonical coordinates of every voxel centre: q = R^T (p - t), p = origin + index * spacing.
    zz, yy, xx = [np.arange(n, dtype=np.float32) * sp for n, sp in zip(shape, spacing)]
    px = origin[0] + xx[None, None, :] - translation[0]
    py = origin[1] + yy[None, :, None] - translation[1]
    pz = origin[2] + zz[:, None, None] - translation[2]
    cx = (rot[0, 0] * px + rot[1, 0] * py + rot[2, 0] * pz).astype(np.float32)
    cy = (rot[0, 1] * px + rot[1, 1] * py + rot[2, 1] * pz).astype(np.float32)
    cz = (rot[0, 2] * px + rot[1, 2] * py + rot[2, 2] * pz).astype(np.float32)
    painter = _Painter(cx, cy, cz, scale)

    side = int(rng.choice([-1, 1]))
    bilateral = bool(rng.random() < config.bilateral_fraction)
    tumour, airway_shift = (None, 0.0) if config.tumor_free else _tumour(painter, rng, side, bilateral)
    tumour = _anatomy(painter, tumour, airway_shift, config.tumor_contrast)
    hu = painter.hu
    # Gentle tissue texture, symmetric like the anatomy (a function of |x|), so regions
    # are not piecewise constant yet a tumour-free head still mirrors onto itself.
    texture = np.zeros(shape, np.float32)
    ax_ = np.abs(cx)
    for _ in range(4):
        k = rng.normal(size=3)
        k *= 2 * np.pi / (rng.uniform(15.0, 40.0) * np.linalg.norm(k))
        texture += np.cos(k[0] * ax_ + k[1] * cy + k[2] * cz + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    hu = np.where((hu > -200) & (hu < 200), hu + 2.0 * texture, hu)

    # Couch: fixed to the grid (not posed), under the posterior head surface.
    y_idx = np.arange(shape[1]) * spacing[1] + origin[1]
    top = grid_centre[1] + 66.0 * scale + 4.0
    core = (y_idx > top + 1.5) & (y_idx < top + 8.5)
    shell = ((y_idx >= top) & (y_idx <= top + 1.5)) | ((y_idx >= top + 8.5) & (y_idx <= top + 10.0))
    hu[:, core, :] = -700.0
    hu[:, shell, :] = 250.0

    sigma = [0.7 / sp for sp in spacing]
    hu = ndimage.gaussian_filter(hu, sigma=sigma)
    if config.noise > 0:
        n = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma=0.6)
        hu = hu + n * (config.noise / max(float(n.std()), 1e-6))
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    label = np.zeros(shape, np.uint8) if tumour is None else tumour.astype(np.uint8)

    geometry = dict(spacing=spacing, origin=tuple(origin), direction=np.eye(3))
    normal = rot @ np.array([1.0, 0.0, 0.0])
    pose = {
        "normal": [float(v) for v in normal], "point": [float(v) for v in translation],
        "yaw_deg": float(yaw), "roll_deg": float(roll), "shift_mm": [float(v) for v in shift],
        "side": "left" if side > 0 else "right", "bilateral": bilateral and not config.tumor_free,
        "gtv_ml": float(label.sum() * np.prod(spacing) / 1000.0),
    }
    cid = case_id or (f"phantom_{index:03d}" if split == "Tr" else f"phantom_test_{index:03d}")
    return PhantomCase(cid, Volume(ct, **geometry), Volume(label, **geometry), pose)


def write_phantom_dataset(out: Path, n_train: int, n_test: int, seed: int, config: PhantomConfig | None = None, console=None) -> Path:
    """Write ``n_train`` + ``n_test`` cases in nnU-Net v2 raw layout, with ``poses.json``."""
    from sats.progress import progress_bar

    config = config or PhantomConfig()
    out = Path(out)
    jobs = [("Tr", i) for i in range(n_train)] + [("Ts", i) for i in range(n_test)]
    poses: dict[str, dict] = {}
    progress = progress_bar(console)
    with progress:
        task = progress.add_task("phantom cases", total=len(jobs))
        for split, i in jobs:
            case = make_case(seed, i, split, config)
            write_image(case.ct, out / f"images{split}" / f"{case.case_id}_0000.nii.gz")
            write_image(case.label, out / f"labels{split}" / f"{case.case_id}.nii.gz")
            poses[case.case_id] = case.pose
            progress.advance(task)
    meta = {
        "name": "SATs head-and-neck phantom",
        "description": f"Synthetic non-contrast planning CT with nasopharyngeal GTV (sats phantom, seed {seed}).",
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "GTV": 1},
        "numTraining": n_train, "file_ending": ".nii.gz",
        "phantom": {"seed": seed, **config.__dict__},
    }
    write_text_atomic(out / "dataset.json", json.dumps(meta, indent=2))
    write_text_atomic(out / "poses.json", json.dumps(poses, indent=2))
    return out
