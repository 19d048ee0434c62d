"""nnU-Net's plain U-Net as a backbone: MONAI's :class:`~monai.networks.nets.DynUNet`,
planned the way nnU-Net's planner plans it from the patch size and voxel spacing
(:func:`plan_network`), and :class:`NetworkPlan`, the plan every backbone is described by.

Tensors are ``(B, C, D, H, W)`` = (batch, channels, z, y, x); x is left-right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from monai.networks.nets import DynUNet
from torch import nn


@dataclass(frozen=True)
class NetworkPlan:
    """Topology of a backbone, one entry per resolution stage, and which backbone it is.

    Attributes:
        patch_size: input patch (z, y, x) in voxels.
        spacing: voxel spacing (z, y, x) in mm the patch is sampled at.
        kernel_sizes: conv kernel per stage, (z, y, x).
        strides: downsampling stride entering each stage, (z, y, x); the first is 1.
        features: channels per stage (``features[0]``: the feature map the SATs head reads).
        arch: the backbone (:data:`sats.model.backbones.BACKBONES`); RUNs from before
            backbones were options have none and are ``nnunet``.
        options: the arch's own settings (widths, depths, heads), JSON-serialisable.
    """

    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    kernel_sizes: list[tuple[int, int, int]] = field(default_factory=list)
    strides: list[tuple[int, int, int]] = field(default_factory=list)
    features: list[int] = field(default_factory=list)
    arch: str = "nnunet"
    options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkPlan":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        return cls(
            tuple(d["patch_size"]), tuple(d["spacing"]), [tuple(k) for k in d["kernel_sizes"]],
            [tuple(s) for s in d["strides"]], list(d["features"]), str(d.get("arch", "nnunet")), dict(d.get("options", {})),
        )

    @property
    def total_stride(self) -> tuple[int, int, int]:
        out = [1, 1, 1]
        for s in self.strides:
            out = [a * b for a, b in zip(out, s)]
        return tuple(out)  # type: ignore[return-value]


def plan_network(
    patch_size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    base_features: int = 32,
    max_features: int = 320,
    min_feature_map: int = 4,
    max_stages: int = 7,
) -> NetworkPlan:
    """Plan stages like nnU-Net: pool an axis while it stays >= 2 x ``min_feature_map``
    voxels and its spacing is less than twice the finest current spacing; use kernel 3
    along an axis once its spacing is within a factor 2 of the finest, else 1.

    Example:
        >>> plan = plan_network((56, 192, 192), (3.0, 1.0, 1.0))
        >>> plan.strides
        [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
        >>> plan.kernel_sizes[0], plan.features
        ((1, 3, 3), [32, 64, 128, 256, 320, 320])
    """
    kernels, strides = _stages(patch_size, spacing, min_feature_map, max_stages)
    features = [min(base_features * 2**i, max_features) for i in range(len(kernels))]
    plan = NetworkPlan(tuple(patch_size), tuple(spacing), kernels, strides, features)  # type: ignore[arg-type]
    bad = [p % t for p, t in zip(patch_size, plan.total_stride)]
    if any(bad):
        raise ValueError(f"patch {tuple(patch_size)} is not divisible by the total stride {plan.total_stride}")
    return plan


def _stages(patch_size, spacing, min_feature_map: int = 4, max_stages: int = 7) -> tuple[list, list]:
    """(kernels, strides) of :func:`plan_network`'s rule, without its divisibility check."""
    size = [float(s) for s in patch_size]
    sp = [float(s) for s in spacing]
    kernel = [1, 1, 1]
    kernels: list[tuple[int, int, int]] = []
    strides: list[tuple[int, int, int]] = [(1, 1, 1)]
    while True:
        finest = min(sp)
        kernel = [3 if (kernel[a] == 3 or sp[a] / finest < 2) else 1 for a in range(3)]
        kernels.append(tuple(kernel))  # type: ignore[arg-type]
        if len(kernels) >= max_stages:
            break
        can_pool = [a for a in range(3) if size[a] >= 2 * min_feature_map]
        if not can_pool:
            break
        finest_poolable = min(sp[a] for a in can_pool)
        pool_axes = [a for a in can_pool if sp[a] / finest_poolable < 2]
        stride = tuple(2 if a in pool_axes else 1 for a in range(3))
        strides.append(stride)  # type: ignore[arg-type]
        size = [s / st for s, st in zip(size, stride)]
        sp = [s * st for s, st in zip(sp, stride)]
    return kernels, strides


def fit_patch(patch_size: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """``patch_size`` (z, y, x voxels) rounded up until the stages :func:`plan_network`
    plans for it divide it, so any patch a user asks for trains (a patch that already
    fits is returned as it is).

    Example:
        >>> fit_patch((20, 36, 44), (3.0, 1.6, 1.6))
        (20, 40, 48)
    """
    p = tuple(int(v) for v in patch_size)
    for _ in range(8):  # each round only grows the patch; two suffice in practice
        _, strides = _stages(p, spacing)
        total = [1, 1, 1]
        for st in strides:
            total = [a * b for a, b in zip(total, st)]
        fitted = tuple(-(-a // t) * t for a, t in zip(p, total))
        if fitted == p:
            return p  # type: ignore[return-value]
        p = fitted
    return p  # type: ignore[return-value]


class EncoderDecoder(nn.Module):
    """The shared U-Net. ``forward`` returns ``(logits, E)``.

    Shapes: input ``(B, in_channels, D, H, W)``; logits ``(B, 1, D, H, W)`` (one sigmoid channel:
    GTV); E, the last decoder feature map before the 1x1x1 segmentation conv,
    ``(B, features[0], D, H, W)``.
    """

    def __init__(self, plan: NetworkPlan, residual: bool = False, in_channels: int = 1) -> None:
        super().__init__()
        self.plan = plan
        self.unet = DynUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=1,
            kernel_size=[list(k) for k in plan.kernel_sizes],
            strides=[list(s) for s in plan.strides],
            upsample_kernel_size=[list(s) for s in plan.strides[1:]],
            filters=list(plan.features),
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
            res_block=residual,
        )

    @property
    def feature_channels(self) -> int:
        return self.plan.features[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.unet.skip_layers(x)
        return self.unet.output_block(features), features


def plan(patch_size: tuple[int, int, int], spacing: tuple[float, float, float], preset: str = "paper",
         base_features: int = 32, max_features: int = 320) -> NetworkPlan:
    """The backbone interface (:mod:`sats.model.backbones`): :func:`plan_network`."""
    return plan_network(patch_size, spacing, base_features, max_features)


def build(plan: NetworkPlan, in_channels: int = 1, residual: bool = False) -> "EncoderDecoder":
    return EncoderDecoder(plan, residual=residual, in_channels=in_channels)
