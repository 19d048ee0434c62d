"""Inference: sliding windows on the symmetric grid, then back to the input's exact grid.

Pipeline of :func:`predict_case`: read -> the training run's preprocessing (plane,
spacing, normalisation) -> sliding-window inference with Gaussian weighting (sigma =
patch / 8), optional mirror test-time augmentation -> probabilities resampled linearly
onto the input grid -> threshold 0.5. The mask has the input's size, spacing, origin and
direction.

The CT and its left-right mirror can run side by side as the two channels of one
sliding window: window w of the mirror then holds the anatomical mirror partners of
window w of the CT, which gives mirror TTA and the asymmetry map
``||g(E) - g(E')||`` (what the model finds asymmetric) in the same pass.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from sats.io import SatsError, Volume, read_image
from sats.network import NetworkPlan, SATsNet
from sats.preprocessing import IntensityStats, Preprocessed, preprocess, resample_to
from sats.symmetry import mirror_lr


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for, a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise SatsError(f"unknown precision {precision!r} (fp32 or bf16)")
    return nullcontext()


@torch.no_grad()
def sliding_window_probabilities(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    patch_size: tuple[int, int, int],
    overlap: float = 0.5,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    tta: bool = False,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_window: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tumour probabilities (and optionally the asymmetry map) for a preprocessed image.

    Windows are accumulated on the CPU in float32 (MONAI's ``sliding_window_inference``
    with ``device=cpu``), so memory grows with the image, not with the number of windows.

    Args:
        predictor: maps ``(N, 1, D, H, W)`` to ``(logits (N, 1, D, H, W), E (N, C, D, H, W))``.
        image: normalised image (z, y, x) on the symmetric grid.
        tta: average with the prediction of the left-right mirror, flipped back.
        head: the projection head g; when given, also return ``||g(E) - g(E')||`` per voxel.
        on_window: called after each window (progress reporting).
    Returns:
        ``(probabilities, asymmetry)``, float32 arrays (z, y, x); asymmetry is None without ``head``.
    """
    device = torch.device(device)
    x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None]  # a writable copy
    siamese = tta or head is not None
    if siamese:
        x = torch.cat([x, mirror_lr(x)], dim=1)  # channel 1: the mirror, windowed alongside

    def windows(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device)
        n = batch.shape[0]
        with autocast(device, precision):
            inp = torch.cat([batch[:, :1], batch[:, 1:]], dim=0) if siamese else batch
            logits, e = predictor(inp)
            outputs = [logits[:n]]
            if siamese:
                outputs.append(logits[n:])
            if head is not None:
                g = head(e)
                outputs.append((g[:n] - g[n:]).float().norm(dim=1, keepdim=True))
        if on_window is not None:
            for _ in range(n):
                on_window()
        return torch.cat(outputs, dim=1).float()

    # Small windows are batched: per-call overhead dominates a window of a few 10k voxels.
    batch = int(np.clip(2_000_000 // int(np.prod(patch_size)), 1, 16))
    out = sliding_window_inference(
        x, roi_size=patch_size, sw_batch_size=batch, predictor=windows, overlap=overlap,
        mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=float(image.min()),
        sw_device=device, device=torch.device("cpu"),
    )[0]
    prob = torch.sigmoid(out[0])
    if tta:
        prob = (prob + mirror_lr(torch.sigmoid(out[1]))) / 2
    asym = out[2].numpy() if head is not None else None
    return prob.numpy().astype(np.float32), asym


@dataclass
class LoadedRun:
    """A trained RUN folder: the model and the preprocessing it was trained with."""

    model: SATsNet
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    stats: IntensityStats
    config: dict

    @property
    def has_head(self) -> bool:
        return self.model.head is not None


def load_run(run: Path, device: torch.device | str = "cpu") -> LoadedRun:
    """Load ``config.json`` and ``model.pt`` of a RUN folder (weights only, never pickles)."""
    from sats.training import _check_format, _read_config, config_from_dict

    run = Path(run)
    if not run.is_dir():
        raise SatsError(f"{run}: no such RUN folder")
    config = _read_config(run)
    weights = run / "model.pt"
    if not weights.exists():
        raise SatsError(f"{run}: no model.pt (training not finished?)")
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise SatsError(f"{weights}: cannot load weights ({type(exc).__name__})") from None
    _check_format(state, weights)
    cfg = config_from_dict(config["train"])
    plan = NetworkPlan.from_dict(config["plan"])
    model = SATsNet(plan, residual=cfg.residual, projection_head=cfg.projection_head, head_channels=cfg.head_channels)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise SatsError(f"{weights}: weights do not match the network in config.json") from None
    return LoadedRun(model.to(device).eval(), tuple(plan.patch_size), tuple(config["spacing"]), IntensityStats(**config["intensity"]), config)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected region of a binary mask (the mask itself when empty)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def check_ct(volume: Volume, name: str) -> None:
    """Refuse images that are not CT in HU (a clear message rather than a silent bad mask)."""
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if lo > -500 or hi < 100:
        raise SatsError(f"{name}: intensities {lo:.0f}..{hi:.0f} do not look like CT in HU (expect air near -1000)")
    if min(volume.shape) < 2:
        raise SatsError(f"{name}: a 3D CT is needed, got size {volume.shape[::-1]} (x, y, z)")


@dataclass
class Prediction:
    """Outputs for one case on the input's grid."""

    mask: Volume  # uint8 {0, 1}
    probabilities: Volume  # float32 [0, 1]
    asymmetry: Volume | None  # float32, ||g(E) - g(E')||
    seconds: float


def count_windows(shape: tuple[int, ...], patch_size: tuple[int, ...], overlap: float) -> int:
    """How many windows the sliding window visits (MONAI's placement)."""
    n = 1
    for size, p in zip(shape, patch_size):
        step = max(int(p * (1 - overlap)), 1)
        n *= 1 if size <= p else int(np.ceil((size - p) / step)) + 1
    return n


def preprocess_for(run: LoadedRun, ct: Volume) -> Preprocessed:
    """The training run's preprocessing: its alignment mode, spacing and normalisation."""
    from sats.alignment import estimate_plane

    train = run.config["train"]
    plane = None
    if train.get("align", False):
        atlas = None
        if train.get("atlas"):
            if not Path(train["atlas"]).exists():
                raise SatsError(f"the model was trained with the atlas {train['atlas']}, which is missing")
            atlas = read_image(train["atlas"])
        plane = estimate_plane(ct, atlas).plane
    return preprocess(ct, run.spacing, run.stats, plane=plane)


def predict_case(
    run: LoadedRun,
    ct: Volume,
    pre: Preprocessed | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    overlap: float = 0.5,
    tta: bool = False,
    asymmetry_map: bool = False,
    on_window: Callable[[], None] | None = None,
    largest_component: bool = True,
) -> Prediction:
    """Predict one CT (HU, any grid); the outputs share the CT's exact geometry.

    ``largest_component`` keeps only the largest 26-connected region of the mask: a
    primary GTV is one mass, and stray false-positive islands far from it dominate HD95.
    """
    import time

    t0 = time.time()
    if asymmetry_map and not run.has_head:
        raise SatsError("--asymmetry-map needs a model trained with the projection head")
    pre = pre or preprocess_for(run, ct)
    model = run.model
    prob, asym = sliding_window_probabilities(
        model.encoder_decoder, pre.image, run.patch_size, overlap=overlap, device=device, precision=precision,
        tta=tta, head=model.head if asymmetry_map else None, on_window=on_window,
    )
    prob_native = resample_to(pre.grid.with_array(prob), ct, order=1, default=0.0)
    binary = prob_native.array >= 0.5
    if largest_component:
        binary = keep_largest_component(binary)
    mask = ct.with_array(binary.astype(np.uint8))
    asym_native = resample_to(pre.grid.with_array(asym), ct, order=1, default=0.0) if asym is not None else None
    return Prediction(mask, prob_native, asym_native, time.time() - t0)


def prefetch(items: list, load: Callable, workers: int = 1) -> Iterator[tuple[object, Future]]:
    """Yield ``(item, future)`` with the next item's ``load`` already running in a thread,
    so reading and preprocessing the next case overlaps inference of the current one."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(load, items[0])] if items else []
        for i, item in enumerate(items):
            if i + 1 < len(items):
                futures.append(pool.submit(load, items[i + 1]))
            yield item, futures[i]


# --- files and folders ----------------------------------------------------------------------


def case_id_for(path: Path) -> str:
    """Case id from a file or DICOM folder name: suffix and nnU-Net's ``_0000`` stripped."""
    from sats.io import strip_suffix

    name = strip_suffix(path.name) if path.is_file() else path.name
    return name[:-5] if name.endswith("_0000") else name


def _has_dicom(folder: Path) -> bool:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM" or f.suffix.lower() == ".dcm":
                return True
    return False


def collect_inputs(path: Path) -> tuple[list[tuple[str, Path]], bool]:
    """``([(case_id, path), ...], single)`` for an image file, a DICOM series folder, or a
    folder of image files and/or DICOM series sub-folders."""
    from sats.io import is_image_file

    path = Path(path)
    if not path.exists():
        raise SatsError(f"{path}: no such file or folder")
    if path.is_file():
        return [(case_id_for(path), path)], True
    if _has_dicom(path):
        return [(case_id_for(path), path)], True
    items = [(case_id_for(f), f) for f in sorted(path.iterdir()) if is_image_file(f) and not f.name.startswith(".")]
    items += [(case_id_for(d), d) for d in sorted(path.iterdir()) if d.is_dir() and _has_dicom(d)]
    if not items:
        raise SatsError(f"{path}: no images (.nii.gz, .nii, .nrrd, .mha) or DICOM series found")
    ids = [c for c, _ in items]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise SatsError(f"{path}: several inputs share the case id {dupes[0]}")
    return items, False


#: ``sats predict --format`` values: NIfTI (or other image) masks, or DICOM objects that
#: reference the input CT series.
OUTPUT_FORMATS = ("nifti", "rtstruct", "seg")


def output_paths(output: Path, case_id: str, single: bool, fmt: str = "nifti") -> dict[str, Path]:
    """Where a case's mask, probabilities and asymmetry map go.

    With ``fmt`` rtstruct or seg the mask is a DICOM file: ``output`` itself for one input
    named ``*.dcm``, else ``{case}_rtstruct.dcm`` / ``{case}_seg.dcm`` in the folder; the
    probability and asymmetry maps stay NIfTI beside it.
    """
    from sats.io import IMAGE_SUFFIXES, strip_suffix

    if fmt != "nifti":
        if single and output.suffix.lower() == ".dcm":
            folder, stem, mask = output.parent, output.name[:-4], output
        else:
            folder, stem = output, case_id
            mask = folder / f"{stem}_{fmt}.dcm"
        suffix = ".nii.gz"
    elif single and output.name.lower().endswith(IMAGE_SUFFIXES):
        stem = strip_suffix(output.name)
        suffix = output.name[len(stem):]
        folder, mask = output.parent, output
    else:
        folder, stem, suffix = output, case_id, ".nii.gz"
        mask = folder / f"{stem}{suffix}"
    return {"mask": mask, "probabilities": folder / f"{stem}_probabilities{suffix}", "asymmetry": folder / f"{stem}_asymmetry{suffix}"}


def predict_paths(
    input_path: Path,
    output: Path,
    run_dir: Path,
    device: str = "cpu",
    precision: str = "fp32",
    overlap: float = 0.5,
    tta: bool = False,
    save_probabilities: bool = False,
    asymmetry_map: bool = False,
    largest_component: bool = True,
    console=None,
    fmt: str = "nifti",
    series_uid: str | None = None,
) -> tuple[int, int]:
    """Predict every input under ``input_path`` into ``output``; returns (done, failed).

    A bad case in a folder is reported and skipped; the others still finish. Every file
    is written atomically, so a failed case leaves nothing behind.

    Args:
        fmt: ``nifti`` (mask image), ``rtstruct`` or ``seg`` (DICOM objects referencing the
            input CT series; every input must then be a DICOM series folder).
        series_uid: SeriesInstanceUID of the CT series to read from a single DICOM folder
            holding several (default: the CT series with most slices).
    """
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sats.dicom import read_dicom_series
    from sats.export import write_rtstruct, write_seg
    from sats.io import write_image

    console = console or Console()
    if fmt not in OUTPUT_FORMATS:
        raise SatsError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, not {fmt!r}")
    items, single = collect_inputs(input_path)
    if series_uid is not None and not (single and items[0][1].is_dir()):
        raise SatsError(f"{input_path}: --series needs one DICOM series folder as input")
    if fmt != "nifti":
        if single and not items[0][1].is_dir():
            raise SatsError(f"{items[0][1]}: --format {fmt} needs a DICOM CT series folder as input (the output references its slices)")
        if single and output.suffix and output.suffix.lower() != ".dcm":
            raise SatsError(f"{output}: --format {fmt} writes a DICOM file: name it *.dcm, or give a folder")
    elif single and not output.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha")) and output.suffix:
        raise SatsError(f"{output}: output for one input must be an image file (.nii.gz, .nii, .nrrd, .mha) or a folder")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SatsError("--device cuda asked for, but no CUDA device is available")
    run = load_run(run_dir, dev)
    if asymmetry_map and not run.has_head:
        raise SatsError(f"{run_dir}: --asymmetry-map needs a model trained with the projection head")
    if not single:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SatsError(f"{output}: cannot create output folder ({exc.strerror})") from None

    def load(item):
        case_id, path = item
        if fmt != "nifti" and not path.is_dir():
            raise SatsError(f"{path}: --format {fmt} needs a DICOM CT series folder as input (the output references its slices)")
        ct = read_dicom_series(path, series_uid) if path.is_dir() else read_image(path)
        check_ct(ct, str(path))
        return ct, preprocess_for(run, ct)

    done = failed = 0
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("cases", total=len(items))
        for (case_id, path), future in prefetch(items, load):
            t0 = time.time()
            try:
                ct, pre = future.result()
                windows = progress.add_task(f"  {case_id}", total=count_windows(pre.image.shape, run.patch_size, overlap))
                pred = predict_case(run, ct, pre, device=dev, precision=precision, overlap=overlap, tta=tta,
                                    asymmetry_map=asymmetry_map, on_window=lambda: progress.advance(windows),
                                    largest_component=largest_component)
                progress.remove_task(windows)
                paths = output_paths(output, case_id, single, fmt)
                note = ""
                if fmt == "rtstruct":
                    if not write_rtstruct(pred.mask, path, paths["mask"], series_uid=series_uid, mask_name=case_id):
                        note = " (empty: the RTSTRUCT holds the ROI without contours)"
                elif fmt == "seg":
                    write_seg(pred.mask, path, paths["mask"], series_uid=series_uid, mask_name=case_id)
                else:
                    write_image(pred.mask, paths["mask"])
                if save_probabilities:
                    write_image(pred.probabilities, paths["probabilities"])
                if asymmetry_map and pred.asymmetry is not None:
                    write_image(pred.asymmetry, paths["asymmetry"])
                done += 1
                ml = float(pred.mask.array.sum()) * pred.mask.voxel_volume_ml
                progress.console.print(f"{case_id}: {ml:.1f} ml GTV, {time.time() - t0:.1f} s -> {paths['mask']}{note}")
            except SatsError as exc:
                failed += 1
                progress.console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                if single:
                    raise
            progress.advance(task)
    return done, failed
