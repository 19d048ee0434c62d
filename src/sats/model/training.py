"""Training SATs: the patch stream and the two-stage loop (the case cache is :mod:`sats.model.cache`).

Read top to bottom: the patch stream, one optimiser step
(:func:`train_step`), then :func:`train`, a table of contents over named steps (set-up,
cases, restore, epoch, end of epoch). Stage 1 trains the Siamese encoder-decoder with
Dice + BCE, stage 2 adds the projection head and the margin loss; the ablations of the
paper's Table 3 and the U-Net baseline are options of the same loop (:mod:`sats.model.config`).

Runs unchanged under ``torchrun --nproc_per_node=N -m sats train ...`` (DDP, gloo on
CPU, nccl on GPU): every rank samples its own patches, gradients are averaged, and only
rank 0 validates and writes files.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

from sats.data.dataset import check_dataset, load_dataset_json, split_folds
from sats.evaluation.metrics import dice
from sats.geometry.preprocessing import IntensityStats
from sats.geometry.symmetry import mirror_lr
from sats.geometry.volume import SatsError
from sats.hardware import available_cores, cpu_has_native_bf16, keep_freed_memory
from sats.model.cache import add_asymmetry_maps, add_registered_mirrors, median_spacing, prepare_cases, prepare_unlabelled, unlabelled_inputs, uses_asymmetry_maps
from sats.model.config import TrainConfig, fit_to_data
from sats.model.losses import SegmentationLoss, asymmetric_mask, margin_loss
from sats.model.backbones import plan_backbone
from sats.model.network import SATsNet, count_parameters, to_preferred_layout
from sats.model.patches import AugmentConfig, CaseArrays, sample_patch
from sats.model.run import Run, RunConfig, lock_folder
from sats.predict.inference import sliding_window_probabilities
from sats.progress import progress_bar

__all__ = ["TrainResult", "train", "train_step"]


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


# --- the patch stream -------------------------------------------------------------------


class PatchStream(torch.utils.data.IterableDataset):
    """``iters * batch`` patches for one epoch: ``(image, label, m, labelled)`` with ``m`` the
    region the margin loss pushes apart (Eq. 1 / XOR from the label, or m_unsup) where the
    stage has the margin loss, else zeros. In those stages the first
    ``round(unlabelled_fraction * batch)`` patches of every batch (at most batch - 1) come
    from the unlabelled CTs. The random stream depends only on (seed, epoch, rank,
    worker), so a resumed run sees the same patches."""

    def __init__(self, cases: list[CaseArrays], cfg: TrainConfig, epoch: int, rank: int,
                 unlabelled: list[CaseArrays] | None = None) -> None:
        self.cases, self.cfg, self.epoch, self.rank = cases, cfg, epoch, rank
        self.augment = AugmentConfig(enabled=cfg.augment)
        self.with_margin = cfg.has_margin(cfg.stage(epoch))
        self.unlabelled = (unlabelled or []) if self.with_margin else []
        self.n_unlabelled = min(round(cfg.unlabelled_fraction * cfg.batch_size), cfg.batch_size - 1) if self.unlabelled else 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.cfg.seed, self.epoch, self.rank, worker])
        n = self.cfg.iters_per_epoch * self.cfg.batch_size
        for i in range(worker, n, n_workers):
            pool = self.unlabelled if i % self.cfg.batch_size < self.n_unlabelled else self.cases
            case = pool[rng.integers(len(pool))]
            force = rng.random() < self.cfg.foreground_fraction
            image, label, asym = sample_patch(case, self.cfg.patch_size, rng, force, self.augment)
            if not self.with_margin:
                m = np.zeros_like(label)
            elif asym is not None:
                m = asym
            else:
                m = asymmetric_mask(torch.from_numpy(label), region=self.cfg.asym_region).numpy().astype(np.uint8)  # type: ignore[arg-type]
            channels = image[None] if image.ndim == 3 else image  # (C, z, y, x)
            yield torch.from_numpy(channels), torch.from_numpy(label[None]), torch.from_numpy(m[None]), case.labelled


# --- one step -------------------------------------------------------------------------------


def poly_lr(base: float, epoch: int, epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay; ``epoch`` counts from 0 within the stage."""
    return base * (1 - epoch / epochs) ** exponent


@torch.no_grad()
def validate(model: SATsNet, cases: list[CaseArrays], cfg: TrainConfig, device: torch.device) -> float:
    """Mean Dice over whole validation volumes on the preprocessed grid (sliding window)."""
    model.eval()
    dices = []
    for case in cases:
        # eager: a compiled module would recompile for eval mode and the window batch sizes
        # of validation (minutes each on a GPU).
        prob, _ = sliding_window_probabilities(
            model, np.asarray(case.image), cfg.patch_size, overlap=cfg.val_overlap, device=device,
            precision="auto" if cfg.amp else "fp32", eager=True,  # bf16 on CPUs with native bf16; fp32 on CUDA, faster there
        )
        dices.append(dice(prob >= 0.5, case.label) / 100.0)
    model.train()
    return float(np.mean(dices))


def stage_optimizer(model: SATsNet, cfg: TrainConfig, stage: str, fused: bool | None = None) -> torch.optim.Optimizer:
    """Stage "1": the encoder-decoder at ``lr``. Stage "2": the head at ``lr``, the
    encoder-decoder at ``stage2_backbone_lr``. "joint": both at ``lr``. The head is
    trained only where the margin loss is on; parameters outside the stage are frozen.
    ``fused`` (default: on CUDA) updates all parameters in one kernel."""
    backbone = list(model.encoder_decoder.parameters())
    head = list(model.head.parameters()) if model.head is not None else []
    train_head = cfg.has_margin(stage) and bool(head)
    for p in head:
        p.requires_grad_(train_head)
    groups = [{"params": backbone, "lr": cfg.stage2_backbone_lr if stage == "2" else cfg.lr, "name": "backbone"}]
    if train_head:
        groups.append({"params": head, "lr": cfg.lr, "name": "head"})
    for g in groups:
        g["initial_lr"] = g["lr"]
    fused = {"fused": True} if (backbone[0].is_cuda if fused is None else fused) else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay, **fused)
    raise SatsError(f"optimizer must be sgd or adamw, not {cfg.optimizer!r}")


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
    m: torch.Tensor | None = None,
    labelled: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One optimiser step on a batch: patches ``x`` (B, C, D, H, W) (C = 1, the CT; 2 with a
    registered mirror) and labels ``s`` (B, 1, D, H, W).

    Siamese: Dice + BCE on both branches (the mirror's label is the mirrored label), plus
    ``beta`` times the margin loss where the stage has it. Not siamese (the U-Net
    baseline, early fusion): Dice + BCE on the CT's sample alone. Gradients are clipped to ``cfg.grad_clip``.
    ``m`` (B, 1, D, H, W) is the margin loss's asymmetric region (default: from ``s`` by
    ``cfg.asym_region``); ``labelled`` (B,) bool marks the patches that have a label:
    the others (unlabelled CTs) enter the margin loss only.
    Returns the loss terms as detached 0-d tensors on the device (reading them waits for
    the GPU, so the caller does that only now and then).
    """
    model = net.module if isinstance(net, DistributedDataParallel) else net
    with_margin = cfg.has_margin(stage)
    # Patches are centred on the mid-sagittal plane, so the flipped patch is the mirrored
    # case's window (every channel flipped along x, the left-right axis).
    x_mirror = mirror_lr(x) if cfg.siamese or model.needs_mirror else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        outputs = net(x, x_mirror, with_features=with_margin, mirror_pass=cfg.siamese)
        if cfg.siamese:
            logits, target = torch.cat([outputs["logits"], outputs["logits_mirror"]]), torch.cat([s, mirror_lr(s)])
        else:
            logits, target = outputs["logits"], s
    if labelled is not None and not bool(labelled.all()):
        keep = torch.cat([labelled, labelled]) if cfg.siamese else labelled
        logits, target = logits[keep], target[keep]
    terms = seg_loss(logits.float(), target)
    loss = terms["dice"] + terms["ce"]
    if with_margin:
        asym = asymmetric_mask(s, region=cfg.asym_region) if m is None else m.float()  # type: ignore[arg-type]
        terms["margin"] = margin_loss(outputs["proj"].float(), outputs["proj_mirror"].float(), asym, cfg.margin)
        loss = loss + cfg.beta * terms["margin"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    out = {k: v.detach() for k, v in terms.items()}
    out["loss"] = loss.detach()
    out.setdefault("margin", torch.zeros((), device=loss.device))
    return out


def uses_bf16(amp: bool, device: torch.device) -> bool:
    """Whether training autocasts to bf16: with ``amp``, on CUDA and on CPUs that compute
    bf16 natively (AMX or AVX512-BF16; the cpu preset's step 2.1x faster than fp32 on an
    AVX512-BF16 EPYC). Elsewhere bf16 is emulated and slower, so fp32."""
    return amp and (device.type == "cuda" or cpu_has_native_bf16())


def prepare_model(model: SATsNet, device: torch.device, amp: bool, compile: bool = False) -> SATsNet:
    """Move the model to ``device`` in its faster memory layout
    (:func:`sats.model.network.prefers_channels_last`). On CUDA cuDNN also picks its fastest
    kernels for the fixed patch size, and with ``compile`` the encoder-decoder is compiled
    in place (``nn.Module.compile``: the state dict keeps its keys), 2.1x the steps/s."""
    model = model.to(device)
    to_preferred_layout(model, model.encoder_decoder.plan, device, uses_bf16(amp, device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if compile:
            model.encoder_decoder.compile()
    return model


# --- the loop -----------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns: epochs in the log, validation Dice (last, best),
    seconds spent in this call, and the trained model (on every rank)."""

    epochs: int
    last_val_dice: float
    best_val_dice: float
    seconds: float
    model: SATsNet


@dataclass
class Setup:
    """Device and process group of this process. ``say`` prints on rank 0 only."""

    device: torch.device
    rank: int
    world: int
    distributed: bool
    say: Console


@dataclass
class Cases:
    """The preprocessed training and validation cases and the grid they live on."""

    train: list[CaseArrays]
    val: list[CaseArrays]
    stats: IntensityStats
    spacing: tuple[float, float, float]
    unlabelled: list[CaseArrays] = field(default_factory=list)


@dataclass
class LoopState:
    """What changes from epoch to epoch; a checkpoint is this plus the weights."""

    first: int  # the first epoch (from 0) this call runs
    history: list[dict] = field(default_factory=list)
    checkpoint: dict | None = None  # the resumed checkpoint, until its optimiser state is used
    stage: str = ""
    optimizer: torch.optim.Optimizer | None = None
    net: torch.nn.Module | None = None  # the model, DDP-wrapped when distributed


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
) -> TrainResult:
    """Train SATs on an nnU-Net-layout dataset into the RUN folder ``out`` (:mod:`sats.model.run`).

    ``stage`` is "1", "2" or "all"; ``resume`` continues from ``out/checkpoint.pt`` with
    the configuration stored there; ``max_epochs`` stops this call after that many epochs
    (the run stays resumable). Returns a :class:`TrainResult`.
    """
    env = setup(device, console)
    out = Path(out)
    with lock_folder(out) if env.rank == 0 else nullcontext():
        if resume:
            cfg = resumed_config(out)
        check_stage(cfg, stage)
        cases, cfg = load_cases(dataset, out, cfg, cache, env, fit=not resume)
        run, model = start_run(dataset, out, cfg, cases, env)
        state = restore(run, model, stage, resume)
        final = stage_span(cfg, stage)[1]
        last = final if max_epochs is None else min(final, state.first + max_epochs)
        t_start = time.time()
        for epoch in range(state.first, last):
            row = run_epoch(model, state, cases, cfg, epoch, env)
            end_of_epoch(run, model, state, row, cases, cfg, epoch, last, env)
        seconds = time.time() - t_start
        if env.rank == 0 and last == final:
            run.save_model(model)
            run.plot_curves(state.history)
            train_localiser(run, cases, cfg, env)
    result = _result(state.history, seconds, model)
    env.say.print(f"[bold green]done[/]: {result.epochs} epochs, this call {seconds / 60:.1f} min; validation Dice last "
                  f"{result.last_val_dice:.4f}, best {result.best_val_dice:.4f}; weights in {run.model_file}")
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


# --- the steps of train() ---------------------------------------------------------------------


def setup(device: str | None, console: Console | None) -> Setup:
    """Pick the device, join the process group under torchrun, and the console of rank 0."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        keep_freed_memory()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SatsError("--device cuda asked for, but no CUDA device is available")
    distributed = _setup_distributed(dev)
    rank, world = _dist_info()
    if dev.type == "cuda" and distributed:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    say = (console or Console()) if rank == 0 else Console(quiet=True)
    return Setup(dev, rank, world, distributed, say)


def resumed_config(out: Path) -> TrainConfig:
    """The configuration a run to be resumed was started with."""
    run = Run.open(out)
    if not run.checkpoint_file.exists():
        raise SatsError(f"{out}: nothing to resume (no checkpoint.pt)")
    return run.config.train


def check_stage(cfg: TrainConfig, stage: str) -> None:
    if stage not in ("1", "2", "all"):
        raise SatsError(f"stage must be 1, 2 or all, not {stage!r}")
    if stage != "all" and cfg.schedule == "joint":
        raise SatsError("the joint schedule has one stage: train it with --stage all")


def stage_span(cfg: TrainConfig, stage: str) -> tuple[int, int]:
    """(first, end) epochs, from 0, that ``stage`` covers."""
    return {"1": (0, cfg.stage1_epochs), "2": (cfg.stage1_epochs, cfg.total_epochs), "all": (0, cfg.total_epochs)}[stage]


def load_cases(dataset: Path, out: Path, cfg: TrainConfig, cache: Path | None, env: Setup,
               fit: bool) -> tuple[Cases, TrainConfig]:
    """Check the dataset, fit the grid to its spacing (``fit``: a copy of ``cfg`` with the
    fitted spacing and patch size is returned), preprocess or read the cache (rank 0 first),
    and split into training and validation cases."""
    if env.rank == 0:
        report = check_dataset(dataset)
        if report.problems:
            raise SatsError(f"{dataset}: fails `sats check` ({len(report.problems)} problem(s)); first: {report.problems[0]}")
    if fit:
        spacing, patch = fit_to_data(cfg, median_spacing(dataset))
        cfg = replace(cfg, spacing=spacing, patch_size=patch)
    cache = Path(cache) if cache else out / "cache"
    if env.rank == 0:
        arrays, stats, spacing = prepare_cases(dataset, cache, cfg, env.say)
    if env.distributed:
        dist.barrier()
    if env.rank != 0:
        arrays, stats, spacing = prepare_cases(dataset, cache, cfg, None, rank=env.rank)
    unlabelled_items = unlabelled_inputs(dataset, cfg)
    if unlabelled_items and not cfg.margin_loss:
        env.say.print(f"[yellow]{len(unlabelled_items)} unlabelled CT(s) left out:[/] without the margin loss they add nothing")
        unlabelled_items = []

    def asymmetry_inputs(console: Console | None) -> list[CaseArrays]:
        """The registered mirrors and m_unsup of the labelled cases where the run uses them, and the unlabelled CTs."""
        if cfg.fusion == "registered":
            add_registered_mirrors(dataset, cache, arrays, cfg, stats, console)
        if uses_asymmetry_maps(cfg):
            add_asymmetry_maps(dataset, cache, arrays, cfg, console)
        return prepare_unlabelled(unlabelled_items, cache / "unlabelled", cfg, stats, console) if unlabelled_items else []

    if env.rank == 0:
        unlabelled = asymmetry_inputs(env.say)
    if env.distributed:
        dist.barrier()
    if env.rank != 0:  # the cache is complete now: this only reads it
        unlabelled = asymmetry_inputs(None)
    train_ids, val_ids = split_folds([c.case_id for c in arrays], cfg.folds, cfg.fold)
    cases = Cases([c for c in arrays if c.case_id in set(train_ids)], [c for c in arrays if c.case_id in set(val_ids)], stats,
                  spacing, unlabelled)
    if unlabelled:
        env.say.print(f"{len(unlabelled)} unlabelled CT(s): {cfg.unlabelled_fraction:.0%} of each batch in the margin-loss stages")
    if not cases.train:
        raise SatsError(f"{dataset}: the training split is empty")
    if sum(len(c.fg) for c in cases.train) == 0:
        raise SatsError(f"{dataset}: every training label is empty")
    return cases, cfg


def start_run(dataset: Path, out: Path, cfg: TrainConfig, cases: Cases, env: Setup) -> tuple[Run, SATsNet]:
    """The RUN folder's configuration (written by rank 0, the same object on every rank)
    and the model, initialised from ``cfg.seed`` on every rank."""
    plan = plan_backbone(cfg.arch, cfg.patch_size, cases.spacing, cfg.preset, cfg.base_features, cfg.max_features)
    config = RunConfig(cfg, plan, cases.spacing, cases.stats, str(Path(dataset).resolve()), load_dataset_json(dataset)["labels"],
                       [c.case_id for c in cases.train], [c.case_id for c in cases.val], [c.case_id for c in cases.unlabelled])
    run = Run.create(out, config) if env.rank == 0 else Run(out, config)
    torch.manual_seed(cfg.seed)
    model = prepare_model(run.build_model(), env.device, cfg.amp, cfg.compile)
    env.say.print(
        f"[bold]sats train[/] {dataset} -> {out}  preset {cfg.preset}, patch {cfg.patch_size}, spacing "
        f"{tuple(round(s, 3) for s in cases.spacing)} mm, {count_parameters(model.encoder_decoder):,} parameters, "
        f"{len(cases.train)} train / {len(cases.val)} val cases, device {env.device} "
        f"({'bf16' if uses_bf16(cfg.amp, env.device) else 'fp32'}), {env.world} process(es)"
    )
    return run, model


def restore(run: Run, model: SATsNet, stage: str, resume: bool) -> LoopState:
    """Where this call starts: a resumed checkpoint, the stage-1 weights for stage 2, or scratch."""
    cfg = run.config.train
    if resume:
        ckpt = run.load_checkpoint(model)
        torch.set_rng_state(ckpt["torch_rng"])
        return LoopState(int(ckpt["epoch"]) + 1, list(ckpt["history"]), ckpt)
    if stage == "2":
        if not run.model_file.exists():
            raise SatsError(f"{run.path}: stage 2 needs the stage-1 weights in {run.model_file}")
        run.load_weights(model, run.model_file)
        return LoopState(cfg.stage1_epochs, run.read_log())
    return LoopState(stage_span(cfg, stage)[0])


def run_epoch(model: SATsNet, state: LoopState, cases: Cases, cfg: TrainConfig, epoch: int, env: Setup) -> dict:
    """One epoch of ``iters_per_epoch`` steps; returns its log row (mean loss terms)."""
    st = cfg.stage(epoch)
    if st != state.stage:  # a new stage (or the first epoch of this call): its optimiser
        state.optimizer = stage_optimizer(model, cfg, st)
        if state.checkpoint is not None and str(state.checkpoint["stage"]) == st:
            state.optimizer.load_state_dict(state.checkpoint["optimizer"])
        state.checkpoint = None
        # Feature fusion leaves the encoder-decoder's own output conv unused: DDP must be told.
        state.net = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                            find_unused_parameters=cfg.feature_fusion) if env.distributed else model
        state.stage = st
    assert state.optimizer is not None and state.net is not None
    e0, n_ep = stage_epochs(cfg, epoch)
    for g in state.optimizer.param_groups:
        g["lr"] = poly_lr(g["initial_lr"], e0, n_ep, cfg.poly_exponent)
    loader = torch.utils.data.DataLoader(PatchStream(cases.train, cfg, epoch, env.rank, cases.unlabelled), batch_size=cfg.batch_size,
                                         num_workers=loader_workers(cfg, env.device), pin_memory=env.device.type == "cuda")
    seg_loss, shown = SegmentationLoss(), ("loss", "dice", "ce", "margin") if cfg.has_margin(st) else ("loss", "dice", "ce")
    sums = {k: torch.zeros((), device=env.device) for k in ("loss", "dice", "ce", "margin")}
    t0 = time.time()
    model.train()
    with progress_bar(env.say, info=True) as progress:
        task = progress.add_task(f"epoch {epoch + 1}/{cfg.total_epochs} (stage {st})", total=cfg.iters_per_epoch, info="")
        for it, (x, s, m, labelled) in enumerate(loader, 1):
            x, s = x.to(env.device, non_blocking=True), s.to(env.device, non_blocking=True).float()
            m, labelled = m.to(env.device, non_blocking=True), labelled.to(env.device)
            terms = train_step(state.net, x, s, cfg, st, state.optimizer, seg_loss, uses_bf16(cfg.amp, env.device),
                               m=m, labelled=labelled)
            for k in sums:
                sums[k] += terms[k]
            # Reading the losses waits for the GPU: only every 10 steps.
            info = " ".join(f"{k} {float(sums[k]) / it:.3f}" for k in shown) if it % 10 == 0 or it == cfg.iters_per_epoch else None
            progress.update(task, advance=1, **({"info": info} if info else {}))
    groups = state.optimizer.param_groups
    row = {"epoch": epoch + 1, "stage": st, "lr": groups[0]["lr"], "lr_head": groups[1]["lr"] if len(groups) > 1 else 0.0}
    row.update({k: float(v) / cfg.iters_per_epoch for k, v in sums.items()})
    row["seconds"] = time.time() - t0
    return row


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """Patch-loader processes: ``cfg.num_workers``, or for -1 (auto) up to 8 on CUDA with a
    core left for the main process (with none the GPU waits on augmentation: about 2
    against 3.7 it/s measured on an H200) and none on CPU, where the cores train."""
    if cfg.num_workers >= 0:
        return cfg.num_workers
    if device.type != "cuda":
        return 0
    return max(0, min(8, available_cores() - 1))


def end_of_epoch(run: Run, model: SATsNet, state: LoopState, row: dict, cases: Cases, cfg: TrainConfig,
                 epoch: int, last: int, env: Setup) -> None:
    """Validate (rank 0, every ``val_every`` epochs and at the end), log, checkpoint."""
    row["val_dice"] = float("nan")
    if env.rank == 0 and cases.val and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == last):
        row["val_dice"] = validate(model, cases.val, cfg, env.device)
    state.history.append(row)
    if env.rank == 0:
        env.say.print(f"  epoch {epoch + 1}: loss {row['loss']:.4f}  val Dice {row['val_dice']:.4f}  ({row['seconds']:.1f} s)")
        if epoch == state.first and last > epoch + 1:
            left = (cfg.total_epochs - epoch - 1) * row["seconds"]
            env.say.print(f"  projected: {left / 3600:.1f} h for the {cfg.total_epochs - epoch - 1} epochs left of the schedule "
                          f"({cfg.total_epochs} x {cfg.iters_per_epoch} iterations) at this epoch's speed")
        e0, n_ep = stage_epochs(cfg, epoch)
        assert state.optimizer is not None
        run.save_checkpoint({
            "epoch": epoch, "stage": state.stage, "model": model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "history": state.history, "torch_rng": torch.get_rng_state(),
            "lr_schedule": {"kind": "poly", "exponent": cfg.poly_exponent, "stage_epoch": e0, "stage_epochs": n_ep},
        })
        run.write_log(state.history)
    if env.distributed:
        dist.barrier()


def train_localiser(run: Run, cases: Cases, cfg: TrainConfig, env: Setup) -> None:
    """Fit the ROI localiser (:mod:`sats.predict.roi`) on every labelled case of the run, once."""
    from sats.predict.roi import fit_localiser, save_localiser

    if run.localiser_file.exists() or cfg.localiser_iters == 0:
        return
    t0 = time.time()
    # Never longer than the network itself trained (a short test run stays short).
    iterations = min(cfg.localiser_iters, cfg.total_epochs * cfg.iters_per_epoch)
    localiser = fit_localiser(cases.train + cases.val, cases.spacing, seed=cfg.seed, iterations=iterations,
                              device=env.device)
    save_localiser(localiser, run.localiser_file)
    env.say.print(f"ROI localiser trained in {time.time() - t0:.0f} s -> {run.localiser_file}")


def _result(history: list[dict], seconds: float, model: SATsNet) -> TrainResult:
    vals = [r["val_dice"] for r in history if not math.isnan(r["val_dice"])]
    return TrainResult(len(history), vals[-1] if vals else float("nan"), max(vals) if vals else float("nan"), seconds, model)
