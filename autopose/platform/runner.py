"""Running the engine's training loop on Ray Train, with reporting, checkpoints and tracking.

Both a search trial and a full training end up here: :func:`fit` builds a
``TorchTrainer`` (DDP over ``num_workers`` workers, gloo on CPUs and NCCL on
GPUs; ``num_workers: 0`` runs the loop in the calling process) whose workers run
:func:`train_loop_per_worker`. That function drives
:class:`autopose.engine.train.Trainer` and, after each epoch:

* every rank reports them to Ray (a barrier), with a checkpoint of the full
  training state from rank 0;
* outside a search, rank 0 also logs the epoch to the MLflow run (an
  :class:`~autopose.platform.tracking.EpochLog`: when the tracking server does
  not answer, the epoch waits in memory and goes with the next epoch that gets
  through, same step numbers, and training goes on). In a search the driver logs
  every trial's epochs from the reports (``autopose.platform.tune.TrialRuns``);
* at the end rank 0 logs ``policy/policy.json`` and ``policy/examples.png`` (in a
  search, a report with ``artifacts_unlogged`` tells the driver that they did not go).

Where checkpoints go, and how a restarted run finds them:

* under Ray Train workers: Ray Train's own storage
  (``RunConfig(name, storage_path)``); a restarted run with the same name
  resumes from its latest checkpoint, and ``TuneReportCallback`` forwards the
  metrics to Tune when the run is a Tune trial;
* in-process inside a Tune trial (``num_workers: 0``): the Tune trial's
  checkpoints (``ray.tune.report``), so that a retried or restored trial resumes;
* in-process outside Tune: a checkpoint file under ``storage_path/name``.

A full training (``TrainingJob.keep_best``) also keeps the checkpoint with the best val AP
(:data:`BEST_METRIC`) beside the latest: Ray's ``checkpoint_score_attribute`` under Ray Train,
``best/`` beside the checkpoint file in-process. :func:`best_checkpoint` hands it to the
registration, so that the registered model is the best epoch, not the last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import ray
import ray.train
import ray.tune
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from autopose.engine.config import AugmentSpec, DataConfig, ModelConfig, TrainConfig
from autopose.engine.train import EpochReport, Trainer, TrainHooks, discrete_augment
from autopose.errors import AutoposeError, error_cause, first_line
from autopose.files import atomic_write, read_json

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
POLICY_FILE = "policy.json"
BEST_METRIC = "val_ap"  # a full training registers its checkpoint with the highest
BEST_FOLDER, BEST_RECORD = "best", "best.json"  # in-process: the best checkpoint and its epoch
# What a trial's reports carry besides its metrics, for the search's driver (never logged as metrics):
NODE_KEY = "node_id"  # the Ray node rank 0 ran on
ARTIFACTS_UNLOGGED = "artifacts_unlogged"  # 1: the final policy could not be logged


@dataclass
class TrainingJob:
    """Everything a training process needs; travels to the workers as the loop's config.

    Attributes:
        data, model, train: the engine's configs.
        augment: the trial's augmentation.
        space: the search space mapping.
        tracking_uri: absolute MLflow URI (Ray workers run in other folders).
        run_id: the MLflow run rank 0 logs to (None: no tracking, unless ``run_key``).
        run_key: ``(experiment id, autopose.trial tag)``: the run to look up when it is first
            needed, for a trial that did not find it as it started (a search's driver opens the
            trial's run from its own thread, :class:`autopose.platform.tune.TrialRuns`).
        examples: crops in ``policy/examples.png`` (0: no picture).
        title: the picture's title.
        in_tune: the loop runs inside a Tune trial (in-process mode reports to Tune).
        checkpoint_dir: in-process outside Tune: where the resumable checkpoint lives.
        inject_failure_after_epoch: fault injection (tests, drills): fail once, right
            after this epoch's report and checkpoint.
        inject_kill_after_epoch: fault injection: the last rank's process kills itself
            (SIGKILL, no clean-up) once, right after this epoch's report and checkpoint.
        keep_best: also keep the checkpoint with the best ``val_ap`` (full training).
    """

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    augment: AugmentSpec
    space: dict[str, Any]
    tracking_uri: str | None = None
    run_id: str | None = None
    run_key: tuple[str, str] | None = None
    examples: int = 8
    title: str = ""
    in_tune: bool = False
    checkpoint_dir: str | None = None
    inject_failure_after_epoch: int | None = None
    inject_kill_after_epoch: int | None = None
    keep_best: bool = False


def keep_if_best(folder: Path, metrics: dict[str, float], checkpoint: Path) -> bool:
    """In-process runs: copy ``checkpoint`` to ``folder/best/`` when its val AP beats the best so
    far (a tie keeps the earlier); returns whether it did. The record (``best.json``: val AP
    and epoch) is written after the copy, so it always names a complete checkpoint."""
    record = folder / BEST_RECORD
    best = read_json(record)[BEST_METRIC] if record.is_file() else None
    if best is not None and not metrics[BEST_METRIC] > best:
        return False
    target = folder / BEST_FOLDER / CHECKPOINT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, "wb") as out, checkpoint.open("rb") as source:
        shutil.copyfileobj(source, out)
    with atomic_write(record) as out:
        json.dump({BEST_METRIC: metrics[BEST_METRIC], "epoch": int(metrics["epoch"])}, out)
    return True


# -- inside the workers --------------------------------------------------------------------------
class _Session:
    """Ray's reporting API for the three ways the loop runs (see the module docstring)."""

    def __init__(self, job: TrainingJob):
        self.job = job
        self.workers = job.train.num_workers > 0
        self.tune_local = not self.workers and job.in_tune
        self.file_dir = (
            Path(job.checkpoint_dir)
            if (not self.workers and not job.in_tune and job.checkpoint_dir)
            else None
        )

    def resume(self, trainer: Trainer) -> bool:
        """Load the latest checkpoint into ``trainer``; False when there is none yet."""
        if self.file_dir is not None:
            path = self.file_dir / CHECKPOINT_FILE
            if not path.exists():
                return False
            trainer.load(path)
            return True
        checkpoint = ray.tune.get_checkpoint() if self.tune_local else ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as folder:
            trainer.load(Path(folder) / CHECKPOINT_FILE)
        return True

    def report(self, metrics: dict[str, float], folder: Path | None) -> None:
        if self.file_dir is not None:
            if folder is not None:
                self.file_dir.mkdir(parents=True, exist_ok=True)
                if self.job.keep_best:
                    keep_if_best(self.file_dir, metrics, folder / CHECKPOINT_FILE)
                os.replace(folder / CHECKPOINT_FILE, self.file_dir / CHECKPOINT_FILE)
            ray.train.report(metrics)
        elif self.tune_local:
            checkpoint = ray.tune.Checkpoint.from_directory(str(folder)) if folder is not None else None
            ray.tune.report(metrics, checkpoint=checkpoint)
        else:
            checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
            ray.train.report(metrics, checkpoint=checkpoint)


class _ReportingHooks(TrainHooks):
    def __init__(self, job: TrainingJob, session: _Session):
        self.job, self.session = job, session
        self.cpu_start = time.process_time()
        self._run = None
        self._epochs = None  # outside Tune: this run's EpochLog (in a search the driver logs epochs)
        self._artifacts_waiting = False  # the final policy and its picture, not logged yet
        self._failed = False  # a tracking call failed (said once)

    @property
    def tracked(self) -> bool:
        return self.job.run_id is not None or self.job.run_key is not None

    def run(self):
        """The run rank 0 logs to: attached by its id, or looked up by ``run_key`` (LookupError
        while the driver has not opened it: the artifacts wait, as for a lost server)."""
        if self._run is None and self.tracked:
            from autopose.platform.tracking import TrackedRun, find_run

            run_id = self.job.run_id
            if run_id is None:
                found = find_run(self.job.tracking_uri, *self.job.run_key)
                if found is None:
                    raise LookupError(f"no run tagged {self.job.run_key[1]!r} yet")
                run_id = found.info.run_id
            self._run = TrackedRun.attach(self.job.tracking_uri, run_id)
        return self._run

    def _cpu_seconds(self, trainer: Trainer) -> float:
        used = torch.tensor([time.process_time() - self.cpu_start], dtype=torch.float64)
        if trainer.world_size > 1:
            used = used.to(trainer.device)  # NCCL reduces CUDA tensors only
            dist.all_reduce(used)
        return float(used.item())

    def on_epoch_end(self, report: EpochReport, trainer: Trainer) -> None:
        metrics = {
            **report.metrics,
            "train_cpu_s": self._cpu_seconds(trainer),
            "train_wall_s": trainer.wall_s,
        }
        every = self.job.train.checkpoint_every
        with tempfile.TemporaryDirectory(prefix="autopose-ckpt-") as folder:
            saved = None
            if (report.is_last or (report.epoch + 1) % every == 0) and trainer.is_main:
                trainer.save(Path(folder) / CHECKPOINT_FILE)
                (Path(folder) / POLICY_FILE).write_text(json.dumps(trainer.policy_document(), indent=2))
                saved = Path(folder)
            extra: dict[str, Any] = {}
            if trainer.is_main and self.job.in_tune:
                extra[NODE_KEY] = ray.get_runtime_context().get_node_id()  # the driver tags the run
            if trainer.is_main and self.tracked:
                self._track(report, metrics, trainer)
                if self._artifacts_waiting:
                    extra[ARTIFACTS_UNLOGGED] = 1  # the driver logs the policy from the checkpoint
            # Every rank reports, equally often (Ray's report is a barrier); rank 0 brings the checkpoint.
            self.session.report({**metrics, **extra}, saved)
        if report.epoch == self.job.inject_failure_after_epoch:
            raise RuntimeError(f"injected failure after epoch {report.epoch} ({self.job.title})")
        if report.epoch == self.job.inject_kill_after_epoch and trainer.rank == trainer.world_size - 1:
            # A resumed run starts after this epoch, so the kill happens once. The pause lets Ray
            # register the checkpoint just reported before the process vanishes: Ray Train's
            # controller collects it at its next health check (every 2 s by default).
            time.sleep(6.0 if trainer.world_size > 1 or self.session.workers else 1.0)
            os.kill(os.getpid(), signal.SIGKILL)

    def _track(self, report: EpochReport, metrics: dict[str, float], trainer: Trainer) -> None:
        """Rank 0's MLflow writes: outside Tune the epochs (in a search the driver logs them from
        the reports), and after the last epoch the policy and its picture. A lost tracking server
        leaves them waiting for the next epoch and never stops the training."""
        from autopose.platform.tracking import EpochLog

        if not self.job.in_tune:
            if self._epochs is None:
                self._epochs = EpochLog(self.run())
            self._epochs.add(report.epoch, metrics)
        self._artifacts_waiting = self._artifacts_waiting or report.is_last
        try:
            if self._epochs is not None:
                self._epochs.flush()
            if self._artifacts_waiting:
                self._log_policy(trainer)
                self._artifacts_waiting = False
        except Exception as error:  # MlflowException, requests' and OSError kinds: the server is away
            # Said once; in a search the driver says it instead (its console is the one read).
            log = logger.warning if not (self._failed or self.job.in_tune) else logger.debug
            self._failed = True
            waiting = len(self._epochs.waiting) if self._epochs is not None else 0
            log(
                "MLflow tracking at %s failed (%s); training goes on, %d epoch(s) wait to be logged",
                self.job.tracking_uri,
                first_line(error),
                waiting,
            )

    def _log_policy(self, trainer: Trainer) -> None:
        from autopose.platform.pictures import render_policy_examples
        from autopose.platform.tracking import POLICY_ARTIFACT

        run = self.run()
        with tempfile.TemporaryDirectory(prefix="autopose-policy-") as folder:
            policy_path = Path(folder) / Path(POLICY_ARTIFACT).name
            policy_path.write_text(json.dumps(trainer.policy_document(), indent=2) + "\n")
            run.log_artifact(policy_path, "policy")
            count = min(self.job.examples, len(trainer.val_set))
            if count > 0:
                rows = [trainer.val_set[i] for i in range(count)]
                meta = trainer.val_set.metadata
                picture = render_policy_examples(
                    discrete_augment(trainer.augment),
                    rows,
                    Path(folder) / "examples.png",
                    title=self.job.title,
                    skeleton=meta.skeleton,
                    seed=self.job.augment.seed,
                )
                run.log_artifact(picture, "policy")


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The function every Ray Train worker runs (also in-process with ``num_workers: 0``)."""
    job: TrainingJob = config["job"]
    if job.tracking_uri is not None:
        from autopose.platform.tracking import quick_tracking_failures

        quick_tracking_failures()
    session = _Session(job)
    device = None
    if session.workers:
        device = ray.train.torch.get_device()
        if device.type == "cuda" and job.train.gpus_per_worker <= 0:
            device = torch.device("cpu")
    trainer = Trainer(job.data, job.model, job.train, job.augment, job.space, device=device)
    session.resume(trainer)
    result = trainer.run(_ReportingHooks(job, session))
    return {"steps": result.steps, "epochs": result.epochs, "wall_s": result.wall_s}


# -- on the driver -----------------------------------------------------------------------------------
def backend_for(train: TrainConfig, backend: str = "auto") -> str:
    if backend != "auto":
        return backend
    return "nccl" if train.gpus_per_worker > 0 else "gloo"


def fit(
    job: TrainingJob,
    *,
    name: str,
    storage_path: str,
    backend: str = "auto",
    tune_callback: bool = False,
) -> ray.train.Result:
    """Run ``job`` on a ``TorchTrainer`` and wait for it.

    Args:
        job: what to train and where to track it.
        name: the Ray Train run's name; the same name resumes the same run.
        storage_path: where Ray Train keeps checkpoints (shared storage on a cluster).
        backend: ``auto`` (NCCL with GPUs, else gloo), ``gloo`` or ``nccl``.
        tune_callback: forward the reports to the enclosing Tune trial.

    Raises:
        AutoposeError: the run failed (with the worker's error, in one line).
    """
    train = job.train
    if train.num_workers == 0:
        scaling = ScalingConfig(num_workers=0)
        callbacks = []
    else:
        resources = {"CPU": train.cpus_per_worker}
        if train.gpus_per_worker > 0:
            resources["GPU"] = train.gpus_per_worker
        scaling = ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.gpus_per_worker > 0, resources_per_worker=resources
        )
        if tune_callback:
            from ray.tune.integration.ray_train import TuneReportCallback

            callbacks = [TuneReportCallback()]
        else:
            callbacks = []
    if train.num_workers == 0 and not job.in_tune and job.checkpoint_dir is None:
        job.checkpoint_dir = str(Path(storage_path) / name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend=backend_for(train, backend)),
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=train.max_failures),
            # As the trials' (tune.py): the newer replaces the older once it is persisted. Scored,
            # Ray keeps the best by val AP and, besides it, always the latest (for a restart).
            checkpoint_config=(
                CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=BEST_METRIC, checkpoint_score_order="max"
                )
                if job.keep_best
                else CheckpointConfig(num_to_keep=1)
            ),
            callbacks=callbacks,
        ),
    )
    try:
        return trainer.fit()
    except AutoposeError:
        raise
    except ray.train.TrainingFailedError as error:
        raise AutoposeError(f"training run {name} failed: {error_cause(error)}") from error


@contextlib.contextmanager
def local_checkpoint(result, job: TrainingJob) -> Iterator[Path]:
    """The final checkpoint as a local file (downloaded for the time of the block when the
    storage is remote). In-process runs keep their checkpoint file themselves."""
    if result.checkpoint is None:
        path = Path(job.checkpoint_dir or "") / CHECKPOINT_FILE
        if not path.is_file():
            raise AutoposeError("training finished without a checkpoint", path=path)
        yield path
        return
    with result.checkpoint.as_directory() as folder:
        path = Path(folder) / CHECKPOINT_FILE
        if not path.is_file():
            raise AutoposeError("training finished without a checkpoint", path=result.checkpoint.path)
        yield path


class KeptCheckpoint(NamedTuple):
    """A checkpoint a run kept: a local file for the time of the block, its epoch (0-based) and
    where it stays (a local path or a storage URI)."""

    local: Path
    epoch: int
    location: str


@contextlib.contextmanager
def best_checkpoint(result, job: TrainingJob) -> Iterator[KeptCheckpoint]:
    """The checkpoint with the best val AP of a ``keep_best`` run (downloaded for the time of the
    block when the storage is remote). Without a record of the best (a run that kept none), the
    final checkpoint at the last epoch."""
    last_epoch = job.train.epochs - 1
    if result.checkpoint is None:
        folder = Path(job.checkpoint_dir or "")
        record, kept = folder / BEST_RECORD, folder / BEST_FOLDER / CHECKPOINT_FILE
        if record.is_file() and kept.is_file():
            yield KeptCheckpoint(kept, int(read_json(record)["epoch"]), str(kept))
            return
        with local_checkpoint(result, job) as path:
            yield KeptCheckpoint(path, last_epoch, str(path))
        return
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if BEST_METRIC in m]
    checkpoint, epoch = result.checkpoint, last_epoch
    if scored:
        checkpoint, metrics = max(scored, key=lambda pair: pair[1][BEST_METRIC])
        epoch = int(metrics["epoch"])
    with checkpoint.as_directory() as folder:
        path = Path(folder) / CHECKPOINT_FILE
        if not path.is_file():
            raise AutoposeError("training finished without a checkpoint", path=checkpoint.path)
        yield KeptCheckpoint(path, epoch, f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}")


def resources_of(train: TrainConfig) -> tuple[float, float]:
    """``(CPUs, GPUs)`` a run of ``train`` holds: what its cost is counted in."""
    workers = max(train.num_workers, 1)
    return train.cpus_per_worker * workers, train.gpus_per_worker * workers
