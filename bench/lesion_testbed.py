"""Check a `sats phantom --background` dataset case by case and print a summary table.

For every case: one connected label (6-connectivity) of 5-60 ml; inside the body; next
to air of the original CT (the airway); no original air or bone under it; the measured
contrast (mean HU of the label's core minus the median of muscle within 10 mm in the
original CT) against the requested one; the lesion's distance below the nasopharynx roof
that was found. Training and test sources must be disjoint.

    python bench/lesion_testbed.py TESTBED
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from sats.data.io import read_image
from sats.data.lesion import surrounding_muscle
from sats.geometry.grid import body_mask
from sats.geometry.landmarks import AIR_HU, BONE_HU


def main(root: Path) -> None:
    lesions = json.loads((root / "lesions.json").read_text())
    background = Path(json.loads((root / "dataset.json").read_text())["lesion_insertion"]["background"])
    rows = []
    for case, meta in sorted(lesions.items()):
        split = "Ts" if case.startswith("npc_test") else "Tr"
        ct = read_image(root / f"images{split}" / f"{case}_0000.nii.gz")
        label = read_image(root / f"labels{split}" / f"{case}.nii.gz").array.astype(bool)
        src = next(p for p in (background / "imagesTr" / meta["source"], background / "imagesTs" / meta["source"],
                               background / meta["source"]) if p.exists())
        hu = read_image(src).array.astype(np.float32)
        _, n = ndimage.label(label)
        core = ndimage.binary_erosion(label)
        contrast = float(ct.array[core].mean()) - float(np.median(surrounding_muscle(hu, label, ct.spacing)))
        centroid = ct.index_to_physical(np.argwhere(label).mean(axis=0))
        rows.append({
            "case": case, "ml": label.sum() * ct.voxel_volume_ml, "pieces": n,
            "in_body": bool((label & body_mask(hu)).sum() == label.sum()),
            "by_air": bool((ndimage.binary_dilation(label, np.ones((3, 3, 3), bool)) & (hu <= AIR_HU)).any()),
            "hu_min": float(hu[label].min()), "hu_max": float(hu[label].max()),
            "contrast_err": contrast - meta["contrast_hu"],
            "to_roof_mm": float(np.linalg.norm(centroid - np.asarray(meta["nasopharynx_roof"]))),
            "bilateral": meta["bilateral"], "split": split, "source": meta["source"],
        })
    ml = np.array([r["ml"] for r in rows])
    err = np.array([r["contrast_err"] for r in rows])
    roof = np.array([r["to_roof_mm"] for r in rows])
    tr = {r["source"] for r in rows if r["split"] == "Tr"}
    ts = {r["source"] for r in rows if r["split"] == "Ts"}
    print(f"| cases (train / test) | {len(tr)} / {len(ts)} |")
    print(f"| train and test sources disjoint | {tr.isdisjoint(ts)} |")
    print(f"| labels in one piece | {sum(r['pieces'] == 1 for r in rows)} / {len(rows)} |")
    print(f"| volume, ml (min / median / max) | {ml.min():.1f} / {np.median(ml):.1f} / {ml.max():.1f} |")
    print(f"| inside the body | {sum(r['in_body'] for r in rows)} / {len(rows)} |")
    print(f"| next to the airway (original air within one voxel) | {sum(r['by_air'] for r in rows)} / {len(rows)} |")
    print(f"| original HU under the labels (min / max) | {min(r['hu_min'] for r in rows):.0f} / {max(r['hu_max'] for r in rows):.0f} "
          f"(air <= {AIR_HU:.0f}, bone >= {BONE_HU:.0f}) |")
    print(f"| measured minus requested contrast, HU (mean / worst) | {err.mean():+.2f} / {err[np.argmax(np.abs(err))]:+.2f} |")
    print(f"| lesion centroid to the roof found, mm (median / max) | {np.median(roof):.1f} / {roof.max():.1f} |")
    print(f"| crossing the midline | {sum(r['bilateral'] for r in rows)} / {len(rows)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
