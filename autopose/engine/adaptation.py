"""Test-time adaptation without labels: BatchNorm statistics re-estimated on the target split.

AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", 2016)
keeps every weight and replaces each BatchNorm layer's running mean and variance by those of
the target data. A shift that every target image shares (a darker split, a blur) moves the
activations' statistics; normalising by the target's own statistics undoes much of it, for
free. The policy search is judged on what it adds beyond this.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from autopose.engine.proxy_scoring import iter_rows


@torch.no_grad()
def adapt_batchnorm(
    model: nn.Module, rows: Iterable[Mapping[str, Any]], *, batch_size: int = 64
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are those of ``rows`` (``model`` is untouched).

    Every BatchNorm layer's running statistics are reset and re-estimated as the plain average
    over all batches (``momentum=None``), in train mode, with no gradient; the copy is returned
    in eval mode.

    Args:
        model: a trained network.
        rows: ``ProxyDataset`` items (or batches of them): ``image`` ``3×H×W`` uint8; labels unused.
        batch_size: crops per forward pass.

    Returns:
        The adapted copy, on the model's device.
    """
    adapted = copy.deepcopy(model)
    norms = _norms(adapted)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over every batch
    parameter = next(adapted.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    adapted.train()
    pending: list[torch.Tensor] = []

    def flush() -> None:
        images = torch.stack(pending).to(device).float().div_(255.0)
        adapted(images)
        pending.clear()

    for row in iter_rows(rows):
        pending.append(torch.as_tensor(row["image"]))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    for norm, original in zip(norms, _norms(model), strict=True):
        norm.momentum = original.momentum
    return adapted.eval()


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
