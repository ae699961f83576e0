"""A trial that fails is retried and resumes from its checkpoint instead of starting over."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from autopose.platform.config import load_experiment
from autopose.platform.tune import FAILURE_ENV, run_search

pytestmark = [pytest.mark.platform, pytest.mark.slow]


def test_failed_trial_resumes_from_its_checkpoint(ray_cluster, smoke_config, monkeypatch):
    only_none = {
        "experiment": "failure",
        "search": {"trials": 0},
        "baselines": {"random_seeds": [], "handcrafted": False, "none": True},
        "train": {"epochs": 3, "steps_per_epoch": 2},
        "tune": {"max_failures": 1},
    }
    config = load_experiment(smoke_config(only_none))
    monkeypatch.setenv(FAILURE_ENV, "0")  # fail once, right after epoch 0's checkpoint
    (outcome,) = run_search(config, verbose=0)
    assert outcome.status == "TERMINATED", outcome.error

    client = MlflowClient(config.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "attempt_wall_s")) == 2  # failed once, retried once
    # Resumed, not restarted: every epoch ran once, and the step count is the uninterrupted one.
    epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_ap"))
    assert epochs == [0, 1, 2]
    steps = sorted(m.value for m in client.get_metric_history(run.info.run_id, "step"))
    assert steps == [2, 4, 6]
