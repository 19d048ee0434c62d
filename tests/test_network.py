"""Network plan, parameter count, Siamese forward and projection head."""

from __future__ import annotations

import pytest
import torch

from sats.model.network import EncoderDecoder, ProjectionHead, SATsNet, count_parameters, plan_network


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


def test_channels_last_rule_follows_the_first_level_width() -> None:
    from sats.model.network import prefers_channels_last

    narrow = plan_network((24, 80, 80), (3.0, 1.6, 1.6), base_features=8, max_features=128)
    wide = plan_network((24, 80, 80), (3.0, 1.6, 1.6), base_features=32, max_features=320)
    assert prefers_channels_last(narrow, "cpu", bf16=False)
    assert not prefers_channels_last(wide, "cpu", bf16=True)
    assert prefers_channels_last(wide, "cuda", bf16=True) and not prefers_channels_last(narrow, "cuda", bf16=False)


def test_channels_last_model_computes_the_same_function() -> None:
    from sats.model.network import to_preferred_layout

    plan = plan_network((16, 32, 32), (3.0, 1.6, 1.6), base_features=8, max_features=32)
    torch.manual_seed(0)
    plain = SATsNet(plan).eval()
    cl = SATsNet(plan).eval()
    cl.load_state_dict(plain.state_dict())
    to_preferred_layout(cl, plan, "cpu", bf16=False)
    conv = cl.encoder_decoder.unet.input_block.conv2.conv.weight  # 8 -> 8 channels
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        a, b = plain(x, x.flip(-1)), cl(x, x.flip(-1))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    # Weights saved from the channels-last model load into a default-layout one unchanged.
    again = SATsNet(plan).eval()
    again.load_state_dict(cl.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x, None)["logits"], a["logits"], rtol=1e-4, atol=1e-4)
