"""One policy step on a batch: every sample mixes the space's ops with its own weights.

The same kernel runs the discrete :class:`~autopose.augment.policy.Policy`
(weights 0 or 1, one op per sample), RandAugment / TrivialAugment (one-hot), and
the differentiable :class:`~autopose.augment.policy.RelaxedPolicy` (soft weights).

How a step mixes ops (the paper's Eq. 6, ``Σ_o w_o · o(x)``, adapted so that
keypoints stay true):

* photometric ops mix in pixel space: ``x' = x + Σ_o s_o (o(x) - x)``;
* geometric ops mix their matrices: ``M = I + Σ_o s_o (M_o - I)``, and ``x'`` is
  warped once by ``M``; the keypoints move by the same ``M``.

``s_o`` is the op's strength for that sample (mixing weight × Bernoulli gate).

FlipLR is the exception: a mirror with the left/right labels swapped cannot be blended (half a
flip squashes the image to a line, and the labels are swapped or not). A sample is flipped,
whole, when its FlipLR strength reaches 1/2 (always with the discrete policy's and hard
sampling's strengths of 0 or 1), after the step's other ops; the gradient with respect to the
strength is the blend's, ``flipped − unflipped`` (straight-through).
Blending differently warped copies of an image in pixel space, as Eq. 6 read
literally does, gives ghost images whose keypoints are nowhere in particular;
blending the matrices gives one image with exact keypoints, is differentiable
in every weight and magnitude, and equals the literal mixture whenever one op
carries all the weight (the discrete policy, and the relaxed one as it
converges).

On a canvas (``pad``: images that hold the crop ``pad = (rows, cols)`` pixels in from each
side, cut from the full image with the crop's transform, :mod:`autopose.data.proxy`), every op
is the crop's op: geometric ops are the crop's maps moved onto the canvas
(:func:`~autopose.augment.ops.on_canvas`: the same center, the same pixels per degree and per
shift), so what a turn or a zoom-out brings into the crop is the image around it rather than
black; Cutout lands inside the crop and is sized by it; FlipLR mirrors about the center both
share. The caller cuts the crop out afterwards (:func:`~autopose.data.transforms.cut_window`).
Photometric ops act on every canvas pixel; AutoContrast and Equalize read the canvas's
statistics, which differ a little from the crop's.

Speed: an op is only run on the samples whose strength exceeds ``min_strength``,
and the warp only on samples with some geometric strength. With
``min_strength = 0`` (discrete policies) this is exact; a small positive value
drops terms smaller than it from the output and from the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from autopose.augment.ops import OpSpec, hflip, identity_matrix, on_canvas, warp

Tensor = torch.Tensor


def cutout_centers(uniform: Tensor, height: int, width: int) -> Tensor:
    """``B×2`` uniform draws in [0, 1) → rectangle centers ``(x, y)`` anywhere on the image."""
    extent = torch.tensor([width, height], dtype=uniform.dtype, device=uniform.device)
    return uniform * extent - 0.5


def apply_step(
    images: Tensor,
    keypoints: Tensor,
    visibility: Tensor,
    specs: Sequence[OpSpec],
    strengths: Tensor,
    values: Tensor,
    cutout_uniform: Tensor | None = None,
    min_strength: float = 0.0,
    flip_pairs: Sequence[tuple[int, int]] | None = None,
    pad: tuple[int, int] = (0, 0),
) -> tuple[Tensor, Tensor, Tensor]:
    """Apply one mixed step.

    Args:
        images: ``B×3×H×W`` float.
        keypoints: ``B×K×2``; visibility: ``B×K``.
        specs: the ``O`` candidate ops (a search space's order).
        strengths: ``B×O`` how much of each op each sample gets (0…1, summing to ≤ 1).
        values: ``B×O`` each op's real magnitude for each sample.
        cutout_uniform: ``B×2`` uniform draws for Cutout's center (fresh ones if ``None``).
        min_strength: ops at or below this strength are skipped for that sample.
        flip_pairs: the ``(left, right)`` keypoint pairs FlipLR swaps (needed once it applies).
        pad: ``(rows, cols)``: the images are canvases around crops this far in from each side
            (see the module docstring); ``(0, 0)``: the images are the crops.

    Returns:
        ``images, keypoints, visibility`` after the step.
    """
    batch, _, height, width = images.shape
    crop_h, crop_w = height - 2 * pad[0], width - 2 * pad[1]
    delta = None
    matrix = None
    warp_needed = torch.zeros(batch, dtype=torch.bool, device=images.device)
    photometric = torch.tensor([not spec.moves_keypoints for spec in specs], device=strengths.device)
    mirror_strength = None
    # One op per sample at full strength and no gradient wanted (discrete policies, RandAugment):
    # write each op's result into a copy instead of blending, which is several times cheaper.
    hard = (
        not (torch.is_grad_enabled() and (strengths.requires_grad or images.requires_grad))
        and bool(((strengths == 0) | (strengths == 1)).all())
        and bool(((strengths[:, photometric] > 0).sum(1) <= 1).all())
    )
    output = None
    for o, spec in enumerate(specs):
        strength = strengths[:, o]
        active = strength > min_strength
        if spec.mirrors:
            mirror_strength = strength
            continue
        if spec.geometric:
            if not bool(active.any()):
                continue
            warp_needed |= active
            op_matrix = on_canvas(spec.matrix(values[:, o].to(images.dtype), crop_h, crop_w), pad)
            term = strength.to(images.dtype)[:, None, None] * (
                op_matrix - identity_matrix(batch, images.device)
            )
            matrix = term if matrix is None else matrix + term
            continue
        index = active.nonzero().squeeze(1)
        if index.numel() == 0:
            continue
        everyone = index.numel() == batch
        subset = images if everyone else images.index_select(0, index)
        value = values[:, o] if everyone else values[:, o].index_select(0, index)
        if spec.name == "Cutout":
            uniform = cutout_uniform if cutout_uniform is not None else torch.rand(batch, 2)
            uniform = uniform.to(images.device, images.dtype)
            centers = cutout_centers(uniform if everyone else uniform.index_select(0, index), crop_h, crop_w)
            centers = centers + centers.new_tensor([float(pad[1]), float(pad[0])])
            changed = spec.image_fn(subset, value, center=centers, extent=(crop_h, crop_w))
        else:
            changed = spec.image_fn(subset, value)
        if hard:
            output = images.clone() if output is None else output
            output.index_copy_(0, index, changed)
            continue
        weight = (strength if everyone else strength.index_select(0, index)).to(images.dtype)
        contribution = weight.view(-1, 1, 1, 1) * (changed - subset)
        if everyone:
            delta = contribution if delta is None else delta + contribution
        else:
            base = torch.zeros_like(images) if delta is None else delta
            delta = base.index_add(0, index, contribution)
    if output is not None:
        images = output
    if delta is not None:
        images = images + delta
    if matrix is not None:
        images, keypoints, visibility = _warped(images, keypoints, visibility, matrix, warp_needed)
    if mirror_strength is not None:
        images, keypoints, visibility = _mirrored(images, keypoints, visibility, mirror_strength, flip_pairs)
    return images, keypoints, visibility


def _warped(images: Tensor, keypoints: Tensor, visibility: Tensor, mixed: Tensor, needed: Tensor):
    """The samples in ``needed`` warped by ``I + mixed`` (``B×2×3``), the others as they are."""
    matrix = mixed + identity_matrix(images.shape[0], images.device)
    if bool(needed.all()):
        return warp(images, keypoints, visibility, matrix)
    index = needed.nonzero().squeeze(1)
    moved = warp(images[index], keypoints[index], visibility[index], matrix[index])
    return (
        images.index_copy(0, index, moved[0]),
        keypoints.index_copy(0, index, moved[1]),
        visibility.index_copy(0, index, moved[2]),
    )


def _mirrored(
    images: Tensor,
    keypoints: Tensor,
    visibility: Tensor,
    strength: Tensor,
    flip_pairs: Sequence[tuple[int, int]] | None,
):
    """FlipLR: the samples whose strength reaches 1/2 mirrored whole, labels swapped; the
    gradient with respect to ``strength`` (B,) is the blend's (see the module docstring)."""
    flip = strength >= 0.5
    if not bool(flip.any()) and not strength.requires_grad:
        return images, keypoints, visibility
    if flip_pairs is None:
        raise ValueError(
            "FlipLR swaps left and right keypoints: bind the space to the dataset's flip pairs "
            "(SearchSpace.with_flip_pairs)"
        )
    flipped = hflip(images, keypoints, visibility, flip_pairs)
    blend = (strength - strength.detach()).to(images.dtype)
    out_images = torch.where(flip.view(-1, 1, 1, 1), flipped[0], images)
    out_keypoints = torch.where(flip.view(-1, 1, 1), flipped[1], keypoints)
    out_images = out_images + blend.view(-1, 1, 1, 1) * (flipped[0] - images)
    out_keypoints = out_keypoints + blend.view(-1, 1, 1).to(keypoints.dtype) * (flipped[1] - keypoints)
    return out_images, out_keypoints, torch.where(flip.view(-1, 1), flipped[2], visibility)
