"""AdaBN: BatchNorm statistics re-estimated on unlabelled target crops, weights untouched."""

from __future__ import annotations

import torch
from torch import nn

from autopose.engine.adaptation import adapt_batchnorm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)
    )


def _rows(count: int, scale: float) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    images = (torch.rand(count, 3, 8, 6, generator=generator) * 255 * scale).round().to(torch.uint8)
    return [{"image": image} for image in images]


def test_statistics_are_the_target_datas_and_the_model_is_untouched():
    model = _net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = _rows(12, scale=0.4)  # a darker target split
    adapted = adapt_batchnorm(model, rows, batch_size=4)  # three equal batches
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    # Oracle: the first BatchNorm's input is the convolution of every target crop.
    images = torch.stack([r["image"] for r in rows]).float() / 255
    features = model[0](images)
    mean = features.mean(dim=(0, 2, 3))
    torch.testing.assert_close(adapted[1].running_mean, mean, rtol=1e-4, atol=1e-5)
    # The average of the three batches' unbiased variances (each over 4·8·6 values).
    variances = torch.stack([features[i : i + 4].var(dim=(0, 2, 3), unbiased=True) for i in (0, 4, 8)])
    torch.testing.assert_close(adapted[1].running_var, variances.mean(0), rtol=1e-4, atol=1e-5)
    assert not adapted.training and adapted[1].momentum == model[1].momentum
    for key in ("0.weight", "1.weight", "1.bias"):  # weights are the model's
        torch.testing.assert_close(adapted.state_dict()[key], before[key], rtol=0, atol=0)


def test_collated_batches_give_the_same_statistics_as_rows():
    model = _net()
    rows = _rows(8, scale=1.0)
    batches = [{"image": torch.stack([r["image"] for r in rows[i : i + 4]])} for i in (0, 4)]
    by_rows = adapt_batchnorm(model, rows, batch_size=4)
    by_batches = adapt_batchnorm(model, batches, batch_size=4)
    torch.testing.assert_close(by_rows[3].running_mean, by_batches[3].running_mean)
