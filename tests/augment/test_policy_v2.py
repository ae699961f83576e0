"""The discrete policy's signs and sub-policy weights (``autopose.policy/2``), and that policies
``autopose.policy/1`` can write still draw exactly what they drew before."""

from __future__ import annotations

import json

import pytest
import torch

from autopose.augment import Policy, PolicyStep, p2net_space

H, W = 32, 24
SPACE = p2net_space()


def batch(size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, H, W, generator=generator)
    # Keypoints near the center: a quarter-width shift keeps them on the image.
    keypoints = torch.rand(size, 5, 2, generator=generator) * 4.0 + torch.tensor([W / 2 - 2.0, H / 2 - 2.0])
    return images, keypoints, torch.full((size, 5), 2.0)


def shifts(policy: Policy, size: int) -> torch.Tensor:
    """``B×2`` how far each sample's keypoints moved (one translation per axis in these tests)."""
    images, keypoints, visibility = batch(size)
    _, moved, _ = policy(images, keypoints, visibility)
    return (moved - keypoints).mean(dim=1)


def test_a_v1_policy_draws_what_policy_v1_drew():
    """Known answer: the /1 algorithm draws ``randint(K, B)`` for the sub-policies, then per step
    ``rand(B)`` for the gates and ``rand(B, 2)`` for Cutout, in that order, call after call."""
    sub_policies = [
        [PolicyStep("TranslateX", 1.0, m), PolicyStep("TranslateY", 0.5, 10.0)] for m in (6.0, 8.0, 10.0)
    ]
    policy = Policy(sub_policies, SPACE, seed=5)
    generator = torch.Generator().manual_seed(5)
    size = 64
    for _ in range(2):  # the second call continues the same stream
        chosen = torch.randint(3, (size,), generator=generator)
        torch.rand(size, generator=generator)  # step 0: p = 1, always applied
        torch.rand(size, 2, generator=generator)
        applied = torch.rand(size, generator=generator) < 0.5
        torch.rand(size, 2, generator=generator)
        moved = shifts(policy, size)
        expected_x = (torch.tensor([0.05, 0.15, 0.25]) * W)[chosen]  # m = 6, 8, 10 of ±0.25
        torch.testing.assert_close(moved[:, 0], expected_x, atol=1e-4, rtol=0)
        torch.testing.assert_close(moved[:, 1], applied.float() * 0.25 * H, atol=1e-4, rtol=0)


def test_uniform_weights_and_sign_one_write_v1_and_replay_the_same_draws(tmp_path):
    sub_policies = [[PolicyStep("Rotate", 0.7, 8.0), PolicyStep("Cutout", 0.5, 3.0)]] * 2 + [
        [PolicyStep("Brightness", 0.4, 2.0), PolicyStep("TranslateX", 0.9, 9.0)]
    ]
    plain = Policy(sub_policies, SPACE, seed=3)
    explicit = Policy(
        [[PolicyStep(s.op, s.p, s.m, sign=1.0) for s in sub] for sub in sub_policies],
        SPACE,
        seed=3,
        sub_policy_weights=[1 / 3] * 3,
    )
    assert explicit.to_dict()["format"] == "autopose.policy/1" and explicit == plain
    document = explicit.to_dict()
    document["format"] = "autopose.policy/2"
    document["sub_policy_weights"] = [0.333333] * 3  # what a /2 writer rounds 1/3 to
    for step in (document["sub_policies"][0][0], document["sub_policies"][2][1]):
        step["sign"] = 1.0
    loaded = Policy.from_dict(document, seed=3)
    images, keypoints, visibility = batch(32)
    reference = plain(images, keypoints, visibility)
    for other in (explicit, loaded):
        out = other(images, keypoints, visibility)
        assert all(torch.equal(a, b) for a, b in zip(reference, out, strict=True))


def test_sign_zero_is_the_mirrored_value():
    images, keypoints, visibility = batch(8)
    for op, m, mirror_m in (("TranslateX", 10.0, 0.0), ("Rotate", 7.5, 2.5), ("Scale", 10.0, 0.0)):
        # Scale: 1.35 mirrors to 0.65, clamped to 0.7, the value at m = 0.
        mirrored = Policy([[PolicyStep(op, 1.0, m, sign=0.0)]], SPACE, seed=0)(images, keypoints, visibility)
        direct = Policy([[PolicyStep(op, 1.0, mirror_m)]], SPACE, seed=0)(images, keypoints, visibility)
        assert all(torch.equal(a, b) for a, b in zip(mirrored, direct, strict=True)), op


def test_signs_are_drawn_with_their_probability():
    size, sign = 2000, 0.3
    moved = shifts(Policy([[PolicyStep("TranslateX", 1.0, 10.0, sign=sign)]], SPACE, seed=1), size)[:, 0]
    assert torch.allclose(moved.abs(), torch.full((size,), 0.25 * W), atol=1e-4)  # ± a quarter width
    frequency = (moved > 0).double().mean().item()
    assert abs(frequency - sign) < 4 * (sign * (1 - sign) / size) ** 0.5


def test_sub_policies_are_drawn_by_their_weights():
    """χ² test of the sub-policy frequencies against the weights (each sub-policy shifts by its own m)."""
    weights = [0.6, 0.1, 0.3]
    sub_policies = [[PolicyStep("TranslateX", 1.0, m)] for m in (6.0, 8.0, 10.0)]
    policy = Policy(sub_policies, SPACE, seed=2, sub_policy_weights=weights)
    size = 6000
    moved = shifts(policy, size)[:, 0]
    chosen = torch.round((moved / W - 0.05) / 0.1).long()  # 0.05, 0.15, 0.25 of the width
    observed = torch.bincount(chosen, minlength=3).double()
    expected = torch.tensor(weights, dtype=torch.float64) * size
    assert ((observed - expected) ** 2 / expected).sum().item() < 13.82  # 2 degrees of freedom, p = 0.001


def test_v2_round_trip_is_exact(tmp_path):
    policy = Policy(
        [
            [PolicyStep("Rotate", 0.6, 7.0, sign=0.25), PolicyStep("Cutout", 0.3, 4.0)],
            [PolicyStep("Scale", 0.5, 9.0, sign=0.9), PolicyStep("Equalize", 0.2, 0.0)],
        ],
        SPACE,
        sub_policy_weights=[0.8, 0.2],
    )
    data = policy.to_dict()
    assert data["format"] == "autopose.policy/2" and data["sub_policy_weights"] == [0.8, 0.2]
    assert data["sub_policies"][0] == [
        {"op": "Rotate", "p": 0.6, "m": 7.0, "sign": 0.25},
        {"op": "Cutout", "p": 0.3, "m": 4.0},  # unsigned: no sign written
    ]
    assert Policy.from_dict(data) == policy
    path = tmp_path / "policy.json"
    policy.to_file(path)
    assert json.loads(path.read_text()) == data and Policy.from_file(path) == policy
    # A sign alone, or weights alone, need /2.
    assert Policy([[PolicyStep("Rotate", 0.6, 7.0, sign=0.5)]], SPACE).to_dict()["format"].endswith("/2")
    weighted = Policy([[PolicyStep("Cutout", 1.0, 1.0)]] * 2, SPACE, sub_policy_weights=[0.4, 0.6])
    assert weighted.to_dict()["format"].endswith("/2") and Policy.from_dict(weighted.to_dict()) == weighted


def test_weights_and_signs_are_checked_in_code_too():
    step = PolicyStep("Rotate", 0.5, 5.0)
    with pytest.raises(ValueError, match="not signed"):
        Policy([[PolicyStep("Cutout", 0.5, 5.0, sign=0.5)]], SPACE)
    with pytest.raises(ValueError, match="out of range"):
        Policy([[PolicyStep("Rotate", 0.5, 5.0, sign=1.5)]], SPACE)
    with pytest.raises(ValueError, match="sum to"):
        Policy([[step], [step]], SPACE, sub_policy_weights=[0.5, 0.4])
    with pytest.raises(ValueError, match="expected 2"):
        Policy([[step], [step]], SPACE, sub_policy_weights=[1.0])
    with pytest.raises(ValueError, match="expected 2"):
        Policy([[step], [step]], SPACE, sub_policy_weights=[1.5, -0.5])
