"""The SATs network: a shared U-shaped encoder-decoder run on the CT and its mirror, and
the projection head g used by the margin loss.

The encoder-decoder is MONAI's :class:`~monai.networks.nets.DynUNet`, configured the way
nnU-Net's planner configures its plain U-Net from the patch size and voxel spacing
(:func:`plan_network`): two 3x3x3 conv -> InstanceNorm -> LeakyReLU per stage, strided
convolutions down, transposed convolutions up with skip concatenation, 32 features
doubling per stage and capped at 320.

The paper's prose speaks of residual blocks and four downsamplings, but its parameter
count (30.70 M, Table 1) is that of the plain six-stage network nnU-Net plans for its
patch of 56 x 192 x 192 at 3 x 1 x 1 mm (strides 1, (1,2,2), 2, 2, 2, (1,2,2)). The plain
network is the default; ``residual=True`` gives residual blocks.

Tensors are ``(B, C, D, H, W)`` = ``(batch, channels, z, y, x)``; the left-right axis is
the last one (see :mod:`sats.geometry.symmetry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import nn


@dataclass(frozen=True)
class NetworkPlan:
    """Topology of the encoder-decoder, one entry per resolution stage.

    Attributes:
        patch_size: input patch (z, y, x) in voxels.
        spacing: voxel spacing (z, y, x) in mm the patch is sampled at.
        kernel_sizes: conv kernel per stage, (z, y, x).
        strides: downsampling stride entering each stage, (z, y, x); the first is 1.
        features: channels per stage.
    """

    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    kernel_sizes: list[tuple[int, int, int]] = field(default_factory=list)
    strides: list[tuple[int, int, int]] = field(default_factory=list)
    features: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkPlan":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        return cls(
            tuple(d["patch_size"]), tuple(d["spacing"]), [tuple(k) for k in d["kernel_sizes"]],
            [tuple(s) for s in d["strides"]], list(d["features"]),
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
    features = [min(base_features * 2**i, max_features) for i in range(len(kernels))]
    plan = NetworkPlan(tuple(patch_size), tuple(spacing), kernels, strides, features)  # type: ignore[arg-type]
    bad = [p % t for p, t in zip(patch_size, plan.total_stride)]
    if any(bad):
        raise ValueError(f"patch {tuple(patch_size)} is not divisible by the total stride {plan.total_stride}")
    return plan


class EncoderDecoder(nn.Module):
    """The shared U-Net. ``forward`` returns ``(logits, E)``.

    Shapes: input ``(B, 1, D, H, W)``; logits ``(B, 1, D, H, W)`` (one sigmoid channel:
    GTV); E, the last decoder feature map before the 1x1x1 segmentation conv,
    ``(B, features[0], D, H, W)``.
    """

    def __init__(self, plan: NetworkPlan, residual: bool = False) -> None:
        super().__init__()
        self.plan = plan
        self.unet = DynUNet(
            spatial_dims=3,
            in_channels=1,
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


class ProjectionHead(nn.Module):
    """g: three 1x1x1 convs with ``channels`` outputs, ReLU after the first two, then unit
    L2 normalisation over channels. ``(B, C_in, D, H, W) -> (B, channels, D, H, W)``."""

    def __init__(self, in_channels: int, channels: int = 16) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv3d(in_channels, channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, 1),
        )

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(e), p=2, dim=1)


class SATsNet(nn.Module):
    """Siamese SATs model: the encoder-decoder applied to a CT patch and its mirrored
    patch in one batched pass (weights shared), plus the optional projection head.

    ``forward(x, x_mirror)`` with both ``(B, 1, D, H, W)`` returns a dict:
    ``logits`` and ``logits_mirror`` ``(B, 1, D, H, W)``; ``proj`` and ``proj_mirror``
    ``(B, 16, D, H, W)`` = g(E), g(E') when the head exists, else E and E' themselves
    (the paper's "no projection head" ablation computes the margin loss on E).
    ``forward(x, None)`` runs the CT branch alone (the plain U-Net baseline): ``logits``
    (and ``proj`` with features).
    At inference only the encoder-decoder is needed: call ``model.encoder_decoder(x)``.
    """

    def __init__(self, plan: NetworkPlan, residual: bool = False, projection_head: bool = True, head_channels: int = 16) -> None:
        super().__init__()
        self.encoder_decoder = EncoderDecoder(plan, residual=residual)
        self.head = ProjectionHead(self.encoder_decoder.feature_channels, head_channels) if projection_head else None

    def forward(self, x: torch.Tensor, x_mirror: torch.Tensor | None, with_features: bool = True) -> dict[str, torch.Tensor]:
        if x_mirror is None:
            logits, e = self.encoder_decoder(x)
            out = {"logits": logits}
            if with_features:
                out["proj"] = self.head(e) if self.head is not None else e
            return out
        b = x.shape[0]
        logits, e = self.encoder_decoder(torch.cat([x, x_mirror], dim=0))
        out = {"logits": logits[:b], "logits_mirror": logits[b:]}
        if with_features:
            proj = self.head(e) if self.head is not None else e
            out["proj"], out["proj_mirror"] = proj[:b], proj[b:]
        return out


def prefers_channels_last(plan: NetworkPlan, device: torch.device | str, bf16: bool) -> bool:
    """Whether this network's convolutions run faster on channels-last 3D tensors
    (N, D, H, W, C in memory) than on the default N, C, D, H, W layout.

    * CUDA: with bf16 only; cuDNN's fast bf16 kernels want it (an H200 paper-preset step
      +33 %), while fp32 ran slower.
    * CPU: when the first level has fewer than 16 features. oneDNN's blocked layout pads
      channels to a multiple of 16 (AVX-512), so 8 features compute 16; channels-last
      does not pad. Measured on a 2-core AVX-512 EPYC: the cpu preset (8 features) trains
      1.5x faster in fp32 and 1.4x in bf16, and predicts 1.15x / 1.45x faster; the paper
      network (32 features) predicts 10-25 % slower channels-last. With the kernels held
      to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) the same holds: 1.35x, 1.25x and 0.86x.
    """
    if torch.device(device).type == "cuda":
        return bf16
    return plan.features[0] < 16


def to_preferred_layout(model: nn.Module, plan: NetworkPlan, device: torch.device | str, bf16: bool) -> nn.Module:
    """``model`` in channels-last 3D where :func:`prefers_channels_last` says so (in place).
    Inputs need no conversion: a one-channel (N, 1, D, H, W) tensor is channels-last
    already, and every convolution after it follows its weights' layout."""
    if prefers_channels_last(plan, device, bf16):
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
