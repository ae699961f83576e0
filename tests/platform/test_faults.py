"""Faults a search or a training survives: processes killed with SIGKILL, lost tracking servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from autopose.platform.config import load_experiment
from autopose.platform.tracking import TAG_ATTEMPT_STARTED, TAG_ATTEMPTS, TAG_TRIAL, run_status_counts
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
        # Killed once and started again; the driver timed both attempts, the killed one too.
        assert run.data.tags[TAG_ATTEMPTS] == "2" and TAG_ATTEMPT_STARTED in run.data.tags
        walls = client.get_metric_history(run.info.run_id, "attempt_wall_s")
        assert sorted(m.step for m in walls) == [0, 1] and all(m.value > 0 for m in walls)
        assert run.data.metrics["trial_wall_s"] == pytest.approx(sum(m.value for m in walls))
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
    assert client.get_run(interrupted).data.tags[TAG_ATTEMPTS] == "2"
    assert client.get_run(finished_before).data.tags[TAG_ATTEMPTS] == "1"


# -- the tracking server goes away ------------------------------------------------------------------------
def _free_port() -> int:

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_mlflow_server(db, artifacts, port: int, log):
    """A real ``mlflow server`` (SQLite backend) in its own process group, answering /health."""

    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{db}",
    ]
    command += ["--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--workers", "1"]
    # No background job runner: it starts a dozen worker processes the test does not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                _stop(server)
                raise AssertionError(f"mlflow server did not start on port {port}") from None
            time.sleep(0.3)


def _stop(server) -> None:

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its uvicorn worker
    server.wait(timeout=30)


def _logged_epochs(db) -> list[int]:
    """``val_ap`` steps in the server's database, read directly (the server may be down)."""

    try:
        with sqlite3.connect(db, timeout=5) as connection:
            rows = connection.execute("SELECT step FROM metrics WHERE key = 'val_ap'").fetchall()
    except sqlite3.Error:  # not created yet
        return []
    return sorted(step for (step,) in rows)


@pytest.mark.timeout(300, method="signal")
def test_tracking_server_lost_mid_search_training_goes_on_and_resume_completes_the_runs(
    ray_cluster, smoke_config, tmp_path, caplog
):
    """A real ``mlflow server`` is SIGKILLed once the first trial's first epoch is logged: that trial
    trains to its end, the next one starts and trains without a run, the driver says once that the
    server went away and, at the end, what the runs miss; what was logged stays. Started again on
    the same port and database, ``--resume`` logs the missing epochs to the same run (same steps,
    each once), opens the run the second trial could not, and closes both FINISHED."""

    db, artifacts, port = tmp_path / "server.db", tmp_path / "artifacts", _free_port()
    uri = f"http://127.0.0.1:{port}"
    epochs = 6
    overrides = {
        "experiment": "lost-server",
        "tracking_uri": uri,
        "search": {"trials": 0},
        "baselines": {"random_seeds": [0], "handcrafted": False, "none": True},
        "train": {"epochs": epochs, "steps_per_epoch": 2},
        "tune": {"max_failures": 0, "max_concurrent": 1},
        "examples": 0,
    }
    config = load_experiment(smoke_config(overrides))
    caplog.set_level("WARNING", logger="autopose.platform.tune")
    with open(tmp_path / "server.log", "ab") as log:
        server = _start_mlflow_server(db, artifacts, port, log)
        try:
            killed_after: list[list[int]] = []

            def kill_after_first_epoch() -> None:
                deadline = time.monotonic() + 120
                while not _logged_epochs(db) and time.monotonic() < deadline and server.poll() is None:
                    time.sleep(0.05)
                _stop(server)
                killed_after.append(_logged_epochs(db))

            killer = threading.Thread(target=kill_after_first_epoch, daemon=True)
            killer.start()
            started = time.monotonic()
            outcomes = run_search(config, verbose=0)
            search_s = time.monotonic() - started
            killer.join(timeout=30)
            assert server.poll() is not None, "the server was not killed during the search"

            # Both trials trained every epoch although the server went away after the first one.
            assert [o.status for o in outcomes] == ["TERMINATED"] * 2, [o.error for o in outcomes]
            assert all(o.val_ap is not None and o.tracking is not None for o in outcomes)
            said = [r.getMessage() for r in caplog.records if r.name == "autopose.platform.tune"]
            assert len(said) == 2, said  # once when it went away, once at the end: not per epoch
            assert "does not answer" in said[0] and uri in said[0] and "training goes on" in said[0]
            assert "still does not answer" in said[1] and uri in said[1] and "--resume" in said[1]
            assert all(f"{o.kind}-{o.seed}-{o.trial_id}" in said[1] for o in outcomes)
            # What was logged before the kill is kept; the rest waits in Tune's results.
            before = _logged_epochs(db)
            assert before == killed_after[0] and before[:1] == [0] and len(before) < epochs, before
            assert search_s < 120, f"a lost server held the search up ({search_s:.0f} s)"

            caplog.clear()
            server = _start_mlflow_server(db, artifacts, port, log)
            resumed = run_search(config, resume=True, verbose=0)
        finally:
            _stop(server)

    assert [(o.status, o.tracking) for o in resumed] == [("TERMINATED", None)] * 2
    assert not [r for r in caplog.records if "does not answer" in r.getMessage()]
    local = MlflowClient(f"sqlite:///{db}")
    runs = local.search_runs([local.get_experiment_by_name("lost-server").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(o.run_id for o in resumed)
    assert sorted(r.data.tags[TAG_TRIAL] for r in runs) == sorted(
        f"lost-server/{o.trial_id}" for o in resumed
    )
    for run in runs:
        assert run.info.status == "FINISHED" and "autopose.stopped_early" not in run.data.tags
        # Every epoch exactly once under its own step, with the values the trial reported to Tune.
        history = local.get_metric_history(run.info.run_id, "val_ap")
        assert sorted(m.step for m in history) == list(range(epochs))
        epoch_values = sorted(m.value for m in local.get_metric_history(run.info.run_id, "epoch"))
        assert epoch_values == list(range(epochs))
        assert run.data.params["kind"] in ("none", "random") and "trial_wall_s" in run.data.metrics


class _Relay:
    """A TCP relay on 127.0.0.1 in front of the tracking server that the test can cut and mend on
    the same port: cut, connections are refused and open ones dropped (a lost network path)."""

    def __init__(self, target_port: int):
        self.port, self.target_port = _free_port(), target_port
        self.open: set = set()
        self.listener = None

    def mend(self) -> None:

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.1)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self.listener = self.listener, None
        listener.close()
        for connection in list(self.open):
            connection.close()

    def _accept(self, listener) -> None:

        while self.listener is listener:
            try:
                near, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.target_port))
            self.open.update((near, far))
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            self.open.discard(end)
            end.close()


@pytest.mark.timeout(300, method="signal")
def test_tracking_server_back_mid_trial_gets_the_waiting_epochs(ray_cluster, smoke_config, tmp_path, caplog):
    """The path to a real ``mlflow server`` is cut once the trial's first epoch is logged and mended
    once the driver has failed to write and said so: the driver sends the waiting epochs (same
    steps, each once), says once that the server went away and once that it is back, and the run
    ends FINISHED and complete without any ``--resume``."""

    db, artifacts = tmp_path / "server.db", tmp_path / "artifacts"
    # The driver writes from its own thread, seconds behind the trial while it opens the run on a
    # busy machine: the trial must still report when the path is mended (20 × 4 steps, ~25 s).
    epochs = 20
    with open(tmp_path / "server.log", "ab") as log:
        server = _start_mlflow_server(db, artifacts, _free_port(), log)
        relay = _Relay(int(server.args[server.args.index("--port") + 1]))
        relay.mend()
        uri = f"http://127.0.0.1:{relay.port}"
        overrides = {
            "experiment": "lost-link",
            "tracking_uri": uri,
            "search": {"trials": 0},
            "baselines": {"random_seeds": [], "handcrafted": False, "none": True},
            "train": {"epochs": epochs, "steps_per_epoch": 4},
            "tune": {"max_failures": 0},
            "examples": 0,
        }
        config = load_experiment(smoke_config(overrides))
        caplog.set_level("WARNING", logger="autopose.platform.tune")
        mended_after: list[int] = []

        def cut_then_mend() -> None:
            deadline = time.monotonic() + 120
            while not _logged_epochs(db) and time.monotonic() < deadline:
                time.sleep(0.05)
            relay.cut()
            # Mend once the driver has said that the server went away (a write of its failed), at
            # the latest epoch Tune's record of the trial holds then.
            while time.monotonic() < deadline:
                if any("does not answer" in r.getMessage() for r in list(caplog.records)):
                    rows = [
                        json.loads(line)
                        for path in (tmp_path / "runs" / "tune" / "lost-link").glob("*/result.json")
                        for line in path.read_text().splitlines()
                    ]
                    mended_after.append(
                        max((int(row["epoch"]) for row in rows if "epoch" in row), default=-1)
                    )
                    break
                time.sleep(0.05)
            relay.mend()

        worker = threading.Thread(target=cut_then_mend, daemon=True)
        worker.start()
        try:
            (outcome,) = run_search(config, verbose=0)
        finally:
            worker.join(timeout=30)
            _stop(server)

    assert outcome.status == "TERMINATED" and outcome.tracking is None
    assert mended_after and mended_after[0] < epochs - 1, f"mended after epoch {mended_after}: too late"
    said = [r.getMessage() for r in caplog.records if r.name == "autopose.platform.tune"]
    assert len(said) == 2 and "does not answer" in said[0] and "answers again" in said[1], said
    assert uri in said[0] and uri in said[1]
    local = MlflowClient(f"sqlite:///{db}")
    (run,) = local.search_runs([local.get_experiment_by_name("lost-link").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_id == outcome.run_id
    assert sorted(m.step for m in local.get_metric_history(run.info.run_id, "val_ap")) == list(range(epochs))
    assert sorted(m.value for m in local.get_metric_history(run.info.run_id, "epoch")) == list(range(epochs))
    # The final policy, logged once the server answered again (the server keeps artifacts on disk).
    assert list(artifacts.glob(f"*/{run.info.run_id}/artifacts/policy/policy.json"))


def test_run_orphaned_by_a_killed_driver_is_marked_failed(ray_cluster, smoke_config):
    """A driver killed before Tune saved a trial leaves that trial's run RUNNING under a trial id
    no later search knows (the resumed search starts it again under a new id). Once the search's
    trials end, such a run is closed FAILED and tagged ``autopose.orphaned``; the search's own
    runs are untouched."""
    from autopose.platform.tracking import TAG_SEARCH, TrackedRun, ensure_experiment

    overrides = {
        "experiment": "orphans",
        "search": {"trials": 0},
        "baselines": {"random_seeds": [], "handcrafted": False, "none": True},
        "train": {"epochs": 1, "steps_per_epoch": 1},
        "examples": 0,
    }
    config = load_experiment(smoke_config(overrides))
    experiment_id = ensure_experiment(config.tracking_uri, "orphans")
    # What the killed driver's trial left: its run, RUNNING, under a trial id Tune never saved.
    orphan = TrackedRun.open(
        config.tracking_uri,
        experiment_id,
        run_name="none-0",
        tags={TAG_TRIAL: "orphans/lost_00000", TAG_SEARCH: "orphans"},
    )
    elsewhere = TrackedRun.open(  # a run of another search in the same experiment: not ours to close
        config.tracking_uri,
        experiment_id,
        run_name="none-0",
        tags={TAG_TRIAL: "other/lost_00000", TAG_SEARCH: "other"},
    )
    (outcome,) = run_search(config, verbose=0)
    assert outcome.status == "TERMINATED"

    client = MlflowClient(config.tracking_uri)
    assert client.get_run(orphan.run_id).info.status == "FAILED"
    assert client.get_run(orphan.run_id).data.tags["autopose.orphaned"] == "true"
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    assert "autopose.orphaned" not in client.get_run(outcome.run_id).data.tags
    assert client.get_run(elsewhere.run_id).info.status == "RUNNING"
