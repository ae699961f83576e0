"""Heatmap L2 with target weights, OHKM and PoseLoss."""

from __future__ import annotations

import pytest
import torch

from autopose.data.codec import HeatmapCodec
from autopose.models.losses import PoseLoss, heatmap_l2, ohkm


def _targets(batch: int = 3, joints: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    codec = HeatmapCodec((64, 48))
    keypoints = torch.rand(batch, joints, 2, generator=generator) * torch.tensor([47.0, 63.0])
    return codec.encode(keypoints, torch.full((batch, joints), 2.0))


def test_heatmap_l2_matches_a_direct_computation() -> None:
    target, weight = _targets()
    pred = torch.rand_like(target)
    expected = 0.5 * ((pred - target) ** 2).mean(dim=(2, 3)) * weight
    assert torch.allclose(heatmap_l2(pred, target, weight), expected)
    assert torch.allclose(heatmap_l2(pred, target, weight, scale=1.0), 2 * expected)


@pytest.mark.parametrize("topk", [1, 5, 8, 17])
def test_ohkm_keeps_exactly_k_joints_per_sample(topk: int) -> None:
    per_joint = torch.rand(4, 17, generator=torch.Generator().manual_seed(topk)).requires_grad_()
    loss = ohkm(per_joint, topk)
    loss.backward()
    kept = per_joint.grad > 0
    assert kept.sum(dim=1).tolist() == [topk] * 4
    # The kept ones are the largest ones, and the value is their mean.
    threshold = per_joint.detach().topk(topk, dim=1).values[:, -1:]
    assert torch.equal(kept, per_joint.detach() >= threshold)
    assert torch.isclose(loss, per_joint.detach().topk(topk, dim=1).values.mean())


def test_ohkm_with_more_k_than_joints_keeps_all() -> None:
    per_joint = torch.rand(2, 5)
    assert torch.isclose(ohkm(per_joint, 8), per_joint.mean())


def test_zero_weight_joint_is_ignored() -> None:
    target, weight = _targets()
    weight[:, 4] = 0.0
    pred = target.clone()
    loss_fn = PoseLoss(ohkm_topk=8)
    base = loss_fn([pred, pred], target, weight)
    wild = pred.clone()
    wild[:, 4] = 100.0  # a huge error on the ignored joint only
    assert torch.equal(loss_fn([wild, wild], target, weight), base)
    assert base == 0
    wild.requires_grad_()
    loss_fn([wild], target, weight).backward()
    assert wild.grad[:, 4].abs().sum() == 0


def test_pose_loss_sums_l2_on_intermediates_and_ohkm_on_final() -> None:
    target, weight = _targets()
    generator = torch.Generator().manual_seed(2)
    outputs = [torch.rand(target.shape, generator=generator) for _ in range(3)]
    expected = (
        heatmap_l2(outputs[0], target, weight).mean()
        + heatmap_l2(outputs[1], target, weight).mean()
        + ohkm(heatmap_l2(outputs[2], target, weight), 8)
    )
    assert torch.isclose(PoseLoss(8)(outputs, target, weight), expected)
    # A single tensor is the final output; topk 0 turns mining off.
    assert torch.isclose(
        PoseLoss(8)(outputs[2], target, weight), ohkm(heatmap_l2(outputs[2], target, weight), 8)
    )
    assert torch.isclose(
        PoseLoss(0)(outputs[2], target, weight), heatmap_l2(outputs[2], target, weight).mean()
    )
