"""Issue 25's E1/E2 table from a study folder: every arm's parameters, GFLOP and seconds a
training step, its test metrics, and its paired difference against nnunet's `unet`.

    python bench/backbone_table.py STUDY [--cross | --scores DIR] [--speed SPEED.md]
    python bench/backbone_table.py results/ablation/E1 --scores results/ablation/E2 --speed results/ablation/E1/speed.md

Parameters and GFLOP (one training step, batch 2, forward and backward, torch's FLOP
counter) are those of the plan each run trained (its config.json) on the meta device;
s/step is the median epoch time of the arm's runs (log.csv) over the iterations of an
epoch, so a run slowed for a while by other work on the machine counts little (train
min/run: the median of the finished runs' summed epoch times, every slowdown in); runs that
shared the cores with others read slower than alone. ``--speed`` adds the arch's seconds a
step measured alone, the table ``python bench/backbones.py --time`` prints. Metrics
come from summary.md's rows (seed-averaged per case, then mean over cases), the paired
columns from summary.json (two-level 95 % interval: seeds, then cases). A second table pairs
each asymmetry arm against the plain `unet` on its own backbone (fusion-reg@stunet-l minus
unet@stunet-l), from cases.csv. ``--cross`` reads the scores from STUDY/cross (the runs
scored on the other test split), ``--scores`` from another folder (the committed E2).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from pathlib import Path

from sats.evaluation.ablation import parse_arm, per_seed_table, seed_case_differences, seed_level
from sats.model.backbones import build_on_meta, step_gflop
from sats.model.network import NetworkPlan, count_parameters


def arm_costs(study: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for cfg_file in sorted(study.glob("runs/*/config.json")):
        arm = cfg_file.parent.name.rsplit("-s", 1)[0]
        cfg = json.loads(cfg_file.read_text())
        log = cfg_file.parent / "log.csv"
        if not (log.exists() and (cfg_file.parent / "metrics.csv").exists()):  # finished and scored runs only
            continue
        rows = list(csv.DictReader(open(log)))
        secs = [float(r["seconds"]) / int(cfg["train"]["iters_per_epoch"]) for r in rows]
        entry = out.setdefault(arm, {"secs": [], "minutes": []})
        entry["secs"] += secs
        entry["minutes"].append(sum(float(r["seconds"]) for r in rows) / 60)
        if "params" not in entry:
            plan = NetworkPlan.from_dict(cfg["plan"])
            net = build_on_meta(plan)
            entry.update(params=count_parameters(net) / 1e6, gflop=step_gflop(plan, int(cfg["train"]["batch_size"]), net=net),
                         patch="x".join(map(str, plan.patch_size)))
    return out


def metric_rows(summary_md: Path) -> dict[str, list[str]]:
    rows = {}
    for line in summary_md.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and re.match(r"^\d+$", cells[1] or ""):
            rows[cells[0]] = cells  # variant, runs, cases, DSC, HD95, ASD, NSD
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path)
    ap.add_argument("--cross", action="store_true")
    ap.add_argument("--scores", type=Path, help="the folder of summary.md, summary.json and cases.csv (default STUDY)")
    ap.add_argument("--speed", type=Path, help="the table of `python bench/backbones.py --time`")
    args = ap.parse_args()
    alone = {}
    if args.speed:
        for line in args.speed.read_text().splitlines():
            cells = [c.strip(" `") for c in line.strip().strip("|").split("|")]
            if len(cells) == 4 and re.match(r"^[\d.]+$", cells[2]):
                alone[cells[0]] = cells[2]
    folder = args.scores or (args.study / "cross" if args.cross else args.study)
    costs = arm_costs(args.study)
    metrics = metric_rows(folder / "summary.md")
    paired = json.loads((folder / "summary.json").read_text())
    print("| arm | arch | variant | runs | patch | params (M) | GFLOP/step | s/step in study" + (" | s/step alone" if alone else "") + " | train min/run | DSC (%) | HD95 (mm) | NSD 1 mm (%) "
          "| ΔDSC vs `unet` (2-level 95 % CI) | per seed |")
    print("|---" * (15 if alone else 14) + "|")
    for arm, m in metrics.items():
        variant, arch = parse_arm(arm)
        c = costs.get(arm, {})
        d = paired.get(arm, {}).get("unet", {}).get("dsc")
        delta = (f"{d['mean_diff']:+.2f} ({d['ci_low_2level']:+.2f} to {d['ci_high_2level']:+.2f})" if d else "(baseline)")
        seeds = ", ".join(f"{v:+.1f}" for v in d["per_seed"]) if d else ""
        cost = (f"{c['patch']} | {c['params']:.2f} | {c['gflop']:.2f} | {statistics.median(c['secs']):.3f}" if c else " | | | ")
        if alone:
            cost += f" | {alone.get(arch, '')}"
        cost += f" | {statistics.median(c['minutes']):.1f}" if c.get("minutes") else " | "
        print(f"| `{arm}` | {arch} | {variant} | {m[1]} | {cost} | {m[3]} | {m[4]} | {m[6]} | {delta} | {seeds} |")
    table = per_seed_table(list(csv.DictReader(open(folder / "cases.csv"))))
    pairs = [(a, f"unet@{parse_arm(a)[1]}" if parse_arm(a)[1] != "nnunet" else "unet") for a in table if parse_arm(a)[0] != "unet"]
    print("\n| on its own backbone | ΔDSC (pp) | 2-level 95 % CI | per seed | ΔNSD (pp) | 2-level 95 % CI |")
    print("|---|---|---|---|---|---|")
    for arm, base in pairs:
        if base not in table:
            continue
        row = []
        for metric in ("dsc", "nsd"):
            _, d = seed_case_differences(table[arm], table[base], metric)
            lvl = seed_level(table[arm], table[base], metric)
            row.append((float(d.mean()), lvl))
        (dd, ld), (dn, ln) = row
        print(f"| `{arm}` − `{base}` | {dd:+.2f} | {ld['ci_low_2level']:+.2f} to {ld['ci_high_2level']:+.2f} | "
              + ", ".join(f"{v:+.1f}" for v in ld["per_seed"])
              + f" | {dn:+.2f} | {ln['ci_low_2level']:+.2f} to {ln['ci_high_2level']:+.2f} |")


if __name__ == "__main__":
    main()
