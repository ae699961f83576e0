"""Faults a search or a training survives: processes killed with SIGKILL, lost tracking servers."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from autopose.platform.config import load_experiment
from autopose.platform.tracking import TAG_TRIAL, run_status_counts
from autopose.platform.tune import KILL_ENV, run_search

pytestmark = [pytest.mark.platform, pytest.mark.slow]


def test_trial_process_killed_resumes_from_its_checkpoint(ray_cluster, smoke_config, monkeypatch):
    two_trials = {
        "experiment": "sigkill",
        "search": {"trials": 0},
        "baselines": {"random_seeds": [0], "handcrafted": False, "none": True},
        "train": {"epochs": 3, "steps_per_epoch": 2},
        "tune": {"max_failures": 1},
        "examples": 0,
    }
    config = load_experiment(smoke_config(two_trials))
    monkeypatch.setenv(KILL_ENV, "0")  # each trial's process SIGKILLs itself after epoch 0's checkpoint
    outcomes = run_search(config, verbose=0)
    assert [o.status for o in outcomes] == ["TERMINATED"] * 2, [o.error for o in outcomes]

    client = MlflowClient(config.tracking_uri)
    experiment_id = client.get_experiment_by_name("sigkill").experiment_id
    assert run_status_counts(config.tracking_uri, experiment_id) == {"FINISHED": 2}
    runs = client.search_runs([experiment_id])
    assert sorted(r.data.tags[TAG_TRIAL] for r in runs) == sorted(f"sigkill/{o.trial_id}" for o in outcomes)
    for run in runs:
        # Killed once and started again; the killed attempt never closed itself, only the retry did.
        assert len(client.get_metric_history(run.info.run_id, "attempt_started")) == 2
        assert len(client.get_metric_history(run.info.run_id, "attempt_wall_s")) == 1
        # Resumed after epoch 0, not restarted: every epoch ran once, steps as uninterrupted.
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_ap")) == [0, 1, 2]
        assert sorted(m.value for m in client.get_metric_history(run.info.run_id, "step")) == [2, 4, 6]
