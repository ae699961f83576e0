"""Parameter and multiply-add counts, anchored to published figures."""

from __future__ import annotations

import pytest
import torch
import torchvision

from autopose.models import build_model
from autopose.models.complexity import count_flops, count_parameters, model_info
from autopose.models.p2net import PAPER_REFINE_BLOCKS, DilatedBottleneck, PAPER_R101_384x288


def test_p2net_r101_matches_the_paper_within_ten_percent() -> None:
    info = model_info("p2net_r101", input_size=(384, 288), num_joints=17)
    assert info["params"] == pytest.approx(PAPER_R101_384x288["params"], rel=0.10)
    # Both GFLOP conventions land within ±10% of the paper's 26.3.
    assert info["gflops_1e9"] == pytest.approx(PAPER_R101_384x288["gflops"], rel=0.10)
    assert info["gflops_hrnet"] == pytest.approx(PAPER_R101_384x288["gflops"], rel=0.10)
    assert info["gflops_hrnet"] == pytest.approx(info["macs"] / 2**30)
    assert info["gflops_1e9"] == pytest.approx(info["macs"] / 1e9)


def test_refinenet_stacks_more_dilated_bottlenecks_into_the_deeper_levels() -> None:
    """The paper's layout (more bottlenecks in deeper levels), the default of every P2Net, and its
    counts as measured against the paper's table (46.55M, 25.85 G MACs; paper 42.5M, 26.3)."""
    model = build_model("p2net_r101", input_size=(384, 288))
    per_level = tuple(
        sum(isinstance(m, DilatedBottleneck) for m in level.modules()) for level in model.refine.levels
    )
    assert per_level == PAPER_REFINE_BLOCKS == (1, 1, 2, 3)
    assert count_parameters(model) == 46_545_813
    assert count_flops(model, (384, 288)) == 25_853_771_776


def test_resnet50_matches_torchvision_docs() -> None:
    # torchvision's model table: ResNet-50, 25,557,032 parameters, 4.09 GFLOPS at 224×224.
    model = torchvision.models.resnet50(weights=None)
    assert count_parameters(model) == 25_557_032
    assert count_flops(model, (224, 224)) / 1e9 == pytest.approx(4.09, abs=0.005)


def test_simple_baseline_counts_deconvolutions_exactly_or_as_hrnet() -> None:
    model = build_model("simplebaseline_r50", input_size=(256, 192))
    backbone_and_head = count_flops(model.backbone, (256, 192)) + 256 * 17 * 64 * 48
    # Three 4×4 deconvolutions: each input pixel meets every weight once.
    deconvs = 2048 * 256 * 16 * (8 * 6) + 256 * 256 * 16 * (16 * 12) + 256 * 256 * 16 * (32 * 24)
    assert count_flops(model, (256, 192)) == backbone_and_head + deconvs
    # HRNet's code charges the output pixels (4× the input's); its paper lists 34.0M and 8.9 GFLOPs.
    hrnet = count_flops(model, (256, 192), deconv_at_output_resolution=True)
    assert hrnet == backbone_and_head + 4 * deconvs
    assert hrnet / 2**30 == pytest.approx(8.9, abs=0.1)
    assert count_parameters(model) / 1e6 == pytest.approx(34.0, abs=0.05)


def test_count_flops_leaves_the_model_as_it_was() -> None:
    model = build_model("p2net_r18", input_size=(128, 96)).train()
    first = count_flops(model, (128, 96))
    assert model.training
    assert all(not module._forward_hooks for module in model.modules())
    assert count_flops(model, (128, 96)) == first
    # Sizes that are multiples of 32: four times the pixels, four times the work, except for
    # the attention modules' 1×1 convs on globally pooled (1×1) features.
    apm_macs = sum(
        m.fc.weight.numel() for m in model.modules() if type(m).__name__ == "AttentionPartialModule"
    )
    assert apm_macs > 0
    assert count_flops(model, (256, 192)) == 4 * (first - apm_macs) + apm_macs
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_linear_layers_are_counted() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.Flatten(), torch.nn.Linear(4 * 6, 5)
    )
    assert count_flops(model, (2, 3)) == 3 * 4 * 6 + 24 * 5
