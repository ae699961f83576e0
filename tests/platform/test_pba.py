"""The pba method's pieces without Ray: PBA's explore, the best member's schedule, its config checks."""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from autopose.augment import SearchSpace
from autopose.errors import AutoposeError
from autopose.platform.config import load_experiment
from autopose.platform.runner import POLICY_FILE
from autopose.platform.tune import PbaExplore, pba_best, perturb_sampled


def point(space: SearchSpace, op: str, p: float, m: int) -> dict[str, Any]:
    return {f"s{k}": {f"t{n}": {"op": op, "p": p, "m": m} for n in range(space.N)} for k in range(space.K)}


@pytest.fixture
def pba_config(smoke_config, smoke_data):
    return load_experiment(
        smoke_config({"data": {"search_val": str(smoke_data["holdout"])}, "pba": {"population": 2}})
    )


def _steps(sampled: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for steps in sampled.values() for step in steps.values()]


def test_explore_moves_p_and_m_by_at_most_three_notches_and_keeps_the_op(pba_config):
    space = SearchSpace.from_dict(pba_config.space_dict)
    rng = random.Random(0)
    moves = set()
    for p, m in ((0.0, 0), (0.5, 5), (1.0, 10)):
        start = point(space, "Rotate", p, m)
        for _ in range(200):
            explored = perturb_sampled(start, space.op_names, rng, resample_probability=0.0)
            for step in _steps(explored):
                assert step["op"] == "Rotate" and 0.0 <= step["p"] <= 1.0 and 0 <= step["m"] <= 10
                assert round(abs(step["p"] - p) * 10) <= 3 and abs(step["m"] - m) <= 3
                moves.add((round((step["p"] - p) * 10), step["m"] - m))
        assert start == point(space, "Rotate", p, m)  # the donor's config is left as it was
    assert {dp for dp, _ in moves} == set(range(-3, 4)) and {dm for _, dm in moves} == set(range(-3, 4))


def test_explore_resamples_with_its_probability(pba_config):
    space = SearchSpace.from_dict(pba_config.space_dict)
    rng = random.Random(1)
    steps = [
        s
        for _ in range(300)
        for s in _steps(perturb_sampled(point(space, "Rotate", 0.5, 5), space.op_names, rng, 0.2))
    ]
    other_op = sum(s["op"] != "Rotate" for s in steps) / len(steps)
    # resampled with 0.2, and then another op than Rotate with 3/4
    assert abs(other_op - 0.2 * 3 / 4) < 4 * (0.15 * 0.85 / len(steps)) ** 0.5
    assert {s["op"] for s in steps} == set(space.op_names)
    explored = PbaExplore(tuple(space.op_names), 1.0)(
        {"trial": {"kind": "pba"}, "policy": point(space, "Scale", 0.1, 1)}
    )
    assert explored["trial"] == {"kind": "pba"} and set(explored["policy"]) == {
        f"s{k}" for k in range(space.K)
    }


@dataclass
class Checkpoint:
    folder: Path

    @contextmanager
    def as_directory(self):
        yield str(self.folder)


@dataclass
class Member:
    metrics: dict[str, float]
    checkpoint: Checkpoint | None
    error: Exception | None = None


def test_the_result_is_the_best_finished_members_schedule(pba_config, tmp_path):
    last = pba_config.train.epochs - 1
    members = []
    for i, (ap, epoch, error) in enumerate(
        [(0.2, last, None), (0.4, last, None), (0.9, last, RuntimeError())]
    ):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / POLICY_FILE).write_text(json.dumps({"format": "autopose.schedule/1", "member": i}))
        members.append(Member({"holdout_ap": ap, "epoch": epoch}, Checkpoint(folder), error))
    assert pba_best(pba_config, members) == {"format": "autopose.schedule/1", "member": 1}
    assert pba_best(pba_config, members[2:]) is None


@pytest.mark.parametrize(
    ("pba", "train", "holdout", "field", "words"),
    [
        ({"population": 1}, {}, True, "pba.population", "≥ 2"),
        ({"population": 2}, {}, False, "pba.population", "holdout split"),
        ({"population": 2}, {"num_workers": 2}, True, "pba.population", "num_workers: 0"),
        ({"population": 2, "perturbation_interval": 0}, {}, True, "pba.perturbation_interval", "≥ 1"),
        ({"population": 2, "quantile_fraction": 0.6}, {}, True, "pba.quantile_fraction", "0.5"),
        ({"population": 2, "resample_probability": 1.5}, {}, True, "pba.resample_probability", "[0, 1]"),
    ],
)
def test_a_bad_pba_setting_names_its_field(smoke_config, smoke_data, pba, train, holdout, field, words):
    overrides = {"pba": pba, "train": train}
    if holdout:
        overrides["data"] = {"search_val": str(smoke_data["holdout"])}
    with pytest.raises(AutoposeError, match=words) as error:
        load_experiment(smoke_config(overrides))
    assert error.value.field == field
