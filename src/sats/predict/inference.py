"""Inference: sliding windows on the symmetric grid, then back to the input's exact grid.

Pipeline of :func:`predict_case`: read -> the training run's preprocessing (plane,
spacing, normalisation) -> the region of interest (:mod:`sats.predict.roi`: the run's localiser,
else anatomical landmarks) -> sliding-window inference over the ROI with Gaussian
weighting (sigma = patch / 8), optional mirror test-time augmentation -> probabilities
resampled linearly onto the input grid -> threshold 0.5. Outside the ROI the probability
is 0. The mask has the input's size, spacing, origin and direction.

The CT and its left-right mirror can run side by side as the two channels of one
sliding window: window w of the mirror then holds the anatomical mirror partners of
window w of the CT, which gives mirror TTA and the asymmetry map
``||g(E) - g(E')||`` (what the model finds asymmetric) in the same pass.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from sats.data.dataset import check_ct
from sats.data.io import collect_inputs, read_image
from sats.geometry.grid import Roi, keep_largest_component, resample_to, whole_roi
from sats.geometry.landmarks import head_frame, nasopharynx_in_view
from sats.geometry.preprocessing import IntensityStats, PlaneSettings, Preprocessed, Preprocessor
from sats.geometry.symmetry import mirror_lr
from sats.geometry.volume import SatsError, Volume, about, validate_options
from sats.hardware import cpu_has_native_bf16
from sats.model.config import Precision, RoiMode
from sats.model.network import SATsNet
from sats.model.run import Run, RunConfig
from sats.predict.quality import QUALITY_FILE, QualityModel, assess, evidence, load_quality
from sats.predict.roi import Localiser, find_roi, load_localiser

__all__ = ["CaseInput", "Ensemble", "LoadedRun", "PredictOptions", "Prediction", "WindowMaps", "load_model", "load_run",
           "predict_case", "predict_file", "predict_paths", "prepare_input", "sliding_window_logits", "sliding_window_probabilities"]

#: ``sats predict --format`` values, one or more, comma-separated: NIfTI (or other image)
#: masks, DICOM objects that reference the input CT series (RTSTRUCT, SEG), and ``sc``, the
#: review sheet as a DICOM Secondary Capture in the CT's study (:mod:`sats.predict.review`).
OUTPUT_FORMATS = ("nifti", "rtstruct", "seg", "sc")
#: What each DICOM format's file is called in an output folder: ``{case}{suffix}``.
DICOM_SUFFIX = {"rtstruct": "_rtstruct.dcm", "seg": "_seg.dcm", "sc": "_review.dcm"}


def parse_formats(text: str) -> tuple[str, ...]:
    """``"rtstruct,sc"`` -> ("rtstruct", "sc"); a SatsError for an unknown or repeated one."""
    formats = tuple(f.strip().lower() for f in str(text).split(",") if f.strip())
    bad = [f for f in formats if f not in OUTPUT_FORMATS]
    if not formats or bad or len(set(formats)) != len(formats):
        raise SatsError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, or several comma-separated (each once), not {text!r}")
    return formats


@dataclass
class PredictOptions:
    """How a prediction runs and what it writes; validated when made.

    Attributes:
        device: "cpu" or "cuda". precision: "fp32", "bf16" (autocast) or "auto" (bf16 where
            the CPU computes it natively (AMX or AVX512-BF16), else fp32).
        roi: "auto" runs the network over the region of interest only (:mod:`sats.predict.roi`),
            "whole" over the whole body.
        overlap: window overlap as a fraction of the patch, in [0, 1).
        tta: average with the prediction of the left-right mirrored CT.
        largest_component: keep only the largest 26-connected region of the mask.
        save_probabilities, asymmetry_map: also write these maps (NIfTI).
        fmt: one or more of :data:`OUTPUT_FORMATS`, comma-separated: "nifti" (mask image),
            "rtstruct" or "seg" (DICOM objects referencing the input series), "sc" (the review
            sheet as DICOM Secondary Capture).
        series_uid: the CT series to read from a DICOM folder holding several.
        quality: judge each prediction (:mod:`sats.predict.quality`): each model also runs the
            mirrored CT, and the verdict is written beside the mask (``{case}_qa.json``), into
            the DICOM objects and as a review sheet (``{case}_review.png``).
    """

    device: str = "cpu"
    precision: Precision = field(default="auto", metadata={"option": "--precision"})
    roi: RoiMode = field(default="auto", metadata={"option": "--roi"})
    overlap: float = 0.5
    tta: bool = False
    largest_component: bool = True
    save_probabilities: bool = False
    asymmetry_map: bool = False
    fmt: str = field(default="nifti", metadata={"option": "--format"})
    series_uid: str | None = None
    quality: bool = True

    def __post_init__(self) -> None:
        validate_options(self)
        parse_formats(self.fmt)
        if "sc" in self.formats and not self.quality:
            raise SatsError("--format sc writes the review sheet, which needs the quality check (drop --no-qa)")
        if not 0.0 <= self.overlap < 1.0:
            raise SatsError(f"overlap must be in [0, 1), not {self.overlap}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise SatsError("--device cuda asked for, but no CUDA device is available")


    @property
    def formats(self) -> tuple[str, ...]:
        return parse_formats(self.fmt)

    @property
    def dicom(self) -> bool:
        """Whether any output is a DICOM object (the input must then be a DICOM CT series)."""
        return any(f != "nifti" for f in self.formats)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> bf16 on CPUs with native bf16 (a window 1.9x faster on AVX512-BF16),
    else fp32 (also on CUDA, where bf16 prediction measured slower); others unchanged."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked for, a no-op for fp32 (``auto`` is resolved first)."""
    precision = resolve_precision(precision, device)
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise SatsError(f"unknown precision {precision!r} (fp32 or bf16)")
    return nullcontext()


@dataclass
class WindowMaps:
    """What one network's sliding window gives for a case, float32 (z, y, x) on its grid:
    the logits of the CT pass, those of the mirrored CT's pass flipped back onto the CT
    (None unless asked for), and ``||g(E) - g(E')||`` (None unless asked for)."""

    logits: np.ndarray
    logits_mirror: np.ndarray | None = None
    asymmetry: np.ndarray | None = None


@torch.no_grad()
def sliding_window_logits(
    model: SATsNet,
    image: np.ndarray,
    patch_size: tuple[int, int, int],
    overlap: float = 0.5,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    mirror_pass: bool = False,
    asymmetry: bool = False,
    on_window: Callable[[], None] | None = None,
    eager: bool = False,
) -> WindowMaps:
    """The network's logits over a preprocessed case, window by window (:class:`WindowMaps`).

    The case and its mirror (every channel flipped along x, the left-right axis) are windowed
    side by side as the channels of one image, so window w of the mirror holds, voxel for
    voxel, the anatomical mirror partners of window w of the case: what the Siamese branch,
    the mirrored pass, the asymmetry map and the fusion models need (:class:`sats.model.network.SATsNet`).
    The case must be a box symmetric about the mid-sagittal plane (the symmetric grid or a
    :class:`sats.geometry.grid.Roi` of it). Windows are blended with Gaussian weights
    (sigma = patch / 8, MONAI's ``sliding_window_inference``) in float32 on the CPU, or on
    the GPU when ``device`` is one.

    Args:
        model: the network; called as ``model(x, x_mirror, ...)``.
        image: the case on the symmetric grid, (z, y, x) or with channels (C, z, y, x)
            (:attr:`sats.geometry.preprocessing.Preprocessed.channels`).
        mirror_pass: also the logits of the mirrored case, flipped back (mirror TTA, the quality check).
        asymmetry: also ``||g(E) - g(E')||`` per voxel (the model needs its projection head).
        on_window: called after each window (progress reporting).
        eager: call the encoder-decoder uncompiled (validation of a compiled model).
    """
    device = torch.device(device)
    channels = image[None] if image.ndim == 3 else image
    x = torch.from_numpy(np.array(channels, dtype=np.float32))[None]  # (1, C, z, y, x), a writable copy
    c = x.shape[1]
    both = mirror_pass or asymmetry
    with_mirror = both or model.needs_mirror
    if with_mirror:
        x = torch.cat([x, mirror_lr(x)], dim=1)  # channels c..2c-1: the mirror, windowed alongside

    def windows(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device)
        with autocast(device, precision):
            out = model(batch[:, :c], batch[:, c:] if with_mirror else None, with_features=asymmetry,
                        mirror_pass=both, eager=eager)
            outputs = [out["logits"]] + ([out["logits_mirror"]] if mirror_pass else [])
            if asymmetry:
                outputs.append((out["proj"] - out["proj_mirror"]).float().norm(dim=1, keepdim=True))
        if on_window is not None:
            for _ in range(batch.shape[0]):
                on_window()
        return torch.cat(outputs, dim=1).float()

    # Small windows are batched: per-call overhead dominates a window of a few 10k voxels.
    batch = int(np.clip(2_000_000 // int(np.prod(patch_size)), 1, 16))
    out = sliding_window_inference(
        x, roi_size=patch_size, sw_batch_size=batch, predictor=windows, overlap=overlap,
        mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=float(channels.min()),
        sw_device=device, device=device if device.type == "cuda" else torch.device("cpu"),
    )[0]
    as_numpy = lambda t: t.cpu().numpy().astype(np.float32)  # noqa: E731
    return WindowMaps(as_numpy(out[0]), as_numpy(mirror_lr(out[1])) if mirror_pass else None,
                      as_numpy(out[-1]) if asymmetry else None)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities from logits divided by a temperature (:mod:`sats.predict.quality`), float32."""
    z = torch.from_numpy(np.asarray(logits, np.float32))
    return torch.sigmoid(z if temperature == 1.0 else z / temperature).numpy()


def sliding_window_probabilities(
    model: SATsNet,
    image: np.ndarray,
    patch_size: tuple[int, int, int],
    overlap: float = 0.5,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    tta: bool = False,
    asymmetry: bool = False,
    on_window: Callable[[], None] | None = None,
    eager: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Tumour probabilities (and optionally the asymmetry map) for a preprocessed case:
    :func:`sliding_window_logits` through the sigmoid; ``tta`` averages the CT pass with the
    mirrored pass. Returns ``(probabilities, asymmetry)``, float32 (z, y, x); asymmetry is
    None unless asked."""
    maps = sliding_window_logits(model, image, patch_size, overlap, device, precision, mirror_pass=tta,
                                 asymmetry=asymmetry, on_window=on_window, eager=eager)
    prob = sigmoid(maps.logits)
    if tta:
        prob = (prob + sigmoid(maps.logits_mirror)) / 2  # type: ignore[arg-type]
    return prob, maps.asymmetry


@dataclass
class LoadedRun:
    """A trained RUN folder in memory: the model and the preprocessing it was trained with."""

    model: SATsNet
    config: RunConfig
    localiser: Localiser | None = None

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.config.plan.patch_size)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.config.spacing

    @property
    def stats(self) -> IntensityStats:
        return self.config.intensity

    @property
    def has_head(self) -> bool:
        return self.model.head is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def preprocessor(self) -> Preprocessor:
        """The run's preprocessing: its alignment (self, atlas or none; an unreliable plane is
        refused), spacing and normalisation, on the model's device."""
        train = self.config.train
        return Preprocessor(self.spacing, self.stats, PlaneSettings.of(train.align, train.atlas), str(self.device),
                            registered_mirror=train.fusion == "registered")


def load_run(run: Path, device: torch.device | str = "cpu") -> LoadedRun:
    """Load one trained model: a RUN folder's configuration and ``model.pt`` (weights only,
    never pickles). :func:`load_model` loads a RUN of folds, or several RUNs, as an ensemble."""
    opened = Run.open(run)
    return LoadedRun(opened.load_model(device), opened.config, load_localiser(opened.localiser_file, device))


@dataclass
class Ensemble:
    """The models one prediction averages, and its quality model.

    ``members`` share the preprocessing (spacing, intensity statistics, alignment, the
    registered mirror where used): one plane and one ROI per case, each member's own
    sliding window (patch sizes and backbones may differ), their probabilities averaged.
    ``quality``: :class:`sats.predict.quality.QualityModel` (the score, its threshold and
    the temperature), or None (the rules alone flag; probabilities uncalibrated).
    """

    members: list[LoadedRun]
    quality: QualityModel | None = None

    @property
    def first(self) -> LoadedRun:
        return self.members[0]

    @property
    def has_head(self) -> bool:
        return all(m.has_head for m in self.members)

    @property
    def temperature(self) -> float:
        return self.quality.temperature if self.quality is not None else 1.0

    @property
    def localiser(self) -> Localiser | None:
        return next((m.localiser for m in self.members if m.localiser is not None), None)

    @property
    def preprocessor(self) -> Preprocessor:
        return self.first.preprocessor


def as_ensemble(run: LoadedRun | Ensemble) -> Ensemble:
    """An :class:`Ensemble` of one model where a single :class:`LoadedRun` is given."""
    return run if isinstance(run, Ensemble) else Ensemble([run])


def member_folders(path: Path) -> list[Path]:
    """The model folders a ``-m`` path stands for: a RUN itself (``config.json`` in it), or
    its ``fold_K`` RUNs that hold a trained model (``sats train --folds``)."""
    path = Path(path)
    folds = sorted(p for p in path.glob("fold_*") if p.is_dir()) if path.is_dir() and not (path / "config.json").exists() else []
    if not folds:
        return [path]  # Run.open names what is wrong with a folder that is not a RUN
    trained = [p for p in folds if (p / "config.json").exists() and (p / "model.pt").exists()]
    if not trained:
        raise SatsError(f"{path}: none of its {len(folds)} fold folder(s) holds a trained model yet")
    return trained


#: What members of one ensemble must share: the case they see is prepared once.
_SHARED = {"spacing": lambda c: tuple(round(v, 6) for v in c.spacing), "intensity statistics": lambda c: c.intensity.to_dict(),
           "alignment": lambda c: (c.train.align, c.train.atlas), "registered mirror": lambda c: c.train.fusion == "registered"}


def load_model(paths: Path | list[Path], device: torch.device | str = "cpu") -> Ensemble:
    """Every model behind ``paths`` (RUN folders or RUNs of folds, :func:`member_folders`)
    as one :class:`Ensemble`, with the quality model (``quality.json``) of the first path
    that has one. Members that would preprocess a case differently are refused."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    folders = [f for p in paths for f in member_folders(p)]
    members = [load_run(f, device) for f in folders]
    for f, m in zip(folders[1:], members[1:]):
        for what, key in _SHARED.items():
            if key(m.config) != key(members[0].config):
                raise SatsError(f"{f}: its {what} differs from {folders[0]}'s; members of one ensemble must preprocess alike")
    quality = next((q for q in (load_quality(p / QUALITY_FILE) for p in paths if p.is_dir()) if q is not None), None)
    return Ensemble(members, quality)


@dataclass
class Prediction:
    """Outputs for one case on the input's grid, and its quality verdict
    (:func:`sats.predict.quality.assess`: the ``{case}_qa.json`` content)."""

    mask: Volume  # uint8 {0, 1}
    probabilities: Volume  # float32 [0, 1]
    asymmetry: Volume | None  # float32, ||g(E) - g(E')||
    seconds: float
    qa: dict = field(default_factory=dict)
    roi: Roi | None = None
    grid: Volume | None = None  # the symmetric grid the ROI is on

    @property
    def flagged(self) -> bool:
        return self.qa.get("flag") == "review"


def count_windows(shape: tuple[int, ...], patch_size: tuple[int, ...], overlap: float) -> int:
    """How many windows the sliding window visits (MONAI's placement)."""
    n = 1
    for size, p in zip(shape, patch_size):
        step = max(int(p * (1 - overlap)), 1)
        n *= 1 if size <= p else int(np.ceil((size - p) / step)) + 1
    return n



def predict_case(
    run: LoadedRun | Ensemble,
    ct: Volume,
    pre: Preprocessed | None = None,
    options: PredictOptions | None = None,
    on_window: Callable[[], None] | None = None,
    region: Roi | None = None,
    **overrides,
) -> Prediction:
    """Predict one CT (HU, any grid); the outputs share the CT's exact geometry.

    ``run``: one model, or an :class:`Ensemble` whose members' probabilities are averaged
    (each through the quality model's temperature). ``options`` (default
    :class:`PredictOptions`), with any of its fields overridden by keyword, e.g.
    ``predict_case(run, ct, precision="bf16")``. ``region`` (default: found by
    :func:`roi_for`, or the whole grid with ``roi="whole"``) limits the windows. The
    largest-component rule keeps one region: a primary GTV is one mass, and stray islands
    far from it dominate HD95. With ``quality`` (the default) each member also runs the
    mirrored CT and the verdict of :func:`sats.predict.quality.assess` is in ``Prediction.qa``.
    """
    t0 = time.time()
    ens = as_ensemble(run)
    opt = replace(options or PredictOptions(), **overrides)
    if opt.asymmetry_map and not ens.has_head:
        raise SatsError("--asymmetry-map needs a model trained with the projection head")
    pre = pre or ens.preprocessor(ct)
    roi = region or roi_for(ens, ct, pre, opt)
    crop = pre.channels[(slice(None), *roi.slices)]
    maps = [sliding_window_logits(m.model, crop, m.patch_size, overlap=opt.overlap, device=opt.device, precision=opt.precision,
                                  mirror_pass=opt.tta or opt.quality, asymmetry=opt.asymmetry_map, on_window=on_window)
            for m in ens.members]

    def member_prob(w: WindowMaps, temperature: float) -> np.ndarray:
        p = sigmoid(w.logits, temperature)
        return (p + sigmoid(w.logits_mirror, temperature)) / 2 if opt.tta else p  # type: ignore[arg-type]

    prob = np.mean([member_prob(w, ens.temperature) for w in maps], axis=0) if len(maps) > 1 else member_prob(maps[0], ens.temperature)
    asym = np.mean([w.asymmetry for w in maps], axis=0) if opt.asymmetry_map else None
    # Outside the ROI every map is 0: resample only the part of the input grid it covers.
    box = native_box(roi, pre.grid, ct)
    sub = sub_volume(ct, box)
    roi_grid = sub_volume(pre.grid, roi.slices)
    prob_box = resample_to(roi_grid.with_array(prob), sub, order=1, default=0.0).array
    prob_native = paste(ct, box, prob_box)
    binary = prob_box >= 0.5
    if opt.largest_component:
        binary = keep_largest_component(binary)
    mask = ct.with_array(paste(ct, box, binary).array.astype(np.uint8))
    asym_native = paste(ct, box, resample_to(roi_grid.with_array(asym), sub, order=1, default=0.0).array) if asym is not None else None
    qa = {}
    if opt.quality:
        def component(p: np.ndarray) -> np.ndarray:
            return keep_largest_component(p >= 0.5) if opt.largest_component else p >= 0.5

        def native_ml(p: np.ndarray) -> float:  # a member's own mask on the input grid, as one model would write it
            return float(component(resample_to(roi_grid.with_array(p), sub, order=1, default=0.0).array).sum()) * ct.voxel_volume_ml

        # The evidence reads each model's own probabilities before the temperature, as the
        # out-of-fold evidence the score was fitted on did (its fit came before the temperature).
        raw = [(member_prob(w, 1.0), sigmoid(w.logits_mirror)) for w in maps]
        ml = float(mask.array.sum()) * mask.voxel_volume_ml
        members = [evidence(p, pm, component(p), native_ml(p)) for p, pm in raw] if len(raw) > 1 else None
        p_raw = np.mean([p for p, _ in raw], axis=0)
        qa = assess(evidence(p_raw, np.mean([pm for _, pm in raw], axis=0), component(p_raw), ml, [p >= 0.5 for p, _ in raw],
                             nasopharynx_in_view(head_frame(ct, pre.grid, pre.plane)), roi.source), ens.quality, members)
    return Prediction(mask, prob_native, asym_native, time.time() - t0, qa, roi, pre.grid)


def native_box(roi: Roi, grid: Volume, ct: Volume) -> tuple[slice, slice, slice]:
    """The input grid's voxels (z, y, x slices) that the ROI on ``grid`` covers, one voxel wider."""
    corners = np.array([[a, b, c] for a in (roi.start[0] - 1, roi.stop[0]) for b in (roi.start[1] - 1, roi.stop[1])
                        for c in (roi.start[2] - 1, roi.stop[2])], float)
    idx = ct.physical_to_index(grid.index_to_physical(corners))
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - 1, 0, ct.shape)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 2, 0, ct.shape)
    hi = np.maximum(hi, lo + 1) if np.all(lo < ct.shape) else hi
    return tuple(slice(int(a), int(max(b, a))) for a, b in zip(lo, hi))  # type: ignore[return-value]


def sub_volume(volume: Volume, box: tuple[slice, ...]) -> Volume:
    """The part ``box`` (z, y, x slices) of ``volume`` with its own origin, same axes."""
    start = np.array([s.start for s in box], float)
    return Volume(volume.array[box], volume.spacing, tuple(volume.index_to_physical(start)), volume.direction.copy())


def paste(ct: Volume, box: tuple[slice, ...], values: np.ndarray) -> Volume:
    """A float32 map on ``ct``'s grid: ``values`` inside ``box``, 0 elsewhere."""
    out = np.zeros(ct.shape, np.float32)
    out[box] = values
    return ct.with_array(out)


def roi_for(run: LoadedRun | Ensemble, ct: Volume, pre: Preprocessed, options: PredictOptions) -> Roi:
    """The region the network runs over: :func:`sats.predict.roi.find_roi` (the first member's
    patch, the first localiser among the members), or the whole grid for ``roi="whole"``."""
    if options.roi == "whole":
        return whole_roi(pre.image.shape)
    ens = as_ensemble(run)
    return find_roi(ct, pre, ens.first.patch_size, ens.localiser)


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


def output_paths(output: Path, case_id: str, single: bool, fmt: str = "nifti") -> dict[str, Path]:
    """Where a case's outputs go: one path per format of ``fmt`` (:func:`parse_formats`),
    ``mask`` (the first format's), and the maps, the verdict and the review sheet.

    In an output folder: ``{case}.nii.gz``, ``{case}_rtstruct.dcm``, ``{case}_seg.dcm``,
    ``{case}_review.dcm`` (Secondary Capture), ``{case}_qa.json``, ``{case}_review.png``,
    ``{case}_probabilities.nii.gz``, ``{case}_asymmetry.nii.gz``. For one input and one
    format, ``output`` may name the file itself (an image file, or ``*.dcm`` for a DICOM
    format); the others are named after it (``out.nii.gz`` -> ``out_qa.json``).
    """
    from sats.data.io import IMAGE_SUFFIXES, strip_suffix

    formats = parse_formats(fmt)
    named = single and len(formats) == 1 and (
        output.suffix.lower() == ".dcm" if formats[0] != "nifti" else output.name.lower().endswith(IMAGE_SUFFIXES))
    if named:
        folder, stem = output.parent, strip_suffix(output.name) if formats[0] == "nifti" else output.name[:-4]
        suffix = output.name[len(stem):] if formats[0] == "nifti" else ".nii.gz"
        paths = {formats[0]: output}
    else:
        folder, stem, suffix = output, case_id, ".nii.gz"
        paths = {f: folder / (f"{stem}{suffix}" if f == "nifti" else f"{stem}{DICOM_SUFFIX[f]}") for f in formats}
    return {**paths, "mask": paths[formats[0]], "probabilities": folder / f"{stem}_probabilities{suffix}",
            "asymmetry": folder / f"{stem}_asymmetry{suffix}", "qa": folder / f"{stem}_qa.json",
            "review": folder / f"{stem}_review.png"}


def predict_paths(
    input_path: Path,
    output: Path,
    run_dir: Path | list[Path],
    options: PredictOptions | None = None,
    console=None,
) -> tuple[int, int]:
    """Predict every input under ``input_path`` into ``output``; returns (done, failed).

    ``run_dir``: a RUN folder, a RUN of folds, or several of either: one ensemble
    (:func:`load_model`). Each case's verdict is printed and written beside its mask.

    A bad case in a folder is reported, naming its file, and skipped; the others still
    finish. Every file is written atomically, so a failed case leaves nothing behind.
    With a DICOM ``options.fmt`` (rtstruct, seg, sc) every input must be a DICOM CT series folder.
    """
    from rich.console import Console

    from sats.progress import progress_bar

    console = console or Console()
    opt = options or PredictOptions()
    items, single = collect_inputs(input_path)
    check_outputs(input_path, output, items, single, opt)
    run = load_model(run_dir, opt.device)
    if opt.asymmetry_map and not run.has_head:
        raise SatsError(f"{run_dir}: --asymmetry-map needs a model trained with the projection head")
    if len(run.members) > 1:
        console.print(f"ensemble of {len(run.members)} models"
                      + (f"; quality model fitted on {run.quality.fitted_on.get('cases')} out-of-fold cases" if run.quality else ""))
    if not single:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SatsError(f"{output}: cannot create output folder ({exc.strerror})") from None

    def load(item: tuple[str, Path]) -> CaseInput:
        with about(item[1]):
            return prepare_input(run, item[1], opt)

    done = failed = 0
    with progress_bar(console) as progress:
        task = progress.add_task("cases", total=len(items))
        for (cid, path), future in prefetch(items, load):
            try:
                paths = output_paths(output, cid, single, opt.fmt)
                with about(path):
                    inp = future.result()
                    total = sum(count_windows(inp.roi.shape, m.patch_size, opt.overlap) for m in run.members)
                    windows = progress.add_task(f"  {cid}", total=total)
                    pred, note = predict_file(run, path, paths, cid, opt, inp, on_window=lambda: progress.advance(windows))
                    progress.remove_task(windows)
                done += 1
                ml = float(pred.mask.array.sum()) * pred.mask.voxel_volume_ml
                verdict = f", {pred.qa['flag']}" if pred.qa else ""
                progress.console.print(f"{cid}: {ml:.1f} ml GTV{verdict}, {pred.seconds:.1f} s -> {paths['mask']}{note}",
                                       highlight=False)
            except SatsError as exc:
                if single:
                    raise
                failed += 1
                progress.console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            progress.advance(task)
    return done, failed


def check_outputs(input_path: Path, output: Path, items: list[tuple[str, Path]], single: bool, opt: PredictOptions) -> None:
    """Refuse input/output combinations that cannot work, before any model is loaded."""
    if opt.series_uid is not None and not (single and items[0][1].is_dir()):
        raise SatsError(f"{input_path}: --series needs one DICOM series folder as input")
    formats = opt.formats
    if opt.dicom and single and not items[0][1].is_dir():
        raise SatsError(f"{items[0][1]}: --format {opt.fmt} needs a DICOM CT series folder as input (the output references its slices)")
    if single and output.suffix and len(formats) > 1:
        raise SatsError(f"{output}: --format {opt.fmt} writes several files: give a folder")
    if single and output.suffix and formats[0] != "nifti" and output.suffix.lower() != ".dcm":
        raise SatsError(f"{output}: --format {opt.fmt} writes a DICOM file: name it *.dcm, or give a folder")
    if single and formats == ("nifti",) and not output.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha")) and output.suffix:
        raise SatsError(f"{output}: output for one input must be an image file (.nii.gz, .nii, .nrrd, .mha) or a folder")


@dataclass
class CaseInput:
    """One input read and made ready: the CT (HU, its own grid), the case on the run's
    symmetric grid, and the ROI the network will run over."""

    ct: Volume
    pre: Preprocessed
    roi: Roi


def prepare_input(run: LoadedRun | Ensemble, path: Path, opt: PredictOptions) -> CaseInput:
    """Read one input (image file or DICOM series folder), check it is CT, preprocess it
    (:attr:`LoadedRun.preprocessor`) and find its ROI."""
    if opt.dicom and not path.is_dir():
        raise SatsError(f"--format {opt.fmt} needs a DICOM CT series folder as input (the output references its slices)")
    if path.is_dir():
        from sats.data.dicom import read_dicom_series  # pydicom only where DICOM is read

        ct = read_dicom_series(path, opt.series_uid)
    else:
        ct = read_image(path)
    check_ct(ct, str(path))
    pre = run.preprocessor(ct)
    return CaseInput(ct, pre, roi_for(run, ct, pre, opt))


def predict_file(run: LoadedRun | Ensemble, path: Path, paths: dict[str, Path], name: str, opt: PredictOptions,
                 prepared: CaseInput | None = None, on_window: Callable[[], None] | None = None) -> tuple[Prediction, str]:
    """One input, end to end: :func:`prepare_input` (unless ``prepared``), :func:`predict_case`
    and :func:`write_outputs` to ``paths`` (:func:`output_paths`). The steps ``sats predict``
    and ``sats serve`` share. Returns the prediction and a note for the log."""
    inp = prepared or prepare_input(run, path, opt)
    pred = predict_case(run, inp.ct, inp.pre, opt, on_window=on_window, region=inp.roi)
    return pred, write_outputs(pred, path, paths, name, opt, inp.ct)


def write_outputs(pred: Prediction, source: Path, paths: dict[str, Path], name: str, opt: PredictOptions, ct: Volume) -> str:
    """Write every output of one case (:func:`output_paths`); returns a note for the log.

    A case flagged ``review`` (:mod:`sats.predict.quality`) carries the flag where a planning
    system shows it: the ROI / segment is named ``GTVp (review)`` and the series description
    gives the reason. The verdict goes to ``{case}_qa.json``, the review sheet to
    ``{case}_review.png`` (and to the Secondary Capture with ``sc``). ``ct``: the input, HU."""
    import json

    from sats.data.io import write_image, write_text_atomic

    formats = opt.formats
    flagged = pred.flagged
    note = f" [review: {pred.qa['reason']}]" if flagged else ""
    roi_name = "GTVp (review)" if flagged else "GTVp"
    description = f"sats GTV - REVIEW: {pred.qa['reason']}" if flagged else "sats automatic GTV segmentation"
    if opt.dicom:
        from sats.predict.export import write_rtstruct, write_seg  # pydicom only where DICOM is written
    if "rtstruct" in formats:
        if not write_rtstruct(pred.mask, source, paths["rtstruct"], roi_name=roi_name, series_uid=opt.series_uid,
                              mask_name=name, description=description):
            note += " (empty: the RTSTRUCT holds the ROI without contours)"
    if "seg" in formats:
        write_seg(pred.mask, source, paths["seg"], segment_label=roi_name, series_uid=opt.series_uid, mask_name=name,
                  description=description)
    if "nifti" in formats:
        write_image(pred.mask, paths["nifti"])
    if opt.save_probabilities:
        write_image(pred.probabilities, paths["probabilities"])
    if opt.asymmetry_map and pred.asymmetry is not None:
        write_image(pred.asymmetry, paths["asymmetry"])
    if pred.qa:
        from sats.predict.review import review_image, write_review_png, write_review_sc

        box = native_box(pred.roi, pred.grid, pred.mask) if pred.roi is not None and pred.grid is not None else None
        sheet = review_image(ct, pred.mask, pred.qa, name, box)
        write_review_png(sheet, paths["review"])
        if "sc" in formats:
            write_review_sc(sheet, source, paths["sc"], pred.qa, series_uid=opt.series_uid)
        write_text_atomic(paths["qa"], json.dumps(pred.qa, indent=2))
    return note

