"""Where the time of one prediction goes, stage by stage (reading the file excluded):
plane search, resampling onto the symmetric grid, ROI, network windows, resampling back,
largest component. Each stage is timed twice in one process; the second (warm) pass is
what a folder's later cases cost.

    python bench/predict_stages.py RUN CT.nii.gz [--device cuda] [--precision auto]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sats.predict.inference import (PredictOptions, load_run, native_box, paste, predict_case, resolve_precision, roi_for,
                            sliding_window_probabilities, sub_volume)
from sats.data.io import read_image
from sats.geometry.grid import keep_largest_component, resample_to
from sats.geometry.preprocessing import estimate_plane, preprocess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("ct", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    device = torch.device(args.device)
    run = load_run(args.run, device)
    ct = read_image(args.ct)
    precision = resolve_precision(args.precision, device)
    opt = PredictOptions(device=str(device), precision=precision, quality=False)  # the stages below are the network path alone
    print(f"{args.ct.name}: {ct.shape[::-1]} voxels (x, y, z), device {device}, precision {precision}")
    for attempt in ("cold", "warm"):
        times: dict[str, float] = {}
        t = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name] = time.perf_counter() - t
            t = time.perf_counter()

        plane = estimate_plane(ct, device=device).plane
        lap("plane")
        pre = preprocess(ct, run.spacing, run.stats, plane=plane, device=str(device) if device.type == "cuda" else None)
        lap("to grid")
        roi = roi_for(run, ct, pre, opt)
        lap("roi")
        prob, _ = sliding_window_probabilities(run.model, pre.image[roi.slices], run.patch_size,
                                               overlap=opt.overlap, device=device, precision=precision)
        lap("network")
        box = native_box(roi, pre.grid, ct)
        back = resample_to(sub_volume(pre.grid, roi.slices).with_array(prob), sub_volume(ct, box), order=1, default=0.0)
        paste(ct, box, back.array)
        lap("back")
        keep_largest_component(back.array >= 0.5)
        lap("component")
        total = sum(times.values())
        t1 = time.perf_counter()
        predict_case(run, ct, options=opt)
        if device.type == "cuda":
            torch.cuda.synchronize()
        whole = time.perf_counter() - t1
        print(f"{attempt}: " + "  ".join(f"{k} {v:.2f}" for k, v in times.items())
              + f"  | sum {total:.2f} s; predict_case {whole:.2f} s (grid {pre.image.shape}, ROI {roi.shape})")


if __name__ == "__main__":
    main()
