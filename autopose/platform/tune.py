"""``autopose search``: one Ray Tune experiment of policy-search trials beside baselines.

Every trial trains the same model under the same budget (the config's
``train`` section) and differs only in its augmentation: ``search`` trials
learn a RelaxedPolicy with the bi-level step, baselines use random policies
(one per seed), the hand-crafted recipe, none, and optionally RandAugment and
TrivialAugment. Each trial is a small driver function that opens its MLflow run
and builds a Ray Train ``TorchTrainer`` (:func:`autopose.platform.runner.fit`);
Tune runs as many trials at once as the cluster's resources allow (or
``tune.max_concurrent``) and ranks them by ``val_ap``.

Methods beside the differentiable search, each a Tune run of its own scored on the holdout split
(``data.search_val``): ``tpe`` (``tune/<name>+tpe``: Optuna's TPE proposes discrete policies,
ASHA stops the weak) and ``pba`` (``tune/<name>+pba``: Population Based Augmentation on Tune's
PBT scheduler; its best member trained under a schedule of policies).

Selection: with a holdout split the search ends with one more Tune run
(``tune/<name>+selection``): every finished search trial's exported policy, tpe's and pba's best,
``none`` and the hand-crafted recipe fine-tune from the same start under the trials' budget,
once per ``selection.seeds``, and the best mean ``holdout_ap`` is tagged ``autopose.selected``
(:mod:`autopose.platform.selection`). The search's own baseline trials of the same kind and
seed are reused, not trained again.

Resources: a trial with Ray Train workers holds almost nothing itself
(0.01 CPU: Tune refuses 0) and its workers hold ``cpus_per_worker`` /
``gpus_per_worker`` each; a trial with ``num_workers: 0`` trains in its own
process and holds one worker's resources.

Failures: a failed trial is retried ``tune.max_failures`` times and resumes from
its latest checkpoint; ``--resume`` (:func:`run_search` with ``resume=True``)
finishes an interrupted experiment with ``Tuner.restore(resume_errored=True)``.

A tracking server that goes away mid-search stops nothing: trials train on and
keep the epochs it did not take (sent when it answers again, same steps); the
driver says so once (:class:`WatchTracking`). Tune's results hold every epoch,
so after the trials end :func:`sync_runs` completes each trial's run from them
(the epochs it misses, its close); a server still away then is reported with
what is missing, and ``--resume`` completes the runs once it is back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.search import ConcurrencyLimiter, Searcher

from autopose.augment import SearchSpace
from autopose.engine.config import RANGED_SETTINGS, AugmentSpec, to_plain
from autopose.engine.train import check_data
from autopose.errors import AutoposeError, error_cause, first_line
from autopose.platform.cluster import ray_session
from autopose.platform.compare import read_selection
from autopose.platform.config import ExperimentConfig, check_name, storage_join
from autopose.platform.runner import POLICY_FILE, TrainingJob, fit, resources_of
from autopose.platform.selection import SELECTION_BASELINES
from autopose.platform.tracking import (
    CONFIG_ARTIFACT,
    MLFLOW_NOTE,
    POLICY_ARTIFACT,
    QUICK_TRACKING_ENV,
    TAG_ATTEMPT_STARTED,
    TAG_ATTEMPTS,
    TAG_CANDIDATE,
    TAG_KIND,
    TAG_NODE,
    TAG_ORPHANED,
    TAG_SEARCH,
    TAG_SEED,
    TAG_SELECTED,
    TAG_STAGE,
    TAG_STOPPED_EARLY,
    TAG_TRIAL,
    TrackedRun,
    bounded_http,
    check_tracking,
    client,
    ensure_experiment,
    flatten,
    quick_tracking_failures,
    source_tags,
    utc_now,
)
from autopose.platform.warm_start import prepare_warm_start

logger = logging.getLogger(__name__)

METRIC, MODE = "val_ap", "max"
SELECTION_STAGE = "selection"
TPE_KIND, PBA_KIND, HOLDOUT_METRIC = "tpe", "pba", "holdout_ap"
# The first words of a trial run's description in MLflow (its ``mlflow.note.content``), by kind.
TRIAL_DESCRIPTIONS = {
    "search": "Differentiable policy search trial (bi-level, the paper's Eq. 8)",
    "none": "Baseline without augmentation",
    "random": "Baseline: a random policy",
    "handcrafted": "Baseline: the hand-crafted policy (flip, rotation, scale, half-body)",
    "randaugment": "Baseline: RandAugment",
    "trivialaugment": "Baseline: TrivialAugment",
    TPE_KIND: "Optuna TPE proposal: a policy trained like a baseline",
    PBA_KIND: "PBA population member (Ray Tune's PBT)",
}
# Fault injection for tests and drills: "N" makes every trial fail once, right after the
# checkpoint of epoch N (0-based), to show that the retry resumes instead of restarting.
FAILURE_ENV = "AUTOPOSE_INJECT_FAILURE"
# "N": every trial's process kills itself (SIGKILL) once, right after the checkpoint of epoch N.
KILL_ENV = "AUTOPOSE_INJECT_KILL"


@dataclass
class TrialSetup:
    """What every trial of one search shares (sent once through the object store)."""

    experiment: ExperimentConfig
    search_name: str
    experiment_id: str
    inject_failure_after_epoch: int | None = None
    inject_kill_after_epoch: int | None = None
    source: dict[str, str] = field(default_factory=dict)  # tracking.source_tags of the driver


@dataclass
class TrialOutcome:
    """One row of a finished search."""

    trial_id: str
    kind: str
    seed: int
    val_ap: float | None
    status: str
    run_id: str | None
    error: str | None = None
    tracking: str | None = None  # what its MLflow run still misses (tracking server away)
    candidate: str | None = None  # the selection candidate it scores (selection stage only)
    holdout_ap: float | None = None
    error_file: str | None = None  # Tune's record of a failed trial's traceback


# -- the trial --------------------------------------------------------------------------------------------
def trial_spec(config: dict[str, Any], experiment: ExperimentConfig) -> AugmentSpec:
    """The augmentation of a trial from its Tune config (``{"trial": {kind, seed}, tau1…}``;
    a selection candidate's ``trial`` also holds ``candidate`` and, for an exported policy
    (kind ``policy``), the policy's JSON)."""
    planned = config["trial"]
    bilevel = None
    if planned["kind"] == "search":
        sampled = {name: config[name] for name in RANGED_SETTINGS if name in config}
        bilevel = experiment.search.resolved(**sampled)  # the one place ranges get their values
    if planned["kind"] in (TPE_KIND, PBA_KIND):  # a sampled policy: trained like any given policy
        policy = sampled_policy(config["policy"], SearchSpace.from_dict(experiment.space_dict))
        return AugmentSpec(kind="policy", seed=int(planned["seed"]), policy=policy)
    return AugmentSpec(
        kind=planned["kind"], seed=int(planned["seed"]), policy=planned.get("policy"), bilevel=bilevel
    )


def trial_tags(setup: TrialSetup, config: dict[str, Any], trial_id: str) -> dict[str, str]:
    """The tags that identify a trial's run (``autopose.trial`` finds it again)."""
    planned = config["trial"]
    kind, seed = str(planned["kind"]), int(planned["seed"])
    tags = {
        **setup.source,
        TAG_TRIAL: f"{setup.search_name}/{trial_id}",
        TAG_KIND: kind,
        TAG_SEED: str(seed),
        TAG_SEARCH: setup.search_name,
        MLFLOW_NOTE: f"{TRIAL_DESCRIPTIONS.get(kind, kind)}, seed {seed}, of search {setup.search_name}.",
    }
    if planned.get("candidate") is not None:
        tags |= {TAG_STAGE: SELECTION_STAGE, TAG_CANDIDATE: str(planned["candidate"])}
        tags[MLFLOW_NOTE] = (
            f"Selection stage of search {setup.search_name}: candidate {planned['candidate']} "
            f"retrained, seed {seed}, scored on the holdout split."
        )
    return tags


def open_trial_run(setup: TrialSetup, spec: AugmentSpec, tags: dict[str, str]) -> TrackedRun:
    """The trial's run, found by its tag or created, with its params and config logged."""
    experiment = setup.experiment
    candidate = tags.get(TAG_CANDIDATE)
    run_name = f"{spec.kind}-{spec.seed}" if candidate is None else f"selection {candidate} seed {spec.seed}"
    run = TrackedRun.open(experiment.tracking_uri, setup.experiment_id, run_name=run_name, tags=tags)
    params = {
        "kind": spec.kind,
        "seed": spec.seed,
        **flatten(to_plain(spec.bilevel) if spec.bilevel else {}, "search."),
        **flatten(to_plain(experiment.model), "model."),
        **flatten(to_plain(experiment.train), "train."),
        **flatten(to_plain(experiment.data), "data."),
        "space": experiment.space_dict.get("name", ""),
    }
    run.log_params(params)
    run.log_yaml(experiment.to_dict(), CONFIG_ARTIFACT)
    return run


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: open the trial's MLflow run, train on Ray Train, record the cost.

    A tracking server that does not answer stops nothing: the trial trains untracked
    (or keeps what it could not log) and the driver completes the run afterwards.
    """
    quick_tracking_failures()
    experiment = setup.experiment
    spec = trial_spec(config, experiment)
    trial_id = ray.tune.get_context().get_trial_id()
    tags = trial_tags(setup, config, trial_id)
    tags[TAG_NODE] = ray.get_runtime_context().get_node_id()  # where the trial's driver ran
    run = None
    try:
        finished = _finished_run(
            experiment.tracking_uri, setup.experiment_id, tags[TAG_TRIAL], experiment.train
        )
        if finished is not None:
            # The driver died after this trial had finished but before Tune saved that: the resumed
            # search gets the logged result back instead of training the trial (and its run) again.
            ray.tune.report(dict(finished.data.metrics))
            return
        run = open_trial_run(setup, spec, tags)
        attempt = len(run.client.get_metric_history(run.run_id, "attempt_wall_s"))
        # Every start is counted, also those whose process died before closing the run (SIGKILL,
        # lost node). Tags, not metrics: a timestamp is no score to plot against val AP.
        starts = int(run.client.get_run(run.run_id).data.tags.get(TAG_ATTEMPTS, "0"))
        run.set_tags({TAG_ATTEMPTS: starts + 1, TAG_ATTEMPT_STARTED: utc_now()})
    except Exception as error:  # MlflowException, requests' and OSError kinds: the server is away
        logger.debug("trial %s trains untracked: %s", trial_id, first_line(error))
        run = None
    job = TrainingJob(
        data=experiment.data,
        model=experiment.model,
        train=experiment.train,
        augment=spec,
        space=experiment.space_dict,
        tracking_uri=experiment.tracking_uri,
        run_id=run.run_id if run is not None else None,
        examples=experiment.examples,
        title=f"{setup.search_name}: {spec.kind} (seed {spec.seed})",
        in_tune=True,
        inject_failure_after_epoch=setup.inject_failure_after_epoch,
        inject_kill_after_epoch=setup.inject_kill_after_epoch,
        tracking_lost=run is None,
    )
    started = time.perf_counter()

    def close(status: str) -> None:
        """Log this attempt's time and the trial's cost so far, then close the run. A server
        away leaves the run open: the driver closes it from Tune's results (:func:`sync_runs`)."""
        if run is None:
            return
        try:
            complete = _epochs_logged(run) >= experiment.train.epochs
            if status == "STOPPED" and not complete and config["trial"]["kind"] == PBA_KIND:
                # PBT pauses members at every perturbation and starts them again (the same run)
                run.log_metrics({"attempt_wall_s": time.perf_counter() - started}, step=attempt)
                return
            if status == "STOPPED":  # stopped by Tune: complete when its last epoch is logged
                if not complete:
                    run.set_tags({TAG_STOPPED_EARLY: "true"})
                status = "FINISHED" if complete else "KILLED"
            run.log_metrics({"attempt_wall_s": time.perf_counter() - started}, step=attempt)
            total_wall = sum(m.value for m in run.client.get_metric_history(run.run_id, "attempt_wall_s"))
            cpus, gpus = resources_of(experiment.train)
            run.log_metrics(
                {
                    "trial_wall_s": total_wall,
                    "cost_cpu_s": total_wall * cpus,
                    "cost_gpu_s": total_wall * gpus,
                },
                step=experiment.train.epochs,
            )
            if status == "FINISHED" and _epochs_logged(run) < experiment.train.epochs:
                return  # epochs still wait to be logged: the driver completes and closes the run
            run.finish(status)
        except Exception as error:  # the server is away: the driver closes the run later
            logger.debug("trial %s: run %s left open: %s", trial_id, run.run_id, first_line(error))

    try:
        fit(
            job,
            name=f"{setup.search_name}-{trial_id}",
            storage_path=storage_join(experiment.storage_path, "train"),
            tune_callback=True,
        )
    except SystemExit:
        # Tune stops a trial by exiting its thread at a report: ASHA cutting it short, or reaching
        # max_t at the last epoch (then the trial is complete: its last epoch is logged).
        close("STOPPED")
        raise
    except BaseException:
        close("FAILED")
        raise
    close("FINISHED")


def _finished_run(tracking_uri: str, experiment_id: str, trial_key: str, train):
    """The trial's MLflow run when it is FINISHED with every epoch logged, else None."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_TRIAL}` = '{trial_key}'", max_results=1
    )
    if not found or found[0].info.status != "FINISHED":
        return None
    epochs = len(mlflow_client.get_metric_history(found[0].info.run_id, METRIC))
    return found[0] if epochs >= train.epochs else None


def _epochs_logged(run: TrackedRun) -> int:
    return len(run.client.get_metric_history(run.run_id, "val_ap"))


class CloseRuns(ray.tune.Callback):
    """On the driver: closes the MLflow run of a trial that ended without closing it itself.

    A trial stopped early by the scheduler (ASHA) is interrupted between two
    epochs, and a trial whose process died never reaches its own bookkeeping:
    their runs would stay RUNNING. Stopped runs end KILLED and tagged
    ``autopose.stopped_early``, with the cost Tune measured; dead ones FAILED
    (a retry reopens the same run).
    """

    def __init__(
        self, tracking_uri: str, experiment_id: str, search_name: str, cpus: float, gpus: float, epochs: int
    ):
        self.tracking_uri, self.experiment_id, self.search_name = tracking_uri, experiment_id, search_name
        self.cpus, self.gpus, self.epochs = cpus, gpus, epochs

    def _open_run(self, trial) -> TrackedRun | None:
        key = f"{self.search_name}/{trial.trial_id}"
        found = client(self.tracking_uri).search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_TRIAL}` = '{key}'", max_results=1
        )
        if not found or found[0].info.status != "RUNNING":
            return None
        return TrackedRun.attach(self.tracking_uri, found[0].info.run_id)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        try:
            self._complete(trial)
        except Exception as error:  # the tracking server is away: sync_runs closes the run later
            logger.debug("run of trial %s left open: %s", trial.trial_id, first_line(error))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        try:
            run = self._open_run(trial)
            if run is not None:
                run.finish("FAILED")
        except Exception as error:
            logger.debug("run of trial %s left open: %s", trial.trial_id, first_line(error))

    def _complete(self, trial) -> None:
        run = self._open_run(trial)
        if run is None:
            return
        result = trial.last_result or {}
        wall = float(result.get("time_total_s", 0.0))
        step = int(result.get("training_iteration", 0))
        run.log_metrics(
            {"trial_wall_s": wall, "cost_cpu_s": wall * self.cpus, "cost_gpu_s": wall * self.gpus}, step
        )
        complete = _epochs_logged(run) >= self.epochs
        if not complete:
            run.set_tags({TAG_STOPPED_EARLY: "true"})
        run.finish("FINISHED" if complete else "KILLED")


class WatchTracking(ray.tune.Callback):
    """On the driver: says once that the tracking server went away (trials report
    ``tracking_unlogged`` > 0), and once that it answers again (every trial caught up)."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self.waiting: dict[str, int] = {}  # trial id → epochs and artifacts it could not log yet
        self.lost = False

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        unlogged = int(result.get("tracking_unlogged") or 0)
        self.waiting[trial.trial_id] = unlogged
        if unlogged and not self.lost:
            self.lost = True
            logger.warning(
                "autopose: MLflow tracking server at %s does not answer (trial %s could not log epoch %s); "
                "training goes on, the unlogged epochs are kept and sent when it answers again",
                self.tracking_uri,
                _trial_name(trial),
                int(result.get("epoch", -1)),
            )
        elif self.lost and not any(self.waiting.values()):
            self.lost = False
            logger.warning(
                "autopose: MLflow tracking server at %s answers again; the waiting epochs are logged",
                self.tracking_uri,
            )


# -- the trials' plan ---------------------------------------------------------------------------------------
def planned_trials(experiment: ExperimentConfig) -> list[dict[str, Any]]:
    return [{"kind": spec.kind, "seed": spec.seed} for spec in experiment.trial_plan()]


class PlannedTrials(Searcher):
    """The fixed trials first (baselines, and search trials without ranged values), then
    ``count`` search trials whose ranged hyperparameters ``inner`` (Optuna) proposes.

    Tune's searchers explore one space; a search here mixes fixed baselines with
    tuned search trials, so this searcher hands out the fixed ones itself and asks
    ``inner`` only for the rest (and tells it only of those).
    """

    def __init__(self, fixed: list[dict[str, Any]], inner: Searcher, count: int, seed_base: int):
        super().__init__(metric=METRIC, mode=MODE)
        self.fixed = list(fixed)
        self.inner = inner
        self.count = count
        self.seed_base = seed_base
        self.handed_out = 0
        self.tuned = 0
        self.inner_trials: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.handed_out < len(self.fixed):
            self.handed_out += 1
            return {"trial": self.fixed[self.handed_out - 1]}
        if self.tuned >= self.count:
            return Searcher.FINISHED
        suggestion = self.inner.suggest(trial_id)
        if suggestion is None or suggestion == Searcher.FINISHED:
            return suggestion
        self.inner_trials.add(trial_id)
        self.tuned += 1
        return {"trial": {"kind": "search", "seed": self.seed_base + self.tuned - 1}, **suggestion}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.inner_trials:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.inner_trials:
            self.inner.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict[str, Any]:
        """This searcher's own bookkeeping (the inner searcher saves itself beside it)."""
        return {
            "fixed": self.fixed,
            "count": self.count,
            "seed_base": self.seed_base,
            "handed_out": self.handed_out,
            "tuned": self.tuned,
            "inner_trials": sorted(self.inner_trials),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.fixed, self.count, self.seed_base = state["fixed"], state["count"], state["seed_base"]
        self.handed_out, self.tuned = state["handed_out"], state["tuned"]
        self.inner_trials = set(state["inner_trials"])

    def save(self, checkpoint_path: str) -> None:
        # JSON, not pickle: reading our own state back must never run code from the storage folder.
        self.inner.save(f"{checkpoint_path}.inner")
        with open(checkpoint_path, "w") as stream:
            json.dump(self.get_state(), stream)

    def restore(self, checkpoint_path: str) -> None:
        try:
            with open(checkpoint_path, encoding="utf-8") as stream:
                state = json.load(stream)
            self.set_state(state)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise AutoposeError(
                f"not a searcher state written by autopose ({type(error).__name__}); never unpickled",
                path=checkpoint_path,
            ) from None
        self.inner.restore(f"{checkpoint_path}.inner")


def _optuna_searcher(experiment: ExperimentConfig) -> Searcher:
    from ray.tune.search.optuna import OptunaSearch

    space = {
        name: ray.tune.loguniform(*getattr(experiment.search, name))
        for name in RANGED_SETTINGS
        if experiment.search.is_range(name)
    }
    if not space:
        raise AutoposeError(
            "search_alg: optuna needs a [low, high] range in search.tau1, search.tau2 or search.policy_lr",
            path=experiment.source,
            field="tune.search_alg",
        )
    optuna = OptunaSearch(
        space=OptunaSearch.convert_search_space(space), metric=METRIC, mode=MODE, seed=experiment.train.seed
    )
    fixed = [p for p in planned_trials(experiment) if p["kind"] != "search"]
    return PlannedTrials(fixed, optuna, experiment.search.trials, experiment.train.seed)


def _trial_name(trial) -> str:
    planned = trial.config.get("trial", {})
    if planned.get("candidate") is not None:
        return f"selection-{planned['candidate']}-seed{planned.get('seed', 0)}-{trial.trial_id}"
    return f"{planned.get('kind', 'trial')}-{planned.get('seed', 0)}-{trial.trial_id}"


def _trainable(setup: TrialSetup):
    train = setup.experiment.train
    if train.num_workers == 0:
        resources = {"cpu": train.cpus_per_worker, "gpu": train.gpus_per_worker}
    else:
        resources = {"cpu": 0.01}  # the driver only waits; its Ray Train workers hold the resources
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), resources)


def _close_runs(setup: TrialSetup) -> CloseRuns:
    cpus, gpus = resources_of(setup.experiment.train)
    experiment = setup.experiment
    return CloseRuns(
        experiment.tracking_uri, setup.experiment_id, setup.search_name, cpus, gpus, experiment.train.epochs
    )


def _asha(experiment: ExperimentConfig):
    """ASHA over epochs (``tune.grace_period``, ``tune.reduction_factor``) on the Tuner's metric."""
    from ray.tune.schedulers import ASHAScheduler

    epochs, settings = experiment.train.epochs, experiment.tune
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=min(settings.grace_period, epochs),
        reduction_factor=settings.reduction_factor,
    )


def _new_tuner(
    setup: TrialSetup,
    path: str,
    *,
    param_space: dict[str, Any],
    num_samples: int,
    verbose: int,
    metric: str = METRIC,
    search_alg=None,
    scheduler=None,
    checkpoints_kept: int | None = 1,
    reuse_actors: bool = True,
    stop: dict[str, Any] | None = None,
) -> ray.tune.Tuner:
    """A Tuner of ``setup``'s trials in ``path`` (``<storage>/tune/<its name>``): what every Tune run
    of a search shares (names, retries, the runs' closing callbacks); ``checkpoints_kept`` per
    trial (None: all)."""
    experiment = setup.experiment
    settings = experiment.tune
    return ray.tune.Tuner(
        _trainable(setup),
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=metric,
            mode=MODE,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=settings.max_concurrent,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
            # later trials skip the process start and imports (about 10 s each here)
            reuse_actors=reuse_actors,
        ),
        run_config=ray.tune.RunConfig(
            name=Path(path).name,
            storage_path=storage_join(experiment.storage_path, "tune"),
            failure_config=ray.tune.FailureConfig(max_failures=settings.max_failures),
            callbacks=[_close_runs(setup), WatchTracking(experiment.tracking_uri)],
            # One checkpoint per trial: Tune deletes the older only once the newer is persisted,
            # and at two a smoke search's trials alone held 3.1 GB of a test run's 13 GB.
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=checkpoints_kept),
            stop=stop,
            verbose=verbose,
        ),
    )


def _tuner(
    setup: TrialSetup,
    path: str,
    *,
    resume: bool,
    verbose: int,
    candidates: list[dict[str, Any]] | None = None,
) -> ray.tune.Tuner:
    """The Tuner of the search's trials, or with ``candidates`` of its selection stage (every
    candidate trains to the end: no early stopping, no sampler)."""
    experiment = setup.experiment
    if resume:
        return ray.tune.Tuner.restore(path, trainable=_trainable(setup), resume_errored=True)
    settings = experiment.tune
    scheduler = _asha(experiment) if settings.scheduler == "asha" and candidates is None else None
    plan = planned_trials(experiment) if candidates is None else candidates
    if settings.search_alg == "optuna" and candidates is None:
        search_alg = _optuna_searcher(experiment)
        if settings.max_concurrent:
            search_alg = ConcurrencyLimiter(search_alg, max_concurrent=settings.max_concurrent)
        return _new_tuner(
            setup,
            path,
            param_space={},
            num_samples=len(plan),
            verbose=verbose,
            search_alg=search_alg,
            scheduler=scheduler,
        )
    param_space = {"trial": ray.tune.grid_search(plan)}
    return _new_tuner(
        setup, path, param_space=param_space, num_samples=1, verbose=verbose, scheduler=scheduler
    )


def run_search(
    experiment: ExperimentConfig,
    *,
    name: str | None = None,
    address: str | None = None,
    resume: bool = False,
    verbose: int = 1,
    say: Callable[[str], None] = logger.info,
) -> list[TrialOutcome]:
    """Run (or with ``resume`` finish) the search the config describes.

    Args:
        experiment: the loaded config (checked already: nothing below fails on it).
        name: the MLflow experiment and Tune run name (default: the config's).
        address: Ray address (default: the running Ray, ``$RAY_ADDRESS``, or a new local one).
        resume: finish an interrupted search of the same name.
        verbose: Tune's console output (0 silent, 1 the trial table).
        say: where the driver's own progress lines go (the warm start's base model).

    Returns:
        One :class:`TrialOutcome` per trial, then one per selection-stage training (``candidate``
        set); ``tracking`` says what its MLflow run still misses when the tracking server went
        away and is not back yet. :func:`autopose.platform.compare.read_selection` reads the
        selection back.

    Raises:
        AutoposeError: the tracking store is unreachable (before Ray starts), a
            search of this name exists already (without ``resume``) or none does
            (with it).
    """
    search_name = check_name(name or experiment.experiment, field="--experiment")
    check_data(experiment.data, experiment.model)  # every data file, from its footer: nothing written yet
    check_tracking(experiment.tracking_uri)
    experiment_id = ensure_experiment(experiment.tracking_uri, search_name)
    path = storage_join(experiment.storage_path, "tune", search_name)
    failure, kill = os.environ.get(FAILURE_ENV), os.environ.get(KILL_ENV)
    setup = TrialSetup(
        experiment=experiment,
        search_name=search_name,
        experiment_id=experiment_id,
        inject_failure_after_epoch=int(failure) if failure not in (None, "") else None,
        inject_kill_after_epoch=int(kill) if kill not in (None, "") else None,
        source=source_tags("autopose search"),
    )
    # Said before Ray starts (tens of seconds): reading the storage folder needs no Ray.
    exists = ray.tune.Tuner.can_restore(path)
    if resume and not exists:
        raise AutoposeError(f"no search named {search_name!r} to resume in {path}", field="--resume")
    if exists and not resume:
        raise AutoposeError(
            f"a search named {search_name!r} exists already in {path}: add --resume to finish it, "
            "or choose another --experiment name",
            field="--experiment",
        )
    with ray_session(address):
        # Every trial starts from the same weights: the base model, trained once (or cached).
        setup.experiment = prepare_warm_start(experiment, experiment_id, search_name, say=say)
        # The driver's own MLflow calls (the callbacks, the clean-up) must not stall the search
        # for minutes each when the server goes away.
        with bounded_http(**QUICK_TRACKING_ENV):
            stages = {"search": _tuner(setup, path, resume=resume, verbose=verbose).fit()}
            if experiment.tpe.trials:
                stages[TPE_KIND] = _run_tpe(setup, path, resume=resume, verbose=verbose, say=say)
            if experiment.pba.population:
                stages[PBA_KIND] = _run_pba(setup, path, resume=resume, verbose=verbose, say=say)
            if experiment.runs_selection():
                selection = _run_selection(setup, stages, path, resume=resume, verbose=verbose, say=say)
                if selection is not None:
                    stages[SELECTION_STAGE] = selection
    with bounded_http(**QUICK_TRACKING_ENV):
        missing: dict[str, str] | None = {}
        for results in stages.values():
            missing = _merge_missing(missing, sync_runs(results, setup))
        if missing is None:
            try:
                _fail_orphaned_runs(experiment.tracking_uri, experiment_id, search_name)
            except Exception as error:  # the server went away just now: --resume does it later
                logger.warning(
                    "autopose: MLflow tracking server at %s stopped answering (%s): runs an earlier "
                    "killed driver left RUNNING are not marked FAILED yet; --resume does it",
                    experiment.tracking_uri,
                    first_line(error),
                )
            missing = {}
        else:
            troubled = ", ".join(
                sorted(
                    _result_name(r) for results in stages.values() for r in results if _trial_id(r) in missing
                )
            )
            logger.warning(
                "autopose: MLflow tracking server at %s still does not answer: the runs of %d trial(s) "
                "miss epochs or their close (%s); every epoch is kept in Tune's results in %s, and "
                "`autopose search --config %s --experiment %s --resume` logs them once the server is back",
                experiment.tracking_uri,
                len(missing),
                troubled,
                path,
                experiment.source,
                search_name,
            )
        outcomes = [
            o
            for results in stages.values()
            for o in _outcomes(results, experiment, search_name, experiment_id, missing)
        ]
        if experiment.runs_selection() and not missing:
            _mark_selected(experiment, search_name, say)
        return outcomes


def _merge_missing(so_far: dict[str, str] | None, more: dict[str, str] | None) -> dict[str, str] | None:
    """Two stages' :func:`sync_runs` answers as one (None: nothing missing)."""
    merged = {**(so_far or {}), **(more or {})}
    return merged or None


# -- the selection stage ---------------------------------------------------------------------------------
def selection_candidates(
    experiment: ExperimentConfig, results, tpe_results=(), pba_results=()
) -> list[dict[str, Any]]:
    """The selection stage's trials: every finished search trial's exported policy, the ``tpe``
    method's best policy, the ``pba`` method's best schedule, and the selection baselines, once
    per selection seed, less the
    baseline trials the search already trained to the end with the same kind and seed (the same
    training: reused, not repeated).

    A search trial counts as finished when its last report holds ``holdout_ap`` (reported only
    after the last epoch): one stopped early or failed exports nothing.
    """
    exports: dict[str, dict[str, Any]] = {}
    best_tpe = tpe_best(experiment, tpe_results)
    if best_tpe is not None:
        exports[TPE_KIND] = best_tpe
    best_pba = pba_best(experiment, pba_results)
    if best_pba is not None:
        exports[PBA_KIND] = best_pba
    trained: set[tuple[str, int]] = set()
    for result in results:
        planned = result.config.get("trial", {})
        finished = not result.error and (result.metrics or {}).get("holdout_ap") is not None
        if not finished:
            continue
        if planned.get("kind") != "search":
            trained.add((planned.get("kind"), int(planned.get("seed", 0))))
        else:
            exported = checkpoint_policy(result)
            if exported is not None:
                exports[f"search-{int(planned['seed'])}"] = exported
    plan = []
    for seed in experiment.selection_seeds():
        plan += [
            {"kind": kind, "seed": seed, "candidate": kind}
            for kind in SELECTION_BASELINES
            if (kind, seed) not in trained
        ]
        plan += [
            {"kind": "policy", "seed": seed, "candidate": name, "policy": policy}
            for name, policy in sorted(exports.items())
        ]
    return plan


# -- the discrete policy space (the tpe and pba methods), and the tpe method -----------------------------
def policy_param_space(space: SearchSpace) -> dict[str, Any]:
    """Tune's space of one discrete policy: ``s<k>`` (sub-policy) → ``t<n>`` (step) → its op,
    probability (steps of 0.1) and magnitude (an integer 0–10, as the paper's grid)."""
    return {
        f"s{k}": {
            f"t{n}": {
                "op": ray.tune.choice(list(space.op_names)),
                "p": ray.tune.quniform(0.0, 1.0, 0.1),
                "m": ray.tune.randint(0, 11),
            }
            for n in range(space.N)
        }
        for k in range(space.K)
    }


def sampled_policy(sampled: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """The policy document of one point of :func:`policy_param_space`."""
    sub_policies = [
        [
            {
                "op": sampled[f"s{k}"][f"t{n}"]["op"],
                "p": round(float(sampled[f"s{k}"][f"t{n}"]["p"]), 1),
                "m": float(sampled[f"s{k}"][f"t{n}"]["m"]),
            }
            for n in range(space.N)
        ]
        for k in range(space.K)
    ]
    return {"format": "autopose.policy/1", "space": space.name, "sub_policies": sub_policies}


def tpe_best(experiment: ExperimentConfig, results) -> dict[str, Any] | None:
    """The policy of the tpe trial with the best holdout AP among those that trained every epoch
    (ASHA stops the others early); None when none did."""
    best = _best_on_holdout(experiment, results)
    if best is None:
        return None
    return sampled_policy(best.config["policy"], SearchSpace.from_dict(experiment.space_dict))


def _best_on_holdout(experiment: ExperimentConfig, results):
    """The result with the best holdout AP among those that trained every epoch; None when none did."""
    finished = [
        r
        for r in results
        if not r.error
        and (r.metrics or {}).get(HOLDOUT_METRIC) is not None
        and int((r.metrics or {}).get("epoch", -1)) == experiment.train.epochs - 1
    ]
    return max(finished, key=lambda r: r.metrics[HOLDOUT_METRIC]) if finished else None


def _run_tpe(setup: TrialSetup, path: str, *, resume: bool, verbose: int, say):
    """The tpe method: ``tpe.trials`` policies proposed by Optuna's TPE, each fine-tuned from the
    trials' start and scored on holdout after every epoch, ASHA stopping the weak (a Tune run of
    its own, ``<name>+tpe``)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    experiment = setup.experiment
    # every epoch scores holdout, so that ASHA can compare candidates before their last epoch
    train = dataclasses.replace(experiment.train, holdout_every_epoch=True)
    tpe_setup = dataclasses.replace(setup, experiment=experiment.replace(train=train))
    tpe_path = f"{path}+{TPE_KIND}"
    if resume and ray.tune.Tuner.can_restore(tpe_path):
        return ray.tune.Tuner.restore(tpe_path, trainable=_trainable(tpe_setup), resume_errored=True).fit()
    say(f"tpe: {experiment.tpe.trials} policies proposed by Optuna's TPE, scored on the holdout split")
    sampler = optuna.samplers.TPESampler(seed=train.seed, n_startup_trials=experiment.tpe.startup_trials)
    tuner = _new_tuner(
        tpe_setup,
        tpe_path,
        param_space={
            "trial": {"kind": TPE_KIND, "seed": train.seed},
            "policy": policy_param_space(SearchSpace.from_dict(experiment.space_dict)),
        },
        num_samples=experiment.tpe.trials,
        verbose=verbose,
        metric=HOLDOUT_METRIC,
        search_alg=OptunaSearch(sampler=sampler),
        scheduler=_asha(tpe_setup.experiment),
    )
    return tuner.fit()


# -- the pba method ---------------------------------------------------------------------------------------
def perturb_sampled(
    sampled: dict[str, Any], op_names: tuple[str, ...], rng: random.Random, resample_probability: float
) -> dict[str, Any]:
    """PBA's explore (Ho et al. 2019, Algorithm 2) on one point of :func:`policy_param_space`:
    each step's op, p and m is drawn afresh with ``resample_probability``; otherwise the op stays,
    p moves by 0–3 tenths and m by 0–3 either way, clipped to [0, 1] and [0, 10]."""

    def moved(value: float, unit: float, high: float) -> float:
        return min(max(value + rng.choice((-1, 1)) * rng.randint(0, 3) * unit, 0.0), high)

    perturbed = copy.deepcopy(sampled)
    for steps in perturbed.values():
        for step in steps.values():
            if rng.random() < resample_probability:
                step["op"] = rng.choice(op_names)
            fresh_p, fresh_m = rng.random() < resample_probability, rng.random() < resample_probability
            step["p"] = rng.randint(0, 10) / 10 if fresh_p else round(moved(step["p"], 0.1, 1.0), 1)
            step["m"] = rng.randint(0, 10) if fresh_m else int(moved(step["m"], 1, 10))
    return perturbed


@dataclass
class PbaExplore:
    """PBT's explore step for pba members: their config's policy perturbed (:func:`perturb_sampled`).
    Unseeded, as PBT's own choice of which member to copy is."""

    op_names: tuple[str, ...]
    resample_probability: float

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        explored = dict(config)
        explored["policy"] = perturb_sampled(
            config["policy"], self.op_names, random.Random(), self.resample_probability
        )
        return explored


def pba_best(experiment: ExperimentConfig, results) -> dict[str, Any] | None:
    """The policy document of the pba member with the best holdout AP after its last epoch: the
    schedule of policies it trained with (``autopose.schedule/1``; one policy when no other
    member's was ever handed to it); None when no member finished."""
    best = _best_on_holdout(experiment, results)
    return checkpoint_policy(best) if best is not None else None


def checkpoint_policy(result) -> dict[str, Any] | None:
    """The policy document a trial's latest checkpoint holds (its ``policy.json``); None without."""
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as folder:
        policy_file = Path(folder) / POLICY_FILE
        return json.loads(policy_file.read_text()) if policy_file.is_file() else None


def _run_pba(setup: TrialSetup, path: str, *, resume: bool, verbose: int, say):
    """The pba method: a population of ``pba.population`` random discrete policies fine-tuned
    from the trials' start, scored on holdout after every epoch, with Tune's PBT (synchronous)
    copying the top members' checkpoints and perturbed policies into the bottom ones every
    ``pba.perturbation_interval`` epochs (a Tune run of its own, ``<name>+pba``)."""
    from ray.tune.schedulers import PopulationBasedTraining

    experiment = setup.experiment
    settings = experiment.pba
    # every member scores holdout and keeps a checkpoint every epoch: PBT ranks and copies them
    train = dataclasses.replace(experiment.train, holdout_every_epoch=True, checkpoint_every=1)
    pba_setup = dataclasses.replace(setup, experiment=experiment.replace(train=train))
    pba_path = f"{path}+{PBA_KIND}"
    if resume and ray.tune.Tuner.can_restore(pba_path):
        return ray.tune.Tuner.restore(pba_path, trainable=_trainable(pba_setup), resume_errored=True).fit()
    say(
        f"pba: a population of {settings.population} policies, perturbed by PBT every "
        f"{settings.perturbation_interval} epoch(s), scored on the holdout split"
    )
    space = SearchSpace.from_dict(experiment.space_dict)
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=settings.perturbation_interval,
        quantile_fraction=settings.quantile_fraction,
        custom_explore_fn=PbaExplore(tuple(space.op_names), settings.resample_probability),
        synch=True,  # every member reaches the interval before any is ranked: a fair comparison
    )
    tuner = _new_tuner(
        pba_setup,
        pba_path,
        param_space={"trial": {"kind": PBA_KIND, "seed": train.seed}, "policy": policy_param_space(space)},
        num_samples=settings.population,
        verbose=verbose,
        metric=HOLDOUT_METRIC,
        scheduler=scheduler,
        # every checkpoint stays: a bottom member copies the top one's checkpoint of the interval,
        # which that member's next one would otherwise replace before the copy starts
        checkpoints_kept=None,
        # Tune ends a member at its last epoch before PBT sees the result: PBT knows no last epoch,
        # and a perturbation there restarted the worse member on an epoch it had done, then waited
        # (synchronous) for a partner that had ended: the search hung (seen in a test run).
        stop={"training_iteration": train.epochs},
        # PBT stops and restarts members at every perturbation anyway: a fresh process each time.
        reuse_actors=False,
    )
    return tuner.fit()


def _run_selection(setup: TrialSetup, stages: dict, path: str, *, resume: bool, verbose: int, say):
    """Train the selection stage's candidates (a Tune run of its own beside the search's); None
    when there is nothing to train."""
    selection_path = f"{path}+{SELECTION_STAGE}"  # '+' is never in a search's name: no clash
    restore = resume and ray.tune.Tuner.can_restore(selection_path)
    candidates = []
    if not restore:
        candidates = selection_candidates(
            setup.experiment, stages["search"], stages.get(TPE_KIND, ()), stages.get(PBA_KIND, ())
        )
    if not restore and not candidates:
        return None
    if not restore:
        names = sorted({c["candidate"] for c in candidates})
        say(
            f"selection: {len(candidates)} candidate training(s) ({', '.join(names)}) "
            "from the trials' start, scored on the holdout split"
        )
    tuner = _tuner(setup, selection_path, resume=restore, verbose=verbose, candidates=candidates)
    return tuner.fit()


def _mark_selected(experiment: ExperimentConfig, search_name: str, say) -> None:
    """Tag the selected candidate's run ``autopose.selected`` (the driver's only write to it)."""
    try:
        selection = read_selection(experiment, search_name)
        if selection is None:
            say("selection: none has no holdout score (its trainings failed): nothing selected")
            return
        client(experiment.tracking_uri).set_tag(selection.winner.run_id, TAG_SELECTED, "true")
    except Exception as error:  # the server went away just now: `autopose search --resume` tags it
        logger.warning("autopose: the selected run could not be tagged (%s)", first_line(error))


# Keys Tune adds to every result, and the trial's own tracking counters: never logged as metrics.
_NOT_LOGGED = {
    *AUTO_RESULT_KEYS,
    "done",
    "trial_id",
    "should_checkpoint",
    "experiment_tag",
    "tracking_errors",
    "tracking_unlogged",
}


def _trial_id(result) -> str:
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name.rsplit("-", 1)[-1])


def _result_name(result) -> str:
    planned = result.config.get("trial", {})
    return f"{planned.get('kind', 'trial')}-{planned.get('seed', 0)}-{_trial_id(result)}"


def _reported_rows(result) -> list[dict[str, Any]]:
    """Every result a trial reported to Tune, in order (its ``result.json``)."""
    rows = []
    results_file = Path(result.path) / "result.json"
    if results_file.is_file():
        for line in results_file.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed driver
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _reported_epochs(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Epoch → the metrics the trial logs for it; the last report of an epoch wins (a resumed
    trial may train the epoch after its last checkpoint again)."""
    return {
        int(row["epoch"]): {k: v for k, v in row.items() if k not in _NOT_LOGGED}
        for row in rows
        if isinstance(row.get("epoch"), int | float)
    }


def _tracking_trouble(rows: list[dict[str, Any]]) -> bool:
    return any(int(row.get("tracking_errors") or 0) for row in rows)


def sync_runs(results, setup: TrialSetup) -> dict[str, str] | None:
    """Complete the MLflow run of every trial that had tracking trouble from Tune's results:
    open it when the trial never could, log the epochs it misses (same steps), its cost (as
    Tune measured it), the final policy from the last checkpoint, and close it as Tune saw
    the trial end. Runs without trouble are left as they are.

    Returns:
        None when every run is complete, else ``{trial id: what its run misses}`` (the
        tracking server does not answer).
    """
    experiment = setup.experiment
    epochs_planned = experiment.train.epochs
    try:
        runs = {
            run.data.tags.get(TAG_TRIAL): run
            for run in client(experiment.tracking_uri).search_runs(
                [setup.experiment_id],
                filter_string=f"tags.`{TAG_SEARCH}` = '{setup.search_name}'",
                max_results=5000,
            )
        }
    except Exception:  # the server is away: every trial that had trouble stays to sync
        runs = None
    missing: dict[str, str] = {}
    for result in results:
        trial_id = _trial_id(result)
        rows = _reported_rows(result)
        reported = _reported_epochs(rows)
        if not reported:
            continue  # never trained an epoch: nothing to log
        if runs is None:  # nothing can be checked: the trial's close at least is in doubt
            trouble = _tracking_trouble(rows)
            missing[trial_id] = "epochs after the server went away, and its close" if trouble else "its close"
            continue
        tags = trial_tags(setup, result.config, trial_id)
        found = runs.get(tags[TAG_TRIAL])
        if found is not None and found.info.status != "RUNNING" and not _tracking_trouble(rows):
            continue  # tracked and closed as usual
        try:
            _sync_run(result, setup, tags, found, reported, epochs_planned)
        except Exception as error:  # the server went away again
            missing[trial_id] = f"not completed ({first_line(error)})"
    return missing or None


def _sync_run(result, setup: TrialSetup, tags: dict[str, str], found, reported, epochs_planned: int) -> None:
    spec = trial_spec(result.config, setup.experiment)
    if found is None:
        run = open_trial_run(setup, spec, tags)
    else:
        run = TrackedRun.attach(setup.experiment.tracking_uri, found.info.run_id)
    # Each epoch went as one batch, stored whole or not at all: its "epoch" metric says which are in.
    logged = {m.step for m in run.client.get_metric_history(run.run_id, "epoch")}
    for epoch in sorted(set(reported) - logged):
        run.log_metrics(reported[epoch], step=epoch)
    trained_all = len(reported) >= epochs_planned
    if not run.client.get_metric_history(run.run_id, "trial_wall_s"):  # the trial could not close it
        wall = float((result.metrics or {}).get("time_total_s", 0.0))
        cpus, gpus = resources_of(setup.experiment.train)
        run.log_metrics(
            {"trial_wall_s": wall, "cost_cpu_s": wall * cpus, "cost_gpu_s": wall * gpus}, len(reported)
        )
    if trained_all and result.checkpoint is not None:
        artifacts = {a.path for a in run.client.list_artifacts(run.run_id, "policy")}
        if POLICY_ARTIFACT not in artifacts:
            with result.checkpoint.as_directory() as folder:
                policy = Path(folder) / POLICY_FILE
                if policy.is_file():
                    run.log_artifact(policy, "policy")
    if result.error:
        status = "FAILED"
    elif trained_all:
        status = "FINISHED"
        if run.client.get_run(run.run_id).data.tags.get(TAG_STOPPED_EARLY):
            run.client.delete_tag(run.run_id, TAG_STOPPED_EARLY)  # closed early for want of epochs
    else:
        run.set_tags({TAG_STOPPED_EARLY: "true"})
        status = "KILLED"
    if run.status() != status:
        run.finish(status)


def _fail_orphaned_runs(tracking_uri: str, experiment_id: str, search_name: str) -> None:
    """Mark FAILED the runs of this search still RUNNING once every trial has ended.

    Only a killed driver leaves one: a trial it started that Tune had not yet saved
    is started again under a new trial id (a new run), and its old run has no owner.
    """
    mlflow_client = client(tracking_uri)
    for run in mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_SEARCH}` = '{search_name}' and attributes.status = 'RUNNING'",
        max_results=5000,
    ):
        mlflow_client.set_tag(run.info.run_id, TAG_ORPHANED, "true")
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")


def _error_file(result) -> str | None:
    path = Path(result.path) / "error.txt"
    return str(path) if path.is_file() else None


def _outcomes(
    results,
    experiment: ExperimentConfig,
    search_name: str,
    experiment_id: str,
    missing: dict[str, str],
) -> list[TrialOutcome]:
    try:
        runs = {
            run.data.tags.get(TAG_TRIAL): run
            for run in client(experiment.tracking_uri).search_runs(
                [experiment_id], filter_string=f"tags.`{TAG_SEARCH}` = '{search_name}'", max_results=5000
            )
        }
    except Exception:  # the server is away (said already): run ids unknown
        runs = {}
    outcomes = []
    for result in results:
        planned = result.config.get("trial", {})
        metrics = result.metrics or {}
        trial_id = _trial_id(result)
        run = runs.get(f"{search_name}/{trial_id}")
        outcomes.append(
            TrialOutcome(
                trial_id=str(trial_id),
                kind=planned.get("kind", "?"),
                seed=int(planned.get("seed", 0)),
                val_ap=metrics.get(METRIC),
                status="ERROR" if result.error else "TERMINATED",
                run_id=run.info.run_id if run is not None else None,
                error=error_cause(result.error) if result.error else None,
                error_file=_error_file(result) if result.error else None,
                tracking=missing.get(str(trial_id)),
                candidate=planned.get("candidate"),
                holdout_ap=metrics.get("holdout_ap"),
            )
        )
    return outcomes
