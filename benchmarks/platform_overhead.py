"""Overhead of the platform around the same work, side by side in one run.

The work: one trial of the smoke model (P2Net-R18, narrow, 64×48) with the
"none" baseline, a fixed number of epochs and steps, on a synthetic proxy. It
runs three ways:

* ``direct``: :class:`autopose.engine.train.Trainer` in this process (no Ray, no MLflow);
* ``tune+train(in-process)+mlflow``: ``autopose search`` with that single trial,
  Ray Train ``num_workers: 0`` (the loop runs inside the Tune trial's process);
* ``tune+train(1 worker)+mlflow``: the same with one Ray Train worker (the path a
  GPU cluster takes: a TorchTrainer controller and worker group per trial).

Each line gives the wall time and its ratio to ``direct``, and splits it: Tune
and the trial's own process (start, imports; the driver opens the MLflow run and
logs the epochs), Ray Train around the loop (controller, worker group, reports,
checkpoints, the policy picture), and the loop itself. A last line gives the fixed costs
measured one by one (Ray start, MLflow, the picture, imports in a fresh
process). Prints JSON lines.

    .venv/bin/python benchmarks/platform_overhead.py [--epochs 3] [--steps 10]

(Not benchmarks/platform.py: a file of that name in the script's folder would shadow the
standard library's ``platform`` module, which torch imports, for every benchmark here.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def emit(**record) -> None:
    print(json.dumps({"benchmark": "platform", **record}), flush=True)


def make_data(folder: Path) -> dict[str, str]:
    from autopose.data import build_synth_proxies, generate_synth

    generate_synth(folder, images=24, val_images=6, seed=0, shift="rotate=45", progress=False)
    paths = {split: folder / f"{split}.parquet" for split in ("train", "val")}
    build_synth_proxies(folder, paths, input_size=(64, 48))
    return {split: str(path) for split, path in paths.items()}


def write_config(
    folder: Path, data: dict[str, str], *, epochs: int, steps: int, workers: int, name: str
) -> Path:
    config = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
    config.update(
        experiment=name,
        tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        storage_path=str(folder / "runs"),
    )
    config["data"].update(train=data["train"], val=data["val"])
    config["train"].update(epochs=epochs, steps_per_epoch=steps, num_workers=workers, threads_per_worker=1)
    config["search"]["trials"] = 0
    config["baselines"] = {"random_seeds": [], "handcrafted": False, "none": True}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def direct(config_path: Path) -> tuple[float, float]:
    from autopose.engine.config import AugmentSpec
    from autopose.engine.train import Trainer
    from autopose.platform.config import load_experiment

    config = load_experiment(config_path)
    started = time.perf_counter()
    trainer = Trainer(config.data, config.model, config.train, AugmentSpec(kind="none"), config.space_dict)
    result = trainer.run()
    return time.perf_counter() - started, result.wall_s


def through_platform(config_path: Path) -> dict[str, float]:
    from mlflow import MlflowClient

    from autopose.platform.config import load_experiment
    from autopose.platform.tune import run_search

    config = load_experiment(config_path)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Tune prints its banner on stdout: keep JSON lines clean
        (outcome,) = run_search(config, verbose=0)
    wall = time.perf_counter() - started
    if outcome.status != "TERMINATED":
        raise RuntimeError(f"trial failed: {outcome.error}")
    metrics = MlflowClient(config.tracking_uri).get_run(outcome.run_id).data.metrics
    return {"wall_s": wall, "trial_s": metrics["trial_wall_s"], "train_s": metrics["train_wall_s"]}


def mlflow_costs(folder: Path, data: dict[str, str], epochs: int) -> dict[str, float]:
    """What one trial's tracking costs, measured in this process on an existing database: open
    the run, log params and the epochs (one call each, as the driver does for a trial of real
    training, whose epochs come minutes apart), render and upload the policy picture."""
    from autopose.augment import no_policy
    from autopose.data import ProxyDataset
    from autopose.platform.pictures import render_policy_examples
    from autopose.platform.tracking import TrackedRun, ensure_experiment

    uri = f"sqlite:///{folder / 'costs.db'}"
    started = time.perf_counter()
    experiment_id = ensure_experiment(uri, "costs")
    create = time.perf_counter() - started
    started = time.perf_counter()
    run = TrackedRun.open(uri, experiment_id, run_name="c", tags={"autopose.trial": "c"})
    run.log_params({f"p{i}": i for i in range(40)})
    for epoch in range(epochs):
        run.log_metrics({f"m{i}": float(i) for i in range(30)}, step=epoch)
    logging = time.perf_counter() - started
    started = time.perf_counter()
    rows = [ProxyDataset(Path(data["val"]))[i] for i in range(6)]
    picture = render_policy_examples(no_policy(), rows, folder / "examples.png", title="costs")
    run.log_artifact(picture, "policy")
    run.finish()
    return {
        "mlflow_new_database_s": create,
        "mlflow_run_logging_s": logging,
        "policy_picture_s": time.perf_counter() - started,
    }


def import_costs() -> dict[str, float]:
    """Seconds a fresh Python process spends importing what a trial's process needs."""

    def fresh(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        return time.perf_counter() - started

    bare = fresh("pass")
    return {
        "import_torch_s": fresh("import torch") - bare,
        "import_engine_s": fresh("import autopose.engine.train") - bare,
        "import_platform_s": fresh("import autopose.platform.tune, autopose.platform.tracking") - bare,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="autopose-bench-") as tmp:
        folder = Path(tmp)
        data = make_data(folder / "data")
        local = write_config(folder, data, epochs=args.epochs, steps=args.steps, workers=0, name="in-process")
        worker = write_config(
            folder, data, epochs=args.epochs, steps=args.steps, workers=1, name="one-worker"
        )
        work = {
            "epochs": args.epochs,
            "steps_per_epoch": args.steps,
            "batch": 8,
            "input": "64x48",
            "cpus": os.cpu_count(),
        }

        direct(local)  # warm the imports and caches so that direct is not charged for them
        direct_wall, direct_train = direct(local)
        emit(case="direct", wall_s=round(direct_wall, 2), train_s=round(direct_train, 2), ratio=1.0, **work)

        import ray

        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
        ray_init = time.perf_counter() - started
        try:
            for case, path in (
                ("tune+train(in-process)+mlflow", local),
                ("tune+train(1 worker)+mlflow", worker),
            ):
                measured = through_platform(path)
                # where the time went, beside the training loop itself
                parts = {
                    "tune_and_trial_start_s": measured["wall_s"] - measured["trial_s"],
                    "train_framework_s": measured["trial_s"] - measured["train_s"],
                    "training_loop_s": measured["train_s"],
                }
                emit(
                    case=case,
                    wall_s=round(measured["wall_s"], 2),
                    ratio=round(measured["wall_s"] / direct_wall, 2),
                    ratio_with_ray_init=round((measured["wall_s"] + ray_init) / direct_wall, 2),
                    overhead_s=round(measured["wall_s"] - direct_wall, 2),
                    **{k: round(v, 2) for k, v in parts.items()},
                    dominant=max(parts, key=parts.get),
                    **work,
                )
        finally:
            ray.shutdown()
        fixed = {"ray_init_s": ray_init, **mlflow_costs(folder, data, args.epochs), **import_costs()}
        emit(
            case="fixed_costs",
            **{k: round(v, 2) for k, v in fixed.items()},
            dominant=max(fixed, key=fixed.get),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
