"""Baseline augmentations to compare searched policies against.

All are callables ``(images, keypoints, visibility) -> (images, keypoints, visibility)``
on batches (``B×3×H×W`` float 0…1, ``B×K×2`` pixels, ``B×K``), like :class:`Policy`:

* :class:`Handcrafted`: the usual top-down recipe (SimpleBaseline / HRNet):
  horizontal flip with left/right swap, rotation, scale, half-body;
* :func:`random_policy`: a :class:`Policy` drawn at random from a search space;
* :func:`no_policy`: no augmentation;
* :class:`RandAugment` (Cubuk et al. 2020) and :class:`TrivialAugment`
  (Müller & Hutter 2021) over the same ops as the search space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from autopose.augment.apply import apply_step
from autopose.augment.ops import (
    MAX_MAGNITUDE,
    hflip_matrix,
    identity_matrix,
    on_canvas,
    rotation_matrix,
    scale_matrix,
    warp,
)
from autopose.augment.policy import Policy, PolicyStep, as_float_images
from autopose.augment.space import SearchSpace
from autopose.data.coco import COCO_FLIP_PAIRS

Tensor = torch.Tensor
Triple = tuple[Tensor, Tensor, Tensor]

COCO_UPPER_BODY = tuple(range(11))  # nose … wrists; the rest (hips, knees, ankles) is the lower body


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def _homogeneous(matrix: Tensor) -> Tensor:
    """``B×2×3`` → ``B×3×3``."""
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=matrix.dtype, device=matrix.device).expand(
        matrix.shape[0], 1, 3
    )
    return torch.cat([matrix, bottom], dim=1)


def _compose(*matrices: Tensor) -> Tensor:
    """``B×2×3`` maps applied first to last → one ``B×2×3`` map."""
    result = _homogeneous(matrices[0])
    for matrix in matrices[1:]:
        result = _homogeneous(matrix) @ result
    return result[:, :2]


class NoAugmentation:
    """The identity (uint8 images are still converted to float)."""

    def __call__(
        self, images: Tensor, keypoints: Tensor, visibility: Tensor, pad: tuple[int, int] = (0, 0)
    ) -> Triple:
        return as_float_images(images), keypoints, visibility

    def __repr__(self) -> str:
        return "NoAugmentation()"


def no_policy() -> NoAugmentation:
    """The "none" baseline."""
    return NoAugmentation()


def random_policy(space: SearchSpace, seed: int) -> Policy:
    """A policy of ``K × N`` steps drawn from ``space``: op uniform over the space's
    ops, ``p`` uniform in [0, 1], ``m`` uniform in [0, 10]. The policy applies
    itself with the same ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    subs = []
    for _ in range(space.K):
        steps = []
        for _ in range(space.N):
            op = space.op_names[int(torch.randint(len(space.ops), (1,), generator=generator))]
            p, m = torch.rand(2, generator=generator).tolist()
            steps.append(PolicyStep(op, round(p, 4), round(m * MAX_MAGNITUDE, 3)))
        subs.append(steps)
    return Policy(subs, space, seed=seed)


class Handcrafted:
    """The usual top-down recipe, on crop batches.

    In order, per sample: half-body with probability ``half_body_p`` (HRNet's
    rule: only for a person with more than ``half_body_min_joints`` labelled
    joints; pick the upper or the lower body with even odds, falling back to the
    other half when the pick has fewer than 3 joints; box the picked joints, widen
    the box to the crop's aspect, pad it by 1.5, and zoom the crop onto it — the
    crop-batch version of HRNet's re-crop); then rotation uniform in
    ``±rotation`` degrees with probability ``rotation_p`` and zoom uniform in
    ``scale_range`` about the crop center; then horizontal flip with probability
    ``flip_p``, swapping left/right keypoints. The geometric steps compose into
    one matrix, so each image is resampled once.

    HRNet draws rotation and scale from clipped normals; uniform draws over the
    same ranges are used here (the issue's recipe states the ranges only).

    Args:
        flip_pairs: ``(left, right)`` keypoint index pairs (COCO by default).
        upper_body: keypoint indices of the upper body (COCO's 0–10 by default;
            MPII's are 7–15).
        seed: seeds the generator (``None``: torch's global one).
    """

    def __init__(
        self,
        flip_pairs: Sequence[tuple[int, int]] = COCO_FLIP_PAIRS,
        upper_body: Sequence[int] = COCO_UPPER_BODY,
        flip_p: float = 0.5,
        rotation: float = 40.0,
        rotation_p: float = 0.6,
        scale_range: tuple[float, float] = (0.65, 1.35),
        half_body_p: float = 0.3,
        half_body_min_joints: int = 8,
        half_body_padding: float = 1.5,
        seed: int | None = None,
    ):
        self.flip_pairs = tuple(tuple(pair) for pair in flip_pairs)
        self.upper_body = tuple(upper_body)
        self.flip_p = flip_p
        self.rotation = rotation
        self.rotation_p = rotation_p
        self.scale_range = scale_range
        self.half_body_p = half_body_p
        self.half_body_min_joints = half_body_min_joints
        self.half_body_padding = half_body_padding
        self.generator = _generator(seed)

    def half_body_matrix(self, keypoints: Tensor, visibility: Tensor, height: int, width: int) -> Tensor:
        """``B×2×3`` zoom onto half of the body (identity for samples not picked)."""
        batch, num_joints = visibility.shape
        g = self.generator
        labelled = visibility.cpu() > 0
        upper = torch.zeros(num_joints, dtype=torch.bool)
        upper[[i for i in self.upper_body if i < num_joints]] = True
        picked = (torch.rand(batch, generator=g) < self.half_body_p) & (
            labelled.sum(1) > self.half_body_min_joints
        )
        upper_joints, lower_joints = labelled & upper, labelled & ~upper
        want_upper = torch.rand(batch, generator=g) < 0.5
        first_choice = want_upper & (upper_joints.sum(1) > 2)
        use_upper = first_choice | (lower_joints.sum(1) <= 2)
        selected = torch.where(use_upper[:, None], upper_joints, lower_joints)
        picked &= selected.sum(1) >= 2
        points = keypoints.detach().cpu().float()
        big = torch.finfo(points.dtype).max
        low = torch.where(selected[..., None], points, torch.full_like(points, big)).amin(1)
        high = torch.where(selected[..., None], points, torch.full_like(points, -big)).amax(1)
        center = torch.where(picked[:, None], (low + high) / 2, torch.zeros_like(low))
        box_w = (high - low)[:, 0].clamp_min(1.0)
        box_h = (high - low)[:, 1].clamp_min(1.0)
        aspect = width / height
        box_w = torch.maximum(box_w, box_h * aspect) * self.half_body_padding
        # Zoom so that the box fills the crop; bounded against degenerate boxes.
        zoom = (width / box_w).clamp(0.5, 4.0)
        zoom = torch.where(picked, zoom, torch.ones_like(zoom))
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        matrix = identity_matrix(batch)
        matrix[:, 0, 0] = zoom
        matrix[:, 1, 1] = zoom
        matrix[:, 0, 2] = torch.where(picked, cx - zoom * center[:, 0], torch.zeros_like(zoom))
        matrix[:, 1, 2] = torch.where(picked, cy - zoom * center[:, 1], torch.zeros_like(zoom))
        return matrix.to(keypoints.device)

    def __call__(
        self, images: Tensor, keypoints: Tensor, visibility: Tensor, pad: tuple[int, int] = (0, 0)
    ) -> Triple:
        """Augment a batch; with ``pad`` the images are canvases around their crops, and every
        map is the crop's (half-body zoom, scale, turn and flip about the crop's center)."""
        images = as_float_images(images)
        batch = images.shape[0]
        height, width = images.shape[2] - 2 * pad[0], images.shape[3] - 2 * pad[1]
        g, device = self.generator, images.device
        in_crop = keypoints - keypoints.new_tensor([float(pad[1]), float(pad[0])])
        half_body = self.half_body_matrix(in_crop, visibility, height, width)
        rotate_now = torch.rand(batch, generator=g) < self.rotation_p
        angle = (torch.rand(batch, generator=g) * 2 - 1) * self.rotation * rotate_now
        low, high = self.scale_range
        zoom = low + (high - low) * torch.rand(batch, generator=g)
        flip = (torch.rand(batch, generator=g) < self.flip_p).to(device)
        flip_matrix = torch.where(
            flip[:, None, None], hflip_matrix(batch, width, device), identity_matrix(batch, device)
        )
        matrix = _compose(
            half_body,
            scale_matrix(zoom.to(device), height, width),
            rotation_matrix(angle.to(device), height, width),
            flip_matrix,
        )
        images, keypoints, visibility = warp(images, keypoints, visibility, on_canvas(matrix, pad))
        if any(max(pair) >= keypoints.shape[1] for pair in self.flip_pairs):
            raise ValueError(f"flip_pairs {self.flip_pairs} do not fit {keypoints.shape[1]} keypoints")
        # The warp already mirrored the coordinates; what remains is the left/right swap.
        permutation = list(range(keypoints.shape[1]))
        for left, right in self.flip_pairs:
            permutation[left], permutation[right] = right, left
        keypoints = torch.where(flip[:, None, None], keypoints[:, permutation], keypoints)
        visibility = torch.where(flip[:, None], visibility[:, permutation], visibility)
        return images, keypoints, visibility

    def __repr__(self) -> str:
        return (
            f"Handcrafted(flip_p={self.flip_p}, rotation=±{self.rotation}° at p={self.rotation_p}, "
            f"scale={self.scale_range}, half_body_p={self.half_body_p})"
        )


class _OneHotOps:
    """Shared by RandAugment and TrivialAugment: per sample, steps of one op each."""

    def __init__(self, space: SearchSpace, seed: int | None):
        self.space = space
        self.generator = _generator(seed)
        # Ops whose range is symmetric about their identity (shifts, turns, Brightness,
        # Sharpness) take either direction with even odds, as RandAugment's signed ops do.
        self._signed = torch.tensor(
            [
                spec.identity is not None and math.isclose((r.low + r.high) / 2, spec.identity, abs_tol=1e-9)
                for r, spec in zip(space.ops, space.specs, strict=True)
            ]
        )

    def _step(
        self, images: Tensor, keypoints: Tensor, visibility: Tensor, magnitude: Tensor, pad: tuple[int, int]
    ) -> Triple:
        batch, num_ops, g = images.shape[0], len(self.space.ops), self.generator
        op = torch.randint(num_ops, (batch,), generator=g)
        mirror = (torch.rand(batch, generator=g) < 0.5) & self._signed[op]
        magnitude = torch.where(mirror, MAX_MAGNITUDE - magnitude, magnitude)
        values = self.space.values(magnitude[:, None].expand(batch, num_ops))
        uniform = torch.rand(batch, 2, generator=g)
        strengths = F.one_hot(op, num_ops).float()
        device = images.device
        return apply_step(
            images,
            keypoints,
            visibility,
            self.space.specs,
            strengths.to(device),
            values.to(device),
            cutout_uniform=uniform,
            flip_pairs=self.space.flip_pairs,
            pad=pad,
        )


class RandAugment(_OneHotOps):
    """RandAugment: ``num_ops`` ops per sample, each uniform over the space's ops,
    all at the normalized ``magnitude`` (0–10), always applied; signed ops take a
    random direction.

    Args:
        space: the ops (and their ranges) to draw from.
        num_ops: ``N``; magnitude: ``M`` (RandAugment's two knobs).
    """

    def __init__(self, space: SearchSpace, num_ops: int = 2, magnitude: float = 9.0, seed: int | None = None):
        super().__init__(space, seed)
        if not 0.0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError("magnitude must lie in [0, 10]")
        self.num_ops = num_ops
        self.magnitude = magnitude

    def __call__(
        self, images: Tensor, keypoints: Tensor, visibility: Tensor, pad: tuple[int, int] = (0, 0)
    ) -> Triple:
        images = as_float_images(images)
        magnitude = torch.full((images.shape[0],), float(self.magnitude))
        for _ in range(self.num_ops):
            images, keypoints, visibility = self._step(images, keypoints, visibility, magnitude, pad)
        return images, keypoints, visibility

    def __repr__(self) -> str:
        return f"RandAugment(space={self.space.name}, N={self.num_ops}, M={self.magnitude})"


class TrivialAugment(_OneHotOps):
    """TrivialAugment (wide): one op per sample, uniform over the space's ops, at a
    magnitude uniform over the whole range [0, 10]."""

    def __call__(
        self, images: Tensor, keypoints: Tensor, visibility: Tensor, pad: tuple[int, int] = (0, 0)
    ) -> Triple:
        images = as_float_images(images)
        magnitude = torch.rand(images.shape[0], generator=self.generator) * MAX_MAGNITUDE
        return self._step(images, keypoints, visibility, magnitude, pad)

    def __repr__(self) -> str:
        return f"TrivialAugment(space={self.space.name})"
