"""PlannedTrials: fixed baselines first, then Optuna-tuned search trials (no Ray needed)."""

from __future__ import annotations

import pytest
from ray.tune.search import Searcher

from autopose.platform.config import load_experiment
from autopose.platform.tune import PlannedTrials, _optuna_searcher, trial_spec


@pytest.fixture
def optuna_config(smoke_config):
    overrides = {
        "tune": {"search_alg": "optuna"},
        "search": {"trials": 3, "tau1": [0.3, 3.0], "policy_lr": [1e-3, 1e-1]},
    }
    return load_experiment(smoke_config(overrides))


def test_baselines_first_then_tuned_search_trials(optuna_config):
    searcher = _optuna_searcher(optuna_config)
    assert isinstance(searcher, PlannedTrials)
    suggestions = []
    for i in range(7):
        suggestion = searcher.suggest(f"t{i}")
        suggestions.append(suggestion)
        if suggestion not in (None, Searcher.FINISHED) and suggestion["trial"]["kind"] == "search":
            searcher.on_trial_complete(f"t{i}", result={"val_ap": 0.1 * i})
    assert [s["trial"] for s in suggestions[:4]] == [
        {"kind": "random", "seed": 0},
        {"kind": "random", "seed": 1},
        {"kind": "handcrafted", "seed": 0},
        {"kind": "none", "seed": 0},
    ]
    tuned = suggestions[4:7]
    assert [s["trial"] for s in tuned] == [{"kind": "search", "seed": s} for s in (0, 1, 2)]
    for suggestion in tuned:
        assert 0.3 <= suggestion["tau1"] <= 3.0 and 1e-3 <= suggestion["policy_lr"] <= 1e-1
        spec = trial_spec(suggestion, optuna_config)
        assert spec.bilevel.tau1 == suggestion["tau1"] and spec.bilevel.tau2 == 0.5  # fixed ones stay
    assert searcher.suggest("t7") == Searcher.FINISHED


def test_state_survives_save_and_restore(optuna_config, tmp_path):
    searcher = _optuna_searcher(optuna_config)
    for i in range(5):
        searcher.suggest(f"t{i}")
    searcher.save(str(tmp_path / "searcher.pkl"))
    again = _optuna_searcher(optuna_config)
    again.restore(str(tmp_path / "searcher.pkl"))
    assert (again.handed_out, again.tuned, again.inner_trials) == (4, 1, {"t4"})
    assert again.suggest("t5")["trial"] == {"kind": "search", "seed": 1}
