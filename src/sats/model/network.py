"""The SATs network: a shared U-shaped encoder-decoder run on the CT and its mirror, and
the projection head g used by the margin loss.

The encoder-decoder is a backbone of :mod:`sats.model.backbones` (``TrainConfig.arch``).
The default, ``nnunet``, is MONAI's :class:`~monai.networks.nets.DynUNet`, configured the
way nnU-Net's planner configures its plain U-Net from the patch size and voxel spacing
(:func:`plan_network`): two 3x3x3 conv -> InstanceNorm -> LeakyReLU per stage, strided
convolutions down, transposed convolutions up with skip concatenation, 32 features
doubling per stage and capped at 320. Everything below works on every backbone.

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

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sats.model.backbones import build_backbone
from sats.model.backbones.nnunet import EncoderDecoder, NetworkPlan, plan_network  # noqa: F401 (re-exported)


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
        self.encoder_decoder = build_backbone(plan, input_channels(fusion, fusion_difference), residual)
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
    return plan.arch == "nnunet" and plan.features[0] < 16  # measured for nnunet only


def to_preferred_layout(model: nn.Module, plan: NetworkPlan, device: torch.device | str, bf16: bool) -> nn.Module:
    """``model`` in channels-last 3D where :func:`prefers_channels_last` says so (in place).
    Inputs need no conversion: a one-channel (N, 1, D, H, W) tensor is channels-last
    already, and every convolution after it follows its weights' layout."""
    if prefers_channels_last(plan, device, bf16):
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
