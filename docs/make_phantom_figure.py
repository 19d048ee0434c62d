"""Draw docs/phantom.png: axial, coronal and sagittal slices of one phantom case through
the GTV centre (W400/L40; GTV contour in red). Run: .venv/bin/python docs/make_phantom_figure.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from sats.data.phantom import make_case

case = make_case(seed=0, index=7)
ct, lab = case.ct.array, case.label.array
sz, sy, sx = case.ct.spacing
zc, yc, xc = (int(v) for v in np.argwhere(lab).mean(axis=0))
# Axial: radiological view (patient right on the image left: array x runs right -> left).
# Coronal and sagittal: head up (array z runs inferior -> superior, so flip it).
views = [
    ("axial", ct[zc], lab[zc], sy / sx),
    ("coronal", ct[:, yc][::-1], lab[:, yc][::-1], sz / sx),
    ("sagittal (face left)", ct[:, :, xc][::-1], lab[:, :, xc][::-1], sz / sy),
]
fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
for ax, (title, img, seg, aspect) in zip(axes, views):
    ax.imshow(img, cmap="gray", vmin=-160, vmax=240, aspect=aspect)
    ax.contour(seg, [0.5], colors="red", linewidths=1.2)
    ax.set_title(title)
    ax.axis("off")
fig.suptitle(f"sats phantom, seed 0 case 7: GTV {case.pose['gtv_ml']:.1f} ml, tumour on the patient's {case.pose['side']}, "
             f"yaw {case.pose['yaw_deg']:.1f} deg, roll {case.pose['roll_deg']:.1f} deg")
fig.tight_layout()
fig.savefig(Path(__file__).with_name("phantom.png"), dpi=80)
