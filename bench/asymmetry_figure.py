"""Overlay of m_unsup (sats.geometry.asymmetry) next to the label-based asymmetric region s XOR s',
on the axial slice with the most tumour, for one case of each dataset given.

    python bench/asymmetry_figure.py OUT.png DATASET:CASE [DATASET:CASE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from sats.data.io import read_image
from sats.geometry.asymmetry import DEFAULT_SPACING, asymmetry_map, precision_recall
from sats.geometry.preprocessing import Preprocessor
from sats.model.losses import asymmetric_mask


def main() -> None:
    out, items = Path(sys.argv[1]), sys.argv[2:]
    fig, axes = plt.subplots(len(items), 2, figsize=(9, 4.2 * len(items)), squeeze=False)
    for row, item in zip(axes, items):
        dataset, case = item.rsplit(":", 1)
        ct = read_image(Path(dataset) / "imagesTr" / f"{case}_0000.nii.gz")
        label = read_image(Path(dataset) / "labelsTr" / f"{case}.nii.gz")
        pre = Preprocessor(DEFAULT_SPACING)(ct, label=label)
        union = asymmetric_mask(torch.from_numpy(pre.label), region="union").numpy()
        m = asymmetry_map(pre).mask
        z = int(np.argmax(union.sum(axis=(1, 2))))
        p, r = precision_recall(m, union)
        for ax, mask, title in ((row[0], union, "label: s XOR s'"), (row[1], m, f"m_unsup (precision {p:.2f}, recall {r:.2f})")):
            ax.imshow(pre.grid.array[z], cmap="gray", vmin=-250, vmax=250)
            ax.imshow(np.ma.masked_where(mask[z] == 0, mask[z]), cmap="autumn", alpha=0.6)
            ax.set_title(f"{case}, z {z}: {title}", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(out)


if __name__ == "__main__":
    main()
