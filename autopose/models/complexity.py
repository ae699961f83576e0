"""Parameter and multiply-add counts.

What is counted: one multiply-add (MAC) per weight use in ``nn.Conv2d``,
``nn.ConvTranspose2d`` and ``nn.Linear`` for ONE image, with the model in eval
mode (the inference graph: P2Net's intermediate heads, used only for training,
are left out). Biases, BatchNorm, activations, pooling, additions, the ImageNet
normalization and interpolation (nearest / bilinear upsampling) are not counted:
together they are well under 1% of the convolutions here, and leaving them out
is what HRNet's reference code and most papers do.

GFLOPs are reported two ways, because papers mix them:

* ``MACs / 2**30``, as HRNet's reference code prints it (``get_model_summary``);
  the P2Net paper's table compares itself with HRNet's, in this convention.
* ``MACs / 1e9``, as torchvision's model docs and fvcore-style counters report.

One more difference from HRNet's code: it charges a transposed convolution
``weight size × output pixels``, which is ``stride²`` times the true count. Pass
``deconv_at_output_resolution=True`` to reproduce its figures (SimpleBaseline-R50
at 256×192: 8.9 "GFLOPs" in the HRNet paper); the default counts true MACs
(``weight size × input pixels``).
"""

from __future__ import annotations

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(
    model: nn.Module,
    input_size: tuple[int, int],
    *,
    deconv_at_output_resolution: bool = False,
) -> int:
    """Multiply-adds of one forward pass of a ``1×3×H×W`` image (see the module docstring).

    Args:
        model: any module taking ``B×3×H×W`` images.
        input_size: ``(height, width)``.
        deconv_at_output_resolution: count transposed convolutions the way
            HRNet's reference code does (``stride²`` too many).

    Returns:
        multiply-adds as an int.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        # Every output element takes (C_in / groups) · kh · kw multiply-adds.
        total += output.numel() * module.weight[0].numel()

    def deconv_hook(
        module: nn.ConvTranspose2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        nonlocal total
        # Weight C_in × C_out/groups × kh × kw: each input pixel meets every weight once.
        pixels = output.shape[-2:].numel() if deconv_at_output_resolution else inputs[0].shape[-2:].numel()
        total += output.shape[0] * pixels * module.weight.numel()

    def linear_hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.ConvTranspose2d):
            handles.append(module.register_forward_hook(deconv_hook))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return int(total)


def model_info(name: str, input_size: tuple[int, int] = (256, 192), num_joints: int = 17) -> dict:
    """Size and cost of an architecture from :func:`autopose.models.build_model`.

    Returns:
        ``{"arch", "input_size": [h, w], "num_joints", "params", "macs",
        "gflops_hrnet": macs / 2**30, "gflops_1e9": macs / 1e9}``.
    """
    from autopose.models import build_model  # the builder imports this module

    model = build_model(name, num_joints=num_joints, input_size=input_size)
    macs = count_flops(model, input_size)
    return {
        "arch": name,
        "input_size": [int(input_size[0]), int(input_size[1])],
        "num_joints": int(num_joints),
        "params": count_parameters(model),
        "macs": macs,
        "gflops_hrnet": macs / 2**30,
        "gflops_1e9": macs / 1e9,
    }
