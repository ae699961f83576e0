"""Policy (discrete, JSON) and RelaxedPolicy (differentiable): sampling, export, files, errors."""

from __future__ import annotations

import json

import pytest
import torch

from autopose.augment import (
    Policy,
    PolicyStep,
    RelaxedPolicy,
    TemperatureSchedule,
    no_policy,
    p2net_space,
    random_policy,
)
from autopose.errors import AutoposeError

H, W = 32, 24
SPACE = p2net_space()
TINY = SPACE.subset(["Rotate", "Brightness", "Cutout", "Equalize"], name="tiny")


def batch(size: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, H, W, generator=generator)
    keypoints = torch.rand(size, 5, 2, generator=generator) * torch.tensor([W - 1.0, H - 1.0])
    return images, keypoints, torch.full((size, 5), 2.0)


# -- the discrete policy ------------------------------------------------------------------------


def test_each_sample_draws_its_own_sub_policy():
    policy = Policy(
        [[PolicyStep("Brightness", 0.0, 0.0)], [PolicyStep("Brightness", 1.0, 0.0)]], SPACE, seed=1
    )
    images, keypoints, visibility = batch(400)
    out, _, _ = policy(images, keypoints, visibility)
    darkened = (out < images - 1e-6).flatten(1).any(1).float().mean().item()
    assert 0.4 < darkened < 0.6  # about half took the sub-policy that always applies


def test_probability_p_is_respected():
    images, keypoints, visibility = batch(500)
    never = Policy([[PolicyStep("Rotate", 0.0, 9.0)]], SPACE, seed=0)(images, keypoints, visibility)
    assert torch.equal(never[0], images) and torch.equal(never[1], keypoints)
    sometimes, _, _ = Policy([[PolicyStep("Cutout", 0.3, 6.0)]], SPACE, seed=0)(images, keypoints, visibility)
    changed = (sometimes != images).flatten(1).any(1).float().mean().item()
    assert abs(changed - 0.3) < 4 * (0.3 * 0.7 / 500) ** 0.5


def test_seed_makes_it_reproducible():
    images, keypoints, visibility = batch()
    a = random_policy(SPACE, seed=7)(images, keypoints, visibility)
    b = random_policy(SPACE, seed=7)(images, keypoints, visibility)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert random_policy(SPACE, seed=7) == random_policy(SPACE, seed=7) != random_policy(SPACE, seed=8)


def test_uint8_images_are_accepted():
    images, keypoints, visibility = batch()
    as_bytes = (images * 255).round().to(torch.uint8)
    out, _, _ = no_policy()(as_bytes, keypoints, visibility)
    assert out.dtype == torch.float32 and torch.allclose(out, as_bytes.float() / 255)
    out, _, _ = random_policy(SPACE, seed=1)(as_bytes, keypoints, visibility)
    assert out.dtype == torch.float32


def test_file_round_trip_is_atomic_and_exact(tmp_path):
    policy = random_policy(SPACE, seed=3)
    path = tmp_path / "sub" / "policy.json"
    policy.to_file(path)
    assert [p.name for p in path.parent.iterdir()] == ["policy.json"]  # no temporary left behind
    data = json.loads(path.read_text())
    assert data["format"] == "autopose.policy/1" and data["space"] == "p2net"
    assert len(data["sub_policies"]) == 3 and all(len(s) == 2 for s in data["sub_policies"])
    assert Policy.from_file(path) == policy


def write(tmp_path, data) -> str:
    path = tmp_path / "policy.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def good_policy() -> dict:
    return {
        "format": "autopose.policy/1",
        "space": "p2net",
        "sub_policies": [
            [{"op": "Rotate", "p": 0.6, "m": 7.0}, {"op": "Brightness", "p": 0.3, "m": 4.0}],
            [{"op": "Cutout", "p": 0.5, "m": 2.0}, {"op": "Equalize", "p": 0.2, "m": 0.0}],
        ],
    }


def broken(change) -> dict:
    data = good_policy()
    change(data)
    return data


def v2(change) -> dict:
    """A good ``autopose.policy/2`` file (weights, a sign on each signed op), then ``change``."""
    data = good_policy()
    data["format"] = "autopose.policy/2"
    data["sub_policy_weights"] = [0.7, 0.3]
    data["sub_policies"][0][0]["sign"] = 0.8
    data["sub_policies"][0][1]["sign"] = 1.0
    change(data)
    return data


def test_a_good_v2_file_loads(tmp_path):
    policy = Policy.from_file(write(tmp_path, v2(lambda d: None)))
    assert policy.sub_policy_weights == (0.7, 0.3)
    assert [[s.sign for s in sub] for sub in policy.sub_policies] == [[0.8, 1.0], [1.0, 1.0]]
    # An unsigned op's step may say sign 1 (Cutout's identity 0 is an end of its range).
    data = v2(lambda d: d["sub_policies"][1][0].update(sign=1))
    assert Policy.from_file(write(tmp_path, data)) == policy


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ('{"format": "autopose.policy/1", "space": ', None, "not valid JSON"),
        (broken(lambda d: d["sub_policies"][1][0].update(op="Twirl")), "sub_policies[1][0].op", "unknown op"),
        (broken(lambda d: d["sub_policies"][0][1].update(p=1.5)), "sub_policies[0][1].p", "outside"),
        (broken(lambda d: d["sub_policies"][0][0].update(m=-1)), "sub_policies[0][0].m", "outside"),
        (broken(lambda d: d["sub_policies"][0][0].update(p="high")), "sub_policies[0][0].p", "number"),
        (broken(lambda d: d["sub_policies"][1][1].pop("m")), "sub_policies[1][1].m", "missing"),
        (broken(lambda d: d["sub_policies"][1][1].update(q=1)), "sub_policies[1][1].q", "unknown field"),
        (broken(lambda d: d.update(format="autopose.policy/9")), "format", "autopose.policy/1"),
        (broken(lambda d: d["sub_policies"][0][0].update(sign=0.5)), "sub_policies[0][0].sign", "policy/2"),
        (broken(lambda d: d.update(sub_policy_weights=[0.5, 0.5])), "sub_policy_weights", "policy/2"),
        (v2(lambda d: d.update(sub_policy_weights=[0.5, 0.6, -0.1])), "sub_policy_weights[2]", "negative"),
        (v2(lambda d: d.update(sub_policy_weights=[0.5, "0.5"])), "sub_policy_weights[1]", "number"),
        (v2(lambda d: d.update(sub_policy_weights=[0.5, True])), "sub_policy_weights[1]", "number"),
        (v2(lambda d: d.update(sub_policy_weights=[0.4, 0.3, 0.3])), "sub_policy_weights", "expected 2"),
        (v2(lambda d: d.update(sub_policy_weights=[0.5, 0.49])), "sub_policy_weights", "sum to 0.99"),
        (v2(lambda d: d.update(sub_policy_weights={"a": 1})), "sub_policy_weights", "list"),
        (v2(lambda d: d["sub_policies"][0][1].update(sign=1.5)), "sub_policies[0][1].sign", "outside"),
        (v2(lambda d: d["sub_policies"][0][1].update(sign=None)), "sub_policies[0][1].sign", "number"),
        (v2(lambda d: d["sub_policies"][1][0].update(sign=0.5)), "sub_policies[1][0].sign", "not signed"),
        (v2(lambda d: d["sub_policies"][1][1].update(sign=0.0)), "sub_policies[1][1].sign", "not signed"),
        (v2(lambda d: d["sub_policies"][1][1].update(q=1)), "sub_policies[1][1].q", "unknown field"),
        (broken(lambda d: d.pop("format")), "format", "missing"),
        (broken(lambda d: d.update(space="imaginary")), "space", "unknown search space"),
        (broken(lambda d: d.update(sub_policies=[])), "sub_policies", "non-empty"),
        (broken(lambda d: d["sub_policies"].append([])), "sub_policies[2]", "non-empty"),
        (broken(lambda d: d["sub_policies"][0].__setitem__(0, "Rotate")), "sub_policies[0][0]", "object"),
    ],
)
def test_invalid_files_name_the_field(tmp_path, data, field, words):
    path = write(tmp_path, data)
    with pytest.raises(AutoposeError) as error:
        Policy.from_file(path)
    assert error.value.path == path and error.value.field == field
    assert words in str(error.value) and path in str(error.value)


def test_a_policy_loads_against_the_space_it_was_searched_in(tmp_path):
    data = good_policy()
    data["space"] = "tiny"
    path = write(tmp_path, data)
    policy = Policy.from_file(path, space=TINY)
    assert policy.space is TINY
    with pytest.raises(AutoposeError) as error:
        Policy.from_file(path, space=SPACE)
    assert error.value.field == "space"


def test_missing_or_binary_file_is_a_clear_error(tmp_path):
    with pytest.raises(AutoposeError, match="file not found"):
        Policy.from_file(tmp_path / "absent.json")
    binary = tmp_path / "policy.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(AutoposeError, match="not UTF-8") as error:
        Policy.from_file(binary)
    assert error.value.path == str(binary)


# -- the relaxed policy -------------------------------------------------------------------------


def test_gumbel_picks_follow_the_softmax():
    """Over many draws the hard Gumbel-softmax pick has the softmax's frequencies (χ² test)."""
    space = SPACE.subset(["Rotate"], name="one-op")
    space = type(space)("four", 4, 1, space.ops)
    policy = RelaxedPolicy(space, TemperatureSchedule(tau1=0.7), seed=0)
    with torch.no_grad():
        policy.sub_policy_logits.copy_(torch.tensor([1.5, 0.0, -1.0, 0.7]))
    draws = 40_000
    index, weight = policy.choose_sub_policies(policy.sample_noise(draws, torch.Generator().manual_seed(11)))
    assert torch.allclose(weight, torch.ones(draws))
    observed = torch.bincount(index, minlength=4).double()
    expected = policy.sub_policy_probabilities().double().detach() * draws
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001


def test_relaxed_bernoulli_gates_open_with_probability_p():
    """A binary Concrete sample of p exceeds 1/2 with probability exactly p."""
    policy = RelaxedPolicy(TINY, seed=0)
    with torch.no_grad():
        policy.probability_logits.copy_(
            torch.logit(torch.linspace(0.1, 0.9, policy.probability_logits.numel())).view_as(
                policy.probability_logits
            )
        )
    noise = policy.sample_noise(20_000, torch.Generator().manual_seed(5))
    logit_p = policy.probability_logits[0]
    u = noise.bernoulli
    gates = torch.sigmoid((logit_p + torch.log(u) - torch.log1p(-u)) / policy.tau2)
    frequency = (gates > 0.5).double().mean(0)
    p = policy.probabilities()[0].double().detach()
    assert torch.all((frequency - p).abs() < 4 * (p * (1 - p) / 20_000).sqrt())


def test_same_noise_same_augmentation():
    policy = RelaxedPolicy(TINY, seed=2)
    images, keypoints, visibility = batch()
    noise = policy.sample_noise(images.shape[0])
    first = policy(images, keypoints, visibility, noise)
    second = policy(images, keypoints, visibility, noise)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_every_parameter_gets_a_gradient_from_the_augmented_images():
    policy = RelaxedPolicy(TINY, init_magnitude=7.0, seed=0)
    images, keypoints, visibility = batch(16)
    out, _, _ = policy(images, keypoints, visibility)
    (out * torch.rand_like(out)).sum().backward()
    for name, parameter in policy.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
    assert (policy.sub_policy_logits.grad != 0).all()
    assert (policy.op_logits.grad != 0).all() and (policy.probability_logits.grad != 0).all()
    magnitude_grad = policy.magnitude_logits.grad
    equalize = TINY.index("Equalize")
    assert (magnitude_grad[..., equalize] == 0).all()  # Equalize has no magnitude (none-in-m)
    others = [i for i in range(len(TINY.ops)) if i != equalize]
    assert (magnitude_grad[..., others] != 0).all()
    signed = [TINY.index("Rotate"), TINY.index("Brightness")]
    unsigned = [TINY.index("Cutout"), equalize]  # Cutout's identity 0 is an end of its range
    assert (policy.sign_logits.grad[..., signed] != 0).all()
    assert (policy.sign_logits.grad[..., unsigned] == 0).all()


def test_skipping_tiny_weights_barely_changes_the_gradient():
    images, keypoints, visibility = batch(8)
    upstream = torch.rand(8, 3, H, W, generator=torch.Generator().manual_seed(1))
    grads = []
    for min_weight in (0.0, 1e-3):
        policy = RelaxedPolicy(SPACE, min_weight=min_weight, init_magnitude=7.0, seed=0)
        with torch.no_grad():
            policy.op_logits[..., :3] += 9.0  # three ops dominate, the other seven weigh ~2e-5 each
        noise = policy.sample_noise(8, torch.Generator().manual_seed(3))
        out, _, _ = policy(images, keypoints, visibility, noise)
        (out * upstream).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.999 and (grads[0] - grads[1]).norm() < 0.02 * grads[0].norm()


def test_dominant_relaxed_policy_equals_its_export():
    """With one op and one sub-policy dominant and p → 1, the relaxed policy is its discrete export."""
    space = type(TINY)("tiny1", 1, 2, TINY.ops)
    policy = RelaxedPolicy(space, TemperatureSchedule(tau2=0.05), init_magnitude=8.0, seed=0)
    with torch.no_grad():
        policy.op_logits.fill_(-30.0)
        policy.op_logits[0, 0, space.index("Rotate")] = 30.0
        policy.op_logits[0, 1, space.index("Brightness")] = 30.0
        policy.probability_logits.fill_(30.0)
        policy.sign_logits.fill_(30.0)  # and every op in the direction its m gives
    exported = policy.export(seed=0)
    assert [[s.op for s in sub] for sub in exported.sub_policies] == [["Rotate", "Brightness"]]
    assert exported.sub_policies[0][0].p == pytest.approx(1.0) and exported.sub_policies[0][
        0
    ].m == pytest.approx(8.0)
    assert exported.sub_policy_weights == pytest.approx((1.0,)) and exported.sub_policies[0][0].sign == 1.0
    images, keypoints, visibility = batch()
    relaxed = policy(images, keypoints, visibility)
    discrete = exported(images, keypoints, visibility)
    assert torch.allclose(relaxed[0], discrete[0], atol=1e-4)
    assert torch.allclose(relaxed[1], discrete[1], atol=1e-4)
    assert torch.equal(relaxed[2], discrete[2])


def test_magnitudes_and_probabilities_stay_in_range():
    policy = RelaxedPolicy(TINY, seed=0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e4)
    images, keypoints, visibility = batch()
    out, _, _ = policy(images, keypoints, visibility)
    out.sum().backward()
    optimizer.step()
    m, p = policy.magnitude_tensor(), policy.probabilities()
    assert torch.all((m >= 0) & (m <= 10)) and torch.all((p >= 0) & (p <= 1))
    exported = policy.export()  # still a valid policy
    assert Policy.from_dict(exported.to_dict(), space=TINY) == exported


def test_summaries_name_every_op():
    policy = RelaxedPolicy(TINY, seed=0)
    weights = policy.op_probabilities()
    assert set(weights) == set(TINY.op_names) and sum(weights.values()) == pytest.approx(1.0)
    assert set(policy.magnitudes()) == set(TINY.op_names)
    # The default start: signed ops halfway from the identity to m = 10 (22.5°), others at 5.
    assert policy.magnitudes()["Rotate"] == pytest.approx(7.5)
    assert policy.magnitudes()["Cutout"] == pytest.approx(5.0)
    assert policy.application_probabilities()["Cutout"] == pytest.approx(0.5)
    assert policy.sign_probabilities() == {
        "Rotate": pytest.approx(0.5),
        "Brightness": pytest.approx(0.5),
        "Cutout": 1.0,  # unsigned: one direction
        "Equalize": 1.0,
    }
    assert RelaxedPolicy(TINY, init_magnitude=5.0).magnitudes()["Rotate"] == pytest.approx(5.0)


def test_temperature_schedule_anneals_geometrically():
    schedule = TemperatureSchedule(tau1=1.0, tau2=0.5, tau1_final=0.1, anneal_steps=10)
    assert schedule.at(0) == (1.0, 0.5)
    assert schedule.at(5)[0] == pytest.approx(0.1**0.5)
    assert schedule.at(50) == (pytest.approx(0.1), 0.5)
    policy = RelaxedPolicy(TINY, schedule)
    policy.set_step(10)
    assert policy.tau1 == pytest.approx(0.1)
