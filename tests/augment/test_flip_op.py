"""FlipLR: a mirror with the left/right keypoints swapped, an op other spaces may include (the
paper's space does not), applied whole or not at all, with a straight-through gradient."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from autopose.augment import (
    PAPER_OP_NAMES,
    Policy,
    PolicyStep,
    RelaxedPolicy,
    SearchSpace,
    load_search_space,
    p2net_space,
)
from autopose.augment.ops import hflip
from autopose.data.coco import COCO_FLIP_PAIRS

H, W = 32, 24
FLIP_YAML = Path(__file__).resolve().parents[2] / "search_spaces" / "p2net_flip.yaml"
PAIRS = ((1, 2), (3, 4))  # five keypoints: a nose and two left/right pairs


def batch(size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, H, W, generator=generator)
    keypoints = torch.rand(size, 5, 2, generator=generator) * torch.tensor([W - 1.0, H - 1.0])
    visibility = torch.randint(1, 3, (size, 5), generator=generator).float()
    return images, keypoints, visibility


def flip_space(ops=("FlipLR",)) -> SearchSpace:
    return load_search_space(FLIP_YAML).subset(list(ops), name="flip")


def test_the_flip_space_is_the_papers_space_plus_flip_and_the_papers_space_has_no_flip():
    space = load_search_space(FLIP_YAML)
    assert space.op_names == (*PAPER_OP_NAMES, "FlipLR")
    assert "FlipLR" not in p2net_space().op_names
    assert space.ops[:-1] == p2net_space().ops
    assert space.to_dict()["ops"]["FlipLR"] is None  # no magnitude
    assert space.with_flip_pairs(COCO_FLIP_PAIRS).to_dict() == space.to_dict()  # pairs stay out of the file


def test_a_discrete_flip_mirrors_the_image_and_swaps_the_left_and_right_keypoints():
    images, keypoints, visibility = batch(6)
    policy = Policy([[PolicyStep("FlipLR", 1.0, 0.0)]], flip_space().with_flip_pairs(PAIRS), seed=0)
    out_images, out_keypoints, out_visibility = policy(images, keypoints, visibility)
    torch.testing.assert_close(out_images, images.flip(-1), rtol=0, atol=0)
    # keypoint 1 (a left one) is where keypoint 2 (its right partner) was, mirrored
    torch.testing.assert_close(out_keypoints[:, 1, 0], W - 1 - keypoints[:, 2, 0])
    torch.testing.assert_close(out_keypoints[:, 1, 1], keypoints[:, 2, 1])
    torch.testing.assert_close(out_keypoints[:, 0, 0], W - 1 - keypoints[:, 0, 0])  # the nose has no partner
    assert torch.equal(out_visibility[:, [0, 2, 1, 4, 3]], visibility)
    again = policy(out_images, out_keypoints, out_visibility)  # a flip undoes itself
    for got, want in zip(again, (images, keypoints, visibility), strict=True):
        torch.testing.assert_close(got, want)


def test_a_flip_at_p_one_half_flips_about_half_and_leaves_the_rest_untouched():
    images, keypoints, visibility = batch(400)
    policy = Policy([[PolicyStep("FlipLR", 0.5, 0.0)]], flip_space().with_flip_pairs(PAIRS), seed=1)
    out_images, out_keypoints, _ = policy(images, keypoints, visibility)
    mirrored, kept = hflip(images, keypoints, visibility, PAIRS), (images, keypoints)
    flipped = (out_images == mirrored[0]).flatten(1).all(1)
    unchanged = (out_images == kept[0]).flatten(1).all(1)
    assert torch.all(flipped ^ unchanged) and 160 < int(flipped.sum()) < 240
    assert torch.equal(out_keypoints[flipped], mirrored[1][flipped])


def test_a_space_not_bound_to_a_dataset_refuses_to_flip():
    images, keypoints, visibility = batch(2)
    policy = Policy([[PolicyStep("FlipLR", 1.0, 0.0)]], flip_space(), seed=0)
    with pytest.raises(ValueError, match="with_flip_pairs"):
        policy(images, keypoints, visibility)


def test_hard_sampling_flips_whole_and_gives_the_flips_weight_and_probability_a_gradient():
    one_step = dataclasses.replace(flip_space(("Brightness", "FlipLR")), ops_per_sub_policy=1)
    space = one_step.with_flip_pairs(PAIRS)
    policy = RelaxedPolicy(space, hard=True, seed=0)
    images, keypoints, visibility = batch(64, seed=3)
    noise = policy.sample_noise(64, torch.Generator().manual_seed(4))
    out_images, out_keypoints, _ = policy(images, keypoints, visibility, noise)
    strengths, _ = policy.strengths_and_values(noise)
    flipped = strengths[:, 0, space.index("FlipLR")] > 0
    assert 0 < int(flipped.sum()) < 64
    torch.testing.assert_close(out_images[flipped].detach(), images[flipped].flip(-1))
    mirrored = hflip(images, keypoints, visibility, PAIRS)[1]
    torch.testing.assert_close(out_keypoints[flipped].detach(), mirrored[flipped])
    (out_images * torch.rand_like(out_images)).sum().backward()
    flip = space.index("FlipLR")
    assert policy.op_logits.grad[..., flip].abs().sum() > 0
    assert policy.probability_logits.grad[..., flip].abs().sum() > 0
    assert torch.all(policy.magnitude_logits.grad[..., flip] == 0)  # no magnitude


def test_the_trainer_binds_the_datasets_pairs(tmp_path):
    from autopose.engine.config import AugmentSpec
    from autopose.engine.train import build_augment

    document = {
        "format": "autopose.policy/1",
        "space": "flip",
        "sub_policies": [[{"op": "FlipLR", "p": 1.0, "m": 0.0}]],
    }
    augment = build_augment(
        AugmentSpec(kind="policy", policy=document),
        flip_space(),
        flip_pairs=COCO_FLIP_PAIRS,
        dataset="coco",
        total_steps=10,
    )
    assert augment.space.flip_pairs == COCO_FLIP_PAIRS
