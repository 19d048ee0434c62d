"""asymmetric_mask, margin_loss and the segmentation loss on hand-made tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sats.model.losses import SegmentationLoss, asymmetric_mask, margin_loss


def test_asymmetric_mask_paper_and_union() -> None:
    seg = torch.zeros(1, 1, 1, 2, 6)
    seg[..., 0, 1] = 1  # unilateral voxel: partner x=4 is healthy
    seg[..., 1, 0] = seg[..., 1, 5] = 1  # bilateral pair: symmetric
    m = asymmetric_mask(seg)
    assert m.sum() == 1 and m[..., 0, 1] == 1
    u = asymmetric_mask(seg, region="union")
    assert u.sum() == 2 and u[..., 0, 1] == 1 and u[..., 0, 4] == 1
    # Eq. (1) never marks a voxel outside the tumour; the union marks its mirror.
    assert torch.all(m <= seg) and not torch.all(u <= seg)


def test_asymmetric_mask_uses_the_given_axis() -> None:
    seg = torch.zeros(3, 4)
    seg[0, 1] = 1
    assert asymmetric_mask(seg, lr_axis=0)[0, 1] == 1
    seg[2, 1] = 1  # now symmetric along axis 0 but not along axis 1
    assert asymmetric_mask(seg, lr_axis=0).sum() == 0
    assert asymmetric_mask(seg, lr_axis=1).sum() == 2


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


def test_margin_loss_zero_for_identical_symmetric_features() -> None:
    e = unit(torch.randn(2, 16, 3, 4, 5))
    assert margin_loss(e, e.clone(), torch.zeros(2, 1, 3, 4, 5)) == 0


def test_margin_loss_grows_when_symmetric_pairs_move_apart() -> None:
    e = unit(torch.randn(1, 4, 2, 2, 2))
    asym = torch.zeros(1, 2, 2, 2)  # (B, D, H, W) form accepted too
    near = margin_loss(e, unit(e + 0.1 * torch.randn_like(e)), asym)
    far = margin_loss(e, unit(e + 2.0 * torch.randn_like(e)), asym)
    assert 0 < near < far


def test_margin_loss_shrinks_when_asymmetric_pairs_move_apart_inside_margin() -> None:
    e = torch.zeros(1, 2, 1, 1, 1)
    e[:, 0] = 1.0
    asym = torch.ones(1, 1, 1, 1, 1)
    losses = []
    for angle in (0.0, 0.5, 1.5, 3.0):  # distance grows with the angle between unit vectors
        e2 = torch.zeros_like(e)
        e2[:, 0], e2[:, 1] = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
        losses.append(float(margin_loss(e, e2, asym, margin=20.0)))
    assert losses[0] == 20.0
    assert all(a > b for a, b in zip(losses, losses[1:]))
    # Beyond the margin the hinge is flat.
    e3 = torch.zeros_like(e)
    e3[:, 0] = -1.0  # d = 4
    assert margin_loss(e, e3, asym, margin=1.0) == 0


def test_margin_loss_normalised_per_region() -> None:
    """Each region's term is its own mean: adding symmetric voxels with d=0 does not dilute the push."""
    e = torch.zeros(1, 1, 1, 1, 10)
    e_flip = torch.zeros_like(e)
    asym_small = torch.zeros(1, 1, 1, 1, 10)
    asym_small[..., 0] = 1
    asym_big = torch.zeros(1, 1, 1, 1, 10)
    asym_big[..., :5] = 1
    assert margin_loss(e, e_flip, asym_small, margin=3.0) == 3.0
    assert margin_loss(e, e_flip, asym_big, margin=3.0) == 3.0
    # Symmetric region: mean of d over symmetric voxels only.
    e_flip[..., 9] = 2.0  # d = 4 at one symmetric voxel of 9
    torch.testing.assert_close(margin_loss(e, e_flip, asym_small, margin=3.0), torch.tensor(3.0 + 4.0 / 9))


def test_margin_loss_gradients_point_the_right_way() -> None:
    e = unit(torch.randn(1, 8, 2, 2, 2)).requires_grad_(True)
    e_flip = unit(torch.randn(1, 8, 2, 2, 2))
    asym = torch.zeros(1, 1, 2, 2, 2)
    asym[..., 0, 0, 0] = 1
    margin_loss(e, e_flip, asym).backward()
    g = e.grad
    diff = (e - e_flip).detach()
    # Gradient descent (-g) moves symmetric pairs together, asymmetric apart.
    sym_dir = (-g * -diff).sum(1)[0]
    assert sym_dir[1, 1, 1] > 0 and sym_dir[0, 0, 0] < 0


def test_segmentation_loss_prefers_the_right_answer() -> None:
    target = torch.zeros(2, 1, 4, 8, 8)
    target[:, :, 1:3, 2:6, 2:6] = 1
    loss = SegmentationLoss()
    good = loss(target * 20 - 10, target)
    bad = loss(10 - target * 20, target)
    assert good["dice"] < 0.01 and good["ce"] < 0.01
    assert bad["dice"] > 0.9 and bad["ce"] > 5
