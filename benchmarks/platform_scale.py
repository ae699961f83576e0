"""Does the platform hold a thousand-trial search? The driver, MLflow, ``compare`` and the report.

The trials do no training: each reports ``--epochs`` results of a baseline trial's metrics to
Tune and returns (``run_search(trial_function=...)``), so that what is measured is the search's
driver (Tune, and :class:`autopose.platform.tune.TrialRuns`, the one writer of every trial's
MLflow run: open, each epoch, close with its cost), then ``autopose compare``'s reading of the
experiment (:func:`autopose.platform.compare.collect`) and the report's
(:func:`autopose.platform.report.write_report`). For each tracking store (a SQLite file, a local
``mlflow server`` on SQLite) and each size (``--trials``, default 100 then 1,000), one line:

* ``results_per_s``: results reported and logged per second of the search's wall time; target
  ≥ 200 (the driver is never a cluster search's bottleneck: a trial of real training reports an
  epoch every few minutes, so 200/s is more than a thousand trials need at once), beside
  ``tune_alone_results_per_s``: the same trials on a bare Tuner without autopose or MLflow;
* ``trials_done_s``: when the last trial reported its last result (Tune's timestamps, whole
  seconds): how long the trials took beside this driver; the rest of ``search_s`` is the driver's
  writer thread finishing what the tracking store has not taken yet;
* ``compare_s`` (target ≤ 5 s at 1,000 runs) and ``report_s`` (≤ 30 s);
* ``driver_peak_rss_mb``: the driver process's peak resident memory after the search, and its growth.

Each line checks that MLflow holds every epoch of every trial once, and every run FINISHED.

    .venv/bin/python benchmarks/platform_scale.py [--trials 100 1000] [--epochs 20] [--concurrent 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"results_per_s": 200.0, "compare_s_at_1000": 5.0, "report_s_at_1000": 30.0}


def emit(**record) -> None:
    print(json.dumps({"benchmark": "platform_scale", **record}), flush=True)


def report_only(config: dict[str, Any], setup) -> None:
    """A trial that trains nothing: a baseline trial's per-epoch metrics, reported to Tune."""
    report_epochs(int(config["trial"]["seed"]), setup.experiment.train.epochs)


def report_epochs(seed: int, epochs: int) -> None:
    import ray.tune

    node = ray.get_runtime_context().get_node_id()
    for epoch in range(epochs):
        ap = 0.05 + 0.3 * (epoch + 1) / epochs + 0.001 * (seed % 17)
        ray.tune.report(
            {
                "epoch": float(epoch),
                "step": float((epoch + 1) * 60),
                "train_loss": 1.0 / (epoch + 1),
                "val_ap": ap,
                "val_ap50": min(1.0, ap * 1.6),
                "val_ap75": ap * 0.8,
                "val_ar": min(1.0, ap * 1.2),
                "lr": 1e-3,
                "epoch_s": 0.01,
                "train_samples_per_s": 1000.0,
                "train_cpu_s": 0.01 * (epoch + 1),
                "train_wall_s": 0.01 * (epoch + 1),
                "node_id": node,
            }
        )


def make_data(folder: Path) -> dict[str, str]:
    from autopose.data import build_synth_proxies, generate_synth

    generate_synth(folder, images=8, val_images=4, seed=0, progress=False)
    paths = {split: folder / f"{split}.parquet" for split in ("train", "val")}
    build_synth_proxies(folder, paths, input_size=(64, 48))
    return {split: str(path) for split, path in paths.items()}


def write_config(
    folder: Path, data: dict[str, str], *, name: str, uri: str, trials: int, epochs: int, concurrent: int
) -> Path:
    config = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
    config.update(experiment=name, tracking_uri=uri, storage_path=str(folder / "runs"), examples=0)
    config["data"].update(train=data["train"], val=data["val"], search_val=None)
    # Light trials: up to `concurrent` at once on the machine, each actor reused for the next.
    config["train"].update(epochs=epochs, cpus_per_worker=2.0 / concurrent, threads_per_worker=1)
    config["search"]["trials"] = 0
    config["baselines"] = {"random_seeds": list(range(trials - 1)), "handcrafted": False, "none": True}
    config["tune"]["max_concurrent"] = concurrent
    config["tpe"]["trials"] = 0
    config["pba"]["population"] = 0
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """A local ``mlflow server`` on SQLite (two workers: the machine's cores)."""
    port = _free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server"]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'server.db'}"]
    command += ["--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "2"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(folder / "server.log", "ab")  # noqa: SIM115 (the server's, for its lifetime)
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow server did not start: see {folder / 'server.log'}") from None
            time.sleep(0.3)


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def check_logged(uri: str, name: str, trials: int, epochs: int) -> dict[str, Any]:
    """Every run FINISHED with each epoch once (read through MLflow, not timed)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=50_000)
    finished = sum(r.info.status == "FINISHED" for r in runs)
    sample = runs[:: max(1, len(runs) // 20)]  # every epoch's steps of about 20 runs
    complete = all(
        sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_ap")) == list(range(epochs))
        for r in sample
    )
    return {"runs": len(runs), "finished": finished, "epochs_complete": complete and len(runs) == trials}


def tune_alone(folder: Path, trials: int, epochs: int, concurrent: int) -> float:
    """Results per second of the same trials on a bare Tuner (no autopose, no MLflow): the most
    this machine's Tune gives, to tell the driver's own share of the time from Tune's."""
    import ray.tune

    def trainable(config: dict[str, Any]) -> None:
        report_epochs(int(config["seed"]), epochs)

    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"cpu": 2.0 / concurrent}),
        param_space={"seed": ray.tune.grid_search(list(range(trials)))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=ray.tune.RunConfig(name=f"alone-{trials}", storage_path=str(folder / "alone"), verbose=0),
    )
    started = time.perf_counter()
    tuner.fit()
    return trials * epochs / (time.perf_counter() - started)


def last_result_time(tune_folder: Path) -> float:
    """When the search's last result was reported (Tune's ``timestamp``, seconds since the epoch)."""
    return max(
        json.loads(line).get("timestamp", 0)
        for path in tune_folder.glob("*/result.json")
        for line in path.read_text().splitlines()
        if line.strip()
    )


def one_search(
    folder: Path, data, uri: str, store: str, trials: int, epochs: int, concurrent: int, alone: float
) -> None:
    from autopose.platform.compare import collect
    from autopose.platform.config import load_experiment
    from autopose.platform.report import write_report
    from autopose.platform.tune import run_search

    name = f"scale-{store}-{trials}"
    config = load_experiment(
        write_config(folder, data, name=name, uri=uri, trials=trials, epochs=epochs, concurrent=concurrent)
    )
    rss_before = peak_rss_mb()
    started, wall_started = time.perf_counter(), time.time()
    outcomes = run_search(config, verbose=0, trial_function=report_only)
    search_s = time.perf_counter() - started
    trials_done_s = last_result_time(folder / "runs" / "tune" / name) - wall_started
    rss_after = peak_rss_mb()
    assert all(o.status == "TERMINATED" for o in outcomes), [o.error for o in outcomes if o.error][:3]

    started = time.perf_counter()
    _, rows = collect(uri, name)
    compare_s = time.perf_counter() - started
    started = time.perf_counter()
    write_report(
        folder / f"report-{name}",
        config,
        data_coco_proxy=Path(data["val"]),
        full_run=None,
        evaluation=None,
        timings={},
        budget={},
    )
    report_s = time.perf_counter() - started
    logged = check_logged(uri, name, trials, epochs)
    emit(
        store=store,
        trials=trials,
        epochs=epochs,
        concurrent=concurrent,
        results=trials * epochs,
        search_s=round(search_s, 1),
        results_per_s=round(trials * epochs / search_s, 1),
        trials_done_s=round(trials_done_s, 1),
        tune_alone_results_per_s=round(alone, 1),
        compare_s=round(compare_s, 2),
        compare_rows=len(rows),
        report_s=round(report_s, 2),
        driver_peak_rss_mb=round(rss_after),
        driver_peak_rss_growth_mb=round(rss_after - rss_before),
        **logged,
        targets=TARGETS,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--stores", nargs="+", choices=["sqlite", "server"], default=["sqlite", "server"])
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="autopose-scale-") as tmp:
        folder = Path(tmp)
        data = make_data(folder / "data")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            alone = {
                trials: tune_alone(folder, trials, args.epochs, args.concurrent) for trials in args.trials
            }
            for store in args.stores:
                server = None
                if store == "server":
                    server, uri = start_server(folder)
                else:
                    uri = f"sqlite:///{folder / 'mlflow.db'}"
                try:
                    for trials in args.trials:
                        one_search(
                            folder, data, uri, store, trials, args.epochs, args.concurrent, alone[trials]
                        )
                finally:
                    if server is not None:
                        stop_server(server)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
