"""P2Net and SimpleBaseline: output shapes, the training/eval contract, gradients, the builder's errors."""

from __future__ import annotations

import pytest
import torch

from autopose.errors import AutoposeError
from autopose.models import ARCHITECTURES, P2Net, build_model, parse_architecture

SMALL_SIZES = [(64, 48), (128, 96)]


def _check_outputs(model: torch.nn.Module, size: tuple[int, int], joints: int, n_train: int) -> None:
    height, width = size
    images = torch.rand(2, 3, height, width, device=next(model.parameters()).device)
    model.train()
    outputs = model(images)
    assert isinstance(outputs, list) and len(outputs) == n_train
    for heatmaps in outputs:
        assert heatmaps.shape == (2, joints, height // 4, width // 4)
        if heatmaps.device.type != "meta":
            assert torch.isfinite(heatmaps).all()
    model.eval()
    with torch.no_grad():
        final = model(images)
    assert isinstance(final, torch.Tensor)
    assert final.shape == (2, joints, height // 4, width // 4)


@pytest.mark.parametrize("size", SMALL_SIZES)
@pytest.mark.parametrize(
    ("name", "n_train"), [("p2net_r18", 5), ("p2net_r18_prog", 5), ("simplebaseline_r18", 1)]
)
def test_shapes_at_two_sizes(name: str, n_train: int, size: tuple[int, int]) -> None:
    _check_outputs(build_model(name, num_joints=17, input_size=size), size, 17, n_train)


@pytest.mark.parametrize(
    ("name", "switches"),
    [
        ("p2net_r18", {"use_apm": False}),
        ("p2net_r18", {"use_parallel": False}),
        ("p2net_r18_prog", {"use_parallel": False, "use_apm": False}),
    ],
)
def test_shapes_of_ablations(name: str, switches: dict) -> None:
    _check_outputs(build_model(name, input_size=(64, 48), **switches), (64, 48), 17, 5)


@pytest.mark.parametrize("name", ["p2net_r50", "simplebaseline_r50"])
def test_shapes_bottleneck_backbones_once(name: str) -> None:
    model = build_model(name, num_joints=16, input_size=(64, 48))
    _check_outputs(model, (64, 48), 16, 1 if name.startswith("simple") else 5)


def test_every_architecture_name_parses() -> None:
    assert len(ARCHITECTURES) == 15
    for name in ARCHITECTURES:
        family, depth, fusion = parse_architecture(name)
        assert name == f"{family}_r{depth}" + ("_prog" if fusion == "progressive" else "")
        assert (fusion is None) == (family == "simplebaseline")
    assert parse_architecture("p2net_r50") == ("p2net", 50, "parallel")
    assert parse_architecture("p2net_r152_prog") == ("p2net", 152, "progressive")


@pytest.mark.parametrize("name", ["p2net_r34", "p2net_r101", "p2net_r152_prog", "simplebaseline_r152"])
def test_deeper_architectures_build_with_their_shapes(name: str) -> None:
    # On the meta device: real construction and shape propagation without the arithmetic.
    with torch.device("meta"):
        model = build_model(name, num_joints=14, input_size=(64, 48))
        _, depth, fusion = parse_architecture(name)
        assert model.backbone.depth == depth
        if isinstance(model, P2Net):
            assert model.config.fusion == fusion
        _check_outputs(model, (64, 48), 14, 1 if name.startswith("simple") else 5)


def test_ablation_switches_remove_their_modules() -> None:
    full = build_model("p2net_r18")
    no_apm = build_model("p2net_r18", use_apm=False)
    no_parallel = build_model("p2net_r18", use_parallel=False)
    names = {type(m).__name__ for m in full.modules()}
    assert {"AttentionPartialModule", "ParallelNet", "ExchangeUnit"} <= names
    assert "AttentionPartialModule" not in {type(m).__name__ for m in no_apm.modules()}
    assert not {"ParallelNet", "ProgressiveFusion"} & {type(m).__name__ for m in no_parallel.modules()}
    prog = {type(m).__name__ for m in build_model("p2net_r18_prog").modules()}
    assert "ProgressiveFusion" in prog and "ParallelNet" not in prog


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = build_model("p2net_r18", input_size=(64, 48)).train()
    outputs = model(torch.rand(2, 3, 64, 48))
    # Each output gets a different random direction so no gradient cancels by symmetry.
    loss = sum((out * torch.randn_like(out)).sum() for out in outputs)
    loss.backward()
    without = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []


def test_normalization_happens_inside() -> None:
    # Callers pass 0…1 images: a constant ImageNet-mean image is zero after the model's normalization.
    model = build_model("simplebaseline_r18")
    mean_image = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert torch.allclose(model.normalize(mean_image), torch.zeros(1, 3, 8, 8), atol=1e-6)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(AutoposeError) as error:
        build_model("p2net_r77")
    message = str(error.value)
    assert "p2net_r77" in message
    assert all(name in message for name in ARCHITECTURES)


def test_unknown_switch_and_bad_size_are_clear_errors() -> None:
    with pytest.raises(AutoposeError, match="use_apn"):
        build_model("p2net_r18", use_apn=False)
    with pytest.raises(AutoposeError, match="switches"):
        build_model("simplebaseline_r18", use_apm=False)
    with pytest.raises(AutoposeError, match="multiples of 4"):
        build_model("p2net_r18", input_size=(66, 48))


def test_switches_from_yaml_lists_and_bad_values() -> None:
    # Configs read from YAML/JSON carry lists; they become the config's tuples.
    model = build_model("p2net_r18", parallel_channels=[16, 16, 16, 16], refine_blocks=[0, 1, 1, 2])
    assert model.config.parallel_channels == (16, 16, 16, 16) and model.config.refine_blocks == (0, 1, 1, 2)
    for bad in (
        {"parallel_channels": [16, 16]},
        {"use_apm": 1},
        {"refine_channels": 0},
        {"fusion": "parallel"},
    ):
        with pytest.raises(AutoposeError, match=next(iter(bad))):
            build_model("p2net_r18", **bad)
