"""Optuna as the search algorithm and ASHA as the scheduler, on the real Tune."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from autopose.platform.config import load_experiment
from autopose.platform.tune import run_search

pytestmark = [pytest.mark.platform, pytest.mark.slow]


def test_optuna_and_asha_run_search_trials_beside_baselines(ray_cluster, smoke_config):
    overrides = {
        "experiment": "optuna",
        "search": {"trials": 1, "tau1": [0.5, 2.0], "policy_lr": [0.001, 0.1]},
        "baselines": {"random_seeds": [], "handcrafted": False, "none": True},
        "train": {"epochs": 2, "steps_per_epoch": 1},
        "tune": {"search_alg": "optuna", "scheduler": "asha", "max_concurrent": 2},
    }
    config = load_experiment(smoke_config(overrides))
    outcomes = run_search(config, verbose=0)
    assert sorted(o.kind for o in outcomes) == ["none", "search"]
    assert all(o.status == "TERMINATED" for o in outcomes), [o.error for o in outcomes]
    client = MlflowClient(config.tracking_uri)
    search = client.get_run(next(o.run_id for o in outcomes if o.kind == "search"))
    tau1 = float(search.data.params["search.tau1"])
    policy_lr = float(search.data.params["search.policy_lr"])
    assert 0.5 <= tau1 <= 2.0 and tau1 != 1.0  # sampled by Optuna, not the range's middle
    assert 0.001 <= policy_lr <= 0.1
    assert search.data.metrics["tau1"] == pytest.approx(tau1)  # the trial trained with it
    # ASHA may stop a trial after its first epoch: its run is closed all the same.
    runs = [client.get_run(o.run_id) for o in outcomes]
    for run in runs:
        stopped = run.data.tags.get("autopose.stopped_early") == "true"
        assert run.info.status == ("KILLED" if stopped else "FINISHED")
        assert run.data.metrics["cost_cpu_s"] > 0
    assert any(run.info.status == "FINISHED" for run in runs)
