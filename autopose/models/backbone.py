"""ResNet backbone: torchvision's ResNet-18/34/50/101/152 cut into C2…C5.

The classification head (``avgpool``, ``fc``) is dropped. Weights start random;
:func:`load_pretrained` reads an ImageNet checkpoint from a local file (nothing
is ever downloaded).

Shapes for an input ``B×3×H×W`` (``C`` = 64 for ResNet-18/34, 256 for 50/101/152):

====== ======== ==================
level  stride   channels
====== ======== ==================
C2     4        ``C``
C3     8        ``2C``
C4     16       ``4C``
C5     32       ``8C``
====== ======== ==================
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet

from autopose.errors import AutoposeError

RESNET_DEPTHS: tuple[int, ...] = (18, 34, 50, 101, 152)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet returning the four stage outputs ``[C2, C3, C4, C5]``.

    Args:
        depth: 18, 34, 50, 101 or 152.

    Attributes:
        out_channels: channels of ``C2…C5``.
    """

    def __init__(self, depth: int):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise AutoposeError(f"unknown ResNet depth {depth}; valid: {', '.join(map(str, RESNET_DEPTHS))}")
        net = getattr(resnet, f"resnet{depth}")(weights=None)
        # Keep torchvision's module names so that ImageNet checkpoints load key for key.
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        width = 64 * (4 if depth >= 50 else 1)
        self.depth = depth
        self.out_channels: tuple[int, int, int, int] = (width, 2 * width, 4 * width, 8 * width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``B×3×H×W`` (already normalized) → ``[C2 B×C×H/4×W/4, …, C5 B×8C×H/32×W/32]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


def load_pretrained(backbone: ResNetBackbone, path: Path | str) -> None:
    """Load an ImageNet classification checkpoint into ``backbone`` in place.

    Accepts a plain state dict (what ``torch.save(resnet.state_dict())`` writes)
    or a dict holding one under ``"state_dict"`` or ``"model"``; a leading
    ``module.`` (DataParallel) or ``backbone.`` prefix is stripped. The
    classifier (``fc.*``) is ignored. Read with ``weights_only=True``: no code
    in the file runs.

    Raises:
        AutoposeError: the file is missing or unreadable, or keys of the
            backbone are missing, unexpected or shaped differently (listed).
    """
    path = Path(path)
    if not path.is_file():
        raise AutoposeError("pretrained weights file not found", path=path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors all mean "not a weights file"
        raise AutoposeError(f"cannot read weights ({type(error).__name__}: {error})", path=path) from None
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        raise AutoposeError("expected a state dict (name → tensor)", path=path)
    state = {}
    for key, value in checkpoint.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if not key.startswith("fc."):
            state[key] = value

    own = backbone.state_dict()
    missing = sorted(key for key in own if key not in state)
    wrong_shape = sorted(
        f"{key} {tuple(state[key].shape)}≠{tuple(own[key].shape)}"
        for key in own
        if key in state and hasattr(state[key], "shape") and state[key].shape != own[key].shape
    )
    unexpected = sorted(key for key in state if key not in own)
    if missing or wrong_shape or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys: {', '.join(missing)}")
        if unexpected:
            # e.g. a ResNet-101 file for a ResNet-50: every key fits, yet it is the wrong network.
            problems.append(f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:20])}")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} keys of another shape: {', '.join(wrong_shape)}")
        raise AutoposeError(
            f"not a ResNet-{backbone.depth} checkpoint; " + "; ".join(problems), path=path, field="state_dict"
        )
    backbone.load_state_dict(state, strict=True)


# ImageNet statistics the torchvision ResNets were trained with (torchvision docs).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNormalize(nn.Module):
    """``(x − mean) / std`` with ImageNet statistics, so callers pass images in 0…1."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std
