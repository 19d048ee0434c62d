"""Residual U-Nets built from MONAI's blocks: STU-Net (S, B, L; Huang et al. 2023),
nnU-Net's residual-encoder U-Nets (ResEnc M and L; Isensee et al., MICCAI 2024) and U-Mamba Bot
(Ma et al. 2024), and the 3D TransUNet (Chen et al. 2023).

Both keep nnU-Net's plan of strides from the patch and spacing
(:func:`~sats.model.backbones.nnunet.plan_network`); they differ in their blocks:

* **STU-Net**: 3 x 3 x 3 kernels everywhere; each stage of the encoder and of the decoder is
  ``depth`` residual blocks (MONAI :class:`~monai.networks.blocks.UnetResBlock`: two convs,
  instance norm, LeakyReLU, a 1 x 1 x 1 shortcut where the shape changes); the decoder
  upsamples by nearest-neighbour interpolation and a 1 x 1 x 1 conv.
* **ResEnc**: a stem conv, then (1, 3, 4, 6, 6, 6, ...) residual blocks per encoder stage with
  nnU-Net's kernels, and a light decoder: a transposed conv and one conv-norm-LeakyReLU per stage.
* **U-Mamba Bot**: a stem, two residual blocks per stage in the encoder and in the decoder
  (transposed convs up), nnU-Net's kernels, and one Mamba layer over the bottleneck's
  voxels (:class:`~sats.model.backbones.mamba.MambaLayer`), U-Mamba's own design with
  nnU-Net's default of two blocks a stage. At the paper's patch this is 57.92 M parameters
  against its 64.76 M (-10.6 %); the paper does not give the plan its count came from.

Widths, by arch and preset: ``paper``, STU-Net S 16-256, B 32-512, L 64-1024 (L two blocks
a stage), the published widths and depths; ResEnc M and L 32-320 like nnU-Net's plain U-Net.
``cpu``, narrowed to about the nnunet cpu preset's GFLOP a step (29.0 at 24 x 80 x 80):
STU-Net S and B 8-128 (at equal cost, S and B, which differ only in width, are one network),
L 6-96 with its two blocks a stage, ResEnc M 6-96, ResEnc L (on 3x the patch) 4-64.

Tensors are ``(B, C, D, H, W)`` = (batch, channels, z, y, x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UnetBasicBlock, UnetOutBlock, UnetResBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from sats.model.backbones.mamba import MambaLayer
from sats.model.backbones.nnunet import NetworkPlan, plan_network
from sats.model.backbones.transformer import ViTBottleneck

NORM = ("INSTANCE", {"affine": True})
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})

#: Per arch and preset: widths (base, cap) and the design. ``blocks``: residual blocks per
#: encoder stage (a list, or one number for every stage); ``decoder``: "res" (``decoder_blocks``
#: residual blocks a stage) or "conv" (one conv-norm-LeakyReLU); ``up``: "interp" (nearest,
#: then a 1 x 1 x 1 conv) or "transpose"; ``stem``: a conv before the first stage;
#: ``mamba``: a Mamba layer over the bottleneck's voxels (:mod:`.mamba`); ``vit``: a ViT there
#: (:mod:`.transformer`); ``encoder`` "plain": two conv-norm-LeakyReLU a stage, no shortcut.
_STU = {"blocks": 1, "decoder": "res", "decoder_blocks": 1, "up": "interp", "stem": False, "isotropic": True}
_RESENC = {"blocks": [1, 3, 4, 6, 6, 6, 6], "decoder": "conv", "up": "transpose", "stem": True, "isotropic": False}
_UMAMBA = {"blocks": 2, "decoder": "res", "decoder_blocks": 2, "up": "transpose", "stem": True, "isotropic": False, "mamba": True}
#: 3D TransUNet, encoder-only: nnU-Net's plain U-Net (two conv-norm-LeakyReLU a stage, no
#: shortcut) with a 12-layer ViT-B over the bottleneck's voxels.
_TRANS = {"blocks": 1, "encoder": "plain", "decoder": "plain", "up": "transpose", "stem": False, "isotropic": False,
          "vit": {"hidden": 768, "layers": 12, "heads": 12, "mlp": 3072}}
SCALES: dict[str, dict[str, dict]] = {
    "stunet-s": {"paper": {**_STU, "base": 16, "cap": 256}, "cpu": {**_STU, "base": 8, "cap": 128}},
    "stunet-b": {"paper": {**_STU, "base": 32, "cap": 512}, "cpu": {**_STU, "base": 8, "cap": 128}},
    "stunet-l": {"paper": {**_STU, "base": 64, "cap": 1024, "blocks": 2, "decoder_blocks": 2},
                 "cpu": {**_STU, "base": 6, "cap": 96, "blocks": 2, "decoder_blocks": 2}},
    "resenc-m": {"paper": {**_RESENC, "base": 32, "cap": 320}, "cpu": {**_RESENC, "base": 6, "cap": 96}},
    # ResEnc L is ResEnc M's network on a 3x larger patch (Backbone.patch_volume); at cpu
    # scale it is narrowed so that its larger patch still costs about nnunet's step.
    "resenc-l": {"paper": {**_RESENC, "base": 32, "cap": 320}, "cpu": {**_RESENC, "base": 4, "cap": 64}},
    "umamba-bot": {"paper": {**_UMAMBA, "base": 32, "cap": 320}, "cpu": {**_UMAMBA, "base": 6, "cap": 96}},
    "transunet": {"paper": {**_TRANS, "base": 32, "cap": 320},
                  "cpu": {**_TRANS, "base": 8, "cap": 96, "vit": {"hidden": 96, "layers": 4, "heads": 4, "mlp": 384}}},
}


def plan_residual(arch: str, patch, spacing, preset: str = "paper") -> NetworkPlan:
    """The plan of a residual U-Net ``arch``: nnU-Net's strides for the patch, the arch's widths."""
    o = dict(SCALES[arch]["cpu" if preset == "cpu" else "paper"])
    p = plan_network(patch, spacing, o["base"], o["cap"])
    kernels = [(3, 3, 3)] * len(p.kernel_sizes) if o["isotropic"] else p.kernel_sizes
    return NetworkPlan(p.patch_size, p.spacing, kernels, p.strides, p.features, options=o)


def planner(arch: str):
    """``(patch, spacing, preset, base_features, max_features) -> NetworkPlan`` for ``arch``
    (the backbone interface; the widths come from :data:`SCALES`)."""
    def plan(patch, spacing, preset="paper", base_features=32, max_features=320) -> NetworkPlan:
        return plan_residual(arch, patch, spacing, preset)
    return plan


def _res(cin: int, cout: int, kernel, stride=1) -> UnetResBlock:
    return UnetResBlock(3, cin, cout, kernel, stride, NORM, ACT)


def _plain(cin: int, cout: int, kernel, stride=1) -> UnetBasicBlock:
    return UnetBasicBlock(3, cin, cout, kernel, stride, NORM, ACT)


class Upsample(nn.Module):
    """STU-Net's up step: nearest-neighbour interpolation by ``stride``, then a 1 x 1 x 1 conv."""

    def __init__(self, cin: int, cout: int, stride) -> None:
        super().__init__()
        self.stride = tuple(stride)
        self.conv = nn.Conv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.stride, mode="nearest"))


class ResidualUNet(nn.Module):
    """A U-Net of residual stages, designed by ``plan.options`` (see :data:`SCALES`);
    ``forward(x) -> (logits, features)``."""

    def __init__(self, plan: NetworkPlan, in_channels: int) -> None:
        super().__init__()
        self.plan = plan
        f, k, s, o = plan.features, plan.kernel_sizes, plan.strides, plan.options
        n = len(f)
        enc_blocks = o["blocks"][:n] if isinstance(o["blocks"], list) else [o["blocks"]] * n
        self.stem = Convolution(3, in_channels, f[0], kernel_size=k[0], norm=NORM, act=ACT) if o["stem"] else None
        cin = f[0] if o["stem"] else in_channels
        self.encoder = nn.ModuleList()
        block = _plain if o.get("encoder") == "plain" else _res
        for i in range(n):
            blocks = [block(cin if j == 0 else f[i], f[i], k[i], s[i] if j == 0 else 1) for j in range(enc_blocks[i])]
            self.encoder.append(nn.Sequential(*blocks))
            cin = f[i]
        self.bottleneck = MambaLayer(f[-1]) if o.get("mamba") else None
        if o.get("vit"):
            deepest = [p // t for p, t in zip(plan.patch_size, plan.total_stride)]
            self.bottleneck = ViTBottleneck(f[-1], int(deepest[0] * deepest[1] * deepest[2]), **o["vit"])
        self.up, self.decoder = nn.ModuleList(), nn.ModuleList()
        for i in range(n - 2, -1, -1):
            if o["up"] == "interp":
                self.up.append(Upsample(f[i + 1], f[i], s[i + 1]))
            else:
                self.up.append(get_conv_layer(3, f[i + 1], f[i], s[i + 1], s[i + 1], conv_only=True, is_transposed=True))
            if o["decoder"] == "plain":
                self.decoder.append(_plain(2 * f[i], f[i], k[i]))
            elif o["decoder"] == "res":
                self.decoder.append(nn.Sequential(*[_res(2 * f[i] if j == 0 else f[i], f[i], k[i]) for j in range(o["decoder_blocks"])]))
            else:
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
        if self.bottleneck is not None:
            x = self.bottleneck(x)
        for up, stage, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = stage(torch.cat([up(x), skip], dim=1))
        return self.head(x), x


def build(plan: NetworkPlan, in_channels: int = 1, residual: bool = False) -> ResidualUNet:
    """The backbone interface: the residual U-Net of ``plan``."""
    return ResidualUNet(plan, in_channels)
