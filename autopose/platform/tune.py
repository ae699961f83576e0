"""``autopose search``: one Ray Tune experiment of policy-search trials beside baselines.

Every trial trains the same model under the same budget (the config's
``train`` section) and differs only in its augmentation: ``search`` trials
learn a RelaxedPolicy with the bi-level step, baselines use random policies
(one per seed), the hand-crafted recipe, none, and optionally RandAugment and
TrivialAugment. Each trial is a small driver function that opens its MLflow run
and builds a Ray Train ``TorchTrainer`` (:func:`autopose.platform.runner.fit`);
Tune runs as many trials at once as the cluster's resources allow (or
``tune.max_concurrent``) and ranks them by ``val_ap``.

Resources: a trial with Ray Train workers holds almost nothing itself
(0.01 CPU: Tune refuses 0) and its workers hold ``cpus_per_worker`` /
``gpus_per_worker`` each; a trial with ``num_workers: 0`` trains in its own
process and holds one worker's resources.

Failures: a failed trial is retried ``tune.max_failures`` times and resumes from
its latest checkpoint; ``--resume`` (:func:`run_search` with ``resume=True``)
finishes an interrupted experiment with ``Tuner.restore(resume_errored=True)``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray.tune.search import ConcurrencyLimiter, Searcher

from autopose.engine.config import AugmentSpec, to_plain
from autopose.errors import AutoposeError
from autopose.platform.cluster import ray_session
from autopose.platform.config import ExperimentConfig, check_name, storage_join
from autopose.platform.runner import TrainingJob, fit, resources_of
from autopose.platform.tracking import (
    CONFIG_ARTIFACT,
    TAG_KIND,
    TAG_NODE,
    TAG_SEARCH,
    TAG_SEED,
    TAG_TRIAL,
    TrackedRun,
    check_tracking,
    client,
    ensure_experiment,
    flatten,
)

METRIC, MODE = "val_ap", "max"
RANGED = ("tau1", "tau2", "policy_lr")
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


# -- the trial --------------------------------------------------------------------------------------------
def trial_spec(config: dict[str, Any], experiment: ExperimentConfig) -> AugmentSpec:
    """The augmentation of a trial from its Tune config (``{"trial": {kind, seed}, tau1…}``)."""
    planned = config["trial"]
    bilevel = None
    if planned["kind"] == "search":
        bilevel = experiment.search.resolved(**{name: config[name] for name in RANGED if name in config})
    return AugmentSpec(kind=planned["kind"], seed=int(planned["seed"]), bilevel=bilevel)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: open the trial's MLflow run, train on Ray Train, record the cost."""
    experiment = setup.experiment
    spec = trial_spec(config, experiment)
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    tags = {
        TAG_TRIAL: f"{setup.search_name}/{trial_id}",
        TAG_KIND: spec.kind,
        TAG_SEED: str(spec.seed),
        TAG_SEARCH: setup.search_name,
        TAG_NODE: ray.get_runtime_context().get_node_id(),  # where the trial's driver ran
    }
    finished = _finished_run(experiment.tracking_uri, setup.experiment_id, tags[TAG_TRIAL], experiment.train)
    if finished is not None:
        # The driver died after this trial had finished but before Tune saved that: the resumed
        # search gets the logged result back instead of training the trial (and its run) again.
        ray.tune.report(dict(finished.data.metrics))
        return
    run = TrackedRun.open(
        experiment.tracking_uri, setup.experiment_id, run_name=f"{spec.kind}-{spec.seed}", tags=tags
    )
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
    job = TrainingJob(
        data=experiment.data,
        model=experiment.model,
        train=experiment.train,
        augment=spec,
        space=experiment.space_dict,
        tracking_uri=experiment.tracking_uri,
        run_id=run.run_id,
        examples=experiment.examples,
        title=f"{setup.search_name}: {spec.kind} (seed {spec.seed})",
        in_tune=True,
        inject_failure_after_epoch=setup.inject_failure_after_epoch,
        inject_kill_after_epoch=setup.inject_kill_after_epoch,
    )
    started = time.perf_counter()
    attempt = len(run.client.get_metric_history(run.run_id, "attempt_wall_s"))
    # Every start is counted, also those whose process died before closing the run (SIGKILL, lost node).
    starts = len(run.client.get_metric_history(run.run_id, "attempt_started"))
    run.log_metrics({"attempt_started": time.time()}, step=starts)

    def close(status: str) -> None:
        """Log this attempt's time and the trial's cost so far, then close the run."""
        run.log_metrics({"attempt_wall_s": time.perf_counter() - started}, step=attempt)
        total_wall = sum(m.value for m in run.client.get_metric_history(run.run_id, "attempt_wall_s"))
        cpus, gpus = resources_of(experiment.train)
        run.log_metrics(
            {"trial_wall_s": total_wall, "cost_cpu_s": total_wall * cpus, "cost_gpu_s": total_wall * gpus},
            step=experiment.train.epochs,
        )
        run.finish(status)

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
        if _epochs_logged(run) >= experiment.train.epochs:
            close("FINISHED")
        else:
            run.set_tags({"autopose.stopped_early": "true"})
            close("KILLED")
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
            run.set_tags({"autopose.stopped_early": "true"})
        run.finish("FINISHED" if complete else "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        run = self._open_run(trial)
        if run is not None:
            run.finish("FAILED")


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
        for name in RANGED
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


def _tuner(setup: TrialSetup, path: str, *, resume: bool, verbose: int) -> ray.tune.Tuner:
    experiment = setup.experiment
    trainable = _trainable(setup)
    if resume:
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    settings = experiment.tune
    scheduler = None
    if settings.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=experiment.train.epochs,
            grace_period=min(settings.grace_period, experiment.train.epochs),
            reduction_factor=settings.reduction_factor,
        )
    plan = planned_trials(experiment)
    if settings.search_alg == "optuna":
        search_alg = _optuna_searcher(experiment)
        if settings.max_concurrent:
            search_alg = ConcurrencyLimiter(search_alg, max_concurrent=settings.max_concurrent)
        param_space: dict[str, Any] = {}
        num_samples = len(plan)
    else:
        search_alg = None
        param_space = {"trial": ray.tune.grid_search(plan)}
        num_samples = 1
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=settings.max_concurrent,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
            reuse_actors=True,  # later trials skip the process start and imports (about 10 s each here)
        ),
        run_config=ray.tune.RunConfig(
            name=setup.search_name,
            storage_path=storage_join(experiment.storage_path, "tune"),
            failure_config=ray.tune.FailureConfig(max_failures=settings.max_failures),
            callbacks=[_close_runs(setup)],
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=2),
            verbose=verbose,
        ),
    )


def run_search(
    experiment: ExperimentConfig,
    *,
    name: str | None = None,
    address: str | None = None,
    resume: bool = False,
    verbose: int = 1,
) -> list[TrialOutcome]:
    """Run (or with ``resume`` finish) the search the config describes.

    Args:
        experiment: the loaded config (checked already: nothing below fails on it).
        name: the MLflow experiment and Tune run name (default: the config's).
        address: Ray address (default: the running Ray, ``$RAY_ADDRESS``, or a new local one).
        resume: finish an interrupted search of the same name.
        verbose: Tune's console output (0 silent, 1 the trial table).

    Returns:
        One :class:`TrialOutcome` per trial.

    Raises:
        AutoposeError: the tracking store is unreachable (before Ray starts), a
            search of this name exists already (without ``resume``) or none does
            (with it).
    """
    search_name = check_name(name or experiment.experiment, field="--experiment")
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
    )
    with ray_session(address):
        exists = ray.tune.Tuner.can_restore(path)
        if resume and not exists:
            raise AutoposeError(f"no search named {search_name!r} to resume in {path}", field="--resume")
        if exists and not resume:
            raise AutoposeError(
                f"a search named {search_name!r} exists already in {path}: add --resume to finish it, "
                "or choose another --experiment name",
                field="--experiment",
            )
        results = _tuner(setup, path, resume=resume, verbose=verbose).fit()
    _fail_orphaned_runs(experiment.tracking_uri, experiment_id, search_name)
    return _outcomes(results, experiment, search_name, experiment_id)


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
        mlflow_client.set_tag(run.info.run_id, "autopose.orphaned", "true")
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")


def _outcomes(
    results, experiment: ExperimentConfig, search_name: str, experiment_id: str
) -> list[TrialOutcome]:
    runs = {
        run.data.tags.get(TAG_TRIAL): run
        for run in client(experiment.tracking_uri).search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_SEARCH}` = '{search_name}'", max_results=5000
        )
    }
    outcomes = []
    for result in results:
        planned = result.config.get("trial", {})
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.rsplit("-", 1)[-1]
        run = runs.get(f"{search_name}/{trial_id}")
        outcomes.append(
            TrialOutcome(
                trial_id=str(trial_id),
                kind=planned.get("kind", "?"),
                seed=int(planned.get("seed", 0)),
                val_ap=metrics.get(METRIC),
                status="ERROR" if result.error else "TERMINATED",
                run_id=run.info.run_id if run is not None else None,
                error=str(result.error).splitlines()[0][:200] if result.error else None,
            )
        )
    return outcomes
