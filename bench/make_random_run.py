"""Write a RUN folder with untrained weights for a preset, to time `sats predict` without
training (the speed does not depend on the weights).

    python bench/make_random_run.py --preset paper --out /tmp/run_paper [--no-align]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from sats import __version__
from sats.network import SATsNet, plan_network
from sats.training import RUN_FORMAT, preset


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
    torch.manual_seed(0)
    model = SATsNet(plan, residual=cfg.residual, projection_head=cfg.projection_head)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"format": RUN_FORMAT, "sats_version": __version__, "train": asdict(cfg), "plan": asdict(plan),
              "spacing": list(spacing), "intensity": {"clip_low": -120.0, "clip_high": 300.0, "mean": 60.0, "std": 36.0},
              "dataset": "none (untrained weights for timing)", "labels": {"background": 0, "GTV": 1},
              "train_ids": [], "val_ids": []}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    torch.save({"format": RUN_FORMAT, "model": model.state_dict()}, args.out / "model.pt")
    print(f"untrained {args.preset} RUN in {args.out}")


if __name__ == "__main__":
    main()
