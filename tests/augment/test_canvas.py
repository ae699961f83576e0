"""Policies on a canvas: the crop's ops, with the image around the crop instead of black.

The oracle is a smooth scene known everywhere: the canvas holds it around the crop, so a turned
or zoomed-out crop cut from the canvas must show the scene where the same op on the crop alone
shows its own pixels (inside) or black (outside).
"""

from __future__ import annotations

import math

import torch

from autopose.augment import Handcrafted, Policy, PolicyStep, RelaxedPolicy, SearchSpace
from autopose.augment.apply import apply_step
from autopose.augment.ops import OPS, on_canvas, rotation_matrix, transform_keypoints
from autopose.data.transforms import cut_window

H, W = 32, 24
PAD = (8, 6)  # rows, cols: a canvas of 48×36, margin 1.5


def scene(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``3×…`` colours of a smooth scene at crop coordinates ``(x, y)``, never black."""
    return torch.stack(
        [
            0.5 + 0.3 * torch.sin(0.21 * xs + 0.05 * ys),
            0.5 + 0.3 * torch.cos(0.13 * ys - 0.07 * xs),
            0.4 + 0.2 * torch.sin(0.1 * (xs + ys)),
        ]
    )


def canvas_and_crop(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = PAD
    ys, xs = torch.meshgrid(
        torch.arange(H + 2 * rows, dtype=torch.float32) - rows,
        torch.arange(W + 2 * cols, dtype=torch.float32) - cols,
        indexing="ij",
    )
    canvas = scene(xs, ys)[None].expand(batch, 3, *xs.shape).clone()
    crop, _ = cut_window(canvas, torch.zeros(batch, 1, 2), PAD)
    return canvas, crop.contiguous()


def keypoints_in_crop(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    keypoints = torch.tensor([[[4.0, 5.0], [20.0, 3.0], [11.5, 16.0], [2.0, 30.0]]]).expand(batch, 4, 2)
    return keypoints.clone(), torch.full((batch, 4), 2.0)


def shifted(keypoints: torch.Tensor) -> torch.Tensor:
    return keypoints + torch.tensor([float(PAD[1]), float(PAD[0])])


TURN = 30.0


def space_of(*ops: str, sub_policies: int = 1, steps: int = 1) -> SearchSpace:
    ranges = {op: ([-TURN, TURN] if op == "Rotate" else None) for op in ops}
    return SearchSpace.from_dict(
        {"name": "canvas", "ops": ranges, "num_sub_policies": sub_policies, "ops_per_sub_policy": steps}
    )


def one_op_policy(op: str, m: float) -> Policy:
    return Policy([[PolicyStep(op, 1.0, m)]], space_of(op), seed=0)


def test_on_canvas_moves_the_crops_map_onto_the_canvas():
    matrix = rotation_matrix(torch.tensor([30.0]), H, W)
    moved = on_canvas(matrix, PAD)
    point = torch.tensor([[[3.0, 7.0], [W - 1.0, H - 1.0]]])
    expected = shifted(transform_keypoints(point, matrix))
    assert torch.allclose(transform_keypoints(shifted(point), moved), expected, atol=1e-5)
    assert on_canvas(matrix, (0, 0)) is matrix


def test_a_turn_on_the_canvas_shows_the_scene_where_the_crop_alone_shows_black():
    canvas, crop = canvas_and_crop()
    keypoints, visibility = keypoints_in_crop()
    policy = one_op_policy("Rotate", 10.0)  # TURN°
    on_crop, crop_keypoints, _ = policy(crop, keypoints, visibility)
    on_canvas_images, canvas_keypoints, _ = policy(canvas, shifted(keypoints), visibility, pad=PAD)
    cut, cut_keypoints = cut_window(on_canvas_images, canvas_keypoints, PAD)
    assert cut.shape == crop.shape
    assert torch.allclose(cut_keypoints, crop_keypoints, atol=1e-4)

    # Where each output pixel comes from, in crop coordinates: the turn's inverse.
    inverse = torch.linalg.inv(
        torch.cat([rotation_matrix(torch.tensor([TURN]), H, W)[0], torch.tensor([[0.0, 0.0, 1.0]])])
    )
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij"
    )
    source = inverse[:2, :2] @ torch.stack([xs.flatten(), ys.flatten()]) + inverse[:2, 2:]
    sx, sy = source.reshape(2, H, W)
    inside = (sx >= 1) & (sx <= W - 2) & (sy >= 1) & (sy <= H - 2)
    outside = ((sx < -1.5) | (sx > W + 0.5) | (sy < -1.5) | (sy > H + 0.5)) & (
        (sx > -PAD[1] + 1) & (sx < W + PAD[1] - 2) & (sy > -PAD[0] + 1) & (sy < H + PAD[0] - 2)
    )
    assert inside.sum() > 300 and outside.sum() > 20  # both kinds of pixels are there to check
    # Inside the crop both read the same pixels; outside, the crop alone has black, the canvas the scene.
    assert torch.allclose(cut[:, :, inside], on_crop[:, :, inside], atol=1e-5)
    assert on_crop[:, :, outside].abs().max() == 0
    assert torch.allclose(cut[0][:, outside], scene(sx[outside], sy[outside]), atol=0.02)


def test_a_turn_and_a_translation_keep_the_crops_keypoints_in_the_relaxed_policy():
    space = space_of("Rotate", "TranslateX", "Scale", sub_policies=2, steps=2)
    canvas, crop = canvas_and_crop()
    keypoints, visibility = keypoints_in_crop()
    relaxed = RelaxedPolicy(space, seed=0, hard=False)
    noise = relaxed.sample_noise(2, generator=torch.Generator().manual_seed(1))
    _, crop_keypoints, _ = relaxed(crop, keypoints, visibility, noise)
    images, canvas_keypoints, _ = relaxed(canvas, shifted(keypoints), visibility, noise, pad=PAD)
    _, cut_keypoints = cut_window(images, canvas_keypoints, PAD)
    assert torch.allclose(cut_keypoints, crop_keypoints, atol=1e-4)
    assert images.shape == canvas.shape


def test_cutout_on_the_canvas_lands_in_the_crop_sized_by_it():
    canvas, crop = canvas_and_crop()
    keypoints, visibility = keypoints_in_crop()
    specs = [OPS["Cutout"]]
    strengths, values = torch.ones(2, 1), torch.full((2, 1), 0.3)
    uniform = torch.tensor([[0.2, 0.7], [0.9, 0.1]])
    on_crop, _, _ = apply_step(crop, keypoints, visibility, specs, strengths, values, cutout_uniform=uniform)
    on_canvas_images, _, _ = apply_step(
        canvas, shifted(keypoints), visibility, specs, strengths, values, cutout_uniform=uniform, pad=PAD
    )
    cut, _ = cut_window(on_canvas_images, keypoints, PAD)
    assert torch.allclose(cut, on_crop, atol=1e-6)


def test_the_handcrafted_policy_on_the_canvas_turns_zooms_and_flips_about_the_crop():
    canvas, crop = canvas_and_crop(batch=6)
    keypoints = torch.rand(6, 17, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [W - 1, H - 1.0]
    )
    visibility = torch.full((6, 17), 2.0)
    make = lambda: Handcrafted(rotation_p=1.0, flip_p=0.5, half_body_p=0.5, half_body_min_joints=3, seed=4)  # noqa: E731
    _, crop_keypoints, crop_visibility = make()(crop, keypoints, visibility)
    images, canvas_keypoints, _ = make()(canvas, shifted(keypoints), visibility, pad=PAD)
    _, cut_keypoints = cut_window(images, canvas_keypoints, PAD)
    seen = crop_visibility > 0  # the crop alone drops points it turns out of view
    assert torch.allclose(cut_keypoints[seen], crop_keypoints[seen], atol=1e-3)
    assert not math.isclose(float(images.std()), 0.0)
