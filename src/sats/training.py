"""Training SATs: configuration, the cached preprocessing, and the two-stage loop.

Read top to bottom: :class:`TrainConfig` (the paper's values are the defaults), the
``cpu`` preset, the case cache, then :func:`train`, which runs stage 1 (Siamese
encoder-decoder, Dice + BCE) and stage 2 (projection head + margin loss) with the same
loop; the ablations of the paper's Table 3 are flags of that loop.

Runs unchanged under ``torchrun --nproc_per_node=N -m sats train ...`` (DDP, gloo on
CPU, nccl on GPU): every rank samples its own patches, gradients are averaged, and only
rank 0 validates and writes files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel

from sats import __version__
from sats.dataset import check_dataset, list_cases, load_dataset_json
from sats.inference import sliding_window_probabilities
from sats.io import SatsError, atomic_path, read_image, write_text_atomic
from sats.losses import SegmentationLoss, asymmetric_mask, margin_loss
from sats.network import SATsNet, count_parameters, plan_network
from sats.patches import AugmentConfig, CaseArrays, sample_patch
from sats.preprocessing import IntensityStats, foreground_samples, intensity_stats, preprocess
from sats.symmetry import mirror_lr

#: Bumped when RUN folders stop being readable by older code.
RUN_FORMAT = 1


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's (Sec. 3.3)."""

    preset: str = "paper"
    patch_size: tuple[int, int, int] = (56, 192, 192)
    spacing: tuple[float, float, float] | None = None  # None: the dataset's median spacing
    align: bool = True  # resample each CT about its own mid-sagittal plane (sats.alignment)
    atlas: str | None = None  # symmetric atlas image: find the plane by affine registration to it
    base_features: int = 32
    max_features: int = 320
    residual: bool = False
    batch_size: int = 2
    stage1_epochs: int = 800
    stage2_epochs: int = 200
    iters_per_epoch: int = 250
    optimizer: str = "sgd"  # "sgd" (the paper: Nesterov momentum) or "adamw"
    lr: float = 1e-2  # stage 1, and the head in stage 2
    stage2_backbone_lr: float = 1e-5
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    projection_head: bool = True
    head_channels: int = 16
    margin_loss: bool = True
    margin: float = 20.0
    # The paper gives no beta. 0.1 keeps the margin term (about 16-20 for asymmetric
    # voxels, 0-4 for symmetric ones) on the scale of Dice + BCE.
    beta: float = 0.1
    asym_region: str = "paper"  # "paper" (Eq. 1) or "union" (s XOR s')
    foreground_fraction: float = 1 / 3
    augment: bool = True
    folds: int = 5
    fold: int | str = 0  # 0..folds-1, or "all" (no validation)
    val_every: int = 1
    val_overlap: float = 0.5
    seed: int = 0
    num_workers: int = 0
    amp: bool = True  # bf16 autocast on CUDA
    # Ablations and baselines (sats ablation): siamese=False trains the encoder-decoder on
    # the CT alone (a plain U-Net with left-right flip augmentation); schedule "joint" runs
    # the head and the margin loss from the first epoch in one stage of total_epochs.
    siamese: bool = True
    schedule: str = "two-stage"  # "two-stage" (the paper) or "joint"
    # When the preset's spacing is more than 1.5 times finer than the data's median along an
    # axis, use the data's spacing there and a patch covering the same millimetres.
    follow_data: bool = True
    grad_clip: float = 12.0

    def __post_init__(self) -> None:
        if self.schedule not in ("two-stage", "joint"):
            raise SatsError(f"schedule must be two-stage or joint, not {self.schedule!r}")
        if self.margin_loss and not self.siamese:
            raise SatsError("the margin loss compares the two branches: it needs siamese=True")

    @property
    def total_epochs(self) -> int:
        return self.stage1_epochs + self.stage2_epochs

    def stage(self, epoch: int) -> str:
        """The stage an epoch (from 0) belongs to: "1", "2" or "joint"."""
        if self.schedule == "joint":
            return "joint"
        return "1" if epoch < self.stage1_epochs else "2"


def fit_to_data(cfg: TrainConfig, data_spacing: tuple[float, float, float]) -> tuple[tuple, tuple]:
    """(spacing, patch size) to train at: the configuration's, except where
    ``cfg.follow_data`` and the configured spacing would up-sample the data more than 1.5
    times along an axis; there the data's spacing and a patch of the same extent in mm
    (rounded up to a multiple of 8 voxels, at least 16) are used.

    Example:
        >>> cfg = preset("cpu")  # 24 x 80 x 80 voxels at 3 x 1.6 x 1.6 mm
        >>> fit_to_data(cfg, (2.5, 3.9, 3.9))  # OpenKBP: 4 mm in-plane
        ((3.0, 3.9, 3.9), (24, 40, 40))
    """
    if cfg.spacing is None:
        return tuple(float(s) for s in data_spacing), tuple(cfg.patch_size)
    spacing, patch = list(cfg.spacing), list(cfg.patch_size)
    if cfg.follow_data:
        for a in range(3):
            if data_spacing[a] > 1.5 * cfg.spacing[a]:
                mm = cfg.patch_size[a] * cfg.spacing[a]
                spacing[a] = float(data_spacing[a])
                patch[a] = max(16, int(8 * math.ceil(mm / spacing[a] / 8)))
    return tuple(float(s) for s in spacing), tuple(int(p) for p in patch)


def preset(name: str) -> TrainConfig:
    """``paper``: the paper's configuration. ``cpu``: small enough to train on the
    default phantom in under ten minutes on 2 cores: coarser spacing, 8 base features,
    19 short epochs, more tumour patches, and AdamW, which gets a small network going
    within a few hundred iterations where SGD at momentum 0.99 needs thousands. The
    stage-2 learning rates keep the paper's 1000:1 ratio of head to encoder-decoder."""
    if name == "paper":
        return TrainConfig()
    if name == "cpu":
        return TrainConfig(
            preset="cpu", patch_size=(24, 80, 80), spacing=(3.0, 1.6, 1.6), base_features=8,
            max_features=128, stage1_epochs=16, stage2_epochs=3, iters_per_epoch=25, batch_size=2,
            optimizer="adamw", lr=3e-3, stage2_backbone_lr=3e-6, foreground_fraction=0.5, val_every=2,
        )
    raise SatsError(f"unknown preset {name!r} (paper or cpu)")


# --- distributed helpers ----------------------------------------------------------------


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _setup_distributed(device: torch.device) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


# --- the case cache ---------------------------------------------------------------------


def _cache_key(files: list[Path], spacing, stats: IntensityStats, align: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"spacing": list(spacing), "stats": stats.to_dict(), "align": align, "v": RUN_FORMAT}).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def alignment_mode(cfg: TrainConfig) -> str:
    return "none" if not cfg.align else (f"atlas:{Path(cfg.atlas).resolve()}" if cfg.atlas else "self")


def prepare_cases(dataset: Path, cache: Path, cfg: TrainConfig, console: Console, rank: int = 0) -> tuple[list[CaseArrays], IntensityStats, tuple]:
    """Preprocess every training case once (align, resample, crop to the body, normalise)
    and cache the arrays as .npy under ``cache``; later runs reuse them."""
    from sats.alignment import estimate_plane

    if cfg.spacing is None:
        raise ValueError("prepare_cases needs cfg.spacing set (see fit_to_data)")
    spacing = tuple(float(v) for v in cfg.spacing)
    align = alignment_mode(cfg)
    cases = training_cases(dataset)
    meta_file = cache / "meta.json"
    files = [c.image for c in cases] + [c.label for c in cases]  # type: ignore[misc]
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        stats = IntensityStats(**meta["stats"])
        if meta.get("key") == _cache_key(files, spacing, stats, align) and meta.get("spacing") == list(spacing):
            return _load_cache(cache, [c.case_id for c in cases]), stats, spacing
    if rank != 0:
        raise SatsError("the training cache must be prepared by rank 0 first")
    cache.mkdir(parents=True, exist_ok=True)
    volumes = []
    with _progress(console) as progress:
        task = progress.add_task("reading", total=len(cases))
        samples = []
        for c in cases:
            ct, lab = read_image(c.image), read_image(c.label)  # type: ignore[arg-type]
            volumes.append((ct, lab))
            samples.append(foreground_samples(ct, lab))
            progress.advance(task)
        stats = intensity_stats(samples)
        task = progress.add_task("aligning and preprocessing" if cfg.align else "preprocessing", total=len(cases))
        atlas = read_image(cfg.atlas) if cfg.align and cfg.atlas else None
        planes = {}
        for c, (ct, lab) in zip(cases, volumes):
            plane = None
            if cfg.align:
                try:
                    result = estimate_plane(ct, atlas)
                except SatsError as exc:
                    raise SatsError(f"{c.image}: {exc}") from None
                plane = result.plane
                planes[c.case_id] = result.to_dict()
            pre = preprocess(ct, spacing, stats, label=lab, plane=plane)
            np.save(cache / f"{c.case_id}_image.npy", pre.image)
            np.save(cache / f"{c.case_id}_label.npy", pre.label)
            progress.advance(task)
    write_text_atomic(meta_file, json.dumps({"key": _cache_key(files, spacing, stats, align), "spacing": list(spacing),
                                             "stats": stats.to_dict(), "align": align, "planes": planes}, indent=2))
    return _load_cache(cache, [c.case_id for c in cases]), stats, spacing


def training_cases(dataset: Path):
    """The labelled training cases of a dataset (an error when there are none or a label is missing)."""
    cases = list_cases(dataset, "Tr")
    if not cases:
        raise SatsError(f"{dataset}: no training cases in imagesTr")
    missing = [c.case_id for c in cases if c.label is None]
    if missing:
        raise SatsError(f"{dataset}: no label for {', '.join(missing[:5])} (run `sats check {dataset}`)")
    return cases


def median_spacing(dataset: Path) -> tuple[float, float, float]:
    """Median voxel spacing (z, y, x) mm of the training images (read from the headers)."""
    spacings = [read_image_header_spacing(c.image) for c in training_cases(dataset)]
    return tuple(float(v) for v in np.median(np.array(spacings), axis=0))  # type: ignore[return-value]


def read_image_header_spacing(path: Path) -> tuple[float, float, float]:
    import SimpleITK as sitk

    if path.is_dir():
        return read_image(path).spacing
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return read_image(path).spacing  # raises a clean SatsError
    return tuple(reader.GetSpacing()[::-1])  # type: ignore[return-value]


def _load_cache(cache: Path, ids: list[str]) -> list[CaseArrays]:
    out = []
    for cid in ids:
        image = np.load(cache / f"{cid}_image.npy", mmap_mode="r", allow_pickle=False)
        label = np.load(cache / f"{cid}_label.npy", allow_pickle=False)
        out.append(CaseArrays(cid, image, label, np.argwhere(label > 0)))
    return out


def split_folds(ids: list[str], folds: int, fold: int | str, seed: int = 12345) -> tuple[list[str], list[str]]:
    """Train/validation ids for ``fold`` of a ``folds``-fold split by case id (fixed seed)."""
    if fold == "all":
        return sorted(ids), []
    fold = int(fold)
    if not 0 <= fold < folds:
        raise SatsError(f"fold {fold} out of range 0..{folds - 1}")
    order = sorted(ids)
    np.random.default_rng(seed).shuffle(order)
    val = sorted(order[fold::folds])
    return sorted(set(ids) - set(val)), val


# --- the patch stream -------------------------------------------------------------------


class PatchStream(torch.utils.data.IterableDataset):
    """``iters * batch`` patches for one epoch. The random stream depends only on
    (seed, epoch, rank, worker), so a resumed run sees the same patches."""

    def __init__(self, cases: list[CaseArrays], cfg: TrainConfig, epoch: int, rank: int) -> None:
        self.cases, self.cfg, self.epoch, self.rank = cases, cfg, epoch, rank
        self.augment = AugmentConfig(enabled=cfg.augment)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, worker])
        n = self.cfg.iters_per_epoch * self.cfg.batch_size
        for _ in range(worker, n, n_workers):
            case = self.cases[rng.integers(len(self.cases))]
            force = rng.random() < self.cfg.foreground_fraction
            image, label = sample_patch(case, self.cfg.patch_size, rng, force, self.augment)
            yield torch.from_numpy(image[None]), torch.from_numpy(label[None])


@dataclass
class TrainResult:
    """What :func:`train` returns: epochs in the log, validation Dice (last, best),
    seconds spent in this call, and the trained model (on every rank)."""

    epochs: int
    last_val_dice: float
    best_val_dice: float
    seconds: float
    model: SATsNet


# --- the loop -----------------------------------------------------------------------------


def _progress(console: Console, info: bool = False) -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if info:
        columns += [TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    return Progress(*columns, console=console)


def poly_lr(base: float, epoch: int, epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay; ``epoch`` counts from 0 within the stage."""
    return base * (1 - epoch / epochs) ** exponent


@torch.no_grad()
def validate(model: SATsNet, cases: list[CaseArrays], cfg: TrainConfig, device: torch.device) -> float:
    """Mean Dice over whole validation volumes on the preprocessed grid (sliding window)."""
    model.eval()
    dices = []
    for case in cases:
        prob, _ = sliding_window_probabilities(
            model.encoder_decoder, np.asarray(case.image), cfg.patch_size, overlap=cfg.val_overlap, device=device,
        )
        pred, ref = prob >= 0.5, case.label > 0
        denom = pred.sum() + ref.sum()
        dices.append(1.0 if denom == 0 else 2.0 * np.logical_and(pred, ref).sum() / denom)
    model.train()
    return float(np.mean(dices))


def stage_optimizer(model: SATsNet, cfg: TrainConfig, stage: str) -> torch.optim.Optimizer:
    """Stage "1": the encoder-decoder at ``lr``. Stage "2": the head at ``lr``, the
    encoder-decoder at ``stage2_backbone_lr``. "joint": both at ``lr``. The head is
    trained only where the margin loss is on; parameters outside the stage are frozen."""
    backbone = list(model.encoder_decoder.parameters())
    head = list(model.head.parameters()) if model.head is not None else []
    train_head = stage in ("2", "joint") and cfg.margin_loss and bool(head)
    for p in head:
        p.requires_grad_(train_head)
    groups = [{"params": backbone, "lr": cfg.stage2_backbone_lr if stage == "2" else cfg.lr, "name": "backbone"}]
    if train_head:
        groups.append({"params": head, "lr": cfg.lr, "name": "head"})
    for g in groups:
        g["initial_lr"] = g["lr"]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)


def stage_epochs(cfg: TrainConfig, epoch: int) -> tuple[int, int]:
    """(epoch within its stage, epochs of that stage): the clock of the poly schedule."""
    stage = cfg.stage(epoch)
    if stage == "2":
        return epoch - cfg.stage1_epochs, cfg.stage2_epochs
    return epoch, (cfg.total_epochs if stage == "joint" else cfg.stage1_epochs)


def train_step(
    net: torch.nn.Module,
    x: torch.Tensor,
    s: torch.Tensor,
    cfg: TrainConfig,
    stage: str,
    optimizer: torch.optim.Optimizer,
    seg_loss: SegmentationLoss,
    use_amp: bool = False,
) -> dict[str, float]:
    """One optimiser step on a batch: CT patches ``x`` and labels ``s``, (B, 1, D, H, W).

    Siamese: Dice + BCE on both branches (the mirror's label is the mirrored label), plus
    ``beta`` times the margin loss where the stage has it. Not siamese (the U-Net
    baseline): Dice + BCE on the CT alone. Gradients are clipped to ``cfg.grad_clip``.
    Returns the loss terms as floats.
    """
    model = net.module if isinstance(net, DistributedDataParallel) else net
    with_margin = stage in ("2", "joint") and cfg.margin_loss
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        if cfg.siamese:
            outputs = net(x, mirror_lr(x), with_features=with_margin)
            logits, target = torch.cat([outputs["logits"], outputs["logits_mirror"]]), torch.cat([s, mirror_lr(s)])
        else:
            outputs = net(x, None, with_features=False)
            logits, target = outputs["logits"], s
    terms = seg_loss(logits.float(), target)
    loss = terms["dice"] + terms["ce"]
    if with_margin:
        asym = asymmetric_mask(s, region=cfg.asym_region)  # type: ignore[arg-type]
        terms["margin"] = margin_loss(outputs["proj"].float(), outputs["proj_mirror"].float(), asym, cfg.margin)
        loss = loss + cfg.beta * terms["margin"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    out = {k: float(v.detach()) for k, v in terms.items()}
    out["loss"] = float(loss.detach())
    out.setdefault("margin", 0.0)
    return out


def config_from_dict(d: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
    return TrainConfig(**d)


def train(
    dataset: Path,
    out: Path,
    cfg: TrainConfig,
    stage: str = "all",
    resume: bool = False,
    cache: Path | None = None,
    device: str | None = None,
    console: Console | None = None,
    max_epochs: int | None = None,
) -> "TrainResult":
    """Train SATs on an nnU-Net-layout dataset into the RUN folder ``out``.

    ``out`` receives ``config.json``, ``checkpoint.pt`` (every epoch, atomic),
    ``model.pt`` (final weights), ``log.csv`` and ``curves.png``.
    ``max_epochs`` stops this call after that many epochs (the run stays resumable).
    Returns a :class:`TrainResult`.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    distributed = _setup_distributed(dev)
    rank, world = _dist_info()
    if dev.type == "cuda" and distributed:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    console = console or Console()
    quiet = Console(quiet=True)
    say = console if rank == 0 else quiet
    out = Path(out)
    if resume:
        if not (out / "checkpoint.pt").exists():
            raise SatsError(f"{out}: nothing to resume (no checkpoint.pt)")
        saved = _read_config(out)
        cfg = config_from_dict(saved["train"])
    if stage not in ("1", "2", "all"):
        raise SatsError(f"stage must be 1, 2 or all, not {stage!r}")
    if stage != "all" and cfg.schedule == "joint":
        raise SatsError("the joint schedule has one stage: train it with --stage all")

    if rank == 0:
        report = check_dataset(dataset)
        if report.problems:
            raise SatsError(f"{dataset}: fails `sats check` ({len(report.problems)} problem(s)); first: {report.problems[0]}")
    # The grid to train on: the configuration's, fitted to the data's spacing.
    if not resume:
        cfg.spacing, cfg.patch_size = fit_to_data(cfg, median_spacing(dataset))
    # Cases: rank 0 preprocesses, the others read its cache.
    cache = Path(cache) if cache else out / "cache"
    if rank == 0:
        cases, stats, spacing = prepare_cases(dataset, cache, cfg, say)
    if distributed:
        dist.barrier()
    if rank != 0:
        cases, stats, spacing = prepare_cases(dataset, cache, cfg, quiet, rank=rank)
    train_ids, val_ids = split_folds([c.case_id for c in cases], cfg.folds, cfg.fold)
    train_cases = [c for c in cases if c.case_id in set(train_ids)]
    val_cases = [c for c in cases if c.case_id in set(val_ids)]
    if not train_cases:
        raise SatsError(f"{dataset}: the training split is empty")
    if sum(len(c.fg) for c in train_cases) == 0:
        raise SatsError(f"{dataset}: every training label is empty")

    torch.manual_seed(cfg.seed)
    plan = plan_network(cfg.patch_size, spacing, cfg.base_features, cfg.max_features)
    model = SATsNet(plan, residual=cfg.residual, projection_head=cfg.projection_head, head_channels=cfg.head_channels).to(dev)
    run_config = {
        "format": RUN_FORMAT, "sats_version": __version__, "train": asdict(cfg), "plan": asdict(plan),
        "spacing": list(spacing), "intensity": stats.to_dict(), "dataset": str(Path(dataset).resolve()),
        "labels": load_dataset_json(dataset)["labels"], "train_ids": train_ids, "val_ids": val_ids,
    }

    first, last = {"1": (0, cfg.stage1_epochs), "2": (cfg.stage1_epochs, cfg.total_epochs), "all": (0, cfg.total_epochs)}[stage]
    final = last
    history: list[dict] = []
    ckpt = None
    if resume:
        ckpt = torch.load(out / "checkpoint.pt", map_location=dev, weights_only=True)
        _check_format(ckpt, out / "checkpoint.pt")
        model.load_state_dict(ckpt["model"])
        history = list(ckpt["history"])
        first = int(ckpt["epoch"]) + 1
        torch.set_rng_state(ckpt["torch_rng"])
    elif stage == "2":
        weights = out / "model.pt"
        if not weights.exists():
            raise SatsError(f"{out}: stage 2 needs the stage-1 weights in {weights}")
        state = torch.load(weights, map_location=dev, weights_only=True)
        _check_format(state, weights)
        model.load_state_dict(state["model"])
        history = _read_log(out / "log.csv")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(run_config, indent=2))
        say.print(
            f"[bold]sats train[/] {dataset} -> {out}  preset {cfg.preset}, patch {cfg.patch_size}, spacing "
            f"{tuple(round(s, 3) for s in spacing)} mm, {count_parameters(model.encoder_decoder):,} parameters, "
            f"{len(train_cases)} train / {len(val_cases)} val cases, device {dev}, {world} process(es)"
        )

    seg_loss = SegmentationLoss()
    optimizer, net, current_stage = None, model, ""
    use_amp = cfg.amp and dev.type == "cuda"
    t_start = time.time()
    if max_epochs is not None:
        last = min(last, first + max_epochs)
    for epoch in range(first, last):
        st = cfg.stage(epoch)
        if st != current_stage:
            optimizer = stage_optimizer(model, cfg, st)
            if ckpt is not None and str(ckpt["stage"]) == st:
                optimizer.load_state_dict(ckpt["optimizer"])
            net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None) if distributed else model
            current_stage = st
        e0, n_ep = stage_epochs(cfg, epoch)
        for g in optimizer.param_groups:
            g["lr"] = poly_lr(g["initial_lr"], e0, n_ep, cfg.poly_exponent)
        with_margin = st in ("2", "joint") and cfg.margin_loss
        loader = torch.utils.data.DataLoader(
            PatchStream(train_cases, cfg, epoch, rank), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
            pin_memory=dev.type == "cuda", persistent_workers=False,
        )
        sums = {"loss": 0.0, "dice": 0.0, "ce": 0.0, "margin": 0.0}
        t0 = time.time()
        model.train()
        with _progress(say, info=True) as progress:
            task = progress.add_task(f"epoch {epoch + 1}/{cfg.total_epochs} (stage {st})", total=cfg.iters_per_epoch, info="")
            for it, (x, s) in enumerate(loader, 1):
                x, s = x.to(dev, non_blocking=True), s.to(dev, non_blocking=True).float()
                terms = train_step(net, x, s, cfg, st, optimizer, seg_loss, use_amp)
                for k in sums:
                    sums[k] += terms[k]
                progress.update(task, advance=1, info=" ".join(f"{k} {v / it:.3f}" for k, v in sums.items() if k != "margin" or with_margin))
        row = {"epoch": epoch + 1, "stage": st, "lr": optimizer.param_groups[0]["lr"],
               "lr_head": optimizer.param_groups[1]["lr"] if len(optimizer.param_groups) > 1 else 0.0}
        row.update({k: v / cfg.iters_per_epoch for k, v in sums.items()})
        row["val_dice"] = float("nan")
        if rank == 0 and val_cases and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == last):
            row["val_dice"] = validate(model, val_cases, cfg, dev)
        row["seconds"] = time.time() - t0
        history.append(row)
        if rank == 0:
            say.print(f"  epoch {epoch + 1}: loss {row['loss']:.4f}  val Dice {row['val_dice']:.4f}  ({row['seconds']:.1f} s)")
            _save(out / "checkpoint.pt", {
                "format": RUN_FORMAT, "epoch": epoch, "stage": st, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "history": history, "torch_rng": torch.get_rng_state(),
                "lr_schedule": {"kind": "poly", "exponent": cfg.poly_exponent, "stage_epoch": e0, "stage_epochs": n_ep},
            })
            _write_log(out / "log.csv", history)
        if distributed:
            dist.barrier()

    seconds = time.time() - t_start
    if rank == 0 and last == final:
        _save(out / "model.pt", {"format": RUN_FORMAT, "model": model.state_dict()})
        _plot_curves(history, out / "curves.png", cfg.stage1_epochs)
    vals = [r["val_dice"] for r in history if not math.isnan(r["val_dice"])]
    result = TrainResult(len(history), vals[-1] if vals else float("nan"), max(vals) if vals else float("nan"), seconds, model)
    if rank == 0:
        say.print(
            f"[bold green]done[/]: {result.epochs} epochs, this call {seconds / 60:.1f} min; validation Dice last "
            f"{result.last_val_dice:.4f}, best {result.best_val_dice:.4f}; weights in {out / 'model.pt'}"
        )
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


# --- RUN folder files ----------------------------------------------------------------------


def _save(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _check_format(obj, path: Path) -> None:
    if not isinstance(obj, dict) or obj.get("format") != RUN_FORMAT:
        raise SatsError(f"{path}: written by an incompatible sats version (format {obj.get('format') if isinstance(obj, dict) else '?'}, expected {RUN_FORMAT})")


def _read_config(run: Path) -> dict:
    path = run / "config.json"
    if not path.exists():
        raise SatsError(f"{run}: not a sats RUN folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SatsError(f"{path}: invalid JSON ({exc.msg})") from None
    _check_format(config, path)
    return config


LOG_COLUMNS = ["epoch", "stage", "lr", "lr_head", "loss", "dice", "ce", "margin", "val_dice", "seconds"]


def _write_log(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for row in history:
                writer.writerow({k: row[k] for k in LOG_COLUMNS})


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as fh:
        return [{k: (int(v) if k == "epoch" else v if k == "stage" else float(v)) for k, v in row.items()} for row in csv.DictReader(fh)]


def _plot_curves(history: list[dict], path: Path, stage1_epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in ("loss", "dice", "ce"):
        ax1.plot(ep, [r[k] for r in history], label=k)
    if any(r["margin"] for r in history):
        ax1.plot(ep, [r["margin"] for r in history], label="margin")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("training loss"), ax1.legend()
    ax2.plot(ep, [r["val_dice"] for r in history], "o-", ms=3)
    ax2.set_xlabel("epoch"), ax2.set_ylabel("validation Dice"), ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.axvline(stage1_epochs + 0.5, color="grey", ls="--", lw=0.8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
