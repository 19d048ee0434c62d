"""Residual U-Nets built from MONAI's blocks: STU-Net (S, B, L; Huang et al. 2023) and
nnU-Net's residual-encoder U-Net (ResEnc M; Isensee et al., MICCAI 2024).

Both keep nnU-Net's plan of strides from the patch and spacing
(:func:`~sats.model.backbones.nnunet.plan_network`); they differ in their blocks:

* **STU-Net**: 3 x 3 x 3 kernels everywhere; each stage of the encoder and of the decoder is
  ``depth`` residual blocks (MONAI :class:`~monai.networks.blocks.UnetResBlock`: two convs,
  instance norm, LeakyReLU, a 1 x 1 x 1 shortcut where the shape changes); the decoder
  upsamples by nearest-neighbour interpolation and a 1 x 1 x 1 conv.
* **ResEnc**: a stem conv, then (1, 3, 4, 6, 6, 6, ...) residual blocks per encoder stage with
  nnU-Net's kernels, and a light decoder: a transposed conv and one conv-norm-LeakyReLU per stage.

Widths, by arch and preset: ``paper``, STU-Net S 16-256, B 32-512, L 64-1024 (L two blocks
a stage), the published widths and depths; ResEnc M 32-320 like nnU-Net's plain U-Net.
``cpu``, narrowed to about the nnunet cpu preset's GFLOP a step (29.0 at 24 x 80 x 80):
STU-Net S and B 8-128 (at equal cost, S and B, which differ only in width, are one network),
L 6-96 with its two blocks a stage, ResEnc M 6-96.

Tensors are ``(B, C, D, H, W)`` = (batch, channels, z, y, x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UnetOutBlock, UnetResBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from sats.model.backbones.nnunet import NetworkPlan, plan_network

NORM = ("INSTANCE", {"affine": True})
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})

#: (base width, cap, encoder blocks per stage, decoder blocks per stage) by arch and preset.
SCALES: dict[str, dict[str, dict]] = {
    "stunet-s": {"paper": {"base": 16, "cap": 256, "depth": 1}, "cpu": {"base": 8, "cap": 128, "depth": 1}},
    "stunet-b": {"paper": {"base": 32, "cap": 512, "depth": 1}, "cpu": {"base": 8, "cap": 128, "depth": 1}},
    "stunet-l": {"paper": {"base": 64, "cap": 1024, "depth": 2}, "cpu": {"base": 6, "cap": 96, "depth": 2}},
    "resenc-m": {"paper": {"base": 32, "cap": 320, "blocks": [1, 3, 4, 6, 6, 6, 6]},
                 "cpu": {"base": 6, "cap": 96, "blocks": [1, 3, 4, 6, 6, 6, 6]}},
}


def _plan(arch: str, patch, spacing, preset: str, isotropic: bool) -> NetworkPlan:
    o = dict(SCALES[arch]["cpu" if preset == "cpu" else "paper"])
    p = plan_network(patch, spacing, o["base"], o["cap"])
    kernels = [(3, 3, 3)] * len(p.kernel_sizes) if isotropic else p.kernel_sizes
    return NetworkPlan(p.patch_size, p.spacing, kernels, p.strides, p.features, options=o)


def plan_stunet_s(patch, spacing, preset="paper", base_features=32, max_features=320) -> NetworkPlan:
    return _plan("stunet-s", patch, spacing, preset, True)


def plan_stunet_b(patch, spacing, preset="paper", base_features=32, max_features=320) -> NetworkPlan:
    return _plan("stunet-b", patch, spacing, preset, True)


def plan_stunet_l(patch, spacing, preset="paper", base_features=32, max_features=320) -> NetworkPlan:
    return _plan("stunet-l", patch, spacing, preset, True)


def plan_resenc_m(patch, spacing, preset="paper", base_features=32, max_features=320) -> NetworkPlan:
    return _plan("resenc-m", patch, spacing, preset, False)


def _res(cin: int, cout: int, kernel, stride=1) -> UnetResBlock:
    return UnetResBlock(3, cin, cout, kernel, stride, NORM, ACT)


class Upsample(nn.Module):
    """STU-Net's up step: nearest-neighbour interpolation by ``stride``, then a 1 x 1 x 1 conv."""

    def __init__(self, cin: int, cout: int, stride) -> None:
        super().__init__()
        self.stride = tuple(stride)
        self.conv = nn.Conv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.stride, mode="nearest"))


class ResidualUNet(nn.Module):
    """A U-Net whose stages are lists of blocks; ``forward(x) -> (logits, features)``."""

    def __init__(self, plan: NetworkPlan, in_channels: int, stu: bool) -> None:
        super().__init__()
        self.plan = plan
        f, k, s, o = plan.features, plan.kernel_sizes, plan.strides, plan.options
        n = len(f)
        enc_blocks = [o["depth"]] * n if stu else o["blocks"][:n]
        self.stem = None if stu else Convolution(3, in_channels, f[0], kernel_size=k[0], norm=NORM, act=ACT)
        cin = in_channels if stu else f[0]
        self.encoder = nn.ModuleList()
        for i in range(n):
            blocks = [_res(cin if j == 0 else f[i], f[i], k[i], s[i] if j == 0 else 1) for j in range(enc_blocks[i])]
            self.encoder.append(nn.Sequential(*blocks))
            cin = f[i]
        self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
        for i in range(n - 2, -1, -1):
            if stu:
                self.up.append(Upsample(f[i + 1], f[i], s[i + 1]))
                self.decoder.append(nn.Sequential(*[_res(2 * f[i] if j == 0 else f[i], f[i], 3) for j in range(o["depth"])]))
            else:
                self.up.append(get_conv_layer(3, f[i + 1], f[i], s[i + 1], s[i + 1], conv_only=True, is_transposed=True))
                self.decoder.append(Convolution(3, 2 * f[i], f[i], kernel_size=k[i], norm=NORM, act=ACT))
        self.head = UnetOutBlock(3, f[0], 1)

    @property
    def feature_channels(self) -> int:
        return self.plan.features[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for up, stage, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = stage(torch.cat([up(x), skip], dim=1))
        return self.head(x), x


def build_stunet(plan: NetworkPlan, in_channels: int = 1, residual: bool = False) -> ResidualUNet:
    return ResidualUNet(plan, in_channels, stu=True)


def build_resenc(plan: NetworkPlan, in_channels: int = 1, residual: bool = False) -> ResidualUNet:
    return ResidualUNet(plan, in_channels, stu=False)
