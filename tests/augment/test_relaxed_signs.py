"""RelaxedPolicy's directions, its start, hard sampling, the export of the whole op distribution,
and state dicts saved before the signs existed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from autopose.augment import (
    Policy,
    PolicyNoise,
    PolicyStep,
    RelaxedPolicy,
    SearchSpace,
    TemperatureSchedule,
    p2net_space,
)
from autopose.augment.policy import LEGACY_SIGN_LOGIT

H, W = 32, 24
SPACE = p2net_space()
TINY = SPACE.subset(["Rotate", "Brightness", "Cutout", "Equalize"], name="tiny")
# Every op but Cutout (whose center the discrete policy draws from its own generator).
NO_CUTOUT = SearchSpace(
    "no-cutout",
    2,
    2,
    SPACE.subset(["TranslateX", "Rotate", "Scale", "Brightness", "SolarizeAdd", "Equalize"]).ops,
)


def batch(size: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, H, W, generator=generator)
    keypoints = torch.rand(size, 5, 2, generator=generator) * 4.0 + torch.tensor([W / 2 - 2.0, H / 2 - 2.0])
    return images, keypoints, torch.full((size, 5), 2.0)


def one_op(op: str, sub_policies: int = 1) -> SearchSpace:
    return SearchSpace(op.lower(), sub_policies, 1, SPACE.subset([op]).ops)


def randomize(policy: RelaxedPolicy, seed: int) -> RelaxedPolicy:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.normal_(0.0, 1.5, generator=generator)
    return policy


# -- directions ---------------------------------------------------------------------------------------


def test_the_relaxed_direction_follows_the_sign_logit():
    """TranslateX at m = 10 (+¼ width) moves right with probability sigmoid(sign logit), left
    otherwise; at a small τ2 the relaxed direction is ±1, so each shift is ±¼ width."""
    policy = RelaxedPolicy(one_op("TranslateX"), TemperatureSchedule(tau2=0.01), seed=0)
    size, logit = 4000, 0.8
    with torch.no_grad():
        policy.probability_logits.fill_(30.0)
        policy.magnitude_logits.fill_(30.0)
        policy.sign_logits.fill_(logit)
        _, moved, _ = policy(*batch(size))
    shift = (moved - batch(size)[1]).mean(dim=1)[:, 0]
    # |d| ≤ 1, and at τ2 = 0.01 all but the draws within ±0.05 of -logit are at ±1.
    assert (shift.abs() <= 0.25 * W + 1e-4).all()
    assert ((shift.abs() - 0.25 * W).abs() < 1e-3).double().mean() > 0.95
    sign = 1 / (1 + math.exp(-logit))
    assert abs((shift > 0).double().mean().item() - sign) < 4 * (sign * (1 - sign) / size) ** 0.5
    assert policy.sign_probabilities() == {"TranslateX": pytest.approx(sign)}


def test_the_relaxed_value_is_identity_plus_direction_times_the_offset():
    policy = randomize(RelaxedPolicy(NO_CUTOUT, seed=0), seed=1)
    noise = policy.sample_noise(16, torch.Generator().manual_seed(2))
    _, values = policy.strengths_and_values(noise)
    index, _ = policy.choose_sub_policies(noise)
    logits = policy.sign_logits[index]
    s = torch.sigmoid((logits + torch.log(noise.sign) - torch.log1p(-noise.sign)) / policy.tau2)
    plain = NO_CUTOUT.values(policy.magnitude_tensor()[index])
    identity, signed = NO_CUTOUT.identity_tensors()
    low, high = NO_CUTOUT.range_tensors()
    expected = (identity + (2 * s - 1) * (plain - identity)).clamp(low.minimum(high), low.maximum(high))
    torch.testing.assert_close(values, torch.where(signed, expected, plain))
    # Noise without sign draws (built from the first three alone) runs every op at value(m).
    legacy = PolicyNoise(noise.sub_policy, noise.bernoulli, noise.cutout)
    torch.testing.assert_close(policy.strengths_and_values(legacy)[1], plain)


# -- the start ------------------------------------------------------------------------------------------


def test_the_default_start_puts_no_op_at_its_identity():
    policy = RelaxedPolicy(SPACE, seed=0)
    m = policy.magnitudes()
    assert m["Rotate"] == pytest.approx(7.5) and m["TranslateX"] == pytest.approx(7.5)
    assert SPACE.value("Scale", m["Scale"]) == pytest.approx(1.175)  # halfway from 1 to 1.35
    assert SPACE.value("Brightness", m["Brightness"]) == pytest.approx(1.45)
    assert m["Cutout"] == pytest.approx(5.0) and m["Solarize"] == pytest.approx(5.0)  # unsigned
    signs = policy.sign_probabilities()
    assert all(
        signs[op] == (pytest.approx(0.5) if signed else 1.0)
        for op, signed in zip(SPACE.op_names, SPACE.signed, strict=True)
    )
    with pytest.raises(ValueError, match="init_magnitude"):
        RelaxedPolicy(SPACE, init_magnitude=10.0)


def test_the_start_gives_p_a_gradient_where_m_5_gave_none():
    """An image loss's gradient in Rotate's and Brightness' ``p``: exactly 0 when they start at
    m = 5 (0°, factor 1: the op changes nothing whatever its gate), nonzero at the default start."""
    images, keypoints, visibility = batch(16)
    upstream = torch.rand(16, 3, H, W, generator=torch.Generator().manual_seed(1))
    ops = [TINY.index("Rotate"), TINY.index("Brightness")]
    for init_magnitude in (None, 5.0):
        policy = RelaxedPolicy(TINY, init_magnitude=init_magnitude, seed=0)
        noise = policy.sample_noise(16, torch.Generator().manual_seed(3))
        out, _, _ = policy(images, keypoints, visibility, noise)
        (out * upstream).sum().backward()
        grad = policy.probability_logits.grad[..., ops]
        if init_magnitude is None:
            assert (grad != 0).all()
        else:
            assert (grad == 0).all()
        assert (policy.probability_logits.grad[..., TINY.index("Cutout")] != 0).all()


# -- hard sampling --------------------------------------------------------------------------------------


def test_hard_sampling_applies_one_op_per_step_at_full_strength():
    policy = randomize(RelaxedPolicy(SPACE, hard=True, seed=0), seed=4)
    noise = policy.sample_noise(256, torch.Generator().manual_seed(5))
    strengths, values = policy.strengths_and_values(noise)
    assert set(strengths.unique().tolist()) <= {0.0, 1.0}
    assert ((strengths > 0).sum(dim=-1) <= 1).all()
    index, _ = policy.choose_sub_policies(noise)
    plain = SPACE.values(policy.magnitude_tensor()[index]).detach()
    mirrored = SPACE.mirror(plain)
    chosen = strengths > 0
    assert torch.all((values == plain) | (values == mirrored) | ~chosen)
    signed = torch.tensor(SPACE.signed).expand_as(chosen)
    assert torch.all(values[chosen & ~signed] == plain[chosen & ~signed])
    assert (values[chosen & signed] != plain[chosen & signed]).any()  # some run mirrored
    with pytest.raises(ValueError, match=r"noise\.op"):
        policy.strengths_and_values(PolicyNoise(noise.sub_policy, noise.bernoulli, noise.cutout, noise.sign))


def test_hard_forward_is_the_discrete_policy_of_its_draws():
    """Per sample, the hard forward equals the discrete policy whose steps are the drawn ops with
    p and sign 0 or 1 as drawn (so the discrete policy draws nothing that matters)."""
    policy = randomize(RelaxedPolicy(NO_CUTOUT, hard=True, seed=0), seed=6)
    images, keypoints, visibility = batch(24, seed=7)
    noise = policy.sample_noise(24, torch.Generator().manual_seed(8))
    out = policy(images, keypoints, visibility, noise)
    strengths, values = policy.strengths_and_values(noise)
    index, _ = policy.choose_sub_policies(noise)
    m = policy.magnitude_tensor().detach()
    plain = NO_CUTOUT.values(m[index])  # the discrete policy's values, to the bit
    mirrored = NO_CUTOUT.mirror(plain)
    names = NO_CUTOUT.op_names
    gates_closed, signs = 0, []
    for b in range(24):
        steps = []
        for n in range(NO_CUTOUT.N):
            if not (strengths[b, n] > 0).any():
                gates_closed += 1
                steps.append(PolicyStep(names[0], 0.0, 5.0))  # closed gate: nothing runs
                continue
            o = int(strengths[b, n].argmax())
            value = values[b, n, o]
            assert value == plain[b, n, o] or (NO_CUTOUT.signed[o] and value == mirrored[b, n, o])
            sign = 1.0 if value == plain[b, n, o] else 0.0
            signs.append(sign)
            steps.append(PolicyStep(names[o], 1.0, float(m[index[b], n, o]), sign))
        discrete = Policy([steps], NO_CUTOUT, seed=0)
        expected = discrete(images[b : b + 1], keypoints[b : b + 1], visibility[b : b + 1])
        for got, want in zip(out, expected, strict=True):
            torch.testing.assert_close(got[b : b + 1].detach(), want, atol=1e-5, rtol=0)
    assert 0 < gates_closed < 48 and 0 < sum(signs) < len(signs)  # both gates, both directions


def test_hard_sampling_gives_every_kind_of_parameter_a_gradient():
    policy = RelaxedPolicy(TINY, hard=True, seed=0)
    images, keypoints, visibility = batch(32)
    out, _, _ = policy(images, keypoints, visibility)
    (out * torch.rand_like(out)).sum().backward()
    for name, parameter in policy.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
        assert (parameter.grad != 0).any(), name
    unsigned = [TINY.index("Cutout"), TINY.index("Equalize")]
    assert (policy.sign_logits.grad[..., unsigned] == 0).all()


def test_hard_draws_follow_the_exported_distribution():
    """χ² test: the (sub-policy, op) pairs the hard forward draws have the weights of the export's
    sub-policies (each pair told apart by its magnitude)."""
    space = SearchSpace("pairs", 2, 1, SPACE.subset(["Rotate", "Brightness", "Cutout"]).ops)
    policy = RelaxedPolicy(space, hard=True, seed=0)
    with torch.no_grad():
        policy.sub_policy_logits.copy_(torch.tensor([0.6, -0.4]))
        policy.op_logits.copy_(torch.tensor([[[1.0, 0.0, -1.0]], [[-0.5, 0.8, 0.2]]]))
        policy.probability_logits.fill_(30.0)  # gates open: the drawn op shows in the strengths
        policy.magnitude_logits.copy_(torch.logit(torch.tensor([[[0.1, 0.2, 0.3]], [[0.4, 0.6, 0.7]]])))
    exported = policy.export(min_share=0.0)
    assert len(exported.sub_policies) == 6
    expected = {
        (sub[0].op, round(sub[0].m, 3)): w
        for sub, w in zip(exported.sub_policies, exported.sub_policy_weights, strict=True)
    }
    draws = 20_000
    noise = policy.sample_noise(draws, torch.Generator().manual_seed(9))
    strengths, _ = policy.strengths_and_values(noise)
    index, _ = policy.choose_sub_policies(noise)
    op = strengths[:, 0].argmax(dim=-1)
    m = policy.magnitude_tensor().detach()[index, 0, op]
    observed = {}
    for o, magnitude in zip(op.tolist(), m.tolist(), strict=True):
        key = (space.op_names[o], round(magnitude, 3))
        observed[key] = observed.get(key, 0) + 1
    assert set(observed) == set(expected)
    chi2 = sum((observed[k] - draws * w) ** 2 / (draws * w) for k, w in expected.items())
    assert chi2 < 20.52  # 5 degrees of freedom, p = 0.001


def test_the_draws_log_probability_is_the_chance_of_what_was_applied():
    """Per outcome of one step (the sub-policy; nothing, or an op in a direction) the log-probability
    is the same for every draw with that outcome, their probabilities sum to 1, and they match
    the outcomes' frequencies over 40,000 hard draws (χ²)."""
    space = SearchSpace("pairs", 2, 1, SPACE.subset(["Rotate", "Brightness", "Cutout"]).ops)
    policy = RelaxedPolicy(space, hard=True, seed=0)
    with torch.no_grad():
        policy.sub_policy_logits.copy_(torch.tensor([0.6, -0.4]))
        policy.op_logits.copy_(torch.tensor([[[1.0, 0.0, -1.0]], [[-0.5, 0.8, 0.2]]]))
        policy.probability_logits.copy_(torch.tensor([[[0.5, -1.0, 0.2]], [[1.5, 0.0, -0.3]]]))
        policy.sign_logits.copy_(torch.tensor([[[0.7, -1.0, 0.0]], [[-0.2, 1.2, 0.0]]]))
    draws = 40_000
    noise = policy.sample_noise(draws, torch.Generator().manual_seed(9))
    strengths, values = policy.strengths_and_values(noise)
    index, _ = policy.choose_sub_policies(noise)
    plain = space.values(policy.magnitude_tensor()[index]).detach()
    log_probability = policy.draw_log_probabilities(noise).detach()
    outcomes: dict[tuple, list[float]] = {}
    for b in range(draws):
        if (strengths[b, 0] > 0).any():
            o = int(strengths[b, 0].argmax())
            key = (int(index[b]), o, bool(values[b, 0, o] == plain[b, 0, o]) or not space.signed[o])
        else:
            key = (int(index[b]), None, None)
        outcomes.setdefault(key, []).append(float(log_probability[b]))
    assert len(outcomes) == 12  # 2 sub-policies × (nothing, Rotate ±, Brightness ±, Cutout)
    for values_of_outcome in outcomes.values():
        assert max(values_of_outcome) - min(values_of_outcome) < 1e-5
    chances = {key: math.exp(v[0]) for key, v in outcomes.items()}
    assert sum(chances.values()) == pytest.approx(1.0, abs=1e-5)
    chi2 = sum((len(outcomes[k]) - draws * p) ** 2 / (draws * p) for k, p in chances.items())
    assert chi2 < 31.26  # 11 degrees of freedom, p = 0.001


def test_the_draws_score_function_estimates_the_gradient_of_an_expectation():
    """Reward 1 when Cutout ran: the mean of reward × ∇ log π over many draws approaches the exact
    gradient of P(Cutout ran) = π_k · w_Cutout · p_Cutout, and the magnitudes get nothing."""
    space = SearchSpace("pairs", 2, 1, SPACE.subset(["Rotate", "Brightness", "Cutout"]).ops)
    policy = randomize(RelaxedPolicy(space, hard=True, seed=0), seed=3)
    cutout = space.index("Cutout")
    exact = (
        policy.sub_policy_probabilities()[:, None]
        * policy.op_weights()[..., cutout]
        * policy.probabilities()[..., cutout]
    ).sum()
    expected = torch.autograd.grad(exact, list(policy.parameters()), allow_unused=True)
    draws = 200_000
    noise = policy.sample_noise(draws, torch.Generator().manual_seed(11))
    strengths, _ = policy.strengths_and_values(noise)
    reward = (strengths[:, 0, cutout] > 0).float().detach()
    surrogate = (reward * policy.draw_log_probabilities(noise)).mean()
    estimate = torch.autograd.grad(surrogate, list(policy.parameters()), allow_unused=True)
    for name, want, got in zip([n for n, _ in policy.named_parameters()], expected, estimate, strict=True):
        if name in ("magnitude_logits", "sign_logits"):
            assert got is None or (got == 0).all(), name
            continue
        torch.testing.assert_close(got, want, atol=4e-3, rtol=0, msg=name)


# -- export ---------------------------------------------------------------------------------------------


def known_policy() -> RelaxedPolicy:
    """One sub-policy of two steps over Rotate, Cutout, Equalize with op weights
    (0.7, 0.2, 0.1) and (0.9, 0.09, 0.01); Rotate's sign 0.8 at step 0 and 0.3 at step 1."""
    space = SearchSpace("known", 1, 2, SPACE.subset(["Rotate", "Cutout", "Equalize"]).ops)
    policy = RelaxedPolicy(space, seed=0)
    with torch.no_grad():
        policy.op_logits.copy_(torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.9, 0.09, 0.01]]])))
        policy.sign_logits.copy_(torch.logit(torch.tensor([[[0.8, 0.5, 0.5], [0.3, 0.5, 0.5]]])))
        policy.probability_logits.copy_(torch.logit(torch.tensor([[[0.6, 0.4, 0.2], [0.9, 0.5, 0.5]]])))
    return policy


def test_export_expands_every_combination_of_ops_above_min_share():
    """Combinations and their weights 0.7·0.9, 0.2·0.9, 0.1·0.9, 0.7·0.09, 0.2·0.09 (≥ 0.01) are
    kept; 0.007, 0.009, 0.002, 0.001 are dropped; the kept weights are renormalised."""
    policy = known_policy()
    exported = policy.export(seed=0)
    ops = [tuple(s.op for s in sub) for sub in exported.sub_policies]
    assert ops == [
        ("Rotate", "Rotate"),
        ("Cutout", "Rotate"),
        ("Equalize", "Rotate"),
        ("Rotate", "Cutout"),
        ("Cutout", "Cutout"),
    ]
    kept = [0.63, 0.18, 0.09, 0.063, 0.018]
    assert exported.sub_policy_weights == pytest.approx([w / sum(kept) for w in kept], abs=1e-6)
    assert policy.exported_share() == pytest.approx(sum(kept), abs=1e-6)
    first = exported.sub_policies[0]
    assert first[0] == PolicyStep("Rotate", pytest.approx(0.6), pytest.approx(7.5), pytest.approx(0.8))
    assert first[1].sign == pytest.approx(0.3) and first[1].p == pytest.approx(0.9)
    assert exported.sub_policies[1][0].sign == 1.0  # Cutout is unsigned
    assert Policy.from_dict(exported.to_dict(), space=policy.space) == exported
    assert exported.to_dict()["format"] == "autopose.policy/2"


def test_export_caps_the_count_and_always_keeps_the_heaviest():
    policy = known_policy()
    capped = policy.export(max_sub_policies=2)
    assert [tuple(s.op for s in sub) for sub in capped.sub_policies] == [
        ("Rotate", "Rotate"),
        ("Cutout", "Rotate"),
    ]
    assert capped.sub_policy_weights == pytest.approx([0.63 / 0.81, 0.18 / 0.81], abs=1e-6)
    assert policy.exported_share(max_sub_policies=2) == pytest.approx(0.81, abs=1e-6)
    alone = policy.export(min_share=0.7)  # nothing reaches 0.7: the heaviest stays
    assert len(alone.sub_policies) == 1 and alone.sub_policy_weights == (1.0,)
    everything = policy.export(min_share=0.0)
    assert len(everything.sub_policies) == 9 and sum(everything.sub_policy_weights) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="min_share"):
        policy.export(min_share=1.0)


def test_export_of_a_fresh_search_space_is_a_valid_policy():
    policy = RelaxedPolicy(SPACE, seed=0)  # near-uniform: 300 combinations of 1/300 each
    exported = policy.export(seed=0, min_share=0.0)
    assert len(exported.sub_policies) == 64  # capped
    assert policy.exported_share(min_share=0.0) == pytest.approx(64 / 300, abs=1e-3)
    assert Policy.from_dict(exported.to_dict()) == exported


# -- state dicts ----------------------------------------------------------------------------------------


def test_a_state_dict_from_before_the_signs_loads_as_it_ran():
    saved = randomize(RelaxedPolicy(TINY, seed=0), seed=10)
    state = {k: v for k, v in saved.state_dict().items() if k != "sign_logits"}
    loaded = RelaxedPolicy(TINY, seed=3)
    loaded.load_state_dict(state)  # strict
    assert torch.equal(loaded.sign_logits, torch.full_like(loaded.sign_logits, LEGACY_SIGN_LOGIT))
    for name in state:
        assert torch.equal(getattr(loaded, name), getattr(saved, name)), name
    # It augments as before the signs: every op at value(m), whatever the sign draws.
    images, keypoints, visibility = batch(16)
    noise = loaded.sample_noise(16, torch.Generator().manual_seed(11))
    with torch.no_grad():
        now = loaded(images, keypoints, visibility, noise)
        before = loaded(
            images, keypoints, visibility, PolicyNoise(noise.sub_policy, noise.bernoulli, noise.cutout)
        )
    for a, b in zip(now, before, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Inside another module (a prefix), and a key missing for another reason is still an error.
    outer = nn.ModuleDict({"policy": RelaxedPolicy(TINY, seed=3)})
    outer.load_state_dict({f"policy.{k}": v for k, v in state.items()})
    assert outer["policy"].sign_logits.eq(LEGACY_SIGN_LOGIT).all()
    with pytest.raises(RuntimeError, match="op_logits"):
        RelaxedPolicy(TINY).load_state_dict({k: v for k, v in state.items() if k != "op_logits"})


def test_a_new_state_dict_round_trips_its_signs():
    saved = randomize(RelaxedPolicy(TINY, seed=0), seed=12)
    loaded = RelaxedPolicy(TINY, seed=1)
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(loaded.sign_logits, saved.sign_logits)
    assert list(saved.state_dict()) == [
        "sub_policy_logits",
        "op_logits",
        "probability_logits",
        "magnitude_logits",
        "sign_logits",
    ]


def test_noise_moves_and_casts_every_draw():
    noise = RelaxedPolicy(TINY).sample_noise(4).to(torch.float64)
    assert all(
        t.dtype == torch.float64
        for t in (noise.sub_policy, noise.bernoulli, noise.cutout, noise.sign, noise.op)
    )
    legacy = PolicyNoise(noise.sub_policy, noise.bernoulli, noise.cutout).to(torch.float32)
    assert legacy.sign is None and legacy.op is None and legacy.cutout.dtype == torch.float32
