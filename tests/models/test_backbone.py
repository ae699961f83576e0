"""ResNet backbone levels and loading ImageNet weights from a local file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from autopose.errors import AutoposeError
from autopose.models import build_model
from autopose.models.backbone import ResNetBackbone, load_pretrained


@pytest.mark.parametrize(("depth", "width"), [(18, 64), (50, 256)])
def test_levels_have_strides_4_to_32(depth: int, width: int) -> None:
    with torch.no_grad():
        levels = ResNetBackbone(depth).eval()(torch.rand(1, 3, 128, 96))
    assert [tuple(x.shape[1:]) for x in levels] == [
        (width, 32, 24),
        (2 * width, 16, 12),
        (4 * width, 8, 6),
        (8 * width, 4, 3),
    ]


@pytest.fixture
def resnet18_file(tmp_path: Path) -> tuple[Path, dict]:
    """A randomly initialised torchvision ResNet-18 saved like an ImageNet checkpoint (fc included)."""
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_load_pretrained_copies_every_tensor(resnet18_file: tuple[Path, dict]) -> None:
    path, state = resnet18_file
    model = build_model("p2net_r18", pretrained=path)
    loaded = model.backbone.state_dict()
    assert set(loaded) == {key for key in state if not key.startswith("fc.")}
    assert all(torch.equal(loaded[key], state[key]) for key in loaded)


def test_load_pretrained_accepts_wrapped_and_prefixed_checkpoints(
    resnet18_file: tuple[Path, dict], tmp_path: Path
) -> None:
    _, state = resnet18_file
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, wrapped)
    backbone = ResNetBackbone(18)
    load_pretrained(backbone, wrapped)
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"])


def test_missing_keys_are_listed(resnet18_file: tuple[Path, dict], tmp_path: Path) -> None:
    _, state = resnet18_file
    del state["layer4.1.bn2.running_var"], state["layer2.0.downsample.0.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(AutoposeError) as error:
        build_model("simplebaseline_r18", pretrained=path)
    message = str(error.value)
    assert str(path) in message
    assert "2 missing keys" in message
    assert "layer4.1.bn2.running_var" in message and "layer2.0.downsample.0.weight" in message


def test_a_checkpoint_of_another_depth_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    # Every ResNet-18 key exists in ResNet-34 with the same shape: only the extra blocks tell.
    with pytest.raises(AutoposeError, match=r"unexpected keys: .*layer1\.2\.conv1\.weight"):
        load_pretrained(ResNetBackbone(18), path)
    with pytest.raises(AutoposeError, match="missing keys"):
        load_pretrained(ResNetBackbone(50), path)


def test_unreadable_or_absent_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(AutoposeError, match="cannot read weights"):
        load_pretrained(ResNetBackbone(18), garbage)
    with pytest.raises(AutoposeError, match="not found"):
        load_pretrained(ResNetBackbone(18), tmp_path / "absent.pth")
