"""``autopose demo``: the whole loop on one machine, on data it makes itself.

Stages (each prints one line when it starts and one with its time when it ends):

1. data — a synthetic train split and a val split with a known shift
   (:data:`autopose.data.synth.DEMO_SHIFT`: val figures turned up to ±45° and
   darker), a holdout split drawn like val for the search's policy step and the
   selection (so the val split the demo reports stays unseen by every choice),
   plus the real COCO samples shipped in the package;
2. proxies — Parquet proxies of train, val, holdout and the COCO samples;
3. search — a Ray Tune experiment on local Ray: differentiable-search trials
   beside the baselines (random ×2 seeds, hand-crafted, none), then the
   selection stage (the search trial's exported policy retrained from the same
   start; none and hand-crafted reused), tracked in MLflow (SQLite in the work
   folder);
4. compare — the table of every trial, and the candidates by holdout AP;
5. promote — the selected candidate's policy trained on Ray Train with 2 workers;
6. evaluate — the trained model on the val split (ground-truth boxes) and on the
   real COCO samples (the bundled detector boxes);
7. report — HTML with PNGs next to it (see :mod:`autopose.platform.report`).

Re-running continues where it stopped, with no clean-up: the synthetic data and
proxies are reused when their inputs match, a search whose planned trials all
finished in MLflow is not run again (a half-finished one resumes through Tune's
restore), a finished full training of the promoted run is reused (a half-finished
one resumes from its checkpoint). The experiment is the package's ``demo_data/demo.yaml``
(``demo_tiny.yaml`` for the tiny budget; ``search_spaces/`` links to both), loaded like any
experiment file with the work folder's paths (:func:`demo_config`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autopose.errors import AutoposeError, first_line
from autopose.files import atomic_write
from autopose.platform.config import ExperimentConfig, load_experiment, storage_join

DEMO_DATA = Path(__file__).parent / "demo_data"
COCO_SAMPLES = DEMO_DATA / "coco_samples"
COCO_ANN = COCO_SAMPLES / "test_coco.json"
COCO_DETS = COCO_SAMPLES / "test_coco_det_AP_H_56.json"
STATE_FILE = "demo_state.json"
EXAMPLE_CROP = (256, 192)  # the COCO samples' proxy: only for pictures, so a comfortable size

# The demo's experiments, shipped as files a user can read and copy (search_spaces/ links to them).
DEMO_SPACE_FILE = DEMO_DATA / "demo_space.yaml"
SHIFT_OPS = ("Rotate", "Brightness")  # the ops that match DEMO_SHIFT

BASE_THREADS = max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class DemoBudget:
    """How much work the demo does (``full``: the 8-minute demo; ``tiny``: the test's): the
    experiment file it runs (the model, the trials' budget, the search's settings and why, in
    that file's comments) and the synthetic data it makes for it."""

    name: str
    experiment: Path  # the experiment YAML; its data paths are replaced by the work folder's
    train_images: int
    val_images: int
    holdout_images: int  # the search's policy step reads these, never the scored val split
    max_persons: int
    clutter: bool
    # The train proxy's canvas (build_proxy's margin): turns and zoom-outs bring in the background
    # around each figure instead of black corners; 1.5 holds a ±45° turn of the crop nearly whole.
    train_margin: float

    def to_dict(self) -> dict[str, Any]:
        """The budget as JSON-ready data (the demo's state file, the report)."""
        return {**asdict(self), "experiment": str(self.experiment)}

    @property
    def input_size(self) -> tuple[int, int]:
        """The crop size the experiment's model takes (the proxies are built at it)."""
        from autopose.engine.config import load_yaml

        height, width = load_yaml(self.experiment)["model"]["input_size"]
        return int(height), int(width)


BUDGETS: dict[str, DemoBudget] = {
    "full": DemoBudget(
        name="full",
        experiment=DEMO_DATA / "demo.yaml",
        train_images=1000,
        val_images=150,
        holdout_images=150,
        max_persons=1,
        clutter=False,
        train_margin=1.5,
    ),
    "tiny": DemoBudget(
        name="tiny",
        experiment=DEMO_DATA / "demo_tiny.yaml",
        train_images=24,
        val_images=8,
        holdout_images=8,
        max_persons=3,
        clutter=True,
        train_margin=1.5,
    ),
}


# -- printing progress -------------------------------------------------------------------------------
class Progress:
    """One line per stage on stdout: ``[3/7] search …`` then ``[3/7] search: done in 412.0 s``."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.index = 0
        self.stream = stream if stream is not None else sys.stdout
        self.started = time.perf_counter()

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, what: str, timings: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Time a stage; the block fills ``note`` (shown after the time) and ``reused``."""
        self.index += 1
        prefix = f"[{self.index}/{self.total}] {name}"
        self.say(f"{prefix}: {what} …")
        info: dict[str, Any] = {"note": "", "reused": False}
        started = time.perf_counter()
        yield info
        wall = time.perf_counter() - started
        previous = timings.get(name, {})
        entry = {"wall_s": round(wall, 2), "reused": bool(info["reused"])}
        if info["reused"] and previous.get("first_wall_s") is not None:
            entry["first_wall_s"] = previous["first_wall_s"]
        elif not info["reused"]:
            entry["first_wall_s"] = round(wall, 2)
        timings[name] = entry
        note = f" ({info['note']})" if info["note"] else ""
        total = time.perf_counter() - self.started
        outcome = "reused" if info["reused"] else "done"
        self.say(f"{prefix}: {outcome} in {wall:.1f} s{note}  [{total:.0f} s so far]")


# -- state between runs ------------------------------------------------------------------------------
def _read_state(workdir: Path) -> dict[str, Any]:
    path = workdir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as stream:
        stream.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- stage 1–2: data ---------------------------------------------------------------------------------
@dataclass
class DemoData:
    """Where the demo's data lives."""

    synth: Path  # OUT/{train,val,holdout}/{images,annotations.json}
    train: Path
    val: Path
    search_val: Path  # the holdout split: what the search's policy step sees instead of val
    coco: Path  # proxy of the real COCO samples (pictures)

    @property
    def val_ann(self) -> Path:
        return self.synth / "val" / "annotations.json"

    @property
    def val_images(self) -> Path:
        return self.synth / "val" / "images"


def prepare_synth(
    workdir: Path, budget: DemoBudget, *, seed: int = 0, shift: str | None = None
) -> tuple[Path, bool]:
    """The synthetic train/val/holdout splits of ``budget``, val and holdout shifted by ``shift``
    (a name of :data:`~autopose.data.synth.KNOWN_SHIFTS`; default the demo's combined shift);
    reused when finished ones of the same settings are there. Returns ``(folder, reused)``."""
    from autopose.data.synth import DEMO_SHIFT, KNOWN_SHIFTS, SYNTH_GENERATOR, generate_synth

    val_shift = DEMO_SHIFT if shift is None else KNOWN_SHIFTS[shift]
    folder = workdir / "data" / (f"synth-{budget.name}" if shift is None else f"synth-{budget.name}-{shift}")
    marker = folder / "synth.json"
    settings = {
        "generator": SYNTH_GENERATOR,
        "train_images": budget.train_images,
        "val_images": budget.val_images,
        "holdout_images": budget.holdout_images,
        "max_persons": budget.max_persons,
        "clutter": budget.clutter,
        "seed": seed,
        "shift": val_shift.to_text(),
    }
    splits = ("train", "val", "holdout")
    splits_there = all((folder / split / "annotations.json").is_file() for split in splits)
    if splits_there and marker.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            if json.loads(marker.read_text()) == settings:
                return folder, True
    generate_synth(
        folder,
        images=budget.train_images,
        val_images=budget.val_images,
        holdout_images=budget.holdout_images,
        max_persons=budget.max_persons,
        clutter=budget.clutter,
        seed=seed,
        shift=val_shift,
        progress=False,
    )
    _write_json(marker, settings)  # written last: its presence means the split is whole
    return folder, False


PROXY_COUNT = 4  # train, val, holdout, COCO samples


def prepare_proxies(workdir: Path, budget: DemoBudget, synth: Path) -> tuple[DemoData, int]:
    """Parquet proxies of train, val, holdout and the COCO samples (``build_proxy`` reuses a finished
    file of the same inputs). Returns the paths and how many were reused."""
    from autopose.data import build_proxy, build_synth_proxies

    input_size = budget.input_size  # read from the experiment file once
    height, width = input_size
    folder = workdir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    data = DemoData(
        synth=synth,
        train=folder / f"train-{synth.name}-{height}x{width}.parquet",
        val=folder / f"val-{synth.name}-{height}x{width}.parquet",
        search_val=folder / f"holdout-{synth.name}-{height}x{width}.parquet",
        coco=folder / f"coco-samples-{EXAMPLE_CROP[0]}x{EXAMPLE_CROP[1]}.parquet",
    )
    splits = {"train": data.train, "val": data.val, "holdout": data.search_val}
    reports = build_synth_proxies(synth, splits, input_size=input_size, train_margin=budget.train_margin)
    reused = sum(report.reused for report in reports.values())
    report = build_proxy(COCO_ANN, COCO_SAMPLES, data.coco, input_size=EXAMPLE_CROP, progress=False)
    reused += int(report.reused)
    return data, reused


# -- the experiment ----------------------------------------------------------------------------------
def demo_config(
    workdir: Path,
    budget: DemoBudget,
    data: DemoData,
    *,
    name: str | None = None,
    seed: int = 0,
    random_seeds: tuple[int, ...] | None = None,
) -> ExperimentConfig:
    """The demo's experiment: ``budget.experiment`` loaded like any experiment file, with the work
    folder's data, MLflow store and storage, and optionally another name, seed or random seeds.

    Every trial trains in its own process (``num_workers: 0``, one CPU each, so that a
    2-core machine runs two trials at once); the full training uses 2 Ray Train workers.
    """
    overrides: dict[str, Any] = {
        "tracking_uri": f"sqlite:///{(workdir / 'mlflow.db').absolute()}",
        "storage_path": str((workdir / "runs").absolute()),
        "data": {"train": str(data.train), "val": str(data.val), "search_val": str(data.search_val)},
        "train": {"seed": seed},
        # The base trains before any trial, alone on the machine: two threads where there are two
        # cores (placement only: the cached base's key does not change).
        "warm_start": {"cpus_per_worker": float(BASE_THREADS), "threads_per_worker": BASE_THREADS},
    }
    if name is not None:
        overrides["experiment"] = name
    if random_seeds is not None:
        overrides["baselines"] = {"random_seeds": list(random_seeds)}
    return load_experiment(budget.experiment, overrides)


# -- Ray and the console ------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the console to the demo's own lines: Tune's legacy (silent at verbose 0) output
    instead of its status boxes, no MLflow download bars or INFO lines. Restored afterwards."""
    import mlflow  # noqa: F401  (its import configures its loggers: set their levels after it)

    from autopose.platform.tracking import scoped_settings

    environment = {"RAY_AIR_NEW_OUTPUT": "0", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with scoped_settings(environment, ("mlflow", "alembic", "ray.tune", "ray.train")):
        yield


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """A local Ray for the demo's stages (started once; an already connected Ray is used as is).

    Worker output stays in Ray's log files (``log_to_driver=False``): the demo prints its
    own progress, and with ``say`` where the dashboard and those log files are. The dashboard
    stays on, bound to 127.0.0.1 (Ray Train V2 leaks placement groups without it).
    """
    import ray

    if ray.is_initialized():
        yield
        return
    try:
        context = ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            configure_logging=True,
            logging_level="ERROR",
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        first = first_line(error)
        raise AutoposeError(f"cannot start a local Ray ({first})") from None
    if say is not None:
        logs = Path(context.address_info["session_dir"]) / "logs"
        dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else "off"
        say(f"      Ray: dashboard {dashboard}, worker logs in {logs}")
    try:
        yield
    finally:
        ray.shutdown()


def known_answer_configs(
    workdir: Path,
    shifts: Sequence[str],
    say: Callable[[str], None] = lambda _: None,
    base_seed: int = 0,
) -> dict[str, ExperimentConfig]:
    """The known-answer suite's experiments (``benchmarks/search_quality.py``,
    ``benchmarks/search_signal.py``): per shift of :data:`autopose.data.synth.KNOWN_SHIFTS`, the
    demo's full budget on data whose val and holdout splits the shift turns, every one starting
    from the same base model (the train split is the same, so is its key), trained once on one
    thread (as every figure in the README was measured: two threads train it faster in the demo
    but round differently, and end at another base of the same key) or reused. ``base_seed`` is
    the base's ``warm_start.seed``: another seed, another base of the same recipe."""
    from autopose.platform.tracking import ensure_experiment
    from autopose.platform.warm_start import prepare_warm_start

    budget = BUDGETS["full"]
    configs = {}
    for shift in shifts:
        synth, _ = prepare_synth(workdir, budget, shift=shift)
        data, _ = prepare_proxies(workdir, budget, synth)
        config = demo_config(workdir, budget, data, name=f"known-answer-{shift}")
        one_thread = dataclasses.replace(
            config.warm_start, cpus_per_worker=1.0, threads_per_worker=1, seed=base_seed
        )
        configs[shift] = config.replace(warm_start=one_thread)
    with quiet_libraries(), local_ray():
        for shift, config in configs.items():
            experiment_id = ensure_experiment(config.tracking_uri, config.experiment)
            configs[shift] = prepare_warm_start(config, experiment_id, config.experiment, say=say)
    return configs


# -- stage 3: the search -----------------------------------------------------------------------------------
def finished_trials(config: ExperimentConfig, name: str) -> dict[tuple[str, int], str]:
    """``(kind, seed) → run id`` of this search's FINISHED trial runs in MLflow."""
    from autopose.platform.compare import trial_rows

    rows = trial_rows(config.tracking_uri, name, search=name)
    return {(r.kind, r.seed): r.run_id for r in rows if r.status == "FINISHED" and r.candidate is None}


def search_is_finished(config: ExperimentConfig, name: str) -> bool:
    """Every planned trial has a FINISHED run in MLflow, and with a selection stage a run is
    tagged selected (the search's last write)."""
    from autopose.platform.tracking import TAG_SEARCH, TAG_SELECTED, client

    planned = {(spec.kind, spec.seed) for spec in config.trial_plan()}
    if not planned <= set(finished_trials(config, name)):
        return False
    if not config.runs_selection():
        return True
    found = client(config.tracking_uri).get_experiment_by_name(name)
    selected = client(config.tracking_uri).search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{TAG_SEARCH}` = '{name}' and tags.`{TAG_SELECTED}` = 'true'",
        max_results=1,
    )
    return bool(selected)


def progress_line(
    rows: list, planned: int, epochs: int, now: float, base: tuple[int, int] | None = None
) -> str:
    """The search's state in one line from its trial rows (:func:`autopose.platform.compare.trial_rows`):
    trials finished out of ``planned``, each running one's epoch (counted from 1) and last val AP,
    and while the trials run, the time left at the pace of the epochs done since the first
    trial started (selection trainings are not foreseen). ``base``: the base model's ``(epochs
    done, epochs)`` while it trains, before any trial (from
    :func:`autopose.platform.warm_start.base_progress`)."""
    trials = [r for r in rows if r.candidate is None]
    finished = sum(r.status == "FINISHED" for r in trials)
    selected = sum(r.status == "FINISHED" for r in rows if r.candidate is not None)
    running = []
    for row in rows:
        if row.status != "RUNNING":
            continue
        label = (
            f"{row.kind}-{row.seed}"
            if row.candidate is None
            else f"selection {row.candidate} seed {row.seed}"
        )
        label += f" {_epoch_in_progress(row.epochs_done, epochs)}"
        if row.epochs_done and row.val_ap is not None:
            label += f" (AP {row.val_ap:.3f})"
        running.append(label)
    text = f"{finished}/{planned} trials finished"
    if base is not None and not rows:
        text += f"; training the base model: {_epoch_in_progress(*base)}"
    if selected:
        text += f", {selected} selection training(s)"
    if running:
        text += "; running: " + ", ".join(sorted(running))
    done = finished * epochs + sum(r.epochs_done for r in trials if r.status == "RUNNING")
    starts = [r.started_s for r in trials if r.started_s is not None]
    if starts and 0 < done < planned * epochs:
        left = (now - min(starts)) * (planned * epochs - done) / done
        text += f"; about {_duration(left)} of trials left"
    return text


def _epoch_in_progress(done: int, epochs: int) -> str:
    """``epoch 2/8``: the epoch a training is in, counted from 1, after ``done`` finished ones."""
    return f"epoch {min(done + 1, epochs)}/{epochs}"


def _duration(seconds: float) -> str:
    """``40 s``, ``3 min``: a rough figure, rounded to 10 s below two minutes."""
    if seconds < 120:
        return f"{max(10, round(seconds / 10) * 10):.0f} s"
    return f"{round(seconds / 60):.0f} min"


class SearchWatcher:
    """Prints :func:`progress_line` whenever the search's state in MLflow changes (polled every
    ``every_s``)."""

    def __init__(
        self, config: ExperimentConfig, name: str, say: Callable[[str], None], every_s: float = 15.0
    ):
        self.config, self.name, self.say, self.every_s = config, name, say, every_s
        self.planned = len(config.trial_plan())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="autopose-demo-watch", daemon=True)
        self.last = ""
        self.started = time.perf_counter()

    def __enter__(self) -> SearchWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def line(self) -> str:
        from autopose.platform.compare import trial_rows
        from autopose.platform.warm_start import base_progress

        rows = trial_rows(self.config.tracking_uri, self.name, search=self.name)
        base = None if rows else base_progress(self.config.tracking_uri, self.name, self.name)
        return progress_line(rows, self.planned, self.config.train.epochs, time.time(), base)

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                text = self.line()
            except Exception:  # a busy SQLite file: try again at the next tick
                continue
            if text and text != self.last:
                self.last = text
                self.say(f"      {time.perf_counter() - self.started:5.0f} s  {text}")


def run_demo_search(config: ExperimentConfig, say: Callable[[str], None]) -> tuple[str, list]:
    """Run, resume or reuse the search. Returns ``(how, outcomes)``: ``how`` is
    ``reused`` (every trial finished before), ``resumed`` or ``new``."""
    import ray.tune

    from autopose.platform.tune import run_search

    name = config.experiment
    if search_is_finished(config, name):
        return "reused", []
    path = storage_join(config.storage_path, "tune", name)
    resume = ray.tune.Tuner.can_restore(path)
    if resume:
        say("      resuming the interrupted search")
    with SearchWatcher(config, name, say):
        outcomes = run_search(config, resume=resume, verbose=0, say=lambda text: say(f"      {text}"))
    failed = [o for o in outcomes if o.status != "TERMINATED"]
    if failed:
        first = failed[0]
        raise AutoposeError(
            f"{len(failed)} trial(s) failed, first {first.kind}-{first.seed}: {first.error}; "
            "run the demo again to retry them",
            field="search",
        )
    if not search_is_finished(config, name):
        # Tune catches Ctrl-C itself, saves its state and returns early: report it as the
        # interruption it is (the CLI then says how to continue).
        raise KeyboardInterrupt
    return ("resumed" if resume else "new"), outcomes


# -- stage 5: promotion and full training -----------------------------------------------------------------
@dataclass
class FullTraining:
    run_id: str
    parent_run: str
    checkpoint: str
    final_val_ap: float | None
    reused: bool
    registered_epoch: int | None = None  # the epoch (0-based) whose checkpoint was registered


def finished_full_training(config: ExperimentConfig, parent_run: str) -> FullTraining | None:
    from autopose.platform.tracking import (
        FULL_TRAIN_KIND,
        TAG_CHECKPOINT,
        TAG_KIND,
        TAG_PARENT,
        TAG_REGISTERED_EPOCH,
        client,
    )

    mlflow_client = client(config.tracking_uri)
    found = mlflow_client.get_experiment_by_name(config.experiment)
    if found is None:
        return None
    for run in mlflow_client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{TAG_KIND}` = '{FULL_TRAIN_KIND}' and tags.`{TAG_PARENT}` = '{parent_run}'",
        max_results=10,
    ):
        checkpoint = run.data.tags.get(TAG_CHECKPOINT)
        if run.info.status == "FINISHED" and checkpoint and Path(checkpoint).is_file():
            epoch = run.data.tags.get(TAG_REGISTERED_EPOCH)
            return FullTraining(
                run.info.run_id,
                parent_run,
                checkpoint,
                run.data.metrics.get("final_val_ap"),
                True,
                None if epoch is None else int(epoch),
            )
    return None


def promote_best(config: ExperimentConfig, best_run: str) -> FullTraining:
    """Promote ``best_run`` and train its policy on Ray Train (or reuse a finished training)."""
    from autopose.platform.promote import promote

    done = finished_full_training(config, best_run)
    if done is not None:
        return done
    outcome = promote(best_run, config=config, tracking_uri=config.tracking_uri)
    return FullTraining(
        outcome.run_id,
        best_run,
        outcome.checkpoint,
        outcome.metrics.get("final_val_ap"),
        False,
        outcome.registered_epoch,
    )


# -- stage 6: evaluation ---------------------------------------------------------------------------------
def evaluate_full_training(config: ExperimentConfig, data: DemoData, full: FullTraining) -> dict[str, Any]:
    """The trained model on the val split's images (ground-truth boxes) and on the COCO
    samples (the bundled detector's boxes), logged to its MLflow run."""
    from autopose.engine.evaluate_command import evaluate_checkpoint
    from autopose.platform.tracking import TrackedRun

    checkpoint = Path(full.checkpoint)
    val = evaluate_checkpoint(checkpoint, data.val_ann, data.val_images, batch_size=64)
    coco = evaluate_checkpoint(checkpoint, COCO_ANN, COCO_SAMPLES, dets_path=COCO_DETS, batch_size=64)
    result = {
        "val_split": {"title": val.title, "metrics": _finite(val.metrics), "notes": list(val.notes)},
        "coco_samples": {"title": coco.title, "metrics": _finite(coco.metrics), "notes": list(coco.notes)},
    }
    run = TrackedRun.attach(config.tracking_uri, full.run_id)
    logged = {f"demo_val_split_{k.lower()}": v for k, v in result["val_split"]["metrics"].items()}
    logged |= {f"coco_samples_{k.lower()}": v for k, v in result["coco_samples"]["metrics"].items()}
    run.log_metrics({k: v for k, v in logged.items() if v is not None}, step=0)
    return result


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in metrics.items()}


# -- the whole demo -----------------------------------------------------------------------------------
STAGES = 7


def run_demo(workdir: Path, budget_name: str = "full", *, stream=None) -> Path:
    """Run (or continue) the demo in ``workdir``; returns the report's HTML file."""
    with quiet_libraries():
        return _run_demo(workdir, budget_name, stream)


def _demo_budget(name: str) -> DemoBudget:
    if name not in BUDGETS:
        raise AutoposeError(f"unknown budget {name!r}; valid: {', '.join(BUDGETS)}", field="--budget")
    return BUDGETS[name]


def _demo_workdir(workdir: Path) -> Path:
    """The demo's work folder, absolute, made when missing."""
    workdir = Path(workdir).absolute()
    if workdir.exists() and not workdir.is_dir():
        raise AutoposeError("exists and is not a folder", path=workdir, field="--workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def _show_selection(config: ExperimentConfig, say: Callable[[str], None]):
    """Say the trials by val AP and the selection by holdout AP; returns the selected candidate."""
    from autopose.platform.compare import collect, format_table, read_selection
    from autopose.platform.selection import format_selection

    name = config.experiment
    _, rows = collect(config.tracking_uri, name, search=name)
    say(format_table(name, rows))
    selection = read_selection(config, name)
    if selection is None:
        raise AutoposeError("the selection stage scored no candidate on holdout", field="search")
    say(format_selection(selection))
    return selection.winner


def _run_demo(workdir: Path, budget_name: str, stream) -> Path:
    from autopose.platform.report import write_report
    from autopose.platform.tracking import check_tracking

    budget, workdir = _demo_budget(budget_name), _demo_workdir(workdir)
    state = _read_state(workdir)
    timings: dict[str, Any] = state.get(budget.name, {}).get("stages", {})
    progress = Progress(STAGES, stream)
    progress.say(f"autopose demo ({budget.name} budget) in {_shown(workdir)}")

    def save_state(**extra: Any) -> None:
        entry = state.setdefault(budget.name, {})
        entry["stages"] = timings
        entry["budget"] = budget.to_dict()
        entry.update(extra)
        _write_json(workdir / STATE_FILE, state)

    with progress.stage(
        "data", "synthetic train/val/holdout (val and holdout turned ±45° and darker)", timings
    ) as info:
        synth, info["reused"] = prepare_synth(workdir, budget)
        info["note"] = _shown(synth)
    save_state()

    with progress.stage(
        "proxies", "Parquet proxies of train, val, holdout and the real COCO samples", timings
    ) as info:
        data, reused = prepare_proxies(workdir, budget, synth)
        info["reused"] = reused == PROXY_COUNT
        info["note"] = f"{PROXY_COUNT - reused} built, {reused} reused"
    save_state()

    config = demo_config(workdir, budget, data)
    check_tracking(config.tracking_uri)
    trials = ", ".join(f"{spec.kind}-{spec.seed}" for spec in config.trial_plan())
    with local_ray(say=progress.say):
        with progress.stage(
            "search", f"{trials} on local Ray, MLflow {config.tracking_uri}", timings
        ) as info:
            how, _ = run_demo_search(config, progress.say)
            info["reused"] = how == "reused"
            info["note"] = {"reused": "finished earlier", "resumed": "resumed", "new": ""}[how]
        save_state()

        with progress.stage("compare", "trials by val AP, candidates by holdout AP", timings) as info:
            best = _show_selection(config, progress.say)
            info["note"] = f"selected: {best.candidate}, holdout AP {best.holdout_ap:.4f}"
        save_state(best_run=best.run_id)

        with progress.stage("promote", f"{best.candidate} trained on Ray Train, 2 workers", timings) as info:
            full = promote_best(config, best.run_id)
            info["reused"] = full.reused
            ap = f"{full.final_val_ap:.4f}" if full.final_val_ap is not None else "-"
            epoch = "" if full.registered_epoch is None else f"epoch {full.registered_epoch} registered, "
            info["note"] = f"run {full.run_id}, {epoch}val proxy AP {ap}"
        save_state(best_run=best.run_id, full_run=full.run_id)

    with progress.stage(
        "evaluate", "val split (GT boxes) and COCO samples (detector boxes)", timings
    ) as info:
        evaluation = evaluate_full_training(config, data, full)
        val_ap = evaluation["val_split"]["metrics"].get("AP")
        coco_ap = evaluation["coco_samples"]["metrics"].get("AP")
        info["note"] = f"val split AP {_fmt(val_ap)}, COCO samples AP {_fmt(coco_ap)}"
    _write_json(workdir / f"evaluation-{budget.name}.json", evaluation)
    save_state(best_run=best.run_id, full_run=full.run_id)

    report_dir = workdir / f"report-{budget.name}"
    with progress.stage("report", "HTML and PNGs", timings) as info:
        html = write_report(
            report_dir,
            config,
            data_coco_proxy=data.coco,
            full_run=full.run_id,
            evaluation=evaluation,
            timings=timings,
            budget=budget.to_dict(),
            shift_ops=SHIFT_OPS,
        )
        info["note"] = _shown(html)
    save_state(best_run=best.run_id, full_run=full.run_id, report=str(html))

    progress.say(f"report: {_shown(html)}")
    from autopose.platform.tracking import mlflow_ui_command

    progress.say(f"MLflow UI: {mlflow_ui_command(config.tracking_uri)}")
    return html


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when below it."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
