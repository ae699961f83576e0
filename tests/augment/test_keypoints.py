"""Keypoints move with the pixels: a dot drawn at each keypoint is found at the moved keypoint.

Each sample carries three keypoints; keypoint ``c`` is drawn as a small Gaussian
dot in channel ``c``, so every dot can be located on its own (intensity centroid)
after the augmentation and compared with where the op says the keypoint went.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopose.augment import (
    Handcrafted,
    Policy,
    PolicyStep,
    RandAugment,
    RelaxedPolicy,
    TrivialAugment,
    p2net_space,
)
from autopose.augment.ops import OPS, magnitude_to_value

H, W = 64, 48
GEOMETRIC = ("TranslateX", "TranslateY", "Rotate", "Scale")
MARGIN = 4.0  # dots closer than this to the border are partly cut off: their centroid is biased
SIGMA = 1.2

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def render_dots(keypoints: torch.Tensor) -> torch.Tensor:
    """``B×3×2`` keypoints → ``B×3×H×W`` images with keypoint ``c`` as a dot in channel ``c``."""
    ys = torch.arange(H, dtype=torch.float32)[:, None]
    xs = torch.arange(W, dtype=torch.float32)[None, :]
    dx = xs - keypoints[..., 0, None, None]
    dy = ys - keypoints[..., 1, None, None]
    return torch.exp(-(dx**2 + dy**2) / (2 * SIGMA**2))


def dot_centers(images: torch.Tensor) -> torch.Tensor:
    """Intensity centroid of each channel: ``B×3×H×W`` → ``B×3×2``."""
    weight = images * (images > 0.05 * images.amax(dim=(-2, -1), keepdim=True))
    ys = torch.arange(H, dtype=torch.float32)[:, None]
    xs = torch.arange(W, dtype=torch.float32)[None, :]
    total = weight.sum(dim=(-2, -1)).clamp_min(1e-12)
    return torch.stack([(weight * xs).sum(dim=(-2, -1)) / total, (weight * ys).sum(dim=(-2, -1)) / total], -1)


def check_dots(images_after, keypoints_after, visibility_after, single_step: bool = False):
    """Every visible dot well inside is within 1 px of its keypoint; keypoints outside are invisible.

    After one op, every keypoint inside is still visible; after several, a keypoint
    that left the crop at one step stays invisible even if a later step brings it back.
    """
    x, y = keypoints_after[..., 0], keypoints_after[..., 1]
    outside = (x < -0.5) | (x > W - 0.5) | (y < -0.5) | (y > H - 0.5)
    assert torch.all(visibility_after[outside] == 0), "a keypoint that left the crop is still visible"
    if single_step:
        assert torch.all(visibility_after[~outside] == 2), "a keypoint inside the crop lost its visibility"
    well_inside = (x >= MARGIN) & (x <= W - 1 - MARGIN) & (y >= MARGIN) & (y <= H - 1 - MARGIN)
    well_inside &= visibility_after == 2
    found = dot_centers(images_after)
    error = (found - keypoints_after).norm(dim=-1)
    assert torch.all(error[well_inside] < 1.0), f"dot off its keypoint by {error[well_inside].max():.2f} px"


keypoint_sets = st.lists(
    st.tuples(st.floats(MARGIN, W - 1 - MARGIN), st.floats(MARGIN, H - 1 - MARGIN)), min_size=6, max_size=6
).map(lambda pts: torch.tensor(pts, dtype=torch.float32).view(2, 3, 2))


@SETTINGS
@given(
    op=st.sampled_from(GEOMETRIC),
    magnitudes=st.lists(st.floats(0.0, 10.0), min_size=2, max_size=2),
    keypoints=keypoint_sets,
)
def test_geometric_op_moves_dots_with_keypoints(op, magnitudes, keypoints):
    spec = OPS[op]
    value = magnitude_to_value(torch.tensor(magnitudes), spec.default_range)
    images = render_dots(keypoints)
    visibility = torch.full((2, 3), 2.0)
    out_images, out_kpts, out_vis = spec.apply(images, keypoints, visibility, value)
    check_dots(out_images, out_kpts, out_vis, single_step=True)


GEOMETRIC_SPACE = p2net_space().subset(GEOMETRIC, name="geometric")
step_strategy = st.builds(
    PolicyStep, op=st.sampled_from(GEOMETRIC), p=st.sampled_from([0.0, 0.5, 1.0]), m=st.floats(0.0, 10.0)
)


@SETTINGS
@given(
    sub_policies=st.lists(st.lists(step_strategy, min_size=1, max_size=3), min_size=1, max_size=3),
    keypoints=keypoint_sets,
    seed=st.integers(0, 2**16),
)
def test_whole_policy_moves_dots_with_keypoints(sub_policies, keypoints, seed):
    policy = Policy(sub_policies, GEOMETRIC_SPACE, seed=seed)
    out = policy(render_dots(keypoints), keypoints, torch.full((2, 3), 2.0))
    check_dots(*out)


@SETTINGS
@given(keypoints=keypoint_sets, seed=st.integers(0, 2**16), magnitude=st.floats(0.5, 9.5))
def test_relaxed_policy_mixture_keeps_keypoints_exact(keypoints, seed, magnitude):
    """Soft mixtures of geometric ops blend matrices, so one image with exact keypoints comes out.

    One step: over two, a dot cut by the border after the first warp comes back with its centroid
    biased though its keypoint is exact (found by Hypothesis: 1.12 px; the discrete whole-policy
    test covers the composition of steps)."""
    one_step = dataclasses.replace(GEOMETRIC_SPACE, ops_per_sub_policy=1)
    policy = RelaxedPolicy(one_step, init_magnitude=magnitude, seed=seed)
    with torch.no_grad():
        policy.op_logits.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(seed))
        policy.probability_logits.fill_(2.0)
        out = policy(render_dots(keypoints), keypoints, torch.full((2, 3), 2.0))
    check_dots(*out)


@SETTINGS
@given(keypoints=keypoint_sets, seed=st.integers(0, 2**16), flip=st.booleans())
def test_handcrafted_moves_dots_with_keypoints(keypoints, seed, flip):
    # Keypoints 0 and 1 are a left/right pair; after a flip keypoint 0 is where dot 1 went.
    augment = Handcrafted(flip_pairs=[(0, 1)], upper_body=[0], flip_p=float(flip), half_body_p=0.0, seed=seed)
    images = render_dots(keypoints)
    out_images, out_kpts, out_vis = augment(images, keypoints, torch.full((2, 3), 2.0))
    if flip:
        out_images = out_images[:, [1, 0, 2]]  # channel c holds the dot of keypoint c again
    check_dots(out_images, out_kpts, out_vis, single_step=True)


def test_handcrafted_half_body_zooms_onto_the_picked_half():
    torch.manual_seed(0)
    batch, joints = 8, 17
    keypoints = torch.rand(batch, joints, 2) * torch.tensor([W - 9.0, H - 9.0]) + 4.0
    visibility = torch.full((batch, joints), 2.0)
    images = torch.rand(batch, 3, H, W)
    augment = Handcrafted(flip_p=0.0, rotation_p=0.0, scale_range=(1.0, 1.0), half_body_p=1.0, seed=3)
    _, moved, _ = augment(images, keypoints, visibility)
    center = torch.tensor([(W - 1) / 2, (H - 1) / 2])
    for i in range(batch):
        halves = (moved[i, :11], moved[i, 11:])  # COCO's upper body is keypoints 0–10
        mids = [(half.amin(0) + half.amax(0)) / 2 for half in halves]
        picked = halves[0] if (mids[0] - center).norm() < (mids[1] - center).norm() else halves[1]
        # The picked half's box is centered on the crop, and its padded box (widened to
        # the crop's aspect) now spans the crop's width exactly.
        assert (mids[0] - center).norm() < 1e-3 or (mids[1] - center).norm() < 1e-3
        extent = picked.amax(0) - picked.amin(0)
        padded_width = 1.5 * max(float(extent[0]), float(extent[1]) * W / H)
        assert abs(padded_width - W) < 1e-3 * W


@SETTINGS
@given(keypoints=keypoint_sets, seed=st.integers(0, 2**16))
def test_rand_and_trivial_augment_move_dots_with_keypoints(keypoints, seed):
    for augment in (
        RandAugment(GEOMETRIC_SPACE, num_ops=2, magnitude=7.0, seed=seed),
        TrivialAugment(GEOMETRIC_SPACE, seed=seed),
    ):
        out = augment(render_dots(keypoints), keypoints, torch.full((2, 3), 2.0))
        check_dots(*out)


def test_keypoints_pushed_out_of_the_crop_become_invisible():
    keypoints = torch.tensor([[[10.0, 20.0], [40.0, 20.0], [30.0, 60.0]]])
    visibility = torch.tensor([[2.0, 1.0, 2.0]])
    images = torch.rand(1, 3, H, W)
    # Half the width to the right: x = 40 → 64 leaves; x = 10 → 34 stays.
    _, moved, vis = OPS["TranslateX"].apply(images, keypoints, visibility, torch.tensor([0.5]))
    assert moved[0, :, 0].tolist() == [34.0, 64.0, 54.0]
    assert vis.tolist() == [[2.0, 0.0, 0.0]]
    # Once gone, a keypoint stays gone even if it comes back.
    _, back, vis_back = OPS["TranslateX"].apply(images, moved, vis, torch.tensor([-0.5]))
    assert torch.allclose(back, keypoints)
    assert vis_back.tolist() == [[2.0, 0.0, 0.0]]
