"""How well the unsupervised asymmetric region (sats.geometry.asymmetry) matches the label-based
ones: voxel-wise precision and recall of m_unsup against Eq. 1 (``s - s∩s'``) and against
``s XOR s'``, per setting, over a dataset's cases. Tune on Tr, report on Ts.

    python bench/asymmetry_eval.py DATASET --split Tr --cases 10 --spacing 2 2 2 [--sweep] [--region body]
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sats.data.dataset import list_cases
from sats.data.io import read_image
from sats.geometry.asymmetry import AsymmetryConfig, asymmetry_cues, precision_recall, score_and_mask
from sats.geometry.preprocessing import Preprocessor
from sats.model.losses import asymmetric_mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--split", default="Tr", choices=["Tr", "Ts"])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--spacing", type=float, nargs=3, default=(2.0, 2.0, 2.0))
    ap.add_argument("--sweep", action="store_true", help="also sweep residual_hu, log_jacobian and threshold")
    ap.add_argument("--field-sigma", type=float, nargs="*", default=[AsymmetryConfig().field_sigma_vox])
    ap.add_argument("--region", default=AsymmetryConfig().region, choices=["nasopharynx", "body"])
    args = ap.parse_args()
    cases = [c for c in list_cases(args.dataset, args.split) if c.label is not None][: args.cases]
    base = AsymmetryConfig(region=args.region)
    scorings = [base]
    if args.sweep:
        scorings = [replace(base, residual_hu=r, log_jacobian=j, threshold=t)
                    for r, j, t in itertools.product((60.0, 100.0, 150.0, 250.0), (0.3, 0.6, 1e9), (1.0,))]
    rows: dict[tuple, list] = {}
    seconds = []
    for case in cases:
        ct, label = read_image(case.image), read_image(case.label)
        pre = Preprocessor(tuple(args.spacing))(ct, label=label)
        s = torch.from_numpy(pre.label)
        paper = asymmetric_mask(s, region="paper").numpy()
        union = asymmetric_mask(s, region="union").numpy()
        for sigma in args.field_sigma:
            t0 = time.time()
            cues = asymmetry_cues(pre, replace(base, field_sigma_vox=sigma))
            seconds.append(time.time() - t0)
            for cfg in scorings:
                _, mask = score_and_mask(cues, cfg)
                key = (sigma, cfg.residual_hu, cfg.log_jacobian, cfg.threshold)
                rows.setdefault(key, []).append((*precision_recall(mask, union), *precision_recall(mask, paper),
                                                 mask.sum() * np.prod(args.spacing) / 1000))
        print(f"{case.case_id}: grid {pre.grid.shape}, registration {seconds[-1]:.1f} s", flush=True)
    print(f"\n{len(cases)} {args.split} cases of {args.dataset}, region {args.region}, spacing {tuple(args.spacing)} mm, "
          f"registration median {np.median(seconds):.1f} s per case")
    print("| field sigma (voxels) | residual HU | log J | threshold | precision (XOR) | recall (XOR) | F1 (XOR) | "
          "precision (Eq. 1) | recall (Eq. 1) | m_unsup ml |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, vals in rows.items():
        v = np.array(vals, float)
        p, r = np.nanmean(v[:, 0]), np.nanmean(v[:, 1])
        f1 = 2 * p * r / max(p + r, 1e-9)
        print(f"| {key[0]:g} | {key[1]:g} | {key[2]:g} | {key[3]:g} | {p:.2f} | {r:.2f} | {f1:.2f} | "
              f"{np.nanmean(v[:, 2]):.2f} | {np.nanmean(v[:, 3]):.2f} | {np.mean(v[:, 4]):.1f} |")


if __name__ == "__main__":
    main()
