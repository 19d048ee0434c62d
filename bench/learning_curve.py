"""The learning-curve table of issue 24 from the studies' cases.csv: `unet` against a variant
with 10 and 60 labelled cases x 2,000 and 6,000 steps, each cell over the seeds both arms have.

    python bench/learning_curve.py CELL=DIR[:SEEDS] ... [--variant fusion-reg]

DIR is a study folder (its cases.csv); SEEDS, e.g. 0-2, restricts a cell to those seeds (the
60-label x 2,000-step cell is study A2's seeds 0-2). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from sats.evaluation.ablation import per_seed_table, seed_level


def cell(folder: Path, seeds: set[int] | None, variant: str) -> str:
    with open(folder / "cases.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if seeds is None or int(r["seed"]) in seeds]
    table = per_seed_table(rows)
    st = seed_level(table[variant], table["unet"], "dsc")
    mean = {v: np.mean([float(r["dsc"]) for r in rows if r["variant"] == v]) for v in ("unet", variant)}
    per_seed = ", ".join(f"{d:+.1f}" for d in st["per_seed"])
    diff = float(np.nanmean(st["per_seed"]))  # cases are the same for every seed: the mean of the seeds' means
    return (f"{mean['unet']:.2f} | {mean[variant]:.2f} | {diff:+.2f} | "
            f"{st['ci_low_2level']:.2f} to {st['ci_high_2level']:.2f} | {per_seed} | {len(st['per_seed'])}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cells", nargs="+", help="NAME=DIR or NAME=DIR:LO-HI")
    ap.add_argument("--variant", default="fusion-reg")
    args = ap.parse_args()
    print(f"| cell | unet DSC | {args.variant} DSC | Δ | two-level 95 % CI | per seed | seeds |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.cells:
        name, where = spec.split("=", 1)
        folder, _, span = where.partition(":")
        seeds = set(range(int(span.split("-")[0]), int(span.split("-")[1]) + 1)) if span else None
        print(f"| {name} | {cell(Path(folder), seeds, args.variant)} |")


if __name__ == "__main__":
    main()
