"""Backbones built from MONAI's networks: Swin UNETR (v1 and v2), UNETR and MedNeXt.

Each MONAI network ends in one output conv (``out`` or ``out_0``); :class:`Tapped` moves
that conv out of the network, so the network returns the last decoder map (the features
the SATs head reads) and the conv turns it into the logits. Weights and arithmetic are
MONAI's own.

Widths per preset: ``paper`` is the configuration whose parameter count the paper gives
(Table 1, at 56 x 192 x 192 with one output channel; the patch rounded up to the
network's multiple); ``cpu`` is narrowed until one training step (batch 2, forward and
backward) costs about what the ``nnunet`` arch's ``cpu`` preset costs at the same patch
(``sats summary --arch X --preset cpu`` prints both; BENCHMARKS.md, issue 25).

Tensors are ``(B, C, D, H, W)`` = (batch, channels, z, y, x).
"""

from __future__ import annotations

import torch
from torch import nn

from sats.model.backbones.nnunet import NetworkPlan

#: Widths by preset. Swin UNETR: MONAI's feature size 48 and heads (3, 6, 12, 24) are the
#: 62.19 M / 72.8 M of the paper; its cpu scale keeps the depths and narrows the channels.
#: UNETR: ViT-B/16 (768 hidden, 12 heads, MLP 3072, 12 layers: MONAI fixes the depth).
#: MedNeXt: the L configuration with kernel 3 (Roy et al. 2023: 61.8 M).
#: cpu scales, GFLOP of a training step (batch 2) against nnunet's cpu preset (29.0 at
#: 24 x 80 x 80, 4.1 at the test bed's 24 x 32 x 32): UNETR 29.1 / 4.6, MedNeXt 26.1 / 4.1.
#: Swin UNETR cannot be brought that low: MONAI needs a feature size divisible by 12 and
#: the patch at least 32 x 64 x 64, so its narrowest costs 92 / 42.5 GFLOP (3.2x / 10.5x).
SCALES: dict[str, dict[str, dict]] = {
    "swinunetr": {"paper": {"feature_size": 48, "num_heads": [3, 6, 12, 24]},
                  "cpu": {"feature_size": 12, "num_heads": [1, 2, 4, 8]}},
    "unetr": {"paper": {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
              "cpu": {"feature_size": 7, "hidden_size": 96, "mlp_dim": 384, "num_heads": 4}},
    "mednext": {"paper": {"init_filters": 32, "expansion": [3, 4, 8, 8], "bottleneck_expansion": 8,
                          "blocks_down": [3, 4, 8, 8], "blocks_bottleneck": 8, "blocks_up": [8, 8, 4, 3]},
                "cpu": {"init_filters": 11, "expansion": [2, 2, 2, 2], "bottleneck_expansion": 2,
                        "blocks_down": [1, 1, 1, 1], "blocks_bottleneck": 1, "blocks_up": [1, 1, 1, 1]}},
}


def _scale(family: str, preset: str) -> dict:
    return dict(SCALES[family]["cpu" if preset == "cpu" else "paper"])


class Tapped(nn.Module):
    """A MONAI network with its final output conv ``head_name`` taken out:
    ``forward(x) -> (logits, features)``."""

    def __init__(self, plan: NetworkPlan, net: nn.Module, head_name: str, feature_channels: int) -> None:
        super().__init__()
        self.plan = plan
        self.head = getattr(net, head_name)
        setattr(net, head_name, nn.Identity())
        self.net = net
        self._feature_channels = feature_channels

    @property
    def feature_channels(self) -> int:
        return self._feature_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net(x)
        return self.head(features), features


def _isotropic_plan(patch, spacing, levels: int, features: list[int], options: dict) -> NetworkPlan:
    """A plan for a network that halves every axis ``levels`` times (3x3x3 kernels)."""
    return NetworkPlan(tuple(patch), tuple(spacing), [(3, 3, 3)] * (levels + 1), [(1, 1, 1)] + [(2, 2, 2)] * levels,
                       features, options=options)


# --- Swin UNETR -------------------------------------------------------------------------------------


def plan_swinunetr(patch, spacing, preset="paper", base_features=32, max_features=320, v2: bool = False) -> NetworkPlan:
    """Swin UNETR: patch embedding 2, four Swin stages (depths 2, 2, 2, 2, window 7), every
    axis a multiple of 32."""
    o = {**_scale("swinunetr", preset), "use_v2": v2}
    f = o["feature_size"]
    return _isotropic_plan(patch, spacing, 5, [f, f, 2 * f, 4 * f, 8 * f, 16 * f], o)


def plan_swinunetr_v2(patch, spacing, preset="paper", base_features=32, max_features=320) -> NetworkPlan:
    """Swin UNETR v2: a residual conv block before each Swin stage."""
    return plan_swinunetr(patch, spacing, preset, base_features, max_features, v2=True)


def build_swinunetr(plan: NetworkPlan, in_channels: int = 1, residual: bool = False) -> Tapped:
    from monai.networks.nets import SwinUNETR

    o = plan.options
    net = SwinUNETR(in_channels=in_channels, out_channels=1, feature_size=o["feature_size"],
                    num_heads=tuple(o["num_heads"]), use_v2=bool(o["use_v2"]))
    return Tapped(plan, net, "out", o["feature_size"])


# --- UNETR ------------------------------------------------------------------------------------------


def plan_unetr(patch, spacing, preset="paper", base_features=32, max_features=320) -> NetworkPlan:
    """UNETR: 16^3 tokens through 12 transformer layers, every axis a multiple of 16; the
    position embedding is sized for the patch, so the patch is fixed once planned."""
    o = _scale("unetr", preset)
    f = o["feature_size"]
    return _isotropic_plan(patch, spacing, 4, [f, 2 * f, 4 * f, 8 * f, o["hidden_size"]], o)


def build_unetr(plan: NetworkPlan, in_channels: int = 1, residual: bool = False) -> Tapped:
    from monai.networks.nets import UNETR

    o = plan.options
    net = UNETR(in_channels, 1, img_size=tuple(plan.patch_size), feature_size=o["feature_size"],
                hidden_size=o["hidden_size"], mlp_dim=o["mlp_dim"], num_heads=o["num_heads"])
    for block in net.vit.blocks:  # MONAI makes a cross-attention norm it never uses: DDP wants no idle weights
        if not block.with_cross_attention:
            block.norm_cross_attn = nn.Identity()
    return Tapped(plan, net, "out", o["feature_size"])


# --- MedNeXt ----------------------------------------------------------------------------------------


def plan_mednext(patch, spacing, preset="paper", base_features=32, max_features=320) -> NetworkPlan:
    """MedNeXt: ConvNeXt blocks (depthwise kernel 3, expansion, GroupNorm), four 2x
    downsamplings, every axis a multiple of 16."""
    o = {**_scale("mednext", preset), "kernel_size": 3}
    f = o["init_filters"]
    return _isotropic_plan(patch, spacing, 4, [f * 2**i for i in range(5)], o)


def build_mednext(plan: NetworkPlan, in_channels: int = 1, residual: bool = False) -> Tapped:
    from monai.networks.nets import MedNeXt

    o = plan.options
    net = MedNeXt(spatial_dims=3, init_filters=o["init_filters"], in_channels=in_channels, out_channels=1,
                  encoder_expansion_ratio=tuple(o["expansion"]), decoder_expansion_ratio=tuple(o["expansion"][::-1]),
                  bottleneck_expansion_ratio=o["bottleneck_expansion"], kernel_size=o["kernel_size"],
                  use_residual_connection=True, blocks_down=tuple(o["blocks_down"]),
                  blocks_bottleneck=o["blocks_bottleneck"], blocks_up=tuple(o["blocks_up"]))
    return Tapped(plan, net, "out_0", o["init_filters"])
