"""autopose.models: the networks (P2Net, SimpleBaseline), losses, complexity counts, person detector.

``build_model(name)`` is the one entry point for pose networks::

    model = build_model("p2net_r50", num_joints=17, input_size=(256, 192))
    outputs = model(images)  # images B×3×H×W in 0…1 (normalized inside)
    # training: list of B×K×H/4×W/4 (intermediate heads…, final); eval: the final tensor

Names are ``p2net_r{depth}`` (Parallel Fusion), ``p2net_r{depth}_prog`` (Progressive
Fusion) and ``simplebaseline_r{depth}`` with depth 18, 34, 50, 101 or 152.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from autopose.errors import AutoposeError
from autopose.models.backbone import RESNET_DEPTHS, ResNetBackbone, load_pretrained
from autopose.models.p2net import P2Net, P2NetConfig
from autopose.models.simple_baseline import SimpleBaseline

ARCHITECTURES: tuple[str, ...] = (
    *(f"p2net_r{depth}" for depth in RESNET_DEPTHS),
    *(f"p2net_r{depth}_prog" for depth in RESNET_DEPTHS),
    *(f"simplebaseline_r{depth}" for depth in RESNET_DEPTHS),
)

# The name decides depth and fusion; every other field of P2NetConfig is a switch.
_P2NET_SWITCHES = tuple(
    f.name for f in dataclasses.fields(P2NetConfig) if f.name not in ("depth", "num_joints", "fusion")
)


def build_model(
    name: str,
    num_joints: int = 17,
    input_size: tuple[int, int] = (256, 192),
    pretrained: Path | str | None = None,
    **switches: object,
) -> nn.Module:
    """A pose network by name.

    Args:
        name: one of :data:`ARCHITECTURES`.
        num_joints: heatmap channels ``K``.
        input_size: ``(height, width)`` the model will see; must be multiples of 4
            (heatmaps are 1/4 of it). The networks themselves take any such size.
        pretrained: local ImageNet ResNet checkpoint for the backbone
            (see :func:`autopose.models.backbone.load_pretrained`).
        **switches: P2Net only, any field of :class:`P2NetConfig` but depth, num_joints
            and fusion (the name sets those). The ablations:
            ``use_apm=False`` drops the Attention Partial Modules;
            ``use_parallel=False`` drops the fusion stage (ParallelNet, or Progressive
            Fusion for ``_prog``): heads and RefineNet read PyramidNet directly.
            Widths (``pyramid_channels=32`` …) make tiny models for tests.

    Raises:
        AutoposeError: unknown name or switch, bad input size, bad pretrained file.
    """
    family, depth, fusion = parse_architecture(name.strip().lower())
    height, width = input_size
    if height <= 0 or width <= 0 or height % 4 or width % 4:
        raise AutoposeError(
            f"input size must be positive multiples of 4, got {height}x{width}", field="input"
        )

    model: nn.Module
    if family == "simplebaseline":
        if switches:
            raise AutoposeError(f"{name} takes no switches, got {', '.join(switches)}", field="switches")
        model = SimpleBaseline(depth, num_joints=num_joints)
    else:
        unknown = sorted(set(switches) - set(_P2NET_SWITCHES))
        if unknown:
            raise AutoposeError(
                f"unknown P2Net switch {', '.join(unknown)}; valid: {', '.join(_P2NET_SWITCHES)}",
                field="switches",
            )
        switches = {key: _checked_switch(key, value) for key, value in switches.items()}
        config = dataclasses.replace(
            P2NetConfig(depth=depth, num_joints=num_joints, fusion=fusion), **switches
        )
        model = P2Net(config)
    if pretrained is not None:
        load_pretrained(model.backbone, pretrained)
    return model


def parse_architecture(name: str) -> tuple[str, int, str | None]:
    """``"p2net_r101_prog"`` → ``("p2net", 101, "progressive")``; SimpleBaseline's fusion is None.

    Raises:
        AutoposeError: the name is not one of :data:`ARCHITECTURES`.
    """
    if name not in ARCHITECTURES:
        raise AutoposeError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}", field="arch")
    family, _, rest = name.partition("_r")
    depth_text, _, variant = rest.partition("_")
    if family == "simplebaseline":
        return family, int(depth_text), None
    return family, int(depth_text), "progressive" if variant == "prog" else "parallel"


def _checked_switch(key: str, value: object) -> object:
    """A P2Net switch as :class:`P2NetConfig` wants it (YAML/JSON lists become tuples)."""
    if key in ("use_apm", "use_parallel"):
        if not isinstance(value, bool):
            raise AutoposeError(f"{key} must be true or false, got {value!r}", field=key)
        return value
    if key in ("parallel_channels", "refine_blocks"):
        minimum = 1 if key == "parallel_channels" else 0
        if (
            not isinstance(value, list | tuple)
            or len(value) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
        ):
            raise AutoposeError(
                f"{key} must be 4 integers ≥ {minimum} (finest level first), got {value!r}", field=key
            )
        return tuple(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AutoposeError(f"{key} must be a positive integer, got {value!r}", field=key)
    return value


__all__ = [
    "ARCHITECTURES",
    "P2Net",
    "P2NetConfig",
    "ResNetBackbone",
    "SimpleBaseline",
    "build_model",
    "load_pretrained",
    "parse_architecture",
]
