"""Write a RUN folder with untrained weights for a preset, to time `sats predict` without
training (the speed does not depend on the weights). Its localiser is untrained too: it
finds no plausible region, so prediction takes the landmark ROI, as a trained RUN does
when its localiser fails, and the timing stays representative.

    python bench/make_random_run.py --preset paper --out /tmp/run_paper [--no-align]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sats.geometry.preprocessing import IntensityStats
from sats.model.config import preset
from sats.model.network import plan_network
from sats.model.run import Run, RunConfig
from sats.predict.roi import Localiser, save_localiser


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-align", action="store_true")
    args = ap.parse_args()
    cfg = preset(args.preset)
    cfg.align = not args.no_align
    spacing = cfg.spacing or (3.0, 1.0, 1.0)
    plan = plan_network(cfg.patch_size, spacing, cfg.base_features, cfg.max_features)
    run = Run.create(args.out, RunConfig(cfg, plan, spacing, IntensityStats(-120.0, 300.0, 60.0, 36.0),
                                         dataset="none (untrained weights for timing)"))
    torch.manual_seed(0)
    run.save_model(run.build_model())
    save_localiser(Localiser().eval(), run.localiser_file)
    print(f"untrained {args.preset} RUN in {args.out}")


if __name__ == "__main__":
    main()
