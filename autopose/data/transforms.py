"""Box → center/scale, the affine crop, and its inverse.

Coordinate convention (used everywhere in autopose): the center of pixel
``(col, row)`` is the point ``(x, y) = (col, row)``; an image of width ``W``
spans ``x ∈ [-0.5, W - 0.5]``. The crop maps the padded person box onto the
whole crop, edge to edge, so the map and its inverse carry no half-pixel bias.

Sizes are ``(height, width)`` like tensor shapes; points are ``(x, y)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

BOX_PADDING = 1.25


def box_to_center_scale(
    bbox: np.ndarray | list[float],
    aspect_ratio: float,
    padding: float = BOX_PADDING,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop center and size for a person box.

    Args:
        bbox: ``(x, y, w, h)`` in image pixels (COCO layout: ``x, y`` is the
            top-left corner of the box's pixel area).
        aspect_ratio: crop ``width / height`` (192 / 256 = 0.75 by default).
        padding: context added around the box (1.25 by default).

    Returns:
        ``center (2,)`` in image pixels and ``scale (2,) = (w, h)``: the crop's
        extent in image pixels, widened or heightened to ``aspect_ratio``, then padded.
    """
    x, y, w, h = (float(v) for v in bbox)
    # The box covers pixel edges [x, x + w]; in the pixel-center convention that is
    # the interval [x - 0.5, x + w - 0.5], whose middle is below.
    center = np.array([x + w / 2.0 - 0.5, y + h / 2.0 - 0.5], dtype=np.float64)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    scale = np.array([w * padding, h * padding], dtype=np.float64)
    return center, scale


def crop_matrix(
    center: np.ndarray,
    scale: np.ndarray,
    output_size: tuple[int, int],
    rotation: float = 0.0,
) -> np.ndarray:
    """The ``2×3`` affine map from image pixels to crop pixels.

    Args:
        center: ``(2,)`` crop center in image pixels.
        scale: ``(2,)`` crop extent ``(w, h)`` in image pixels.
        output_size: ``(height, width)`` of the crop.
        rotation: degrees, counter-clockwise in the displayed image.

    Returns:
        ``float64 2×3`` matrix ``A`` with ``crop = A @ [x, y, 1]``.
    """
    out_h, out_w = output_size
    sx = out_w / float(scale[0])
    sy = out_h / float(scale[1])
    theta = math.radians(rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    # Image y points down, so a counter-clockwise turn on screen is R(-theta) in (x, y).
    rot = np.array([[cos, sin], [-sin, cos]])
    linear = np.diag([sx, sy]) @ rot
    out_center = np.array([(out_w - 1) / 2.0, (out_h - 1) / 2.0])
    translation = out_center - linear @ np.asarray(center, dtype=np.float64)
    return np.concatenate([linear, translation[:, None]], axis=1)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a ``2×3`` affine matrix (``... ×2×3`` batches allowed)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    linear = matrix[..., :2]
    inv_linear = np.linalg.inv(linear)
    inv_translation = -(inv_linear @ matrix[..., 2:3])
    return np.concatenate([inv_linear, inv_translation], axis=-1)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a ``2×3`` affine map to ``N×2`` points (extra columns are kept)."""
    points = np.asarray(points, dtype=np.float64)
    xy = points[..., :2] @ matrix[:, :2].T + matrix[:, 2]
    if points.shape[-1] > 2:
        return np.concatenate([xy, points[..., 2:]], axis=-1)
    return xy


def warp_image(
    image: Image.Image | np.ndarray, matrix: np.ndarray, output_size: tuple[int, int]
) -> np.ndarray:
    """Crop an image with the affine ``matrix`` (image → crop), bilinear, zero fill.

    Args:
        image: PIL image or ``H×W×3`` uint8 array.
        matrix: ``2×3`` image → crop map from :func:`crop_matrix`.
        output_size: ``(height, width)`` of the crop.

    Returns:
        ``height×width×3`` uint8 array.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    inverse = invert_affine(matrix)
    linear, translation = inverse[:, :2], inverse[:, 2]
    # PIL samples output pixel centers at (col + 0.5, row + 0.5) and reads input pixel
    # centers there too: shift our integer-centered map into PIL's frame.
    pil_translation = translation + 0.5 - linear @ np.array([0.5, 0.5])
    data = (*linear[0], pil_translation[0], *linear[1], pil_translation[1])
    out_h, out_w = output_size
    warped = image.convert("RGB").transform(
        (out_w, out_h), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR
    )
    return np.asarray(warped)


# The widest canvas a proxy stores around each crop, as canvas side over crop side: 2 already
# holds a 45° turn of a 4:3 crop and a zoom-out to 1/2 without a black corner.
MAX_MARGIN = 3.0


def check_margin(margin: float) -> None:
    """Raise ValueError unless ``margin`` (canvas side over crop side) is a number in
    ``[1, MAX_MARGIN]``."""
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 1.0 <= margin <= MAX_MARGIN:
        raise ValueError(f"must lie in [1, {MAX_MARGIN:g}] (canvas side over crop side), got {margin!r}")


def canvas_padding(input_size: tuple[int, int], margin: float) -> tuple[int, int]:
    """``(rows, cols)`` of image a canvas keeps on each side of an ``input_size`` crop so that
    its sides are about ``margin`` times the crop's (rounded to whole pixels; ``margin = 1``: none).

    Raises:
        ValueError: ``margin`` outside ``[1, MAX_MARGIN]`` (:func:`check_margin`).
    """
    check_margin(margin)
    height, width = input_size
    return round((margin - 1.0) * height / 2), round((margin - 1.0) * width / 2)


def canvas_size(input_size: tuple[int, int], pad: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of the canvas that holds an ``input_size`` crop ``pad`` in from each side."""
    return input_size[0] + 2 * pad[0], input_size[1] + 2 * pad[1]


def canvas_crop_matrix(
    center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int], pad: tuple[int, int]
) -> np.ndarray:
    """The image → canvas map (:func:`crop_matrix` at :func:`canvas_size`) of the crop with
    ``center`` and extent ``scale``: the crop's pixels per image pixel kept, so that canvas pixel
    ``p + (cols, rows)`` is crop pixel ``p``."""
    stored = canvas_size(input_size, pad)
    widening = np.array([stored[1] / input_size[1], stored[0] / input_size[0]])
    return crop_matrix(center, np.asarray(scale, dtype=np.float64) * widening, stored)


def cut_window(
    images: torch.Tensor, keypoints: torch.Tensor, pad: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops inside canvases ``…×C×(H+2·rows)×(W+2·cols)``: ``…×C×H×W`` images and the
    keypoints ``…×K×2`` in the crops' pixels. Visibility is unchanged: a point outside the crop
    is the codec's to drop, as in a crop cut without a canvas."""
    if pad == (0, 0):
        return images, keypoints
    rows, cols = pad
    height, width = images.shape[-2:]
    return images[..., rows : height - rows, cols : width - cols], window_keypoints(keypoints, pad)


def window_keypoints(keypoints: torch.Tensor, pad: tuple[int, int]) -> torch.Tensor:
    """Keypoints ``…×K×2`` in canvas pixels, in the pixels of the crop ``pad = (rows, cols)`` in
    (:func:`cut_window`'s keypoints)."""
    if pad == (0, 0):
        return keypoints
    rows, cols = pad
    return keypoints - keypoints.new_tensor([float(cols), float(rows)])


# The largest crop side accepted. Top-down pose networks take 256×192 or 384×288 (the P2Net
# paper's); a 100000×100000 crop was once accepted and grew past 18 GB before it was killed.
MAX_CROP_SIDE = 1024


def check_crop_size(height: int, width: int) -> None:
    """Raise ValueError unless both sides are positive multiples of 4 and at most MAX_CROP_SIDE."""
    if height <= 0 or width <= 0 or height % 4 or width % 4:
        raise ValueError(f"input size must be positive multiples of 4, got {height}x{width}")
    if max(height, width) > MAX_CROP_SIDE:
        raise ValueError(
            f"input size {height}x{width} is larger than {MAX_CROP_SIDE} a side: pose crops are "
            "256x192 or 384x288, and each crop's image and heatmaps grow with its area"
        )


def parse_size(text: str) -> tuple[int, int]:
    """``"256x192"`` → ``(256, 192)`` (height, width), checked by :func:`check_crop_size`."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected HxW such as 256x192, got {text!r}") from None
    check_crop_size(height, width)
    return height, width
