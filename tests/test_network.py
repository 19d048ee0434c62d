"""Network plan, parameter count, Siamese forward and projection head."""

from __future__ import annotations

import pytest
import torch

from sats.network import EncoderDecoder, ProjectionHead, SATsNet, count_parameters, plan_network


def test_paper_plan_matches_nnunet() -> None:
    plan = plan_network((56, 192, 192), (3.0, 1.0, 1.0))
    assert plan.strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert plan.kernel_sizes[0] == (1, 3, 3) and all(k == (3, 3, 3) for k in plan.kernel_sizes[1:])
    assert plan.features == [32, 64, 128, 256, 320, 320]


def test_paper_parameter_count_within_one_percent_of_table_1() -> None:
    model = EncoderDecoder(plan_network((56, 192, 192), (3.0, 1.0, 1.0)))
    n = count_parameters(model)
    assert abs(n - 30.70e6) / 30.70e6 < 0.01, n


def test_isotropic_plan_uses_3d_kernels_everywhere() -> None:
    plan = plan_network((64, 64, 64), (1.0, 1.0, 1.0))
    assert all(k == (3, 3, 3) for k in plan.kernel_sizes)
    assert all(s == (2, 2, 2) for s in plan.strides[1:])
    assert len(plan.strides) == 5  # 64 -> 4 voxels


def test_patch_not_divisible_is_rejected() -> None:
    with pytest.raises(ValueError, match="divisible"):
        plan_network((56, 190, 192), (3.0, 1.0, 1.0))


def test_siamese_forward_shares_weights_and_returns_both_branches() -> None:
    torch.manual_seed(0)
    plan = plan_network((8, 32, 32), (3.0, 1.0, 1.0), base_features=4, max_features=16)
    model = SATsNet(plan).eval()
    x = torch.randn(2, 1, 8, 32, 32)
    x_m = torch.flip(x, dims=(-1,))
    out = model(x, x_m)
    assert out["logits"].shape == (2, 1, 8, 32, 32) and out["logits_mirror"].shape == (2, 1, 8, 32, 32)
    assert out["proj"].shape == (2, 16, 8, 32, 32)
    torch.testing.assert_close(out["proj"].norm(dim=1), torch.ones(2, 8, 32, 32))
    # Same weights: the mirror branch equals the encoder-decoder applied to the mirror alone.
    alone, _ = model.encoder_decoder(x_m)
    torch.testing.assert_close(out["logits_mirror"], alone, atol=1e-5, rtol=1e-4)
    # Swapping the inputs swaps the outputs.
    swapped = model(x_m, x)
    torch.testing.assert_close(swapped["logits"], out["logits_mirror"], atol=1e-5, rtol=1e-4)


def test_without_head_the_features_are_the_decoder_output() -> None:
    plan = plan_network((8, 16, 16), (1.0, 1.0, 1.0), base_features=4)
    model = SATsNet(plan, projection_head=False)
    out = model(torch.randn(1, 1, 8, 16, 16), torch.randn(1, 1, 8, 16, 16))
    assert model.head is None and out["proj"].shape[1] == 4


def test_residual_option_builds_a_different_network() -> None:
    plan = plan_network((8, 16, 16), (1.0, 1.0, 1.0), base_features=4)
    assert count_parameters(EncoderDecoder(plan, residual=True)) > count_parameters(EncoderDecoder(plan))


def test_projection_head_layers() -> None:
    head = ProjectionHead(32, 16)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(convs) == 3 and all(c.kernel_size == (1, 1, 1) and c.out_channels == 16 for c in convs)
    assert sum(isinstance(m, torch.nn.ReLU) for m in head.modules()) == 2
