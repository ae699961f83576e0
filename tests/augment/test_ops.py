"""The ops: pixel convention, agreement with PIL, and the gradients each op promises."""

from __future__ import annotations

import kornia
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from autopose.augment import ops
from autopose.augment.ops import OPS, magnitude_to_value

H, W = 64, 48


def random_image(seed: int = 0, height: int = H, width: int = W) -> torch.Tensor:
    """A ``1×3×H×W`` image on the 8-bit grid (so PIL sees exactly the same pixels)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, height, width, generator=generator) * 255).round() / 255


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).astype(np.float32) / 255).permute(2, 0, 1)[None]


def test_magnitude_maps_linearly_onto_the_range():
    values = magnitude_to_value(torch.tensor([0.0, 5.0, 10.0]), (-45.0, 45.0))
    assert values.tolist() == [-45.0, 0.0, 45.0]
    assert magnitude_to_value(2.5, (1.0, 0.0)).item() == pytest.approx(0.75)  # ranges may run downwards


def test_integer_translation_shifts_pixels_exactly():
    """kornia's warp_affine(align_corners=True) samples at integer pixel centers."""
    image = random_image()
    keypoints = torch.tensor([[[5.0, 7.0]]])
    out, moved, _ = ops.translate_x(image, keypoints, torch.full((1, 1), 2.0), torch.tensor([3.0 / W]))
    # Equal up to kornia's float32 coordinate normalization (well below an 8-bit level).
    assert torch.allclose(out[..., 3:], image[..., :-3], atol=1e-4)
    assert out[..., :3].abs().max() < 1e-4  # zero fill (up to float32 coordinate rounding)
    assert moved.tolist() == [[[8.0, 7.0]]]
    out, moved, _ = ops.translate_y(image, keypoints, torch.full((1, 1), 2.0), torch.tensor([-2.0 / H]))
    assert torch.allclose(out[..., :-2, :], image[..., 2:, :], atol=1e-4)
    assert moved.tolist() == [[[5.0, 5.0]]]


def test_warp_matches_kornia_warp_affine():
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(4, 3, H, W, generator=generator)
    matrix = ops.rotation_matrix(torch.tensor([10.0, -30.0, 45.0, 0.0]), H, W)
    matrix[:, :, :2] *= torch.tensor([1.2, 0.8, 1.0, 0.7]).view(4, 1, 1)
    matrix[:, 0, 2] += torch.tensor([1.5, -3.0, 0.0, 2.0])
    expected = kornia.geometry.transform.warp_affine(images, matrix, (H, W), align_corners=True)
    assert torch.allclose(ops.warp_images(images, matrix), expected, atol=1e-4)


def test_quarter_turn_matches_rot90_pixel_for_pixel():
    image = random_image(1, 32, 32)
    keypoints = torch.tensor([[[3.0, 10.0]]])
    out, moved, _ = ops.rotate(image, keypoints, torch.full((1, 1), 2.0), torch.tensor([90.0]))
    expected = torch.rot90(image, k=1, dims=(-2, -1))  # counter-clockwise on screen
    assert torch.allclose(out, expected, atol=1e-5)
    # The pixel at (x, y) = (3, 10) lands at (10, 31 - 3) after a counter-clockwise quarter turn.
    assert torch.allclose(moved, torch.tensor([[[10.0, 28.0]]]), atol=1e-5)
    assert expected[0, :, 28, 10].tolist() == image[0, :, 10, 3].tolist()


def test_scale_keeps_the_center_fixed():
    image = random_image()
    center = torch.tensor([[[(W - 1) / 2, (H - 1) / 2]]])
    _, moved, _ = ops.scale(image, center, torch.full((1, 1), 2.0), torch.tensor([1.3]))
    assert torch.allclose(moved, center)


def test_photometric_ops_match_pil():
    image = random_image(2)
    pil = to_pil(image)
    add = 60 / 255
    cases = {
        "Equalize": (ops.equalize_image(image), ImageOps.equalize(pil)),
        "Solarize": (ops.solarize_image(image, torch.tensor([0.5])), ImageOps.solarize(pil, 128)),
        "SolarizeAdd": (
            ops.solarize_add_image(image, torch.tensor([add])),
            pil.point(lambda v: min(v + 60, 255) if v < 128 else v),
        ),
        "Brightness": (
            ops.brightness_image(image, torch.tensor([1.4])),
            ImageEnhance.Brightness(pil).enhance(1.4),
        ),
        "Sharpness": (
            ops.sharpness_image(image, torch.tensor([1.7])),
            ImageEnhance.Sharpness(pil).enhance(1.7),
        ),
    }
    for name, (ours, theirs) in cases.items():
        # PIL rounds to 8 bits: within 1.5 levels everywhere.
        assert (ours - from_pil(theirs)).abs().max() * 255 < 1.5, name


def test_sharpness_equals_kornia():
    image = torch.rand(3, 3, 20, 17)
    factor = torch.tensor([0.0, 0.6, 1.8])
    assert torch.allclose(
        ops.sharpness_image(image, factor), kornia.enhance.sharpness(image, factor), atol=1e-6
    )


def test_cutout_fills_the_covered_area():
    image = torch.rand(2, 3, H, W)
    centers = torch.tensor([[20.0, 30.0], [20.0, 30.0]])
    out = ops.cutout_image(image, torch.tensor([0.0, 0.25]), center=centers)
    assert torch.equal(out[0], image[0])  # size 0 changes nothing
    changed = (out[1] != image[1]).any(0)
    assert changed.sum() == pytest.approx(0.25 * H * 0.25 * W, abs=2 * (0.25 * (H + W)) + 4)
    assert torch.allclose(out[1, :, 30, 20], torch.full((3,), ops.CUTOUT_FILL))


def test_hflip_mirrors_and_swaps_pairs():
    image = torch.rand(2, 3, H, W)
    keypoints = torch.tensor([[[1.0, 2.0], [10.0, 3.0], [20.0, 4.0]]]).repeat(2, 1, 1)
    visibility = torch.tensor([[2.0, 1.0, 0.0]]).repeat(2, 1)
    apply = torch.tensor([True, False])
    out, moved, vis = ops.hflip(image, keypoints, visibility, [(0, 1)], apply=apply)
    assert torch.equal(out[0], image[0].flip(-1)) and torch.equal(out[1], image[1])
    assert moved[0].tolist() == [[W - 11.0, 3.0], [W - 2.0, 2.0], [W - 21.0, 4.0]]
    assert vis[0].tolist() == [1.0, 2.0, 0.0] and vis[1].tolist() == [2.0, 1.0, 0.0]
    twice = ops.hflip(*ops.hflip(image, keypoints, visibility, [(0, 1)]), [(0, 1)])
    assert torch.equal(twice[0], image) and torch.equal(twice[1], keypoints)


MAGNITUDE_OPS = [name for name, spec in OPS.items() if spec.has_magnitude]


@pytest.mark.parametrize("name", MAGNITUDE_OPS)
def test_gradient_in_magnitude_is_finite_and_nonzero(name):
    spec = OPS[name]
    images = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(3), requires_grad=True)
    keypoints = torch.tensor([[[10.0, 10.0], [30.0, 40.0]]]).repeat(2, 1, 1)
    m = torch.tensor([3.0, 7.0], requires_grad=True)
    out, moved, _ = spec.apply(
        images, keypoints, torch.full((2, 2), 2.0), magnitude_to_value(m, spec.default_range)
    )
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(4))
    ((out * weights).sum() + moved.sum()).backward()
    assert torch.isfinite(m.grad).all() and (m.grad != 0).all(), m.grad
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


EXACT_OPS = [name for name in MAGNITUDE_OPS if OPS[name].gradient == "exact"]


@pytest.mark.parametrize("name", EXACT_OPS)
def test_exact_gradients_agree_with_finite_differences(name):
    """Ops that claim an exact gradient in the magnitude: autograd equals a central difference."""
    spec = OPS[name]
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(1, 3, 24, 20, generator=generator, dtype=torch.float64)
    weights = torch.rand(1, 3, 24, 20, generator=generator, dtype=torch.float64)
    keypoints = torch.tensor([[[4.0, 6.0]]], dtype=torch.float64)
    center = torch.tensor([[9.3, 11.6]], dtype=torch.float64)

    def loss(value: torch.Tensor) -> torch.Tensor:
        if name == "Cutout":
            return (ops.cutout_image(images, value, center=center) * weights).sum()
        return (spec.apply(images, keypoints, torch.full((1, 1), 2.0), value)[0] * weights).sum()

    low, high = spec.default_range
    value = torch.tensor([low + 0.37 * (high - low)], dtype=torch.float64, requires_grad=True)
    (analytic,) = torch.autograd.grad(loss(value), value)
    eps = 1e-6 * max(abs(high - low), 1.0)
    numeric = (loss(value.detach() + eps) - loss(value.detach() - eps)) / (2 * eps)
    assert analytic.item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-6)


def test_equalize_is_straight_through_in_the_image():
    images = torch.rand(2, 3, H, W, requires_grad=True)
    upstream = torch.rand(2, 3, H, W)
    out = ops.equalize_image(images)
    assert torch.allclose(out, kornia.enhance.equalize(images.detach()))
    out.backward(upstream)
    assert torch.equal(images.grad, upstream)


def test_solarize_threshold_is_straight_through_and_image_gradient_exact():
    images = torch.rand(2, 3, H, W, requires_grad=True)
    threshold = torch.tensor([0.3, 0.7], requires_grad=True)
    out = ops.solarize_image(images, threshold)
    expected = torch.where(images >= threshold.view(-1, 1, 1, 1), 1 - images, images)
    assert torch.equal(out, expected.detach())
    out.sum().backward()
    sign = torch.where(images >= threshold.view(-1, 1, 1, 1), -1.0, 1.0)
    assert torch.equal(images.grad, sign)
    # Raising the threshold turns pixels x ≈ t from 1 - x back into x, a change of 2t - 1.
    assert threshold.grad[0] < 0 < threshold.grad[1]
