"""Mid-sagittal plane accuracy and speed.

Phantoms (known pose): plane-normal angle error and midline offset at the nasopharynx.
Real head CTs (OpenKBP imagesTr): rotate each CT by a known yaw/roll about its plane and
check that the plane found after equals the rotated plane found before (no ground truth
exists for real scans; consistency is what can be measured).

    python bench/alignment_accuracy.py --phantoms 20 --openkbp ../shared/data/openkbp --real 20 [--method both]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sats.data.dataset import list_cases  # noqa: E402
from sats.data.io import read_image  # noqa: E402
from sats.data.phantom import PhantomConfig, make_case  # noqa: E402
from sats.geometry.alignment import find_plane, find_plane_registration  # noqa: E402
from sats.geometry.symmetry import Plane  # noqa: E402
from test_alignment import rotate_about  # noqa: E402

METHODS = {"symmetry-plane": find_plane, "registration": find_plane_registration}


def row(name, angles, offsets, times):
    a, o, t = np.array(angles), np.array(offsets), np.array(times)
    print(f"| {name} | {len(a)} | {np.median(a):.3f} | {a.max():.3f} | {np.median(o):.3f} | {o.max():.3f} | {np.median(t):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phantoms", type=int, default=20)
    ap.add_argument("--openkbp", type=Path, default=None)
    ap.add_argument("--real", type=int, default=20)
    ap.add_argument("--method", default="both", choices=["both", *METHODS])
    args = ap.parse_args()
    methods = list(METHODS) if args.method == "both" else [args.method]
    print("| set, method | n | median angle (deg) | worst angle | median offset (mm) | worst offset | median s |")
    print("|---|---|---|---|---|---|---|")
    for m in methods:
        find = METHODS[m]
        angles, offsets, times = [], [], []
        for i in range(args.phantoms):
            case = make_case(100, i, config=PhantomConfig(max_angle=10, max_shift=10))
            true = Plane(case.pose["normal"], case.pose["point"])
            t0 = time.time()
            found = find(case.ct).plane
            times.append(time.time() - t0)
            angles.append(true.angle_to(found))
            offsets.append(abs(found.signed_distance(true.point)))
        row(f"phantoms (yaw/roll <= 10 deg, shift <= 10 mm), {m}", angles, offsets, times)
        if args.openkbp:
            angles, offsets, times = [], [], []
            rng = np.random.default_rng(0)
            for c in list_cases(args.openkbp, "Tr")[: args.real]:
                ct = read_image(c.image)
                t0 = time.time()
                before = find(ct).plane
                times.append(time.time() - t0)
                yaw, roll = rng.uniform(-8, 8, size=2)
                rotated, r, centre = rotate_about(ct, before.point, yaw, roll)
                after = find(rotated).plane
                expected = Plane(r @ before.normal, r @ (before.point - centre) + centre)
                angles.append(expected.angle_to(after))
                offsets.append(abs(after.signed_distance(expected.point)))
            row(f"OpenKBP rotated by known yaw/roll <= 8 deg, {m}", angles, offsets, times)


if __name__ == "__main__":
    main()
