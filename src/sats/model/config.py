"""Configuration: :class:`TrainConfig` with the paper's values as defaults, the presets,
and the rule that fits a preset's grid to the data.

Every option with a fixed set of values is a ``Literal``; :func:`validate_options` checks
them all once, when a configuration is made, so a typo is one clear error listing the
allowed values rather than a silent fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from sats.geometry.volume import SatsError, validate_options
from sats.model.backbones import backbone, optimizer_defaults, train_patch
from sats.model.losses import AsymRegion  # defined beside the loss that uses it
from sats.model.network import Fusion  # defined beside the network that uses it

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["two-stage", "joint"]
Precision = Literal["fp32", "bf16", "auto"]
RoiMode = Literal["auto", "whole"]



@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are the paper's (Sec. 3.3)."""

    preset: str = "paper"
    patch_size: tuple[int, int, int] = (56, 192, 192)
    spacing: tuple[float, float, float] | None = None  # None: the dataset's median spacing
    # The encoder-decoder (sats.model.backbones): nnU-Net's plain U-Net, the paper's network.
    arch: str = field(default="nnunet", metadata={"option": "--arch"})
    align: bool = True  # resample each CT about its own mid-sagittal plane (sats.geometry.alignment)
    atlas: str | None = None  # symmetric atlas image: find the plane by affine registration to it
    base_features: int = 32
    max_features: int = 320
    residual: bool = False
    batch_size: int = 2
    stage1_epochs: int = 800
    stage2_epochs: int = 200
    iters_per_epoch: int = 250
    optimizer: Optimizer = "sgd"  # the paper: SGD with Nesterov momentum
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
    # "paper" (Eq. 1: s - s∩s'), "union" (s XOR s') or "unsupervised" (m_unsup, sats.geometry.asymmetry)
    asym_region: AsymRegion = field(default="paper", metadata={"option": "--asym-region"})
    # Unlabelled CTs (a folder; imagesTr entries without a label join them): in the stages
    # with the margin loss, this share of every batch is unlabelled patches, which add only
    # the margin loss with m_unsup. At least one patch of a batch stays labelled.
    unlabelled: str | None = None
    unlabelled_fraction: float = 0.5
    foreground_fraction: float = 1 / 3
    augment: bool = True
    folds: int = 5
    fold: int | Literal["all"] = 0  # 0..folds-1, or "all" (no validation)
    val_every: int = 1
    val_overlap: float = 0.5
    seed: int = 0
    num_workers: int = -1  # -1: auto (CUDA: up to 8 loader processes, a core left free; CPU: none)
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (training.uses_bf16)
    # torch.compile the encoder-decoder on CUDA: 2.1x the steps/s on an H200 (synthetic
    # steps); off by default until a whole run is measured (BENCHMARKS.md).
    compile: bool = False
    # Ablations and baselines (sats ablation): siamese=False trains the encoder-decoder on
    # the CT alone (a plain U-Net with left-right flip augmentation); schedule "joint" runs
    # the head and the margin loss from the first epoch in one stage of total_epochs.
    siamese: bool = True
    schedule: Schedule = "two-stage"  # the paper's two stages, or one stage with one poly decay ("joint")
    # Where the mirror enters the network (sats.model.network): as an input channel, the plain
    # mirror ("mirror") or the mirror registered to the CT ("registered"), optionally with their
    # difference; or feature fusion (each voxel's decoder features beside its mirror partner's).
    fusion: Fusion = field(default="none", metadata={"option": "--fusion"})
    fusion_difference: bool = False
    feature_fusion: bool = False
    # When the preset's spacing is more than 1.5 times finer than the data's median along an
    # axis, use the data's spacing there and a patch covering the same millimetres.
    follow_data: bool = True
    grad_clip: float = 12.0
    # The ROI localiser (sats.predict.roi), fitted after training; 0 leaves it out (prediction
    # then takes the landmark ROI).
    localiser_iters: int = 300

    def __post_init__(self) -> None:
        validate_options(self)
        backbone(self.arch)  # an unknown arch is one error listing the known ones
        if not 0.0 <= self.unlabelled_fraction < 1.0:
            raise SatsError(f"unlabelled_fraction must be in [0, 1), not {self.unlabelled_fraction}")
        if self.fusion_difference and self.fusion == "none":
            raise SatsError("fusion_difference needs a fusion input (mirror or registered)")
        if self.margin_loss and not self.siamese:
            raise SatsError("the margin loss compares the two branches: it needs siamese=True")
        if self.fold != "all" and (not isinstance(self.fold, int) or not 0 <= self.fold < self.folds):
            raise SatsError(f"fold {self.fold} out of range 0..{self.folds - 1} (or all)")
        positive = ("base_features", "max_features", "batch_size", "iters_per_epoch", "folds", "val_every",
                    "lr", "margin", "grad_clip", "head_channels")
        bad = [f"{k}={getattr(self, k)}" for k in positive if not getattr(self, k) > 0]
        bad += [f"{k}={getattr(self, k)}" for k in ("stage1_epochs", "stage2_epochs", "beta", "localiser_iters",
                                                     "weight_decay", "stage2_backbone_lr") if getattr(self, k) < 0]
        if self.num_workers < -1:
            bad.append(f"num_workers={self.num_workers}")
        if self.total_epochs < 1:
            bad.append("stage1_epochs + stage2_epochs = 0")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            bad.append(f"foreground_fraction={self.foreground_fraction}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            bad.append(f"patch_size={self.patch_size}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            bad.append(f"spacing={self.spacing}")
        if bad:
            raise SatsError(f"invalid training option(s): {', '.join(bad)}")

    @property
    def total_epochs(self) -> int:
        return self.stage1_epochs + self.stage2_epochs

    def stage(self, epoch: int) -> str:
        """The stage an epoch (from 0) belongs to: "1", "2" or "joint"."""
        if self.schedule == "joint":
            return "joint"
        return "1" if epoch < self.stage1_epochs else "2"

    def has_margin(self, stage: str) -> bool:
        """Whether the margin loss (and with it the head) is trained in ``stage``."""
        return stage in ("2", "joint") and self.margin_loss


def fit_to_data(cfg: TrainConfig, data_spacing: tuple[float, float, float]) -> tuple[tuple, tuple]:
    """(spacing, patch size) to train at: the configuration's, except where
    ``cfg.follow_data`` and the configured spacing would up-sample the data more than 1.5
    times along an axis; there the data's spacing and a patch of the same extent in mm
    (rounded up to a multiple of 8 voxels, at least 16) are used. The patch is then rounded
    up to what ``cfg.arch`` takes, or grown where it trains on a larger one
    (:func:`sats.model.backbones.train_patch`).

    Example:
        >>> cfg = preset("cpu")  # 24 x 80 x 80 voxels at 3 x 1.6 x 1.6 mm
        >>> fit_to_data(cfg, (2.5, 3.9, 3.9))  # OpenKBP: 4 mm in-plane
        ((3.0, 3.9, 3.9), (24, 40, 40))
    """
    if cfg.spacing is None:
        spacing = tuple(float(s) for s in data_spacing)
        return spacing, train_patch(cfg.arch, tuple(cfg.patch_size), spacing)
    spacing, patch = list(cfg.spacing), list(cfg.patch_size)
    if cfg.follow_data:
        for a in range(3):
            if data_spacing[a] > 1.5 * cfg.spacing[a]:
                mm = cfg.patch_size[a] * cfg.spacing[a]
                spacing[a] = float(data_spacing[a])
                patch[a] = max(16, int(8 * math.ceil(mm / spacing[a] / 8)))
    fitted = tuple(float(s) for s in spacing)
    return fitted, train_patch(cfg.arch, tuple(int(p) for p in patch), fitted)


def preset(name: str) -> TrainConfig:
    """``paper``: the paper's configuration. ``cpu``: small enough to train on the
    default phantom in about 6 minutes on 2 cores with native bf16 (AVX512-BF16 or AMX):
    coarser spacing, 8 base features, 19 epochs of 50 iterations, more tumour patches,
    and AdamW, which gets a small network going within a few hundred iterations where
    SGD at momentum 0.99 needs thousands. The stage-2 learning rates keep the paper's
    1000:1 ratio of head to encoder-decoder. (Until 2026-11-27 it ran 25 iterations an
    epoch: validation Dice 0.67 on the demo, against 0.81 with 50.)"""
    if name == "paper":
        return TrainConfig()
    if name == "cpu":
        return TrainConfig(
            preset="cpu", patch_size=(24, 80, 80), spacing=(3.0, 1.6, 1.6), base_features=8,
            max_features=128, stage1_epochs=16, stage2_epochs=3, iters_per_epoch=50, batch_size=2,
            optimizer="adamw", lr=3e-3, stage2_backbone_lr=3e-6, foreground_fraction=0.5, val_every=2,
        )
    raise SatsError(f"unknown preset {name!r} (paper or cpu)")


#: Ablation variants and baselines: the options of :class:`TrainConfig` that make each
#: (``sats train --variant``, ``sats ablation --variants``); everything else is shared.
#: Every arm trains on one schedule, a single polynomial decay over all steps ("joint"),
#: unless its name says "2stage" or it is the paper's ``sats``: the paper's stage 2 trains
#: the encoder-decoder at 1/1000 of the rate for the last fifth of the steps.
VARIANTS: dict[str, dict] = {
    # One schedule (the fair comparison, sats ablation's default arms).
    "unet": {"siamese": False, "projection_head": False, "margin_loss": False, "schedule": "joint"},  # CT alone, Dice + BCE
    "fusion": {"siamese": False, "projection_head": False, "margin_loss": False, "schedule": "joint", "fusion": "mirror"},
    "fusion-reg": {"siamese": False, "projection_head": False, "margin_loss": False, "schedule": "joint", "fusion": "registered"},
    "feature-fusion": {"projection_head": False, "margin_loss": False, "schedule": "joint", "feature_fusion": True},
    "siamese": {"projection_head": False, "margin_loss": False, "schedule": "joint"},
    "sats-joint": {"schedule": "joint"},  # head and margin loss from the first step
    "sats-joint-union": {"schedule": "joint", "asym_region": "union"},  # ... with the margin loss's region s XOR s'
    # The paper's two stages (Table 3), named so; ``sats`` is the paper's method.
    "sats": {},
    "unet-2stage": {"siamese": False, "projection_head": False, "margin_loss": False},
    "siamese-2stage": {"projection_head": False, "margin_loss": False},  # Table 3 row 1
    "margin-no-head-2stage": {"projection_head": False, "margin_loss": True},  # row 2
    # Beyond the paper (sats.geometry.asymmetry): the margin loss's region from registration
    # to the mirror instead of the label; and the labelled cases plus unlabelled CTs (--unlabelled).
    "sats-unsup": {"asym_region": "unsupervised"},
    "sats-semi": {},
    "sats-semi-joint": {"schedule": "joint"},
}
#: Variants that add unlabelled CTs (``--unlabelled``).
SEMI_VARIANTS = ("sats-semi", "sats-semi-joint")


def stage_split(epochs: int) -> dict[str, int]:
    """``epochs`` split 4:1 between the stages, like the paper's 800:200."""
    return {"stage1_epochs": epochs - epochs // 5, "stage2_epochs": epochs // 5}


def build(preset_name: str = "paper", variant: str | None = None, epochs: int | None = None, **overrides) -> TrainConfig:
    """The one way a training configuration is made: the preset, then the variant's options
    (:data:`VARIANTS`), then ``epochs`` (split 4:1 between the stages; the whole of a joint
    schedule) and the explicit ``overrides`` (any :class:`TrainConfig` field), validated once.
    An ``arch`` override brings its optimiser for the preset first
    (:func:`sats.model.backbones.optimizer_defaults`: UNETR trains with AdamW 1e-5 in the
    paper preset), so an explicit ``lr`` or ``optimizer`` still wins.

    Example:
        >>> cfg = build("cpu", variant="unet", epochs=40, seed=3)
        >>> cfg.siamese, cfg.stage1_epochs + cfg.stage2_epochs, cfg.seed
        (False, 40, 3)
    """
    base = preset(preset_name)
    if variant is not None and variant not in VARIANTS:
        raise SatsError(f"--variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SatsError(f"unknown training option(s) {', '.join(unknown)}")
    arch = overrides.get("arch") or base.arch
    changes = {**optimizer_defaults(arch, base.preset), **(VARIANTS[variant] if variant else {}), **(stage_split(epochs) if epochs is not None else {}), **overrides}
    for key in ("patch_size", "spacing"):
        if changes.get(key) is not None:
            changes[key] = tuple(changes[key])
    return replace(base, **changes)


def parse_fold(text: str) -> int | Literal["all"]:
    """``--fold`` text: ``all`` or a fold number."""
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise SatsError(f"--fold must be a fold number or all, not {text!r}") from None
