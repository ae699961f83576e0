"""The selection stage's arithmetic and plan, without Ray: scores with known answers."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ray.train import Checkpoint

from autopose.platform.compare import PolicyRow, format_methods, method_rows, selection_of
from autopose.platform.config import load_experiment
from autopose.platform.runner import POLICY_FILE
from autopose.platform.selection import CandidateScore, candidate_scores, format_selection, select
from autopose.platform.tune import selection_candidates


def scores(table: dict[str, dict[int, float]]) -> list[CandidateScore]:
    return [
        CandidateScore(name, seed, ap, val_ap=ap / 2, run_id=f"{name}@{seed}")
        for name, by_seed in table.items()
        for seed, ap in by_seed.items()
    ]


def test_the_best_mean_holdout_wins_and_its_gain_is_paired_by_seed():
    selection = select(
        scores(
            {
                "none": {0: 0.30, 1: 0.20, 2: 0.25},
                "handcrafted": {0: 0.28, 1: 0.21, 2: 0.20},
                "search-0": {0: 0.40, 1: 0.26, 2: 0.33},
            }
        )
    )
    assert [r.candidate for r in selection.ranked] == ["search-0", "none", "handcrafted"]
    best = selection.winner
    gains = [0.40 - 0.30, 0.26 - 0.20, 0.33 - 0.25]
    assert best.gain == pytest.approx(statistics.fmean(gains))
    assert best.gain_sd == pytest.approx(statistics.stdev(gains))
    assert best.holdout_ap == pytest.approx((0.40 + 0.26 + 0.33) / 3)
    assert best.val_ap == pytest.approx((0.40 + 0.26 + 0.33) / 6)
    assert best.run_id == "search-0@0"  # the lowest seed's run is the one to promote
    # 0.08 ± 0.02 over 3 seeds: 2 standard errors are 0.023, well below the gain
    assert best.noise_floor == pytest.approx(2 * statistics.stdev(gains) / 3**0.5)
    assert selection.within_noise is False
    assert "above the noise floor" in selection.summary()


def test_a_gain_the_seeds_disagree_on_is_within_the_noise_floor():
    selection = select(scores({"none": {0: 0.30, 1: 0.20}, "search-0": {0: 0.36, 1: 0.19}}))
    assert selection.winner.candidate == "search-0"
    assert selection.within_noise is True
    assert "within the noise floor" in selection.summary()


def test_none_wins_a_tie_and_is_never_beaten_by_a_worse_candidate():
    tie = select(scores({"handcrafted": {0: 0.25}, "none": {0: 0.25}}))
    assert tie.winner.candidate == "none"
    assert "no candidate beat training without augmentation" in tie.summary()
    worse = select(scores({"none": {0: 0.25, 1: 0.3}, "search-1": {0: 0.2, 1: 0.1}}))
    assert worse.winner.candidate == "none" and worse.ranked[1].gain == pytest.approx(-0.125)


def test_one_seed_says_the_noise_is_unknown():
    selection = select(scores({"none": {0: 0.2}, "search-0": {0: 0.3}}))
    assert selection.winner.noise_floor is None and selection.within_noise is None
    assert "one seed has no spread" in selection.summary()
    table = format_selection(selection)
    assert "search-0 *" in table and "+0.1000" in table


def test_only_seeds_none_was_scored_with_count_and_none_is_required():
    selection = select(scores({"none": {0: 0.2}, "search-0": {0: 0.1, 1: 0.9}, "search-1": {1: 0.5}}))
    assert [r.candidate for r in selection.ranked] == ["none", "search-0"]  # search-1 shares no seed
    assert selection.ranked[1].seeds == (0,)
    assert select(scores({"search-0": {0: 0.3}})) is None


def row(kind: str, seed: int, holdout: float | None, *, candidate=None, status="FINISHED") -> PolicyRow:
    return PolicyRow(
        kind=kind,
        seed=seed,
        val_ap=0.1,
        cost_cpu_s=1.0,
        cost_gpu_s=0.0,
        run_id=f"{candidate or kind}-{seed}",
        status=status,
        search="s",
        promoted=False,
        holdout_ap=holdout,
        candidate=candidate,
    )


def test_scores_come_from_selection_runs_and_the_searchs_own_baselines():
    rows = [
        row("none", 0, 0.2),  # a trial of the search, reused as the candidate "none"
        row("handcrafted", 0, 0.1),
        row("random", 0, 0.5),  # random policies are not candidates
        row("search", 0, 0.4),  # a search trial is not: its exported policy, retrained, is
        row("policy", 0, 0.3, candidate="search-0"),
        row("none", 1, 0.25, candidate="none"),
        row("policy", 1, 0.35, candidate="search-0"),
        row("policy", 2, 0.9, candidate="search-0"),  # not a selection seed
        row("handcrafted", 1, None, candidate="handcrafted", status="FAILED"),
    ]
    found = {(s.candidate, s.seed): s.holdout_ap for s in candidate_scores(rows, [0, 1])}
    assert found == {
        ("none", 0): 0.2,
        ("handcrafted", 0): 0.1,
        ("search-0", 0): 0.3,
        ("none", 1): 0.25,
        ("search-0", 1): 0.35,
    }


@dataclass
class FinishedTrial:
    """What the plan reads of a Tune result: its config, error, last metrics and checkpoint."""

    config: dict[str, Any]
    metrics: dict[str, float]
    checkpoint: Checkpoint | None = None
    error: Exception | None = None


def test_the_plan_retrains_each_finished_export_and_reuses_the_searchs_baselines(
    smoke_config, smoke_data, tmp_path
):
    config = load_experiment(
        smoke_config({"data": {"search_val": str(smoke_data["holdout"])}, "selection": {"seeds": [0, 1]}})
    )
    assert config.runs_selection()
    exported = {
        "format": "autopose.policy/1",
        "space": "smoke",
        "sub_policies": [[{"op": "Scale", "p": 1, "m": 2}]],
    }
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / POLICY_FILE).write_text(json.dumps(exported))
    done = {"val_ap": 0.1, "holdout_ap": 0.1}
    results = [
        FinishedTrial({"trial": {"kind": "search", "seed": 0}}, done, Checkpoint.from_directory(folder)),
        FinishedTrial({"trial": {"kind": "search", "seed": 1}}, {"val_ap": 0.1}),  # stopped early
        FinishedTrial({"trial": {"kind": "none", "seed": 0}}, done),
        FinishedTrial({"trial": {"kind": "handcrafted", "seed": 0}}, done, error=RuntimeError("lost")),
    ]
    plan = selection_candidates(config, results)
    assert [(p["candidate"], p["kind"], p["seed"]) for p in plan] == [
        ("handcrafted", "handcrafted", 0),  # its trial failed: trained again
        ("search-0", "policy", 0),
        ("none", "none", 1),
        ("handcrafted", "handcrafted", 1),
        ("search-0", "policy", 1),
    ]
    assert plan[1]["policy"] == exported


def test_the_stage_runs_only_with_a_holdout_split(smoke_config, smoke_data):
    assert not load_experiment(smoke_config()).runs_selection()  # no data.search_val
    holdout = {"data": {"search_val": str(smoke_data["holdout"])}}
    assert load_experiment(smoke_config(holdout)).runs_selection()
    assert load_experiment(smoke_config(holdout)).selection_seeds() == [0]  # train.seed
    off = load_experiment(smoke_config({**holdout, "selection": {"enabled": False}}))
    assert not off.runs_selection()


@pytest.mark.parametrize(
    ("selection", "field", "words"),
    [
        ({"enabled": True}, "selection.enabled", "give data.search_val"),
        ({"seeds": []}, "selection.seeds", "non-empty list"),
        ({"seeds": [0, 0]}, "selection.seeds", "repeats a seed"),
        ({"seeds": [True]}, "selection.seeds[0]", "expected int"),
    ],
)
def test_a_bad_selection_section_names_its_field(smoke_config, selection, field, words):
    from autopose.errors import AutoposeError

    path: Path = smoke_config({"selection": selection})
    with pytest.raises(AutoposeError) as error:
        load_experiment(path)
    assert (error.value.field, error.value.path) == (field, str(path))
    assert words in str(error.value)


def test_one_row_per_method_with_its_cost_and_its_best_candidates_gain():
    rows = [
        row("none", 0, 0.2),
        row("handcrafted", 0, 0.1),
        row("random", 0, 0.5),
        row("random", 1, 0.1),
        row("search", 0, 0.4),
        row("search", 1, 0.4),
        row("tpe", 0, 0.6),
        row("tpe", 0, 0.2),
        row("tpe", 0, 0.3),
        row("policy", 0, 0.3, candidate="search-0"),
        row("policy", 0, 0.35, candidate="search-1"),
        row("policy", 0, 0.25, candidate="tpe"),
    ]
    selection = selection_of(rows)  # seeds: those the selection stage trained with
    assert selection.winner.candidate == "search-1"
    methods = {m.method: m for m in method_rows(rows, selection)}
    assert list(methods) == ["search", "tpe", "random", "handcrafted", "none"]
    assert (methods["tpe"].trials, methods["tpe"].cost_cpu_s) == (3, 3.0)  # the selection's not counted
    assert (methods["search"].candidate, methods["search"].gain) == ("search-1", pytest.approx(0.15))
    assert (methods["tpe"].candidate, methods["tpe"].gain) == ("tpe", pytest.approx(0.05))
    assert methods["random"].candidate is None and methods["none"].gain == 0.0
    table = format_methods(list(methods.values()))
    assert "search-1" in table and "+0.1500" in table and "CPU-s" in table
    assert selection_of([r for r in rows if r.candidate is None]) is None  # no selection stage
