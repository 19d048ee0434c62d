"""Time stage-1 and stage-2 training iterations of a preset on random data.

Prints iterations/s and peak memory for each stage. Meant for a GPU machine with the
paper preset (patch 56x192x192, batch 2, 30.7 M parameters); runs on CPU too.

    python bench/train_speed.py --preset paper --device cuda --iters 20
    python bench/train_speed.py --preset cpu --device cpu --iters 5 --amp     # as sats train on CPU now
    python bench/train_speed.py --preset cpu --device cpu --iters 5 --plain   # as before (fp32, default layout)

``--amp`` is bf16 autocast where ``sats train`` would use it (CUDA, or a CPU with native
bf16), else fp32. ``GFLOP`` is one step's floating-point operations (a multiply-add
counts 2; torch's FLOP counter, convolutions and matrix products), ``GFLOP/s`` what the
timed steps achieved: set against the machine's peak, it says how much faster the step
could still get.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from sats.model.backbones import plan_backbone
from sats.model.config import build
from sats.model.losses import SegmentationLoss
from sats.model.network import SATsNet, count_parameters, prefers_channels_last
from sats.model.training import prepare_model, stage_optimizer, train_step, uses_bf16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast where sats train uses it (its default)")
    ap.add_argument("--plain", action="store_true", help="as before the speed work: default layout, no cuDNN autotune, unfused optimiser")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder-decoder")
    ap.add_argument("--arch", default="nnunet", help="backbone (sats.model.backbones); its patch is rounded up to what it takes")
    args = ap.parse_args()
    cfg = build(args.preset, arch=args.arch)
    dev = torch.device(args.device)
    plan = plan_backbone(cfg.arch, cfg.patch_size, cfg.spacing or (3.0, 1.0, 1.0), cfg.preset, cfg.base_features, cfg.max_features)
    cfg = replace(cfg, patch_size=plan.patch_size)
    model = SATsNet(plan).to(dev) if args.plain else prepare_model(SATsNet(plan), dev, args.amp, args.compile)  # as sats train does
    bf16 = uses_bf16(args.amp, dev)
    layout = "channels-last" if not args.plain and prefers_channels_last(plan, dev, bf16) else "default"
    seg_loss = SegmentationLoss()
    b = cfg.batch_size
    x = torch.randn(b, 1, *cfg.patch_size, device=dev)
    s = torch.zeros(b, 1, *cfg.patch_size, device=dev)
    d, h, w = cfg.patch_size
    s[:, :, d // 4 : d // 2, h // 4 : h // 2, w // 4 : w // 2] = 1
    print(f"arch {cfg.arch}, preset {cfg.preset}, patch {cfg.patch_size}, batch {b} (x2 Siamese), {count_parameters(model.encoder_decoder):,} parameters, "
          f"device {dev}{' ' + torch.cuda.get_device_name(dev) if dev.type == 'cuda' else ''}, {'bf16' if bf16 else 'fp32'}, {layout} layout, "
          f"{'plain' if args.plain else 'prepared'}{', compiled' if args.compile else ''}")
    print(f"{'stage':>5} {'it/s':>8} {'s/it':>8} {'peak GiB':>9} {'GFLOP':>7} {'GFLOP/s':>8}")
    for stage in ("1", "2"):
        opt = stage_optimizer(model, cfg, stage, fused=False if args.plain else None)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        gflop = float("nan")
        if not args.compile:  # counting runs the ops eagerly; a compiled module would recompile
            with FlopCounterMode(display=False) as counter:  # one untimed step
                train_step(model, x, s, cfg, stage, opt, seg_loss, use_amp=bf16)
            gflop = counter.get_total_flops() / 1e9
        for i in range(args.warmup + args.iters):
            if i == args.warmup:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
            train_step(model, x, s, cfg, stage, opt, seg_loss, use_amp=bf16)  # the step sats train runs
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = (time.perf_counter() - t0) / args.iters
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        print(f"{stage:>5} {1 / dt:>8.2f} {dt:>8.3f} {peak:>9.2f} {gflop:>7.1f} {gflop / dt:>8.1f}")


if __name__ == "__main__":
    main()
