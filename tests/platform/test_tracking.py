"""How every run's epochs are logged and how every run is closed, on a real SQLite MLflow."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from autopose.platform.tracking import (
    QUICK_TRACKING_ENV,
    TAG_STOPPED_EARLY,
    TAG_TRIAL,
    EpochLog,
    TrackedRun,
    bounded_http,
    close_run,
    ensure_experiment,
)

pytestmark = pytest.mark.platform


@pytest.fixture
def run(tmp_path) -> TrackedRun:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "tracking")
    return TrackedRun.open(uri, experiment_id, run_name="trial", tags={TAG_TRIAL: "tracking/t0"})


def _steps(run: TrackedRun, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(run.tracking_uri).get_metric_history(run.run_id, key))


def test_epoch_log_logs_each_epoch_once_across_writers(run):
    """A second EpochLog on the same run (a resumed driver, a restarted worker) is handed epochs
    the run holds already and one it does not: only the new one is logged, under its own step."""
    first = EpochLog(run)
    for epoch in (0, 1):
        first.add(epoch, {"epoch": epoch, "val_ap": 0.1 * (epoch + 1), "node_id": "not a number"})
    first.flush()
    assert first.waiting == {}

    resumed = EpochLog(TrackedRun.attach(run.tracking_uri, run.run_id))
    for epoch in (1, 2, 0):
        resumed.add(epoch, {"epoch": epoch, "val_ap": 0.5})
    resumed.flush()

    assert _steps(run, "val_ap") == [0, 1, 2]
    assert _steps(run, "epoch") == [0, 1, 2]
    history = MlflowClient(run.tracking_uri).get_metric_history(run.run_id, "val_ap")
    assert {m.step: m.value for m in history} == {0: pytest.approx(0.1), 1: pytest.approx(0.2), 2: 0.5}
    assert "node_id" not in MlflowClient(run.tracking_uri).get_run(run.run_id).data.metrics


def test_epoch_log_keeps_what_a_lost_server_did_not_take(tmp_path, run):
    """Against a store that cannot be reached the epochs stay waiting, in order; once the run's
    store answers (the same log pointed at it again), they go, each once."""
    unreachable = TrackedRun.attach("http://127.0.0.1:9", run.run_id)
    epochs = EpochLog(unreachable)
    epochs.add(1, {"epoch": 1, "val_ap": 0.2})
    epochs.add(0, {"epoch": 0, "val_ap": 0.1})
    with (
        bounded_http(**QUICK_TRACKING_ENV),
        pytest.raises(Exception),  # noqa: B017 (requests' and MLflow's kinds)
    ):
        epochs.flush()
    assert sorted(epochs.waiting) == [0, 1]
    epochs.run = run
    epochs.flush()
    assert epochs.waiting == {} and _steps(run, "val_ap") == [0, 1]


@pytest.mark.parametrize(
    ("status", "stopped_early"), [("FINISHED", False), ("KILLED", True), ("FAILED", False)]
)
def test_close_run_logs_the_cost_and_the_status(run, status, stopped_early):
    close_run(run, status, wall_s=10.0, resources=(2.0, 0.5), step=3, stopped_early=stopped_early)
    closed = MlflowClient(run.tracking_uri).get_run(run.run_id)
    assert closed.info.status == status
    assert closed.data.metrics == {"trial_wall_s": 10.0, "cost_cpu_s": 20.0, "cost_gpu_s": 5.0}
    assert _steps(run, "cost_cpu_s") == [3]
    assert (TAG_STOPPED_EARLY in closed.data.tags) == stopped_early


def test_a_step_larger_than_one_batch_is_logged_whole_in_several_calls(run):
    """MLflow takes at most 1,000 metrics a call: a step of 1,500 goes in two, none lost."""
    run.log_metrics({f"m{i}": float(i) for i in range(1500)}, step=4)
    metrics = MlflowClient(run.tracking_uri).get_run(run.run_id).data.metrics
    assert len(metrics) == 1500 and metrics["m1499"] == 1499.0


def test_the_driver_writes_each_trials_run_from_its_own_thread_as_tune_told_it(smoke_config):
    """TrialRuns hands Tune's events to a writer thread: the run holds every epoch once, is
    closed FINISHED, and carries the trial as it was when Tune told of it, whatever Tune changes
    later; the experiment's end waits for the writes. A fresh callback pickles (Tune keeps it
    with the experiment)."""
    import pickle
    from types import SimpleNamespace

    from autopose.platform.config import load_experiment
    from autopose.platform.tracking import TAG_SEED, TAG_TRIAL, ensure_experiment, find_run
    from autopose.platform.tune import TrialRuns, TrialSetup

    config = load_experiment(smoke_config({"experiment": "writer", "train": {"epochs": 3}}))
    experiment_id = ensure_experiment(config.tracking_uri, config.experiment)
    callback = TrialRuns(TrialSetup(config, "writer", experiment_id))
    pickle.loads(pickle.dumps(callback))
    trial = SimpleNamespace(
        trial_id="w_00000", config={"trial": {"kind": "none", "seed": 4}}, last_result=None, checkpoint=None
    )
    callback.on_trial_start(0, [], trial)
    for epoch in range(3):
        callback.on_trial_result(0, [], trial, {"epoch": epoch, "val_ap": 0.1 * (epoch + 1)})
    trial.config["trial"]["seed"] = 99  # Tune's trial changes after the events: the writer saw a copy
    callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([trial])
    assert callback._writer is None

    run = find_run(config.tracking_uri, experiment_id, "writer/w_00000", key_tag=TAG_TRIAL)
    assert run.info.status == "FINISHED" and run.data.tags[TAG_SEED] == "4"
    history = MlflowClient(config.tracking_uri).get_metric_history(run.info.run_id, "val_ap")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(0, 0.1), (1, 0.2), (2, 0.3)]


def test_a_trial_finds_its_run_by_its_key_once_the_driver_has_opened_it(tmp_path):
    """A trial that started before the driver's writer opened its run (``run_key``, no
    ``run_id``) gets a LookupError until the run exists (its artifacts then wait, as for a lost
    server), and the run itself after."""
    from autopose.platform.runner import TrainingJob, _ReportingHooks

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "late")
    job = TrainingJob(None, None, None, None, {}, tracking_uri=uri, run_key=(experiment_id, "late/t7"))
    hooks = _ReportingHooks(job, session=None)
    assert hooks.tracked
    with pytest.raises(LookupError, match="late/t7"):
        hooks.run()
    opened = TrackedRun.open(uri, experiment_id, run_name="trial", tags={TAG_TRIAL: "late/t7"})
    assert hooks.run().run_id == opened.run_id
    assert not _ReportingHooks(TrainingJob(None, None, None, None, {}), session=None).tracked
