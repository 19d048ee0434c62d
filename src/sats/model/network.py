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

**Where the mirror enters** (:class:`SATsNet`, beyond the paper): every model is given a
window of the case and, where it needs one, the same window of the mirrored case (every
channel flipped along x). On the symmetric grid the mirrored case holds, at each voxel, that
voxel's anatomical mirror partner. The paper's Siamese model runs the encoder-decoder on
both and compares them only in the margin loss; two options let the mirror act at
inference too:

* ``fusion`` (early fusion): the mirror is an input channel, ``[I, M(I)]`` ("mirror"), or
  ``[I, W(M(I))]`` with the mirror deformably registered to the CT first ("registered", the
  reflective registration of Raina et al., MICCAI BrainLes 2019); ``fusion_difference`` adds
  ``|I - W(M(I))|``.
* ``feature_fusion``: the decoder features of the CT branch E and of the mirror branch E'
  are concatenated voxel by voxel before a 1x1x1 output conv, so the segmentation of each
  voxel sees the features of its mirror partner (E' at voxel v describes v's partner). A
  late, feature-level comparison of the two sides in the spirit of DeepSymNet (Barman et
  al., ISBI 2019) and SEAN (Liang et al., MICCAI 2021), reduced to concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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


Fusion = Literal["none", "mirror", "registered"]


def input_channels(fusion: str, difference: bool = False) -> int:
    """Channels the encoder-decoder takes: the CT, plus the (registered) mirror, plus their difference."""
    return 1 + (fusion != "none") + bool(difference)


class SATsNet(nn.Module):
    """The SATs model: the encoder-decoder (weights shared) on a CT window and, where needed,
    the same window of the mirrored case, in one batched pass; the optional projection head;
    the fusion options of the module docstring.

    ``forward(x, x_mirror)``: ``x`` ``(B, C, D, H, W)`` holds the case's channels (C = 1, the
    CT; C = 2 with ``fusion="registered"``: the CT and its registered mirror); ``x_mirror``
    the same window of the mirrored case (every channel flipped along x: for a window
    centred on the mid-sagittal plane, ``mirror_lr(x)``). Returns a dict: ``logits``
    ``(B, 1, D, H, W)``; with ``mirror_pass`` the mirrored case's own ``logits_mirror``; with
    ``with_features`` ``proj`` (and ``proj_mirror``) = g(E), g(E') where the head exists,
    else E and E' themselves (the paper's "no projection head" ablation).
    ``mirror_pass=False`` runs the CT's sample alone (the plain U-Net, early fusion), using
    ``x_mirror`` only as an input channel where ``fusion="mirror"``. Feature fusion always
    runs both branches: its logits need E'. ``eager`` calls the encoder-decoder's
    ``forward`` (a compiled module would recompile for eval mode and new batch sizes).
    """

    def __init__(self, plan: NetworkPlan, residual: bool = False, projection_head: bool = True, head_channels: int = 16,
                 fusion: Fusion = "none", fusion_difference: bool = False, feature_fusion: bool = False) -> None:
        super().__init__()
        self.fusion, self.fusion_difference = fusion, fusion_difference
        self.encoder_decoder = EncoderDecoder(plan, residual=residual, in_channels=input_channels(fusion, fusion_difference))
        c = self.encoder_decoder.feature_channels
        self.head = ProjectionHead(c, head_channels) if projection_head else None
        self.fuse = nn.Conv3d(2 * c, 1, 1) if feature_fusion else None

    @property
    def needs_mirror(self) -> bool:
        """Whether even a plain prediction needs the mirrored case's window (x_mirror)."""
        return self.fusion == "mirror" or self.fuse is not None

    def network_input(self, x: torch.Tensor, x_mirror: torch.Tensor | None) -> torch.Tensor:
        """The case's channels -> the encoder-decoder's input (see the class docstring)."""
        if self.fusion == "mirror":
            if x_mirror is None:
                raise ValueError("fusion 'mirror' takes the mirrored window as its second channel: give x_mirror")
            x = torch.cat([x[:, :1], x_mirror[:, :1]], dim=1)
        if self.fusion_difference:
            x = torch.cat([x, (x[:, :1] - x[:, 1:2]).abs()], dim=1)
        return x

    def forward(self, x: torch.Tensor, x_mirror: torch.Tensor | None = None, with_features: bool = True,
                mirror_pass: bool = True, eager: bool = False) -> dict[str, torch.Tensor]:
        ed = self.encoder_decoder.forward if eager else self.encoder_decoder
        b = x.shape[0]
        both = x_mirror is not None and (mirror_pass or self.fuse is not None)
        if self.fuse is not None and not both:
            raise ValueError("feature fusion compares each voxel with its mirror partner: give x_mirror")
        inputs = self.network_input(x, x_mirror)
        if both:
            inputs = torch.cat([inputs, self.network_input(x_mirror, x)])  # type: ignore[arg-type]
        logits, e = ed(inputs)
        if self.fuse is not None:  # each sample's voxels with their partners' features (E' at v: v's partner)
            logits = torch.cat([self.fuse(torch.cat([e[:b], e[b:]], dim=1)), self.fuse(torch.cat([e[b:], e[:b]], dim=1))])
        out = {"logits": logits[:b]}
        if both and mirror_pass:
            out["logits_mirror"] = logits[b:]
        if with_features:
            proj = self.head(e) if self.head is not None else e
            out["proj"] = proj[:b]
            if both:
                out["proj_mirror"] = proj[b:]
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
