"""The tpe method's pieces without Ray: its search space, the policy of a sampled point, the
best finished candidate, and its config checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from ray.tune.search.optuna import OptunaSearch

from autopose.augment import Policy, SearchSpace
from autopose.errors import AutoposeError
from autopose.platform.config import load_experiment
from autopose.platform.tune import TPE_KIND, policy_param_space, sampled_policy, tpe_best, trial_spec


def point(space: SearchSpace, op: str, p: float, m: int) -> dict[str, Any]:
    return {f"s{k}": {f"t{n}": {"op": op, "p": p, "m": m} for n in range(space.N)} for k in range(space.K)}


@pytest.fixture
def tpe_config(smoke_config, smoke_data):
    return load_experiment(
        smoke_config({"data": {"search_val": str(smoke_data["holdout"])}, "tpe": {"trials": 3}})
    )


def test_every_step_of_every_sub_policy_is_searched_over_the_spaces_ops(tpe_config):
    space = SearchSpace.from_dict(tpe_config.space_dict)
    param_space = policy_param_space(space)
    assert sorted(param_space) == [f"s{k}" for k in range(space.K)]
    assert all(sorted(sub) == [f"t{n}" for n in range(space.N)] for sub in param_space.values())
    step = param_space["s0"]["t0"]
    assert list(step["op"].categories) == list(space.op_names)
    assert (step["m"].lower, step["m"].upper) == (0, 11)  # randint's upper bound is exclusive: 0–10
    # Optuna takes the space as it is (every value a distribution it knows)
    converted = OptunaSearch.convert_search_space(param_space)
    assert len(converted) == space.K * space.N * 3


def test_a_sampled_point_is_a_valid_policy_that_a_tpe_trial_trains(tpe_config):
    space = SearchSpace.from_dict(tpe_config.space_dict)
    sampled = point(space, "Rotate", 0.30000000000000004, 7)  # quniform's float noise
    document = sampled_policy(sampled, space)
    policy = Policy.from_dict(document, space=space)
    assert [(s.op, s.p, s.m) for sub in policy.sub_policies for s in sub] == [("Rotate", 0.3, 7.0)] * (
        space.K * space.N
    )
    spec = trial_spec({"trial": {"kind": TPE_KIND, "seed": 0}, "policy": sampled}, tpe_config)
    assert spec.kind == "policy" and spec.policy == document


@dataclass
class Finished:
    config: dict[str, Any]
    metrics: dict[str, float]
    error: Exception | None = None


def test_the_best_is_the_highest_holdout_among_candidates_that_trained_every_epoch(tpe_config):
    space = SearchSpace.from_dict(tpe_config.space_dict)
    last = tpe_config.train.epochs - 1
    results = [
        Finished({"policy": point(space, "Rotate", 0.5, 3)}, {"holdout_ap": 0.2, "epoch": last}),
        Finished({"policy": point(space, "Scale", 0.5, 3)}, {"holdout_ap": 0.3, "epoch": last}),
        Finished(
            {"policy": point(space, "Cutout", 0.5, 3)}, {"holdout_ap": 0.9, "epoch": last - 1}
        ),  # stopped
        Finished(
            {"policy": point(space, "Brightness", 0.5, 3)}, {"holdout_ap": 0.8, "epoch": last}, RuntimeError()
        ),
    ]
    best = tpe_best(tpe_config, results)
    assert {s["op"] for sub in best["sub_policies"] for s in sub} == {"Scale"}
    assert tpe_best(tpe_config, results[2:]) is None


def test_tpe_needs_a_holdout_split_and_counts_that_are_not_negative(smoke_config):
    with pytest.raises(AutoposeError, match="holdout split") as error:
        load_experiment(smoke_config({"tpe": {"trials": 2}}))
    assert error.value.field == "tpe.trials"
    with pytest.raises(AutoposeError, match="≥ 0") as error:
        load_experiment(smoke_config({"tpe": {"startup_trials": -1}}))
    assert error.value.field == "tpe.startup_trials"
