"""Augmentation ops on batched tensors, keypoints moving with the pixels.

Every op is a pure function over tensors::

    images, keypoints, visibility = op(images, keypoints, visibility, value)

with ``images B×3×H×W`` float in 0…1, ``keypoints B×K×2`` ``(x, y)`` in pixels
of the image, ``visibility B×K`` (0 absent, 1 occluded, 2 seen) and ``value``
the op's REAL magnitude, one per sample ``(B,)`` (degrees for Rotate, a factor
for Scale, …). :func:`magnitude_to_value` maps the normalized magnitude
``m ∈ [0, 10]`` of a policy to that real value; the ranges come from the
search space (:mod:`autopose.augment.space`), :data:`OPS` holds the defaults.

Coordinates follow :mod:`autopose.data.transforms`: the center of pixel
``(col, row)`` is ``(x, y) = (col, row)``, so an image of width ``W`` spans
``x ∈ [-0.5, W - 0.5]``. Geometric ops build one ``B×2×3`` matrix (image pixels
→ image pixels) and use it both for the warp and for the keypoints; the warp
samples in exactly this convention, as kornia's ``warp_affine`` with
``align_corners=True`` does (both checked in ``tests/augment/test_ops.py``). A
keypoint that leaves the crop gets visibility 0 (its pixels are gone; it stays 0 even if a later op brings the
point back).

Gradients (each op's docstring repeats its own):

* exact — the op is differentiable in the image and in the magnitude;
* straight-through — the forward pass is the real op, the backward pass uses a
  stated surrogate (Equalize's image gradient, Solarize's threshold);
* none-in-m — the op has no magnitude (Equalize, FlipLR).

FlipLR (not in the paper's space; spaces may include it) mirrors the crop and swaps the
left/right keypoints, so it needs the dataset's ``(left, right)`` index pairs: a space carries
them once bound to a dataset (:meth:`autopose.augment.space.SearchSpace.with_flip_pairs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Triple = tuple[Tensor, Tensor, Tensor]

MAX_MAGNITUDE = 10.0
CUTOUT_FILL = 0.5  # gray, like AutoAugment's cutout fill
SOLARIZE_ADD_THRESHOLD = 0.5  # AutoAugment's SolarizeAdd adds below 128/255
SOLARIZE_SURROGATE_WIDTH = 0.05  # width of the sigmoid that stands in for Solarize's step


def magnitude_to_value(magnitude: Tensor | float, value_range: tuple[float, float]) -> Tensor:
    """Normalized magnitude ``m ∈ [0, 10]`` → real value, linear over ``value_range``.

    ``m = 0`` gives ``value_range[0]`` and ``m = 10`` gives ``value_range[1]``
    (a range may run downwards, e.g. Solarize's threshold 1 → 0). Differentiable in ``m``.
    """
    low, high = value_range
    magnitude = torch.as_tensor(magnitude, dtype=torch.float32)
    return low + (high - low) * magnitude / MAX_MAGNITUDE


# -- affine matrices (B×2×3, image pixels → image pixels) ---------------------------------------------


def identity_matrix(batch: int, device: torch.device | None = None, dtype=torch.float32) -> Tensor:
    """``B×2×3`` identity maps."""
    return torch.eye(2, 3, device=device, dtype=dtype).expand(batch, 2, 3).clone()


def _matrix(a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor, f: Tensor) -> Tensor:
    """Stack per-sample entries into ``B×2×3`` ``[[a, b, c], [d, e, f]]``."""
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], -2)


def translate_x_matrix(value: Tensor, height: int, width: int) -> Tensor:
    """Shift right by ``value × width`` pixels (``value`` is a fraction of the width)."""
    zero, one = torch.zeros_like(value), torch.ones_like(value)
    return _matrix(one, zero, value * width, zero, one, zero)


def translate_y_matrix(value: Tensor, height: int, width: int) -> Tensor:
    """Shift down by ``value × height`` pixels."""
    zero, one = torch.zeros_like(value), torch.ones_like(value)
    return _matrix(one, zero, zero, zero, one, value * height)


def rotation_matrix(value: Tensor, height: int, width: int) -> Tensor:
    """Turn ``value`` degrees counter-clockwise on screen about the image center."""
    theta = value * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    # Image y points down, so counter-clockwise on screen is R(-theta) in (x, y),
    # as in autopose.data.transforms.crop_matrix.
    return _matrix(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def scale_matrix(value: Tensor, height: int, width: int) -> Tensor:
    """Zoom by ``value`` about the image center (``value > 1`` enlarges the content)."""
    zero = torch.zeros_like(value)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    return _matrix(value, zero, cx * (1 - value), zero, value, cy * (1 - value))


def on_canvas(matrix: Tensor, pad: tuple[int, int]) -> Tensor:
    """A crop's ``B×2×3`` map as the same map on a canvas holding the crop ``pad = (rows, cols)``
    pixels in from each side: ``T(p) · M · T(−p)`` with ``p = (cols, rows)``. Points of the crop
    move exactly as before; the canvas's extra pixels are what the map brings into view."""
    if pad == (0, 0):
        return matrix
    offset = matrix.new_tensor([float(pad[1]), float(pad[0])])
    linear = matrix[:, :, :2]
    translation = matrix[:, :, 2] + offset - linear @ offset
    return torch.cat([linear, translation[..., None]], dim=-1)


def hflip_matrix(batch: int, width: int, device: torch.device | None = None) -> Tensor:
    """Mirror ``x → W - 1 - x``."""
    matrix = identity_matrix(batch, device)
    matrix[:, 0, 0] = -1.0
    matrix[:, 0, 2] = width - 1.0
    return matrix


# -- keypoint bookkeeping --------------------------------------------------------------------------


def transform_keypoints(keypoints: Tensor, matrix: Tensor) -> Tensor:
    """Apply ``B×2×3`` maps to ``B×K×2`` points."""
    return keypoints @ matrix[:, :, :2].transpose(1, 2) + matrix[:, None, :, 2]


def inside_crop(keypoints: Tensor, height: int, width: int) -> Tensor:
    """``B×K`` bool: the point lies on the image (pixel edges ``[-0.5, size - 0.5]``)."""
    x, y = keypoints[..., 0], keypoints[..., 1]
    return (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)


def invert_matrix(matrix: Tensor) -> Tensor:
    """Inverse of ``B×2×3`` affine maps (closed form, differentiable)."""
    a, b, c = matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 0, 2]
    d, e, f = matrix[:, 1, 0], matrix[:, 1, 1], matrix[:, 1, 2]
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    return _matrix(ia, ib, -(ia * c + ib * f), id_, ie, -(id_ * c + ie * f))


def warp_images(images: Tensor, matrix: Tensor) -> Tensor:
    """Resample ``B×C×H×W`` images so that input pixel ``p`` lands at ``matrix @ p`` (bilinear,
    zero fill).

    This is what ``kornia.geometry.transform.warp_affine(..., align_corners=True)``
    computes (the same numbers to 1e-4, checked in the tests), written with
    ``grid_sample`` directly: kornia's grid bookkeeping cost about 40% more on the
    CPU (measured, 13 × 3×256×192). With
    ``align_corners=True`` the normalized coordinate −1 is the center of the first
    pixel and +1 that of the last, which is the project's pixel-center convention.
    """
    height, width = images.shape[-2:]
    inverse = invert_matrix(matrix.to(images.dtype))  # output pixel → input pixel
    # In normalized coordinates u = 2x / (W - 1) - 1 (and likewise v): theta = N · inverse · N⁻¹.
    sx, sy = 2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)
    a, b, c = inverse[:, 0, 0], inverse[:, 0, 1], inverse[:, 0, 2]
    d, e, f = inverse[:, 1, 0], inverse[:, 1, 1], inverse[:, 1, 2]
    theta = _matrix(
        a,
        b * sx / sy,
        sx * (a / sx + b / sy + c) - 1.0,
        d * sy / sx,
        e,
        sy * (d / sx + e / sy + f) - 1.0,
    )
    # affine_grid's batched matmul with inner size 3 is slow on the CPU; broadcasting is 2× faster.
    xs = torch.linspace(-1.0, 1.0, width, dtype=images.dtype, device=images.device)
    ys = torch.linspace(-1.0, 1.0, height, dtype=images.dtype, device=images.device)[:, None]
    t = theta[:, :, :, None, None]
    grid = torch.stack(
        [t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2], t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2]], -1
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def warp(images: Tensor, keypoints: Tensor, visibility: Tensor, matrix: Tensor) -> Triple:
    """Warp images by ``B×2×3`` ``matrix`` (bilinear, zero fill); move keypoints the same way.

    Gradient: exact in the image and in the matrix entries.
    """
    height, width = images.shape[-2:]
    warped = warp_images(images, matrix)
    moved = transform_keypoints(keypoints, matrix.to(keypoints.dtype))
    inside = inside_crop(moved, height, width)
    return warped, moved, torch.where(inside, visibility, torch.zeros_like(visibility))


def _geometric(matrix_fn: Callable[[Tensor, int, int], Tensor]):
    def op(images: Tensor, keypoints: Tensor, visibility: Tensor, value: Tensor) -> Triple:
        height, width = images.shape[-2:]
        value = torch.as_tensor(value, dtype=images.dtype, device=images.device).expand(images.shape[0])
        return warp(images, keypoints, visibility, matrix_fn(value, height, width))

    return op


def translate_x(images: Tensor, keypoints: Tensor, visibility: Tensor, value: Tensor) -> Triple:
    """Shift right by ``value × W`` pixels (``value (B,)``, a fraction of the width).

    Gradient: exact in the image and in ``value``.
    """
    return _geometric(translate_x_matrix)(images, keypoints, visibility, value)


def translate_y(images: Tensor, keypoints: Tensor, visibility: Tensor, value: Tensor) -> Triple:
    """Shift down by ``value × H`` pixels (``value (B,)``, a fraction of the height).

    Gradient: exact in the image and in ``value``.
    """
    return _geometric(translate_y_matrix)(images, keypoints, visibility, value)


def rotate(images: Tensor, keypoints: Tensor, visibility: Tensor, value: Tensor) -> Triple:
    """Rotate ``value (B,)`` degrees counter-clockwise about the image center.

    Gradient: exact in the image and in ``value``.
    """
    return _geometric(rotation_matrix)(images, keypoints, visibility, value)


def scale(images: Tensor, keypoints: Tensor, visibility: Tensor, value: Tensor) -> Triple:
    """Zoom by the factor ``value (B,)`` about the image center (> 1 enlarges).

    Gradient: exact in the image and in ``value``.
    """
    return _geometric(scale_matrix)(images, keypoints, visibility, value)


def hflip(
    images: Tensor,
    keypoints: Tensor,
    visibility: Tensor,
    flip_pairs: Sequence[tuple[int, int]],
    apply: Tensor | None = None,
) -> Triple:
    """Mirror left-right and swap the left/right keypoints of ``flip_pairs``.

    Args:
        flip_pairs: ``(left, right)`` keypoint index pairs
            (``autopose.data.coco.COCO_FLIP_PAIRS``).
        apply: ``(B,)`` bool, which samples to flip (all when ``None``).

    Gradient: exact in the image; none-in-m (no magnitude).
    """
    batch, _, _, width = images.shape
    if apply is None:
        apply = torch.ones(batch, dtype=torch.bool, device=images.device)
    flipped_images = images.flip(-1)
    permutation = list(range(keypoints.shape[1]))
    for left, right in flip_pairs:
        permutation[left], permutation[right] = right, left
    flipped_kpts = keypoints[:, permutation].clone()
    flipped_kpts[..., 0] = width - 1 - flipped_kpts[..., 0]
    flipped_vis = visibility[:, permutation]
    pick = apply.view(-1, 1, 1, 1)
    return (
        torch.where(pick, flipped_images, images),
        torch.where(apply.view(-1, 1, 1), flipped_kpts, keypoints),
        torch.where(apply.view(-1, 1), flipped_vis, visibility),
    )


def flip_lr(
    images: Tensor,
    keypoints: Tensor,
    visibility: Tensor,
    value: Tensor | None = None,
    *,
    flip_pairs: Sequence[tuple[int, int]],
) -> Triple:
    """FlipLR as an op: :func:`hflip` of every sample (``value`` is ignored: no magnitude).

    Gradient: exact in the image; none-in-m.
    """
    return hflip(images, keypoints, visibility, flip_pairs)


# -- photometric ops (keypoints unchanged) ---------------------------------------------------------


def _per_sample(value: Tensor | float, images: Tensor) -> Tensor:
    value = torch.as_tensor(value, dtype=images.dtype, device=images.device)
    return value.expand(images.shape[0]).view(-1, 1, 1, 1)


def equalize_image(images: Tensor, value: Tensor | None = None) -> Tensor:
    """Histogram equalization per image and channel (kornia's, which matches PIL's).

    Gradient: straight-through in the image (the backward pass is the identity's:
    kornia's equalize passes zero gradient); none-in-m (no magnitude).
    """
    equalized = kornia.enhance.equalize(images)
    if not (torch.is_grad_enabled() and images.requires_grad):
        return equalized
    return images + (equalized - images).detach()


def solarize_image(images: Tensor, value: Tensor) -> Tensor:
    """Invert the pixels at or above the threshold ``value (B,)`` (0…1).

    Gradient: exact in the image (±1). Straight-through in the threshold: the
    forward pass is the hard step, the backward pass that of the smooth surrogate
    ``x + σ((x - t) / 0.05)(1 - 2x)`` (its image gradient is not used).
    """
    threshold = _per_sample(value, images)
    hard = torch.where(images >= threshold, 1.0 - images, images)
    if not (torch.is_grad_enabled() and threshold.requires_grad):
        return hard
    frozen = images.detach()
    soft = frozen + torch.sigmoid((frozen - threshold) / SOLARIZE_SURROGATE_WIDTH) * (1.0 - 2.0 * frozen)
    return hard + (soft - soft.detach())


def solarize_add_image(images: Tensor, value: Tensor) -> Tensor:
    """Add ``value (B,)`` to the pixels below 0.5, clipped to 1 (AutoAugment's SolarizeAdd).

    kornia's ``solarize(additions=…)`` adds to every pixel and then inverts, a
    different op, hence this line of our own.

    Gradient: exact in the image and in ``value`` (zero where the sum clips).
    """
    added = (images + _per_sample(value, images)).clamp(0.0, 1.0)
    return torch.where(images < SOLARIZE_ADD_THRESHOLD, added, images)


def brightness_image(images: Tensor, value: Tensor) -> Tensor:
    """Multiply by the factor ``value (B,)`` and clip (PIL's ``ImageEnhance.Brightness``;
    kornia's ``adjust_brightness`` is additive).

    Gradient: exact in the image and in ``value`` (zero where it clips).
    """
    return (images * _per_sample(value, images)).clamp(0.0, 1.0)


def sharpness_image(images: Tensor, value: Tensor) -> Tensor:
    """Blend with a smoothed copy: factor 0 smooth, 1 unchanged, > 1 sharper (PIL's
    ``ImageEnhance.Sharpness``; the same numbers as ``kornia.enhance.sharpness``).

    The 3×3 smoothing kernel ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13`` is written
    as a box sum plus four times the center: a 3×3 average pool runs about ten
    times faster on the CPU than kornia's depthwise convolution (measured, batch 32
    × 256×192), with the same result. Border pixels stay unsmoothed, as in PIL.

    Gradient: exact in the image and in ``value``.
    """
    inner = images[..., 1:-1, 1:-1]
    smooth = ((F.avg_pool2d(images, 3, stride=1) * 9.0 + 4.0 * inner) / 13.0).clamp(0.0, 1.0)
    blurred = F.pad(smooth - inner, (1, 1, 1, 1)) + images
    return (blurred + (images - blurred) * _per_sample(value, images)).clamp(0.0, 1.0)


def _coverage(coords: Tensor, center: Tensor, half: Tensor) -> Tensor:
    """Fraction of each pixel ``[c - 0.5, c + 0.5]`` covered by ``[center - half, center + half]``."""
    lower = torch.maximum(coords - 0.5, center - half)
    upper = torch.minimum(coords + 0.5, center + half)
    return (upper - lower).clamp(0.0, 1.0)


def cutout_image(
    images: Tensor,
    value: Tensor,
    center: Tensor | None = None,
    generator=None,
    extent: tuple[int, int] | None = None,
) -> Tensor:
    """Fill a ``value·H × value·W`` rectangle with gray (``value (B,)``, a fraction of the size).

    Args:
        center: ``B×2`` ``(x, y)`` rectangle centers in pixels; uniform over the
            image when ``None`` (drawn with ``generator``).
        extent: the ``(H, W)`` the size is a fraction of (the image's when ``None``; a crop's
            on a canvas, see :func:`autopose.augment.apply.apply_step`).

    The rectangle is anti-aliased: each pixel is filled by the fraction of it that
    the rectangle covers, so the size has a gradient. Keypoints under the
    rectangle keep their visibility (the model should still find occluded joints).

    Gradient: exact in the image and in ``value`` (through the edge pixels).
    """
    batch, _, height, width = images.shape
    if center is None:
        uniform = torch.rand(batch, 2, generator=generator).to(images.device, images.dtype)
        center = uniform * torch.tensor([width, height], dtype=images.dtype, device=images.device) - 0.5
    size = torch.as_tensor(value, dtype=images.dtype, device=images.device).expand(batch)
    xs = torch.arange(width, dtype=images.dtype, device=images.device)
    ys = torch.arange(height, dtype=images.dtype, device=images.device)
    size_h, size_w = extent if extent is not None else (height, width)
    cover_x = _coverage(xs[None, :], center[:, 0:1], (size * size_w / 2)[:, None])  # B×W
    cover_y = _coverage(ys[None, :], center[:, 1:2], (size * size_h / 2)[:, None])  # B×H
    cover = (cover_y[:, :, None] * cover_x[:, None, :])[:, None]  # B×1×H×W
    return images + (CUTOUT_FILL - images) * cover


def _photometric(image_fn: Callable[[Tensor, Tensor], Tensor]):
    def op(images: Tensor, keypoints: Tensor, visibility: Tensor, value: Tensor) -> Triple:
        return image_fn(images, value), keypoints, visibility

    op.__doc__ = image_fn.__doc__
    return op


equalize = _photometric(equalize_image)
solarize = _photometric(solarize_image)
solarize_add = _photometric(solarize_add_image)
brightness = _photometric(brightness_image)
sharpness = _photometric(sharpness_image)
cutout = _photometric(cutout_image)


# -- the op table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """One searchable op.

    Attributes:
        name: the name used in policy files and search spaces.
        apply: ``(images, keypoints, visibility, value) -> (images, keypoints, visibility)``.
        default_range: the real values ``m = 0`` and ``m = 10`` map to (the paper's
            space); ``None`` for an op without magnitude.
        domain: the real values the op accepts, to validate a search space's range.
        gradient: what the backward pass gives, in words.
        identity: the real value that leaves the image unchanged (``None`` if none).
        matrix: for a geometric op, ``(value (B,), H, W) -> B×2×3``.
        image_fn: for a photometric op, ``(images, value) -> images``.
        mirrors: the op is FlipLR: a mirror with the left/right keypoints swapped, applied
            whole or not at all (it cannot be blended; see :func:`autopose.augment.apply.apply_step`).
    """

    name: str
    apply: Callable[..., Triple]
    default_range: tuple[float, float] | None
    domain: tuple[float, float] | None
    gradient: str
    identity: float | None = None
    matrix: Callable[[Tensor, int, int], Tensor] | None = None
    image_fn: Callable[..., Tensor] | None = None
    mirrors: bool = False

    @property
    def geometric(self) -> bool:
        return self.matrix is not None

    @property
    def moves_keypoints(self) -> bool:
        """A geometric op or the mirror: the keypoints move with the pixels."""
        return self.geometric or self.mirrors

    @property
    def has_magnitude(self) -> bool:
        return self.default_range is not None


# Default ranges follow AutoAugment / RandAugment (Cubuk et al. 2019, 2020) where
# they carry over; Rotate and Scale are the project's pose ranges (DESIGN.md), the
# translations a quarter of the crop so the person stays mostly inside.
OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("TranslateX", translate_x, (-0.25, 0.25), (-1.0, 1.0), "exact", 0.0, translate_x_matrix),
        OpSpec("TranslateY", translate_y, (-0.25, 0.25), (-1.0, 1.0), "exact", 0.0, translate_y_matrix),
        OpSpec("Rotate", rotate, (-45.0, 45.0), (-180.0, 180.0), "exact", 0.0, rotation_matrix),
        OpSpec("Scale", scale, (0.7, 1.35), (0.1, 10.0), "exact", 1.0, scale_matrix),
        OpSpec(
            "Equalize", equalize, None, None, "straight-through (image), none-in-m", image_fn=equalize_image
        ),
        OpSpec(
            "Solarize",
            solarize,
            (1.0, 0.0),
            (0.0, 1.0),
            "exact (image), straight-through (threshold)",
            image_fn=solarize_image,
        ),
        OpSpec(
            "SolarizeAdd", solarize_add, (0.0, 0.43), (-1.0, 1.0), "exact", 0.0, image_fn=solarize_add_image
        ),
        OpSpec("Brightness", brightness, (0.1, 1.9), (0.0, 10.0), "exact", 1.0, image_fn=brightness_image),
        OpSpec("Sharpness", sharpness, (0.1, 1.9), (-10.0, 10.0), "exact", 1.0, image_fn=sharpness_image),
        OpSpec("Cutout", cutout, (0.0, 0.5), (0.0, 1.0), "exact", 0.0, image_fn=cutout_image),
        OpSpec("FlipLR", flip_lr, None, None, "exact (image), none-in-m", mirrors=True),
    )
}
OP_NAMES: tuple[str, ...] = tuple(OPS)
# The paper's Table 1: every op but FlipLR (horizontal flip is not among them).
PAPER_OP_NAMES: tuple[str, ...] = tuple(name for name in OPS if name != "FlipLR")
