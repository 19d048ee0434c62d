"""Backbones: the encoder-decoders SATs can run on, one module per family.

Every backbone has the same small interface (:class:`Backbone`): ``plan(patch, spacing,
preset, base_features, max_features)`` gives a :class:`~sats.model.backbones.nnunet.NetworkPlan`
(the patch rounded up to what the network can take, the widths of the preset's scale),
and ``build(plan, in_channels, residual)`` gives a module whose ``forward(x)`` returns
``(logits, features)``: logits ``(B, 1, D, H, W)``, features the last decoder map before
the output conv, ``(B, feature_channels, D, H, W)``, on the input's grid. Adding a
backbone is a new module and an entry in :data:`BACKBONES`; training, the Siamese
wrapper and inference do not change.

=================  ===========================================  ================================
arch               family                                        module
=================  ===========================================  ================================
``nnunet``         nnU-Net's plain U-Net (MONAI DynUNet)          :mod:`.nnunet`
``swinunetr``      Swin UNETR (Hatamizadeh et al. 2022)           :mod:`.monai_nets`
``swinunetr-v2``   Swin UNETR v2 (residual conv per stage)        :mod:`.monai_nets`
``unetr``          UNETR (ViT-B/16 encoder)                       :mod:`.monai_nets`
``mednext``        MedNeXt L, kernel 3 (Roy et al. 2023)          :mod:`.monai_nets`
``stunet-s/b/l``   STU-Net (Huang et al. 2023)                    :mod:`.residual`
``resenc-m/l``     nnU-Net ResEnc M and L (Isensee et al. 2024)   :mod:`.residual`
``umamba-bot``     U-Mamba Bot (Ma et al. 2024)                   :mod:`.residual`
``transunet``      3D TransUNet (Chen et al. 2023)                :mod:`.residual`
=================  ===========================================  ================================

Tensors are ``(B, C, D, H, W)`` = (batch, channels, z, y, x); x is left-right.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from torch import nn

from sats.geometry.volume import SatsError
from sats.model.backbones import monai_nets, nnunet, residual
from sats.model.backbones.nnunet import NetworkPlan


@dataclass(frozen=True)
class Backbone:
    """One arch: how to plan it, how to build it, and its optimiser per preset.

    Attributes (its ``--arch`` name is its key in :data:`BACKBONES`):
        plan: ``(patch, spacing, preset, base_features, max_features) -> NetworkPlan``.
        build: ``(plan, in_channels, residual) -> nn.Module`` returning ``(logits, features)``.
        multiple: every axis of the patch must be a multiple of it (the planner rounds up).
        fit: instead of ``multiple``, ``(patch, spacing) -> patch`` rounded up to what the
            network planned for it takes (nnunet: a multiple of its total stride).
        optimizer: per preset, the :class:`~sats.model.config.TrainConfig` fields this arch
            changes (the paper's Sec. 4.2 for ``paper``); empty: the preset's own.
        paper_params_m: the paper's parameter count (Table 1, millions) at 56 x 192 x 192, or None.
        patch_volume: the arch trains on the run's patch grown to this many times its volume
            (every axis by the cube root), then rounded (:func:`train_patch`).
    """

    plan: Callable[..., NetworkPlan]
    build: Callable[..., nn.Module]
    multiple: int = 1
    fit: Callable[..., tuple[int, int, int]] | None = None
    optimizer: dict[str, dict] | None = None
    paper_params_m: float | None = None
    patch_volume: float = 1.0


BACKBONES: dict[str, Backbone] = {
    "nnunet": Backbone(nnunet.plan, nnunet.build, fit=nnunet.fit_patch, paper_params_m=30.70),
    "swinunetr": Backbone(monai_nets.plan_swinunetr, monai_nets.build_swinunetr, 32,
                          paper_params_m=62.19),
    "swinunetr-v2": Backbone(monai_nets.plan_swinunetr_v2, monai_nets.build_swinunetr, 32,
                             paper_params_m=72.89),
    # The paper trains UNETR with AdamW at 1e-5 (Sec. 4.2); at that rate the cpu schedule of
    # 2,000 steps barely moves, so the cpu preset keeps its AdamW 3e-3 for every arch.
    "unetr": Backbone(monai_nets.plan_unetr, monai_nets.build_unetr, 16,
                      optimizer={"paper": {"optimizer": "adamw", "lr": 1e-5}}, paper_params_m=93.01),
    "mednext": Backbone(monai_nets.plan_mednext, monai_nets.build_mednext, 16, paper_params_m=61.80),
    "stunet-s": Backbone(residual.planner("stunet-s"), residual.build, fit=nnunet.fit_patch, paper_params_m=14.60),
    "stunet-b": Backbone(residual.planner("stunet-b"), residual.build, fit=nnunet.fit_patch, paper_params_m=58.26),
    "stunet-l": Backbone(residual.planner("stunet-l"), residual.build, fit=nnunet.fit_patch, paper_params_m=440.30),
    "resenc-m": Backbone(residual.planner("resenc-m"), residual.build, fit=nnunet.fit_patch),
    # nnU-Net's ResEnc L planner builds M's network for a 24 GB GPU memory target against M's
    # 8 GB and spends the difference on the patch: here, 3x the run's patch volume.
    "resenc-l": Backbone(residual.planner("resenc-l"), residual.build, fit=nnunet.fit_patch, patch_volume=3.0),
    # The paper's UMambaBot count (64.76 M) depends on a plan it does not give: +-10 %.
    "umamba-bot": Backbone(residual.planner("umamba-bot"), residual.build, fit=nnunet.fit_patch,
                           paper_params_m=64.76),
    # The paper trains TransUNet with SGD at 1e-3 (Sec. 4.2); its count depends on a plan it does not give.
    "transunet": Backbone(residual.planner("transunet"), residual.build, fit=nnunet.fit_patch,
                          optimizer={"paper": {"lr": 1e-3}}, paper_params_m=119.37),
}


def backbone(arch: str) -> Backbone:
    """The :class:`Backbone` named ``arch``; a :class:`SatsError` listing the names otherwise."""
    try:
        return BACKBONES[arch]
    except KeyError:
        raise SatsError(f"--arch must be one of {', '.join(BACKBONES)}, not {arch!r}") from None


def round_patch(arch: str, patch: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """``patch`` (z, y, x voxels, at ``spacing`` z, y, x mm) rounded up to one the arch
    takes: nnunet's to a multiple of the total stride planned for it; the others' each
    axis to the arch's multiple, and y and x to at least twice it, so the deepest feature
    map keeps 2 x 2 voxels in-plane (a training step's instance norm needs more than one).

    Example:
        >>> round_patch("swinunetr", (24, 32, 32), (3.0, 4.7, 4.7)), round_patch("nnunet", (20, 36, 44), (3.0, 1.6, 1.6))
        ((32, 64, 64), (20, 40, 48))
    """
    b = backbone(arch)
    if b.fit is not None:
        return b.fit(patch, spacing)
    m = b.multiple
    z, y, x = (-(-int(p) // m) * m for p in patch)
    return z, max(y, 2 * m), max(x, 2 * m)


def train_patch(arch: str, patch: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """The patch (z, y, x voxels) ``arch`` trains on when the run asks for ``patch`` at ``spacing``
    (z, y, x mm): :func:`round_patch` of it, or, for an arch with a ``patch_volume`` (ResEnc L:
    3), of the patch with the run's aspect ratio whose rounded volume comes closest to that
    many times the run's. Apply it once, where the run's patch is decided.

    Example:
        >>> train_patch("resenc-l", (56, 192, 192), (3.0, 1.0, 1.0)), train_patch("resenc-m", (56, 192, 192), (3.0, 1.0, 1.0))
        ((80, 256, 256), (56, 192, 192))
    """
    target = backbone(arch).patch_volume
    if target == 1.0:
        return round_patch(arch, patch, spacing)
    want = target * float(np.prod(patch))
    grown = (round_patch(arch, tuple(int(round(int(p) * g / 100)) for p in patch), spacing)  # type: ignore[arg-type]
             for g in range(100, 200))
    return min(grown, key=lambda p: (abs(np.log(float(np.prod(p)) / want)), p))


def plan_backbone(arch: str, patch: tuple[int, int, int], spacing: tuple[float, float, float], preset: str = "paper",
                  base_features: int = 32, max_features: int = 320) -> NetworkPlan:
    """The plan of ``arch`` for a patch (z, y, x voxels, rounded up to the arch's multiple)
    at ``spacing`` (z, y, x mm). ``base_features`` and ``max_features`` size ``nnunet``;
    the other archs take their widths from ``preset`` (``paper`` or ``cpu``).

    Example:
        >>> plan_backbone("swinunetr", (56, 192, 192), (3.0, 1.0, 1.0)).patch_size
        (64, 192, 192)
    """
    b = backbone(arch)
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    plan = b.plan(round_patch(arch, patch, spacing), spacing, preset, base_features, max_features)
    return replace(plan, arch=arch)


def build_backbone(plan: NetworkPlan, in_channels: int = 1, residual: bool = False) -> nn.Module:
    """The module of ``plan`` (see the module docstring for its ``forward``)."""
    return backbone(plan.arch).build(plan, in_channels, residual)


def optimizer_defaults(arch: str, preset: str) -> dict:
    """The :class:`~sats.model.config.TrainConfig` fields ``arch`` sets under ``preset``."""
    return dict((backbone(arch).optimizer or {}).get(preset, {}))


def build_on_meta(plan: NetworkPlan, in_channels: int = 1, residual: bool = False) -> nn.Module:
    """The plan's module with its weights on the meta device (shapes only, no memory): for
    counting parameters and operations."""
    import torch

    try:
        with torch.device("meta"):
            return build_backbone(plan, in_channels, residual)
    except RuntimeError:  # a constructor that reads a tensor's value (Swin UNETR's drop-path rates)
        return build_backbone(plan, in_channels, residual).to("meta")


def step_gflop(plan: NetworkPlan, batch_size: int = 2, in_channels: int = 1, net: nn.Module | None = None) -> float:
    """Floating-point operations (GFLOP; a multiply-add is 2) of one training step of the
    bare backbone: forward and backward of ``batch_size`` patches. Counted by torch's FLOP
    counter on the meta device, so even the paper's sizes cost no memory or time. ``net``:
    the plan's module, already built (it is moved to the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = (net if net is not None else build_on_meta(plan, in_channels)).to("meta")
    x = torch.empty((batch_size, in_channels, *plan.patch_size), device="meta")
    with FlopCounterMode(display=False) as counter:
        logits, _ = net(x)
        logits.sum().backward()
    return counter.get_total_flops() / 1e9
