"""Heatmap losses: L2 with target weights, and online hard keypoint mining (OHKM).

Pure functions for the math, :class:`PoseLoss` as the thin module training uses.
The paper (after CPN) supervises every intermediate output with the plain L2 loss
and the RefineNet output with OHKM: per sample only the ``k`` joints with the
largest loss count, so training focuses on the hard ones.
"""

from __future__ import annotations

import torch
from torch import nn


def heatmap_l2(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, scale: float = 0.5
) -> torch.Tensor:
    """Per-sample, per-joint mean squared error, times the target weight.

    Args:
        pred: ``B×K×h×w`` predicted heatmaps.
        target: ``B×K×h×w`` target heatmaps (from :class:`~autopose.data.codec.HeatmapCodec`).
        weight: ``B×K`` target weight; 0 drops a joint (absent or outside the crop).
        scale: constant factor; 0.5 by default, as in the SimpleBaseline / HRNet
            reference code (``0.5 · MSE``), so loss values compare with theirs.

    Returns:
        ``B×K`` losses: ``scale · weight · mean_pixels((pred − target)²)``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    squared = (pred.float() - target.float()).pow(2).flatten(2).mean(dim=-1)  # B×K
    return scale * squared * weight.to(squared.dtype)


# The paper keeps "the top α (α = 10) keypoints" in online hard keypoint mining (CPN keeps 8 of 17).
OHKM_TOPK = 10


def ohkm(per_joint_loss: torch.Tensor, topk: int = OHKM_TOPK) -> torch.Tensor:
    """Online hard keypoint mining: mean of each sample's ``topk`` largest joint losses.

    Args:
        per_joint_loss: ``B×K`` (e.g. from :func:`heatmap_l2`).
        topk: joints kept per sample; ``min(topk, K)`` are kept.

    Returns:
        scalar: the batch mean of the per-sample means of the kept losses.
    """
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    k = min(int(topk), per_joint_loss.shape[-1])
    hardest, _ = per_joint_loss.topk(k, dim=-1)  # B×k
    return hardest.mean()


class PoseLoss(nn.Module):
    """L2 on every intermediate output, OHKM on the final one; their sum.

    Args:
        ohkm_topk: joints kept per sample on the final output (10 as in the P2Net paper,
            :data:`OHKM_TOPK`; CPN keeps 8). ``0`` turns mining off: the final output gets the
            plain L2 too.

    Forward:
        outputs: list of ``B×K×h×w`` (intermediate…, final), as P2Net returns in
            training mode, or one tensor (the final output only).
        target: ``B×K×h×w``.
        weight: ``B×K``.

        Returns a scalar: ``Σ_intermediate mean(L2) + OHKM(L2(final))``.
    """

    def __init__(self, ohkm_topk: int = OHKM_TOPK):
        super().__init__()
        if ohkm_topk < 0:
            raise ValueError(f"ohkm_topk must be 0 (off) or positive, got {ohkm_topk}")
        self.ohkm_topk = int(ohkm_topk)

    def forward(
        self, outputs: list[torch.Tensor] | torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        *intermediate, final = outputs
        total = sum((heatmap_l2(pred, target, weight).mean() for pred in intermediate), target.new_zeros(()))
        final_loss = heatmap_l2(final, target, weight)
        if self.ohkm_topk:
            return total + ohkm(final_loss, self.ohkm_topk)
        return total + final_loss.mean()

    def extra_repr(self) -> str:
        return f"ohkm_topk={self.ohkm_topk}"
