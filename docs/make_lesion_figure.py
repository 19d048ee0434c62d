"""Draw docs/lesion_insertion.png: three cases of a `sats phantom --background` dataset,
axial, coronal and sagittal slices through the inserted GTV, each next to the same slice
of the original CT (W400/L40; the GTV contour in red on the right-hand copy).

Run: .venv/bin/python docs/make_lesion_figure.py TESTBED [CASE CASE CASE]
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from sats.data.io import read_image

root = Path(sys.argv[1])
lesions = json.loads((root / "lesions.json").read_text())
background = Path(json.loads((root / "dataset.json").read_text())["lesion_insertion"]["background"])
cases = sys.argv[2:5] or sorted(lesions)[:3]
fig, axes = plt.subplots(len(cases), 6, figsize=(15, 2.9 * len(cases)))
for row, case in zip(np.atleast_2d(axes), cases):
    split = "Ts" if case.startswith("npc_test") else "Tr"
    ct = read_image(root / f"images{split}" / f"{case}_0000.nii.gz")
    label = read_image(root / f"labels{split}" / f"{case}.nii.gz").array
    source = lesions[case]["source"]
    original = read_image(next(p for p in (background / "imagesTr" / source, background / "imagesTs" / source, background / source) if p.exists()))
    sz, sy, sx = ct.spacing
    zc, yc, xc = (int(v) for v in np.round(np.argwhere(label).mean(axis=0)))
    half = [int(70 / s) for s in ct.spacing]  # a 140 mm field of view around the GTV
    zs, ys, xs = (slice(max(0, c - h), c + h) for c, h in zip((zc, yc, xc), half))
    # Axial: radiological (patient right on the image left); coronal and sagittal: head up.
    views = [("axial", lambda a: a[zc, ys, xs], sy / sx), ("coronal", lambda a: a[zs, yc, xs][::-1], sz / sx),
             ("sagittal", lambda a: a[zs, ys, xc][::-1], sz / sy)]
    for i, (name, cut, aspect) in enumerate(views):
        for j, (image, title) in enumerate(((original.array, "original"), (ct.array, "with GTV"))):
            ax = row[2 * i + j]
            ax.imshow(cut(image), cmap="gray", vmin=-160, vmax=240, aspect=aspect)
            if j:
                ax.contour(cut(label), [0.5], colors="red", linewidths=1.0)
            ax.set_title(f"{case}: {name}, {title}" if i == 0 and j == 0 else f"{name}, {title}", fontsize=9)
            ax.axis("off")
    m = lesions[case]
    row[0].text(0, -0.08, f"{source}: {m['volume_ml']:.0f} ml, {m['side']}, +{m['contrast_hu']:.0f} HU over muscle"
                + (", crosses the midline" if m["bilateral"] else ""), transform=row[0].transAxes, fontsize=9, va="top")
fig.subplots_adjust(left=0.005, right=0.995, top=0.95, bottom=0.05, wspace=0.03, hspace=0.3)
fig.savefig(Path(__file__).parent / "lesion_insertion.png", dpi=80)
print("wrote docs/lesion_insertion.png")
