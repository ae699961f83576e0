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


def test_ray_train_worker_killed_resumes_and_does_the_uninterrupted_steps(ray_cluster, smoke_config):
    """Two DDP workers on gloo; rank 1 is SIGKILLed after epoch 0: Ray Train restarts the group
    (FailureConfig) from epoch 0's checkpoint and the run ends with the uninterrupted step count."""
    import dataclasses

    from autopose.engine.config import AugmentSpec
    from autopose.platform.runner import TrainingJob, fit
    from autopose.platform.tracking import TrackedRun, ensure_experiment

    config = load_experiment(smoke_config({"experiment": "train-kill"}))
    train = dataclasses.replace(
        config.train, epochs=3, steps_per_epoch=2, num_workers=2, cpus_per_worker=1, max_failures=1
    )
    experiment_id = ensure_experiment(config.tracking_uri, "train-kill")
    run = TrackedRun.open(config.tracking_uri, experiment_id, run_name="killed", tags={TAG_TRIAL: "killed"})
    job = TrainingJob(
        data=config.data,
        model=config.model,
        train=train,
        augment=AugmentSpec(kind="none", seed=0),
        space=config.space_dict,
        tracking_uri=config.tracking_uri,
        run_id=run.run_id,
        examples=0,
        inject_kill_after_epoch=0,
    )
    result = fit(job, name="train-kill", storage_path=config.storage_path)
    assert result.checkpoint is not None

    client = MlflowClient(config.tracking_uri)
    # Every epoch logged once: epoch 0 before the kill, 1 and 2 after the restart (not 0 again).
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "val_ap")) == [0, 1, 2]
    steps = sorted(m.value for m in client.get_metric_history(run.run_id, "step"))
    per_epoch = steps[0]
    assert per_epoch > 0 and steps == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert result.metrics["step"] == 3 * per_epoch


def test_search_driver_killed_resume_finishes_without_duplicate_runs(ray_cluster, smoke_config):
    """``autopose search`` is SIGKILLed once a trial's run is FINISHED and the next one RUNNING;
    ``--resume`` finishes the experiment. The interrupted trial continues its own MLflow run
    (same run id, reopened by its trial tag), and the finished one is not trained again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    one_at_a_time = {
        "experiment": "driver-kill",
        "search": {"trials": 0},
        "baselines": {"random_seeds": [0], "handcrafted": False, "none": True},
        "train": {"epochs": 4, "steps_per_epoch": 2},
        "tune": {"max_concurrent": 1},
        "examples": 0,
    }
    path = smoke_config(one_at_a_time)
    config = load_experiment(path)
    address = ray_cluster.get_runtime_context().gcs_address  # the session's Ray: no second Ray to start
    command = [
        sys.executable,
        "-m",
        "autopose.cli",
        "search",
        "--config",
        str(path),
        "--experiment",
        "driver-kill",
    ]
    command += ["--address", address]
    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, "RAY_ADDRESS")}
    client = MlflowClient(config.tracking_uri)

    def statuses() -> dict[str, str]:
        experiment = client.get_experiment_by_name("driver-kill")
        if experiment is None:
            return {}
        runs = client.search_runs([experiment.experiment_id])
        return {r.info.run_id: r.info.status for r in runs}

    driver = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and driver.poll() is None:
            seen = list(statuses().values())
            if "FINISHED" in seen and "RUNNING" in seen:
                break
            time.sleep(0.5)
        assert driver.poll() is None, driver.communicate()[0].decode()[-3000:]
        before_kill = statuses()
        assert sorted(before_kill.values()) == ["FINISHED", "RUNNING"], before_kill
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and anything it started
        driver.wait()
    finished_before = next(run_id for run_id, status in before_kill.items() if status == "FINISHED")
    interrupted = next(run_id for run_id, status in before_kill.items() if status == "RUNNING")
    finished_at = client.get_run(finished_before).info.end_time

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, timeout=180)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr).decode()[-3000:]

    after = statuses()
    # Exactly one run per planned trial, all FINISHED, none left RUNNING: the interrupted trial
    # continued its own run rather than opening a second one.
    assert after == {finished_before: "FINISHED", interrupted: "FINISHED"}
    assert client.get_run(finished_before).info.end_time == finished_at  # not reopened or retrained
    finished_epochs = sorted(m.step for m in client.get_metric_history(finished_before, "val_ap"))
    assert finished_epochs == [0, 1, 2, 3]
    # The interrupted trial resumed from its last checkpoint: an epoch logged after that checkpoint
    # but before the kill is trained and logged again (same step), none is skipped.
    resumed_epochs = sorted(m.step for m in client.get_metric_history(interrupted, "val_ap"))
    assert set(resumed_epochs) == {0, 1, 2, 3} and len(resumed_epochs) <= 5, resumed_epochs
    # The interrupted trial was started twice (before the kill and on resume), closed once.
    assert len(client.get_metric_history(interrupted, "attempt_started")) == 2
    assert len(client.get_metric_history(finished_before, "attempt_started")) == 1
