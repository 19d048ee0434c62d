"""Parameters and GFLOP a training step of every backbone (issue 25): the paper's patch and
scale, and the cpu scale at the cpu preset's patch and at the lesion test bed's.

    python bench/backbones.py
    python bench/backbones.py --time [--threads 1] [--steps 10]

Counted on the meta device (no weights allocated, nothing timed), so it runs anywhere.
``--time`` instead times a training step of each arch's cpu scale at the lesion test bed's
patch, as a study's run takes it (one branch, batch 2, forward, backward and an SGD step,
bf16 autocast and channels-last where training uses them; ``--threads`` as the study's
``OMP_NUM_THREADS``): the median seconds of ``--steps`` steps after 3 unmeasured ones.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sats.model.backbones import BACKBONES, build_on_meta, plan_backbone, step_gflop, train_patch
from sats.model.network import count_parameters


def row(arch: str) -> str:
    def plan(patch, spacing, preset):  # the patch a run of the arch trains on (ResEnc L: about 3x)
        return plan_backbone(arch, train_patch(arch, patch, spacing), spacing, preset, 8 if preset == "cpu" else 32,
                             128 if preset == "cpu" else 320)

    paper = plan((56, 192, 192), (3.0, 1.0, 1.0), "paper")
    cpu = plan((24, 80, 80), (3.0, 1.6, 1.6), "cpu")
    bed = plan((24, 32, 32), (3.0, 4.688, 4.688), "cpu")
    ref = BACKBONES[arch].paper_params_m
    n = count_parameters(build_on_meta(paper)) / 1e6
    return (f"| `{arch}` | {'x'.join(map(str, paper.patch_size))} | {n:.2f} | {ref if ref else 'n/a'} | "
            f"{step_gflop(paper):,.0f} | {count_parameters(build_on_meta(cpu)) / 1e6:.2f} | "
            f"{'x'.join(map(str, cpu.patch_size))} | {step_gflop(cpu):.1f} | {'x'.join(map(str, bed.patch_size))} | {step_gflop(bed):.2f} |")


def seconds_a_step(arch: str, steps: int) -> tuple[str, float]:
    import torch

    from sats.model.backbones import build_backbone
    from sats.model.network import prefers_channels_last
    from sats.model.training import uses_bf16

    plan = plan_backbone(arch, train_patch(arch, (24, 32, 32), (3.0, 4.688, 4.688)), (3.0, 4.688, 4.688), "cpu", 8, 128)
    net = build_backbone(plan).train()
    cpu = torch.device("cpu")
    bf16 = uses_bf16(True, cpu)
    fmt = torch.channels_last_3d if prefers_channels_last(plan, cpu, bf16) else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(2, 1, *plan.patch_size).to(memory_format=fmt)
    times = []
    for i in range(3 + steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = net(x)
        logits.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return "x".join(map(str, plan.patch_size)), statistics.median(times)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if args.time:
        import torch

        torch.set_num_threads(args.threads)
        print(f"| arch | test-bed patch | s/step ({args.threads} thread(s), median of {args.steps}) | x nnunet |")
        print("|---|---|---|---|")
        base = None
        for arch in BACKBONES:
            patch, sec = seconds_a_step(arch, args.steps)
            base = base or sec
            print(f"| `{arch}` | {patch} | {sec:.3f} | {sec / base:.2f} |", flush=True)
        raise SystemExit
    print("| arch | paper patch | params (M) | paper (M) | GFLOP/step | cpu params (M) | cpu patch | GFLOP/step | test-bed patch | GFLOP/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in BACKBONES:
        print(row(arch), flush=True)
