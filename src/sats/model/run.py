"""The RUN folder: one trained (or training) model and everything needed to use it.

A RUN folder holds::

    config.json     RunConfig: the TrainConfig, network plan, grid spacing (z, y, x) mm,
                    intensity normalisation, dataset, labels and the train/validation split
    model.pt        final weights {"format", "model"}
    localiser.pt    the ROI localiser (sats.predict.roi) {"format", "channels", "model"}
    checkpoint.pt   the last finished epoch: weights, optimiser, history, RNG state
    log.csv         one row per epoch (LOG_COLUMNS); curves.png draws it
    .lock           held (fcntl) while `sats train` writes into the folder

:class:`Run` is the only code that reads or writes these files. Every file is written
atomically, every ``torch.load`` is ``weights_only=True``, and every damaged or foreign
file is one :class:`SatsError` naming it.

Example:
    >>> run = Run.open("runs/sats")                  # doctest: +SKIP
    >>> model = run.load_model(device="cpu")         # SATsNet in eval mode
    >>> run.config.spacing, run.config.train.patch_size
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch

from sats import __version__
from sats.data.io import atomic_path, write_text_atomic
from sats.geometry.preprocessing import IntensityStats
from sats.geometry.volume import SatsError
from sats.model.config import TrainConfig
from sats.model.network import NetworkPlan, SATsNet, to_preferred_layout

#: Bumped when RUN folders stop being readable by older code.
RUN_FORMAT = 1

#: The files of a RUN folder (see the module docstring).
CONFIG_FILE, MODEL_FILE, LOCALISER_FILE, CHECKPOINT_FILE = "config.json", "model.pt", "localiser.pt", "checkpoint.pt"
LOG_FILE, CURVES_FILE = "log.csv", "curves.png"

LOG_COLUMNS = ["epoch", "stage", "lr", "lr_head", "loss", "dice", "ce", "margin", "val_dice", "seconds"]


def config_from_dict(d: dict) -> TrainConfig:
    """A TrainConfig from its JSON form (lists become tuples, unknown keys are ignored)."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})


@dataclass
class RunConfig:
    """What ``config.json`` holds. ``spacing`` is the training grid, (z, y, x) mm."""

    train: TrainConfig
    plan: NetworkPlan
    spacing: tuple[float, float, float]
    intensity: IntensityStats
    dataset: str = ""
    labels: dict = field(default_factory=lambda: {"background": 0, "GTV": 1})
    train_ids: list[str] = field(default_factory=list)
    val_ids: list[str] = field(default_factory=list)
    unlabelled_ids: list[str] = field(default_factory=list)  # unlabelled CTs the margin loss used

    def to_dict(self) -> dict:
        return {"format": RUN_FORMAT, "sats_version": __version__, "train": asdict(self.train), "plan": asdict(self.plan),
                "spacing": list(self.spacing), "intensity": self.intensity.to_dict(), "dataset": self.dataset,
                "labels": self.labels, "train_ids": self.train_ids, "val_ids": self.val_ids,
                "unlabelled_ids": self.unlabelled_ids}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(config_from_dict(d["train"]), NetworkPlan.from_dict(d["plan"]), tuple(float(v) for v in d["spacing"]),  # type: ignore[arg-type]
                   IntensityStats(**d["intensity"]), str(d.get("dataset", "")), dict(d.get("labels", {})),
                   list(d.get("train_ids", [])), list(d.get("val_ids", [])), list(d.get("unlabelled_ids", [])))


def check_format(obj: object, path: Path) -> None:
    """Refuse a file written by another RUN format (or not by sats at all)."""
    if not isinstance(obj, dict) or obj.get("format") != RUN_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else "?"
        raise SatsError(f"{path}: written by an incompatible sats version (format {found}, expected {RUN_FORMAT})")


class Run:
    """A RUN folder. :meth:`create` starts one, :meth:`open` reads an existing one."""

    def __init__(self, path: str | os.PathLike, config: RunConfig) -> None:
        self.path = Path(path)
        self.config = config

    # --- the files -----------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def localiser_file(self) -> Path:
        return self.path / LOCALISER_FILE

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def curves_file(self) -> Path:
        return self.path / CURVES_FILE

    # --- create and open -----------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, config: RunConfig) -> Run:
        """Write ``config.json`` (atomically) into ``path``, creating the folder."""
        run = cls(path, config)
        run.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.config_file, json.dumps(config.to_dict(), indent=2))
        return run

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        """Read an existing RUN folder's ``config.json``; a clear error if it is not one."""
        path = Path(path)
        if not path.is_dir():
            raise SatsError(f"{path}: no such RUN folder")
        return cls(path, read_config(path / CONFIG_FILE))

    # --- the model -----------------------------------------------------------------------
    def build_model(self) -> SATsNet:
        """The network of this run, freshly initialised (seeded by the caller)."""
        cfg = self.config.train
        return SATsNet(self.config.plan, residual=cfg.residual, projection_head=cfg.projection_head, head_channels=cfg.head_channels,
                       fusion=cfg.fusion, fusion_difference=cfg.fusion_difference, feature_fusion=cfg.feature_fusion)

    def load_model(self, device: torch.device | str = "cpu") -> SATsNet:
        """The trained network from ``model.pt``, on ``device``, in eval mode."""
        if not self.model_file.exists():
            raise SatsError(f"{self.path}: no model.pt (training not finished?)")
        model = self.build_model()
        self.load_weights(model, self.model_file)
        model = model.to(device).eval()
        return to_preferred_layout(model, self.config.plan, device, bf16=False)

    def load_weights(self, model: SATsNet, path: Path) -> dict:
        """Load ``path`` (model.pt or checkpoint.pt) into ``model``; returns the whole file."""
        state = load_state(path)
        try:
            model.load_state_dict(state["model"])
        except (KeyError, RuntimeError):
            raise SatsError(f"{path}: weights do not match the network in {self.config_file}") from None
        return state

    def save_model(self, model: SATsNet) -> Path:
        save_state(self.model_file, {"format": RUN_FORMAT, "model": model.state_dict()})
        return self.model_file

    # --- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> Path:
        """Write ``checkpoint.pt``: ``state`` holds epoch, stage, model, optimizer, history, torch_rng."""
        save_state(self.checkpoint_file, {"format": RUN_FORMAT, **state})
        return self.checkpoint_file

    def load_checkpoint(self, model: SATsNet) -> dict:
        """Restore ``model`` from ``checkpoint.pt``; returns the checkpoint (epoch, stage, optimizer, ...)."""
        if not self.checkpoint_file.exists():
            raise SatsError(f"{self.path}: nothing to resume (no checkpoint.pt)")
        ckpt = self.load_weights(model, self.checkpoint_file)
        missing = [k for k in ("epoch", "stage", "optimizer", "history", "torch_rng") if k not in ckpt]
        if missing:
            raise SatsError(f"{self.checkpoint_file}: damaged checkpoint (no {', '.join(missing)})")
        return ckpt

    # --- log and curves ------------------------------------------------------------------
    def write_log(self, history: list[dict]) -> None:
        with atomic_path(self.log_file) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for row in history:
                writer.writerow({k: row[k] for k in LOG_COLUMNS})

    def read_log(self) -> list[dict]:
        if not self.log_file.exists():
            return []
        try:
            with open(self.log_file) as fh:
                return [{k: (int(v) if k == "epoch" else v if k == "stage" else float(v)) for k, v in row.items()}
                        for row in csv.DictReader(fh)]
        except (ValueError, TypeError):
            raise SatsError(f"{self.log_file}: damaged training log") from None

    def plot_curves(self, history: list[dict]) -> Path:
        from sats.evaluation.figures import training_curves_png

        return training_curves_png(history, self.curves_file, self.config.train.stage1_epochs)

@contextmanager
def lock_folder(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``path/.lock`` for the duration: a second ``sats train`` on the folder is refused.

    An advisory ``flock``: the kernel releases it when the process dies, so a killed run
    never leaves a stale lock. A folder this call created and left holding only the lock
    (the run failed before writing anything) is removed again.
    """
    path = Path(path)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SatsError(f"{path}: cannot create the RUN folder ({exc.strerror})") from None
    lock = path / ".lock"
    try:
        with open(lock, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "?"
                raise SatsError(f"{path}: in use by another sats train (pid {holder}); wait for it or use another --out") from None
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            # Temporaries of a writer killed mid-write (atomic_path's ".name.*.tmp*"): with the
            # lock held nobody else is writing here, so they are garbage.
            for tmp in path.glob(".*.tmp*"):
                tmp.unlink(missing_ok=True)
            yield
    finally:
        if created and [p.name for p in path.iterdir()] == [".lock"]:
            lock.unlink(missing_ok=True)
            path.rmdir()


@contextmanager
def claim(path: str | os.PathLike, wait: bool) -> Iterator[bool]:
    """Hold an advisory ``flock`` on the file ``path`` (created if missing) for the duration.

    Yields True when held; with ``wait=False`` yields False at once when another open of the
    file holds it. Released by the kernel when the process dies, so never stale.
    """
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def read_config(path: Path) -> RunConfig:
    """Parse a RUN folder's ``config.json``; one SatsError naming it for anything wrong."""
    if not path.exists():
        raise SatsError(f"{path.parent}: not a sats RUN folder (no config.json)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SatsError(f"{path}: not valid JSON ({getattr(exc, 'msg', None) or exc.reason})") from None
    check_format(raw, path)
    try:
        return RunConfig.from_dict(raw)
    except SatsError as exc:
        raise SatsError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SatsError(f"{path}: incomplete or damaged run configuration ({type(exc).__name__}: {exc})") from None


def save_state(path: Path, obj: dict) -> None:
    """Write a weights file (a dict of tensors and plain values) atomically with ``torch.save``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_state(path: Path) -> dict:
    """Read a weights file written by :func:`save_state`: ``weights_only=True`` (never unpickles
    code), on the CPU, its format checked; one SatsError naming the file for anything wrong."""
    if not path.exists():
        raise SatsError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise SatsError(f"{path}: damaged or not a sats weights file ({type(exc).__name__})") from None
    check_format(state, path)
    return state
