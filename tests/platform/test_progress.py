"""The demo's progress line, from the trial rows ``compare`` reads (no Ray, no MLflow)."""

from __future__ import annotations

from autopose.platform.compare import PolicyRow
from autopose.platform.demo import progress_line


def _row(kind, seed, status, epochs_done=0, val_ap=None, started_s=None, candidate=None) -> PolicyRow:
    return PolicyRow(
        kind=kind,
        seed=seed,
        val_ap=val_ap,
        cost_cpu_s=None,
        cost_gpu_s=None,
        run_id=f"{kind}{seed}",
        status=status,
        search="demo",
        promoted=False,
        candidate=candidate,
        epochs_done=epochs_done,
        started_s=started_s,
    )


def test_running_trials_show_the_epoch_in_progress_and_the_time_left_at_the_pace_so_far():
    rows = [
        _row("none", 0, "FINISHED", 2, 0.1, started_s=1000.0),
        _row("search", 0, "RUNNING", 1, 0.011, started_s=1000.0),
        _row("random", 0, "RUNNING", 0, started_s=1050.0),
    ]
    # 3 of 4 × 2 = 8 epochs done in 120 s since the first start: 5 left take 200 s (3 min)
    line = progress_line(rows, planned=4, epochs=2, now=1120.0)
    assert line == (
        "1/4 trials finished; running: random-0 epoch 1/2, search-0 epoch 2/2 (AP 0.011); "
        "about 3 min of trials left"
    )


def test_before_any_epoch_and_after_the_last_there_is_no_estimate():
    assert progress_line([], planned=3, epochs=2, now=0.0) == "0/3 trials finished"
    started = [_row("none", 0, "RUNNING", 0, started_s=10.0)]
    assert progress_line(started, planned=3, epochs=2, now=40.0) == (
        "0/3 trials finished; running: none-0 epoch 1/2"
    )
    done = [_row("none", 0, "FINISHED", 2, 0.2, started_s=0.0)]
    selection = _row("policy", 0, "RUNNING", 1, 0.3, started_s=50.0, candidate="search-0")
    assert progress_line([*done, selection], planned=1, epochs=2, now=60.0) == (
        "1/1 trials finished; running: selection search-0 seed 0 epoch 2/2 (AP 0.300)"
    )
    # a short wait is said in tens of seconds
    half = [_row("none", 0, "FINISHED", 2, 0.2, started_s=0.0), _row("none", 1, "RUNNING", 0, started_s=20.0)]
    assert progress_line(half, planned=2, epochs=2, now=30.0).endswith("about 30 s of trials left")


def test_before_the_trials_the_line_shows_the_base_models_epoch(tmp_path):
    """The base model trains first (minutes in the demo): its epoch, read from its MLflow run."""
    from mlflow import MlflowClient

    from autopose.platform.tracking import TAG_KIND, ensure_experiment
    from autopose.platform.warm_start import BASE_KIND, TAG_USED_BY, base_progress

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "demo")
    assert base_progress(uri, "demo", "demo") is None  # no base run yet
    client = MlflowClient(uri)
    run = client.create_run(experiment_id, tags={TAG_KIND: BASE_KIND, TAG_USED_BY: "demo"})
    client.log_param(run.info.run_id, "train.epochs", "8")
    assert base_progress(uri, "demo", "demo") == (0, 8)
    client.log_metric(run.info.run_id, "epoch", 2.0, step=2)
    assert base_progress(uri, "demo", "demo") == (3, 8)
    assert progress_line([], planned=5, epochs=2, now=0.0, base=(3, 8)) == (
        "0/5 trials finished; training the base model: epoch 4/8"
    )
    client.set_terminated(run.info.run_id)
    assert base_progress(uri, "demo", "demo") is None  # done: the trials' line takes over
    assert base_progress(uri, "demo", "another search") is None
