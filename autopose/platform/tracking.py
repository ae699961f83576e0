"""MLflow tracking: one run per trial, the names and tags every tool reads back.

Runs (see DESIGN.md): one MLflow experiment per search; one run per Ray Tune
trial, tagged ``autopose.kind`` (search | random | handcrafted | none |
randaugment | trivialaugment | full-train), ``autopose.seed``,
``autopose.trial`` (the Tune trial id, so that a retried trial reopens its own
run instead of adding one); full training adds ``autopose.parent_run`` (and
MLflow's own ``mlflow.parentRunId`` so that the UI nests it); promotion sets
``autopose.promoted=true``. Artifacts: ``policy/policy.json``,
``policy/examples.png``, ``config/experiment.yaml``.

Every process (the CLI, Ray trials, Ray Train workers) talks to MLflow through
:class:`MlflowClient` with an explicit, absolute tracking URI: nothing relies on
MLflow's process-global state, which Ray workers would not share.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import logging
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from autopose import __version__
from autopose.errors import AutoposeError, first_line

TAG_KIND = "autopose.kind"
TAG_SEED = "autopose.seed"
TAG_TRIAL = "autopose.trial"
TAG_PARENT = "autopose.parent_run"
TAG_PROMOTED = "autopose.promoted"
TAG_SEARCH = "autopose.search"  # the Tune experiment (search) a run belongs to
TAG_NODE = "autopose.node"  # the Ray node a trial ran on
TAG_CHECKPOINT = "autopose.checkpoint"  # a full training's final checkpoint file
TAG_STOPPED_EARLY = "autopose.stopped_early"  # closed before its planned epochs
TAG_ORPHANED = "autopose.orphaned"  # left RUNNING by a search driver that died
TAG_STAGE = "autopose.stage"  # "selection" on the runs of a search's selection stage
TAG_CANDIDATE = "autopose.candidate"  # the selection candidate a run scores (search-0, none …)
TAG_SELECTED = "autopose.selected"  # the candidate run the selection stage chose to promote
TAG_ATTEMPTS = "autopose.attempts"  # how often a trial's run was started (retries, resumes)
TAG_ATTEMPT_STARTED = "autopose.attempt_started"  # when the latest attempt started (UTC, ISO 8601)
TAG_REGISTERED_EPOCH = "autopose.registered_epoch"  # the epoch whose checkpoint a training registered
MLFLOW_PARENT = "mlflow.parentRunId"
MLFLOW_NOTE = "mlflow.note.content"  # the run's description in MLflow's UI
# MLflow 3's UI opens an experiment without this tag on its GenAI (traces) page.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
POLICY_ARTIFACT = "policy/policy.json"
EXAMPLES_ARTIFACT = "policy/examples.png"
CONFIG_ARTIFACT = "config/experiment.yaml"
SEARCH_KINDS = (
    "search",
    "tpe",
    "pba",
    "random",
    "handcrafted",
    "none",
    "randaugment",
    "trivialaugment",
    "policy",
)
FULL_TRAIN_KIND = "full-train"

# MLflow's own limits (mlflow.utils.validation): keep logged values inside them.
_MAX_PARAM_VALUE = 6000
_MAX_BATCH_METRICS = 1000


# -- the tracking server -------------------------------------------------------------------------
def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# MLflow's HTTP client retries an unreachable server with exponential backoff for about four
# minutes per call (MLFLOW_HTTP_REQUEST_MAX_RETRIES 7, BACKOFF_FACTOR 2 in mlflow 3.17): a trial
# would stall that long at every epoch. What a quick call does not get through is kept and sent
# again at the next epoch, so one prompt retry is enough.
QUICK_TRACKING_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def quick_tracking_failures() -> None:
    """In a training process: let a lost MLflow server fail a call in seconds (settings already
    in the environment win) and keep urllib3's per-retry warnings off the console."""
    for key, value in QUICK_TRACKING_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


@contextlib.contextmanager
def scoped_settings(environment: dict[str, str], quiet_loggers: tuple[str, ...] = ()) -> Iterator[None]:
    """Environment variables set and loggers raised to ERROR for the calls inside; both
    restored afterwards (the caller may be someone's notebook)."""
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    loggers = [logging.getLogger(name) for name in quiet_loggers]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bounded_http(**settings: str) -> contextlib.AbstractContextManager[None]:
    """MLflow HTTP settings (``MLFLOW_HTTP_REQUEST_*`` names) for the calls inside, without
    urllib3's retry warnings (a lost server would fill the console with one per retry)."""
    return scoped_settings(settings, ("urllib3.connectionpool",))


def _quick_http() -> contextlib.AbstractContextManager[None]:
    """No retry loop at all while probing."""
    return bounded_http(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")


def mlflow_ui_command(tracking_uri: str) -> str:
    """The command that opens MLflow's UI on ``tracking_uri``, runnable as printed: the ``mlflow``
    beside this Python (the project's venv is not on PATH after ``make demo``), relative to the
    working folder when it lies below it."""
    executable = Path(sys.executable).parent / "mlflow"
    try:
        shown = f"./{executable.relative_to(Path.cwd())}"
    except ValueError:
        shown = str(executable)
    return f"{shown} ui --backend-store-uri {tracking_uri} --host 127.0.0.1"


def require_store(tracking_uri: str) -> None:
    """A read-only command's check: the SQLite store it reads exists (reading never creates one:
    a fresh store costs MLflow its table creation, 15–47 s here, and leaves a file behind)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        if not db.is_file():
            raise AutoposeError(
                f"no MLflow store at {db}: nothing was tracked here (run a search here, or give "
                "--tracking-uri or $MLFLOW_TRACKING_URI)",
                field="--tracking-uri",
            )


def check_tracking(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail early, in one line, when the tracking store cannot be used.

    Called by the CLI and the platform before Ray starts any trial.

    Raises:
        AutoposeError: the SQLite file's folder is missing or read-only, or an
            ``http(s)://`` server does not answer within ``timeout_s``.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        if not db.parent.is_dir():
            raise AutoposeError(
                f"folder of the MLflow database does not exist: {db.parent}", field="tracking_uri"
            )
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise AutoposeError(f"MLflow database is not writable: {db}", field="tracking_uri")
    elif tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status != 200:
                    raise AutoposeError(
                        f"MLflow server at {tracking_uri} answered {response.status} on /health",
                        field="tracking_uri",
                    )
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise AutoposeError(
                f"MLflow tracking server unreachable at {tracking_uri} ({reason}); start it "
                "(`mlflow server --host 127.0.0.1 --port 5000`) or fix tracking_uri / MLFLOW_TRACKING_URI",
                field="tracking_uri",
            ) from None
    try:
        with _quick_http():
            client(tracking_uri).search_experiments(max_results=1)
    except (MlflowException, OSError) as error:
        first = first_line(error)
        raise AutoposeError(
            f"MLflow tracking store {tracking_uri} is not usable ({first})", field="tracking_uri"
        ) from None


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live beside the database (not in whatever folder a Ray
    trial runs in); a tracking server decides for itself (None)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        return (db.parent / "mlartifacts" / safe).as_uri()
    return None


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The id of MLflow experiment ``name``, created when missing, tagged as model development
    (:data:`EXPERIMENT_KIND`) so that MLflow's UI opens it on its runs."""
    mlflow_client = client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow_client.create_experiment(
                name,
                artifact_location=default_artifact_location(tracking_uri, name),
                tags=dict([EXPERIMENT_KIND]),
            )
        except MlflowException:
            # another process created it in between
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(experiment.experiment_id)
    key, value = EXPERIMENT_KIND
    if experiment.tags.get(key) != value:  # made by an older autopose
        mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def epochs_logged(metrics: Mapping[str, float]) -> int:
    """How many epochs a run has logged, from its latest ``epoch`` metric (0-based; none: 0)."""
    return int(metrics["epoch"]) + 1 if "epoch" in metrics else 0


def utc_now() -> str:
    """Now, as an ISO 8601 UTC timestamp to the second (a tag's value)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@functools.cache
def code_commit() -> str | None:
    """The git commit of the autopose code this process runs, when it runs from a git checkout
    (None otherwise: an installed wheel, or no git)."""
    folder = Path(__file__).resolve().parents[2]
    try:
        found = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = found.stdout.strip()
    return commit if found.returncode == 0 and len(commit) == 40 else None


def source_tags(command: str) -> dict[str, str]:
    """MLflow's source tags for runs that ``command`` (e.g. ``autopose search``) starts: the
    command and the code's git commit where there is one. Computed on the driver, whose
    checkout is the one the user ran (a cluster's workers may have none)."""
    tags = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL", "autopose.version": __version__}
    commit = code_commit()
    if commit is not None:
        tags["mlflow.source.git.commit"] = commit
    return tags


# -- values for MLflow ---------------------------------------------------------------------------
def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping → ``{"train.lr": "0.001", ...}`` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = str(list(value) if isinstance(value, tuple) else value)
            flat[name] = text[:_MAX_PARAM_VALUE]
    return flat


def metric_name(name: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / space``; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _metric_entries(metrics: Mapping[str, Any], timestamp_ms: int, step: int) -> list[Metric]:
    """MLflow metrics of the finite numbers in ``metrics`` (text and flags are never logged)."""
    return [
        Metric(metric_name(k), float(v), timestamp_ms, int(step))
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    ]


def find_run(tracking_uri: str, experiment_id: str, key: str, *, key_tag: str = TAG_TRIAL):
    """The MLflow run of ``experiment_id`` whose ``key_tag`` is ``key`` (a trial's
    ``autopose.trial``), or None."""
    found = client(tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.`{key_tag}` = '{key}'", max_results=1
    )
    return found[0] if found else None


# -- one run ---------------------------------------------------------------------------------------
class TrackedRun:
    """One MLflow run, written through an explicit client (usable in any process).

    Build with :meth:`open` (find or create) or :meth:`attach` (a known run id).
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = client(tracking_uri)

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> TrackedRun:
        return cls(tracking_uri, run_id)

    @classmethod
    def open(
        cls,
        tracking_uri: str,
        experiment_id: str,
        *,
        run_name: str,
        tags: Mapping[str, str],
        key_tag: str = TAG_TRIAL,
    ) -> TrackedRun:
        """The run whose ``key_tag`` equals ``tags[key_tag]``, reopened (a retried or resumed
        trial), else a new one. Either way it ends up RUNNING with ``tags`` set."""
        found = find_run(tracking_uri, experiment_id, tags[key_tag], key_tag=key_tag)
        return cls.reopen_or_create(tracking_uri, experiment_id, found, run_name, tags)

    @classmethod
    def reopen_or_create(
        cls, tracking_uri: str, experiment_id: str, found, run_name: str, tags: Mapping[str, str]
    ) -> TrackedRun:
        """``found`` (an MLflow run the caller looked up) reopened with ``tags`` set, or, when it
        is None, a new run created with them."""
        mlflow_client = client(tracking_uri)
        if found is None:
            created = mlflow_client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
            return cls(tracking_uri, created.info.run_id)
        run = cls(tracking_uri, found.info.run_id)
        mlflow_client.update_run(run.run_id, status="RUNNING")
        run.set_tags(tags)
        return run

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: Mapping[str, Any], existing: Mapping[str, str] | None = None) -> None:
        """Log params once: keys the run has already (``existing``, else asked) are skipped,
        so that a resumed run never conflicts."""
        if existing is None:
            existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:_MAX_PARAM_VALUE]) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.log_steps({step: metrics})

    def log_steps(self, steps: Mapping[int, Mapping[str, Any]]) -> None:
        """Log several steps' metrics (step → metrics; a run's epochs are its steps), in order, in
        as few calls as MLflow's batch limit allows; a step is split only when it alone exceeds
        the limit. A failed call raises; the calls before it stay."""
        now = int(time.time() * 1000)
        batch: list[Metric] = []
        for step in sorted(steps):
            entries = _metric_entries(steps[step], now, step)
            if batch and len(batch) + len(entries) > _MAX_BATCH_METRICS:
                self.client.log_batch(self.run_id, metrics=batch)
                batch = []
            batch.extend(entries)
            while len(batch) > _MAX_BATCH_METRICS:  # one step larger than a batch
                self.client.log_batch(self.run_id, metrics=batch[:_MAX_BATCH_METRICS])
                batch = batch[_MAX_BATCH_METRICS:]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if artifact_path is not None:
            check_artifact_path(artifact_path)
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, check_artifact_path(artifact_file))

    def log_yaml(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.log_text(yaml.safe_dump(dict(data), sort_keys=False), artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status


class EpochLog:
    """The per-epoch metrics of one run on their way to MLflow: the only way epochs are logged.

    Epochs wait here until the tracking server takes them, each under its own step, as many
    as wait in one call (:meth:`TrackedRun.log_steps`). An epoch is not split across calls
    (unless it alone holds more than MLflow's batch of 1,000 metrics), so it is stored whole or
    not at all, its ``epoch`` metric with it: after a call whose answer was lost, and before the
    first send (a resumed run), the epochs the server already holds are skipped, and every
    epoch is logged once.
    """

    def __init__(self, run: TrackedRun):
        self.run = run
        self.waiting: dict[int, dict[str, Any]] = {}
        self._in_doubt = True  # nothing is known of what the run holds until it is asked

    def add(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """Queue ``epoch``'s metrics (non-numeric values are never logged); the last wins."""
        self.waiting[int(epoch)] = dict(metrics)

    def flush(self) -> None:
        """Send the waiting epochs in order.

        Raises:
            Exception: the server did not take them (MlflowException, requests' and OSError
                kinds); what was not sent keeps waiting.
        """
        try:
            if self._in_doubt and self.waiting:
                stored = self.run.client.get_metric_history(self.run.run_id, "epoch")
                for epoch in {int(m.step) for m in stored} & set(self.waiting):
                    del self.waiting[epoch]
            if self.waiting:
                self.run.log_steps(self.waiting)
                self.waiting.clear()
            self._in_doubt = False
        except Exception:
            self._in_doubt = True
            raise


def close_run(
    run: TrackedRun,
    status: str,
    *,
    wall_s: float,
    resources: tuple[float, float],
    step: int,
    stopped_early: bool = False,
    attempt_wall: tuple[int, float] | None = None,
) -> None:
    """Log a run's cost and close it: how every run ends (trials, the base, full trainings).

    ``wall_s`` is the run's wall time (every attempt), ``resources`` the ``(CPUs, GPUs)`` it held
    (:func:`autopose.platform.runner.resources_of`): ``trial_wall_s``, ``cost_cpu_s`` and
    ``cost_gpu_s`` are logged at ``step``, in one call with ``attempt_wall`` (the closing attempt's
    step and wall time, as ``attempt_wall_s``) when given. ``stopped_early`` tags a run closed
    before its planned epochs.
    """
    cpus, gpus = resources
    cost = {"trial_wall_s": wall_s, "cost_cpu_s": wall_s * cpus, "cost_gpu_s": wall_s * gpus}
    entries = {step: cost}
    if attempt_wall is not None:
        attempt, wall = attempt_wall
        entries.setdefault(attempt, {})["attempt_wall_s"] = wall
    run.log_steps(entries)
    if stopped_early:
        run.set_tags({TAG_STOPPED_EARLY: "true"})
    run.finish(status)


def check_artifact_path(artifact: str) -> str:
    """An artifact path stays inside its run's artifact folder: relative, no ``..``.

    Raises:
        AutoposeError: an absolute path, a drive, or a ``..`` part.
    """
    parts = artifact.replace("\\", "/").split("/")
    if not artifact or artifact.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
        raise AutoposeError(
            f"artifact path {artifact!r} must stay inside the run's artifacts", field="artifact"
        )
    return artifact


def get_run(tracking_uri: str, run_id: str):
    """The MLflow run ``run_id``.

    Raises:
        AutoposeError: no such run in this tracking store.
    """
    try:
        return client(tracking_uri).get_run(run_id)
    except MlflowException:
        raise AutoposeError(f"no MLflow run {run_id!r} in {tracking_uri}", field="RUN_ID") from None


def download_artifact(tracking_uri: str, run_id: str, artifact: str, dst: str | Path) -> Path:
    """Download one artifact of a run into folder ``dst``.

    Raises:
        AutoposeError: the run has no such artifact.
    """
    check_artifact_path(artifact)
    try:
        local = client(tracking_uri).download_artifacts(run_id, artifact, str(dst))
    except (MlflowException, OSError) as error:
        first = first_line(error, 160)
        raise AutoposeError(f"run {run_id} has no artifact {artifact} ({first})", field="RUN_ID") from None
    return Path(local)


def log_model(
    tracking_uri: str,
    run_id: str,
    model: torch.nn.Module,
    *,
    registered_model: str,
    alias: str | None,
    description: str | None = None,
) -> tuple[str, str]:
    """Log ``model`` as an MLflow PyTorch model of run ``run_id``, register it under
    ``registered_model`` (the new version described by ``description``) and point ``alias``
    at the new version.

    Returns:
        ``(model_uri, version)``.
    """
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    # MLflow prints its registry steps ("Successfully registered model …") to stderr, in the middle
    # of the caller's own progress lines: they go to the debug log instead.
    chatter = io.StringIO()
    with (
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None),
        contextlib.redirect_stderr(chatter),
    ):
        info = mlflow.pytorch.log_model(
            model.cpu().eval(),
            name="model",
            registered_model_name=registered_model,
            # Plain pickle: the safe 'pt2' format needs torch.export of the whole model.
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "autopose"],
        )
    if chatter.getvalue().strip():
        logging.getLogger(__name__).debug("MLflow: %s", " ".join(chatter.getvalue().split()))
    version = str(info.registered_model_version)
    if description:
        client(tracking_uri).update_model_version(registered_model, version, description=description)
    if alias:
        client(tracking_uri).set_registered_model_alias(registered_model, alias, version)
    return info.model_uri, version


def run_status_counts(tracking_uri: str, experiment_id: str) -> dict[str, int]:
    """How many runs of an experiment are in each status (for reports and tests)."""
    counts: dict[str, int] = {}
    for run in client(tracking_uri).search_runs([experiment_id], max_results=5000):
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return counts


__all__ = [
    "CONFIG_ARTIFACT",
    "EXAMPLES_ARTIFACT",
    "FULL_TRAIN_KIND",
    "POLICY_ARTIFACT",
    "SEARCH_KINDS",
    "TAG_KIND",
    "TAG_PARENT",
    "TAG_PROMOTED",
    "TAG_SEED",
    "TAG_TRIAL",
    "EpochLog",
    "RunStatus",
    "TrackedRun",
    "check_artifact_path",
    "check_tracking",
    "close_run",
    "download_artifact",
    "ensure_experiment",
    "find_run",
    "flatten",
    "get_run",
    "log_model",
    "require_store",
]
