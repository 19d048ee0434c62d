"""`sats predict` on a full-size head-and-neck CT against one window and against the
whole-image sliding window, side by side in one run.

The CT: OpenKBP ``kbp_test_247`` (head to shoulders) resampled to 0.977 x 0.977 x 3 mm,
614 x 614 x 128 voxels, as a planning system exports it. The network: the ``paper``
preset with untrained weights (``bench/make_random_run.py``; the speed does not depend
on the weights), which also takes the ROI's landmark path, as a trained RUN's fallback.

    python bench/predict_speed.py [--ct CT] [--work DIR] [--repeats 3] [--whole-body] [--full-sliding]

Rows:
- ``sats predict``: the whole command (reading, alignment, ROI, windows, resampling back,
  writing), median of ``--repeats`` runs, peak memory of the process;
- ``sats predict --roi whole`` (``--whole-body``): the same over the whole body (before the ROI);
- one window: one forward pass of a 56 x 192 x 192 window, same precision;
- MONAI ``sliding_window_inference`` over the whole CT at its own spacing (the cost per
  window of nnU-Net's predictor): timed over a block of windows and scaled to the whole
  CT's window count, or run in full with ``--full-sliding``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OPENKBP_CT = HERE.parent.parent / "shared" / "data" / "openkbp" / "imagesTs" / "kbp_test_247_0000.nii.gz"
SPACING = (3.0, 0.977, 0.977)  # (z, y, x) mm


def build_ct(source: Path, out: Path) -> Path:
    """``source`` resampled (B-spline) to :data:`SPACING` over the same extent, int16 HU."""
    import SimpleITK as sitk

    if out.exists():
        return out
    img = sitk.ReadImage(str(source))
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), SPACING[::-1])]
    ref = sitk.Image(size, sitk.sitkInt16)
    ref.SetSpacing(SPACING[::-1])
    ref.SetOrigin(img.GetOrigin())
    ref.SetDirection(img.GetDirection())
    big = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkBSpline, -1024.0, sitk.sitkInt16)
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(big, str(out), useCompression=True)
    return out


def time_command(cmd: list[str], repeats: int) -> tuple[float, float, float]:
    """(median s, min s, peak resident GiB of the children) over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return statistics.median(times), min(times), peak


@torch.no_grad()
def time_window(net, patch, precision: str, repeats: int) -> float:
    """Median seconds of one forward pass of a ``patch`` window (after one warm-up pass)."""
    from sats.predict.inference import autocast

    x = torch.randn(1, 1, *patch)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            net(x)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def time_sliding(net, ct_path: Path, patch, precision: str, full: bool) -> tuple[float, int, int]:
    """(seconds for the whole CT, windows timed, windows of the whole CT) for MONAI's
    sliding window at the CT's own spacing, 50 % overlap, Gaussian weighting."""
    from monai.inferers import sliding_window_inference

    from sats.data.io import read_image
    from sats.predict.inference import autocast, count_windows

    image = read_image(ct_path).array.astype(np.float32)
    total = count_windows(image.shape, patch, 0.5)
    # A block of 1 x 2 x 2 windows (or the whole CT): same per-window cost, a fraction of the time.
    block = image if full else image[: patch[0], : int(patch[1] * 1.5), : int(patch[2] * 1.5)]
    timed = count_windows(block.shape, patch, 0.5)
    x = torch.from_numpy((block - block.mean()) / (block.std() + 1e-6))[None, None]

    def predictor(w: torch.Tensor) -> torch.Tensor:
        with autocast(torch.device("cpu"), precision):
            return net(w)[0].float()

    t0 = time.perf_counter()
    sliding_window_inference(x, patch, 1, predictor, overlap=0.5, mode="gaussian", sigma_scale=0.125)
    seconds = time.perf_counter() - t0
    return seconds * total / timed, timed, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ct", type=Path, help=f"full-size CT (default: built from {OPENKBP_CT.name})")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sats_predict_speed"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--whole-body", action="store_true", help="also time `sats predict --roi whole` (once)")
    ap.add_argument("--full-sliding", action="store_true", help="run the whole-image sliding window in full")
    args = ap.parse_args()

    from sats.predict.inference import load_run, resolve_precision

    ct = args.ct or build_ct(OPENKBP_CT, args.work / "fullsize_0000.nii.gz")
    run_dir = args.work / "run_paper"
    if not (run_dir / "model.pt").exists():
        subprocess.run([sys.executable, str(HERE / "make_random_run.py"), "--preset", "paper", "--out", str(run_dir)], check=True)
    sats = str(Path(sys.executable).with_name("sats"))
    precision = resolve_precision("auto", "cpu")
    run = load_run(run_dir)
    patch = run.patch_size
    threads = torch.get_num_threads()
    print(f"CT {ct} | paper network, patch {patch}, precision auto -> {precision}, {threads} threads", flush=True)

    rows = []
    med, best, peak = time_command([sats, "predict", "-i", str(ct), "-o", str(args.work / "out.nii.gz"), "-m", str(run_dir)], args.repeats)
    rows.append(("sats predict (ROI)", med, f"median of {args.repeats}, min {best:.1f} s, peak {peak:.2f} GiB"))
    if args.whole_body:
        med_w, _, _ = time_command([sats, "predict", "-i", str(ct), "-o", str(args.work / "out_whole.nii.gz"), "-m", str(run_dir),
                                    "--roi", "whole"], 1)
        rows.append(("sats predict --roi whole", med_w, "one run"))
    window = time_window(run.model.encoder_decoder, patch, precision, args.repeats)
    rows.append(("one window forward", window, f"median of {args.repeats}"))
    if precision != "fp32":
        rows.append(("one window forward, fp32", time_window(run.model.encoder_decoder, patch, "fp32", args.repeats), ""))
    whole, timed, total = time_sliding(run.model.encoder_decoder, ct, patch, precision, args.full_sliding)
    rows.append(("MONAI sliding window, whole CT", whole, f"{total} windows" + ("" if args.full_sliding else f", scaled from {timed} timed")))

    print(f"\n{'what':<34} {'seconds':>9} {'windows-equivalent':>19}  note")
    for name, seconds, note in rows:
        print(f"{name:<34} {seconds:>9.1f} {seconds / window:>19.1f}  {note}")
    print(f"\nsats predict / one window = {med / window:.1f} (goal <= 6); whole-image sliding window / sats predict = {whole / med:.1f}x")


if __name__ == "__main__":
    main()
