"""Losses of SATs: the asymmetric-region mask (Eq. 1), the voxel-wise margin loss (Eq. 2)
and the Dice + BCE segmentation loss; total ``l = l_dice + l_ce + beta * l_margin`` (Eq. 3).

Feature pairs are compared at the same voxel of E = g(features of I) and
E' = g(features of I'), I' the left-right mirror of I: E' is *not* flipped back, so voxel
v of E' describes the anatomical mirror partner of voxel v of I.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

from sats.geometry.symmetry import LR_AXIS, mirror_lr

#: Where the margin loss pushes pairs apart: Eq. 1 ("paper"), ``s XOR s'`` ("union"), or
#: the label-free m_unsup of :mod:`sats.geometry.asymmetry` ("unsupervised", precomputed per case).
AsymRegion = Literal["paper", "union", "unsupervised"]


def asymmetric_mask(seg: torch.Tensor, lr_axis: int = LR_AXIS, region: AsymRegion = "paper") -> torch.Tensor:
    """Where the tumour is asymmetric: Eq. (1), ``m = s - s ∩ s'``, s' = ``mirror_lr(s)``.

    ``region="union"`` gives ``s XOR s'``: a voxel whose mirror partner holds tumour is one
    side of an asymmetric pair too, and with E' compared at the same voxel the pair
    (healthy voxel, tumour partner) is as dissimilar as (tumour voxel, healthy partner).

    Args:
        seg: binary label, any shape whose ``lr_axis`` is left-right, e.g. (B, 1, D, H, W).
    Returns:
        A float tensor of seg's shape, 1 in the asymmetric region.

    Example:
        >>> s = torch.tensor([[1., 1., 0., 1.]])   # tumour at x=0,1 and its mirror x=3
        >>> asymmetric_mask(s)                      # x=0 pairs with x=3 (symmetric), x=1 with x=2
        tensor([[0., 1., 0., 0.]])
        >>> asymmetric_mask(s, region="union")
        tensor([[0., 1., 1., 0.]])
    """
    s = seg > 0.5
    s_mirror = mirror_lr(s, lr_axis)
    if region == "paper":
        m = s & ~s_mirror
    elif region == "union":
        m = s ^ s_mirror
    else:
        raise ValueError(f"region must be paper or union, not {region!r} (unsupervised regions come from sats.geometry.asymmetry)")
    return m.to(torch.float32)


def margin_loss(
    e: torch.Tensor,
    e_flip: torch.Tensor,
    asym: torch.Tensor,
    margin: float = 20.0,
) -> torch.Tensor:
    """Voxel-wise margin (contrastive) loss between the features of a CT and its mirror.

    With ``d = ||e - e'||^2`` over channels at each voxel: where ``asym == 0`` the pair is
    pulled together (``d``); where ``asym == 1`` it is pushed apart by the hinge
    ``max(margin - d, 0)``. This follows the paper's text (abstract, Sec. 1 and 3: the
    features of asymmetric abnormal regions are made dissimilar to their mirror). The
    printed Eq. (2) has the two indicators the other way round, which would pull tumour
    pairs together; we take it for a typo.

    Normalisation: each term is the mean over its own region (symmetric voxels,
    asymmetric voxels), and the loss is their sum; an empty region contributes 0. A mean
    over all voxels would let the few tumour voxels vanish next to the background.

    With unit-normalised features (the projection head) ``d <= 4``, so the paper's
    ``margin = 20`` keeps the hinge always active: the asymmetric term then simply
    maximises the distance (its value stays in [16, 20]). The margin is configurable.

    Args:
        e, e_flip: (B, C, D, H, W) projected features of the CT and of its mirror.
        asym: (B, 1, D, H, W) or (B, D, H, W) asymmetric mask (1 = asymmetric).
    Returns:
        A scalar tensor.
    """
    if asym.dim() == e.dim() - 1:
        asym = asym.unsqueeze(1)
    d = (e - e_flip).pow(2).sum(dim=1, keepdim=True)
    asym = asym.to(d.dtype)
    sym = 1.0 - asym
    pull = (sym * d).sum() / sym.sum().clamp_min(1.0)
    push = (asym * F.relu(margin - d)).sum() / asym.sum().clamp_min(1.0)
    return pull + push


class SegmentationLoss(torch.nn.Module):
    """Dice + binary cross-entropy on sigmoid logits, ``(B, 1, D, H, W)`` each.

    Dice is computed over the whole batch (as nnU-Net's batch Dice), so patches without
    tumour do not produce an undefined per-sample Dice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        target = target.to(logits.dtype)
        return {"dice": self.dice(logits, target), "ce": F.binary_cross_entropy_with_logits(logits, target)}
