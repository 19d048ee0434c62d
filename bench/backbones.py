"""Parameters and GFLOP a training step of every backbone (issue 25): the paper's patch and
scale, and the cpu scale at the cpu preset's patch and at the lesion test bed's.

    python bench/backbones.py

Counted on the meta device (no weights allocated, nothing timed), so it runs anywhere.
"""

from __future__ import annotations

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


if __name__ == "__main__":
    print("| arch | paper patch | params (M) | paper (M) | GFLOP/step | cpu params (M) | cpu patch | GFLOP/step | test-bed patch | GFLOP/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in BACKBONES:
        print(row(arch), flush=True)
