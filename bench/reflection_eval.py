"""How much asymmetry the reflective registration leaves on anatomy without a tumour, and what it costs.

For each CT: aligned on its mid-sagittal plane (sats.geometry.preprocessing.Preprocessor) at
the run grid's spacing, then the mirror registered to it (sats.geometry.reflection). Prints the
mean absolute HU difference to the plain mirror |I - M(I)| and to the registered mirror
|I - W(M(I))| over the head (body deeper than 5 mm, HU clipped to the registration window)
and over the nasopharynx box (sats.geometry.landmarks), and the registration's seconds.

    python bench/reflection_eval.py --cts ../shared/data/openkbp/imagesTr/*.nii.gz --limit 8 --phantoms 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from sats.data.io import read_image
from sats.data.phantom import PhantomConfig, make_case
from sats.geometry.grid import body_mask, box_to_roi
from sats.geometry.landmarks import landmark_box
from sats.geometry.preprocessing import Preprocessor
from sats.geometry.reflection import HU_WINDOW, registered_mirror
from sats.geometry.symmetry import mirror_lr


def measure(name: str, ct, spacing) -> dict:
    pre = Preprocessor(spacing)(ct)  # HU
    t0 = time.perf_counter()
    warped = registered_mirror(pre.grid)
    seconds = time.perf_counter() - t0
    hu = np.clip(pre.image, *HU_WINDOW)
    plain, reg = np.abs(hu - mirror_lr(hu)), np.abs(hu - np.clip(warped, *HU_WINDOW))
    head = ndimage.distance_transform_edt(body_mask(pre.image), sampling=pre.grid.spacing) > 5.0
    head &= mirror_lr(head)
    lo, hi, source = landmark_box(pre.grid, pre.grid, pre.plane)
    box = np.zeros(head.shape, bool)
    box[box_to_roi(lo, hi, pre.grid, (1, 1, 2), source).slices] = True
    row = {"case": name, "s": seconds, "head_plain": plain[head].mean(), "head_reg": reg[head].mean(),
           "box_plain": plain[head & box].mean(), "box_reg": reg[head & box].mean(), "box": source}
    print(f"{name:<24} {seconds:6.1f} {row['head_plain']:8.1f} {row['head_reg']:8.1f} {row['box_plain']:8.1f} {row['box_reg']:8.1f}  {source}",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cts", type=Path, nargs="*", default=[])
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--phantoms", type=int, default=4, help="tumour-free analytic phantoms as well")
    ap.add_argument("--spacing", type=float, nargs=3, default=(3.0, 4.6875, 4.6875), help="Z Y X mm (study A's grid)")
    args = ap.parse_args()
    print(f"{'case':<24} {'reg s':>6} {'|I-M|':>8} {'|I-W|':>8} {'box I-M':>8} {'box I-W':>8}  (HU, mean over the head / the nasopharynx box)")
    rows = [measure(p.name.split('_0000')[0], read_image(p), tuple(args.spacing)) for p in sorted(args.cts)[: args.limit]]
    rows += [measure(f"phantom-{i}", make_case(7, i, config=PhantomConfig(tumor_free=True)).ct, tuple(args.spacing))
             for i in range(args.phantoms)]
    for kind, sel in (("real", [r for r in rows if not r["case"].startswith("phantom")]), ("phantom", [r for r in rows if r["case"].startswith("phantom")])):
        if sel:
            m = {k: np.median([r[k] for r in sel]) for k in ("s", "head_plain", "head_reg", "box_plain", "box_reg")}
            print(f"median {kind} ({len(sel)}): registration {m['s']:.1f} s; head |I-M| {m['head_plain']:.1f} -> |I-W| {m['head_reg']:.1f} HU; "
                  f"box {m['box_plain']:.1f} -> {m['box_reg']:.1f} HU")


if __name__ == "__main__":
    main()
