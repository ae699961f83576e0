"""``autopose search``: one Ray Tune experiment of policy-search trials beside baselines.

Every trial trains the same model under the same budget (the config's
``train`` section) and differs only in its augmentation: ``search`` trials
learn a RelaxedPolicy with the bi-level step, baselines use random policies
(one per seed), the hand-crafted recipe, none, and optionally RandAugment and
TrivialAugment. Each trial is a small driver function that builds a Ray Train
``TorchTrainer`` (:func:`autopose.platform.runner.fit`); Tune runs as many
trials at once as the cluster's resources allow (or ``tune.max_concurrent``)
and ranks them by ``val_ap``. The driver is the one writer of every trial's
MLflow run (:class:`TrialRuns`, a Tune callback): it opens the run, logs each
reported epoch, and closes it with its cost; the trial logs only its artifacts.

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

A tracking server that goes away mid-search stops nothing: trials train on, the
driver keeps the epochs it did not take and sends them when it answers again (same
steps), and says so once each way (:class:`TrialRuns`). Tune's results hold every
epoch, so after the trials end :func:`sync_runs` completes each run still open
from them; a server still away then is reported with what is missing, and
``--resume`` completes the runs once it is back.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import queue
import random
import threading
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
from autopose.platform.runner import ARTIFACTS_UNLOGGED, NODE_KEY, POLICY_FILE, TrainingJob, fit, resources_of
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
    TAG_TRIAL,
    EpochLog,
    TrackedRun,
    bounded_http,
    check_tracking,
    client,
    close_run,
    ensure_experiment,
    epochs_logged,
    find_run,
    flatten,
    quick_tracking_failures,
    source_tags,
    utc_now,
)
from autopose.platform.warm_start import prepare_warm_start

logger = logging.getLogger(__name__)

METRIC, MODE = "val_ap", "max"
_MAX_RUNS = 50_000  # MLflow's own cap on one search_runs page
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
    # What each trial runs: None is run_trial (train); benchmarks/platform_scale.py passes a
    # stand-in that only reports, to measure the driver without training.
    trial_function: Callable[[dict[str, Any], TrialSetup], None] | None = None


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


def open_trial_run(setup: TrialSetup, spec: AugmentSpec, tags: dict[str, str], found) -> TrackedRun:
    """The trial's run ``found`` by its tag (reopened), or a new one when None, with its params
    and config logged."""
    experiment = setup.experiment
    candidate = tags.get(TAG_CANDIDATE)
    run_name = f"{spec.kind}-{spec.seed}" if candidate is None else f"selection {candidate} seed {spec.seed}"
    run = TrackedRun.reopen_or_create(experiment.tracking_uri, setup.experiment_id, found, run_name, tags)
    params = {
        "kind": spec.kind,
        "seed": spec.seed,
        **flatten(to_plain(spec.bilevel) if spec.bilevel else {}, "search."),
        **flatten(to_plain(experiment.model), "model."),
        **flatten(to_plain(experiment.train), "train."),
        **flatten(to_plain(experiment.data), "data."),
        "space": experiment.space_dict.get("name", ""),
    }
    run.log_params(params, existing=found.data.params if found is not None else {})
    run.log_yaml(experiment.to_dict(), CONFIG_ARTIFACT)
    return run


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: train on Ray Train and report every epoch to Tune.

    The trial writes nothing to MLflow but its artifacts (the final policy and its picture): the
    driver's :class:`TrialRuns` opens its run as it starts (from the driver's writer thread, so
    the trial looks it up again when it logs them), and logs its epochs, status and cost from the
    reports. A tracking server that does not answer, or a run not open yet, stops nothing.
    """
    quick_tracking_failures()
    experiment = setup.experiment
    spec = trial_spec(config, experiment)
    trial_id = ray.tune.get_context().get_trial_id()
    trial_key = trial_tags(setup, config, trial_id)[TAG_TRIAL]
    try:
        found = find_run(experiment.tracking_uri, setup.experiment_id, trial_key)
    except Exception as error:  # MlflowException, requests' and OSError kinds: the server is away
        logger.debug("trial %s trains without its run: %s", trial_id, first_line(error))
        found = None
    if found is not None and _complete(found, experiment.train.epochs):
        # The driver died after this trial had finished but before Tune saved that: the resumed
        # search gets the logged result back instead of training the trial (and its run) again.
        ray.tune.report(dict(found.data.metrics))
        return
    job = TrainingJob(
        data=experiment.data,
        model=experiment.model,
        train=experiment.train,
        augment=spec,
        space=experiment.space_dict,
        tracking_uri=experiment.tracking_uri,
        run_id=found.info.run_id if found is not None else None,
        run_key=(setup.experiment_id, trial_key),
        examples=experiment.examples,
        title=f"{setup.search_name}: {spec.kind} (seed {spec.seed})",
        in_tune=True,
        inject_failure_after_epoch=setup.inject_failure_after_epoch,
        inject_kill_after_epoch=setup.inject_kill_after_epoch,
    )
    fit(
        job,
        name=f"{setup.search_name}-{trial_id}",
        storage_path=storage_join(experiment.storage_path, "train"),
        tune_callback=True,
    )


def _runs_by_trial(tracking_uri: str, experiment_id: str, search_name: str) -> dict[str, Any]:
    """Every MLflow run of search ``search_name``, by its ``autopose.trial`` tag (one query)."""
    return {
        run.data.tags.get(TAG_TRIAL): run
        for run in client(tracking_uri).search_runs(
            [experiment_id], filter_string=f"tags.`{TAG_SEARCH}` = '{search_name}'", max_results=_MAX_RUNS
        )
    }


def _complete(run, epochs: int) -> bool:
    """Whether ``run`` is FINISHED with its ``epochs`` logged."""
    return run.info.status == "FINISHED" and epochs_logged(run.data.metrics) >= epochs


@dataclass
class _TrialRun:
    """The driver's record of one trial's run (see :class:`TrialRuns`)."""

    run: TrackedRun | None = None  # None: not opened yet (the server did not answer)
    epochs: EpochLog | None = None
    done: bool = False  # closed already (by an earlier driver): never written again
    attempt: int = 0  # this attempt's step in ``attempt_wall_s``
    earlier_wall_s: float = 0.0  # the attempts before this one
    started: float | None = None  # this attempt's start (driver clock); None: no attempt open
    counted: bool = False  # this attempt's start is in the run's tags
    last_result: float | None = None
    last_epoch: int = -1  # the latest epoch reported
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)  # epochs before the run opened
    pending_node: str | None = None  # the node the latest result came from
    sent_at: float = -math.inf  # when its epochs last went (monotonic clock)
    view: _TrialView | None = None  # what the writer last knew of the trial (to send what waits)

    def unsent(self) -> bool:
        """Whether anything the trial reported is not in its run yet."""
        if self.done:
            return False
        return self.run is None or bool(self.pending) or bool(self.epochs and self.epochs.waiting)

    node: str | None = None  # the node tag set


@dataclass(frozen=True)
class _TrialView:
    """What the writer needs of a Tune trial, taken when Tune tells of it: the writer thread
    reads it later, while Tune goes on changing the trial (a PBT member's config, its results)."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] | None
    checkpoint: Any

    @classmethod
    def of(cls, trial) -> _TrialView:
        return cls(trial.trial_id, copy.deepcopy(trial.config), trial.last_result, trial.checkpoint)


class TrialRuns(ray.tune.Callback):
    """On the driver: the one writer of every trial's MLflow run (the trials log only artifacts).

    * trial start (also a retry, a resume, a PBT member continuing): the run is found by its
      ``autopose.trial`` tag or created, its params and config logged, its start counted
      (``autopose.attempts``, ``autopose.attempt_started``);
    * every result: the epoch's metrics, under the epoch as step (:class:`EpochLog`: each once),
      within :attr:`BATCH_S` seconds: the epochs a trial reports meanwhile go in one call (a
      trial of real training reports an epoch every few minutes; a thousand quick ones would
      otherwise hold the driver up, ``benchmarks/platform_scale.py``);
    * retry, error and completion: the attempt's wall time (``attempt_wall_s``); error and
      completion also close the run with its cost (:func:`close_run`): FAILED, FINISHED, or KILLED
      and tagged ``autopose.stopped_early`` for a trial the scheduler stopped before its last epoch.

    The writes run on a thread of their own, in the order Tune's events came: Tune's loop only
    hands each event over (with its time and a copy of what it needs of the trial), so a tracking
    server that takes tens of milliseconds a call does not hold the search up (through a local
    ``mlflow server`` the writes in Tune's loop gave 23 results/s). A trial may thus start before
    its run is open: it looks the run up again when it logs its artifacts (``run_key`` of
    :class:`autopose.platform.runner.TrainingJob`). The thread owns every trial's record; the
    experiment's end waits for it to finish.

    A tracking server that does not answer stops nothing: what it did not take waits here (every
    epoch is in Tune's results too), the driver says once that it went away and once that it
    answers again, and asks it again at most every :attr:`RETRY_S` seconds, so that a lost server
    does not slow the search down. :func:`sync_runs` completes what is still missing after the
    trials end, and after a killed driver (``--resume``).
    """

    RETRY_S = 1.0
    BATCH_S = 1.0

    def __init__(self, setup: TrialSetup):
        self.trial_setup = setup  # not `setup`: Tune calls its callbacks' setup()
        self.trials: dict[str, _TrialRun] = {}
        self.lost = False
        self.behind: set[str] = set()  # trials whose writes failed since the server went away
        # The search's runs an earlier driver left (a resume), by trial tag; read at the first start.
        self._earlier: dict[str, Any] | None = None
        self._retry_at = 0.0
        self._due_checked = 0.0
        self._resources = resources_of(setup.experiment.train)
        self._events: queue.SimpleQueue | None = None  # Tune's events, for the writer thread
        self._writer: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune keeps its callbacks with the experiment (Tuner.restore): a thread does not pickle,
        # and a restored driver starts its own.
        state = self.__dict__.copy()
        state["_events"] = state["_writer"] = None
        return state

    # -- Tune's events: handed to the writer thread with the time they came
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._post(self._started, trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._post(self._reported, trial, dict(result))

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._post(self._recovered, trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._post(self._close, trial, "FAILED")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._post(self._close, trial, None)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.finish_writes()

    def _post(self, handler: Callable[..., None], trial, *args: Any) -> None:
        """Hand ``handler(view of trial, now, *args)`` to the writer thread."""
        if self._writer is None:
            self._events = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._write_events, name="autopose-mlflow", daemon=True)
            self._writer.start()
        self._events.put((handler, _TrialView.of(trial), time.perf_counter(), args))

    def finish_writes(self) -> None:
        """Wait until every event handed over so far is written (or kept for a lost server)."""
        if self._writer is not None:
            self._events.put(None)
            self._writer.join()
            self._writer = self._events = None

    def _write_events(self) -> None:
        """The writer thread: Tune's events in order, and the epochs due on :attr:`BATCH_S`."""
        while True:
            try:
                event = self._events.get(timeout=self.BATCH_S)
            except queue.Empty:
                event = ()
            if event is None:
                return
            if event:
                handler, view, at, args = event
                try:
                    handler(view, at, *args)
                except Exception:  # a bug here must not stop the writes of the other trials
                    logger.exception("autopose: the MLflow writer failed on trial %s", _trial_name(view))
            self._send_due()

    # -- on the writer thread
    def _started(self, trial: _TrialView, at: float) -> None:
        state = self.trials.setdefault(trial.trial_id, _TrialRun())
        state.view = trial
        if state.started is not None:  # a PBT member continuing after a pause: its last attempt ends
            last = state.last_result if state.last_result is not None else at
            self._write(trial, lambda: self._end_attempt(state, at=last), retry_now=True)
        state.started, state.counted, state.node = at, False, None
        self._write(trial, lambda: self._send(trial, state))

    def _reported(self, trial: _TrialView, at: float, result: dict) -> None:
        state = self.trials.setdefault(trial.trial_id, _TrialRun(started=at))
        state.view, state.last_result = trial, at
        if isinstance(result.get("epoch"), int | float):
            state.last_epoch = max(state.last_epoch, int(result["epoch"]))
            state.pending[int(result["epoch"])] = _epoch_metrics(result)
        if result.get(NODE_KEY) is not None:
            state.pending_node = str(result[NODE_KEY])
        if time.monotonic() - state.sent_at >= self.BATCH_S:
            self._write(trial, lambda: self._send(trial, state))

    def _send_due(self) -> None:
        """Send the epochs that waited :attr:`BATCH_S` for more of their trial's (one look over
        the trials per :attr:`BATCH_S`)."""
        now = time.monotonic()
        if now - self._due_checked < self.BATCH_S:
            return
        self._due_checked = now
        for state in self.trials.values():
            if state.unsent() and state.sent_at <= now - self.BATCH_S and state.view is not None:
                self._write(state.view, lambda view=state.view, state=state: self._send(view, state))

    def _recovered(self, trial: _TrialView, at: float) -> None:
        state = self.trials.get(trial.trial_id)
        if state is not None and state.started is not None:
            self._write(trial, lambda: self._end_attempt(state, at=at), retry_now=True)

    # -- the writes
    def _open(self, trial: _TrialView, state: _TrialRun) -> None:
        if state.run is not None or state.done:
            return
        setup = self.trial_setup
        tags = trial_tags(setup, trial.config, trial.trial_id)
        if self._earlier is None:  # one query for the whole search, not one per trial
            self._earlier = _runs_by_trial(
                setup.experiment.tracking_uri, setup.experiment_id, setup.search_name
            )
        found = self._earlier.pop(tags[TAG_TRIAL], None)
        if found is not None and _complete(found, setup.experiment.train.epochs):
            state.done = True  # finished before a killed driver could tell Tune: left as it is
            return
        # Every start is counted, also one whose process then dies before its attempt is timed;
        # the count goes in with the run's creation (a driver killed right after leaves it right).
        # Tags, not metrics: a timestamp is no score to plot against val AP.
        starts = int(found.data.tags.get(TAG_ATTEMPTS, "0")) if found is not None else 0
        tags |= {TAG_ATTEMPTS: str(starts + 1), TAG_ATTEMPT_STARTED: utc_now()}
        run = open_trial_run(setup, trial_spec(trial.config, setup.experiment), tags, found)
        state.counted = True
        walls = run.client.get_metric_history(run.run_id, "attempt_wall_s") if found is not None else []
        state.attempt, state.earlier_wall_s = len(walls), sum(m.value for m in walls)
        state.run, state.epochs = run, EpochLog(run)

    def _send(self, trial: _TrialView, state: _TrialRun) -> None:
        state.sent_at = time.monotonic()
        self._open(trial, state)
        if state.run is None:
            return
        if not state.counted:  # a later start of a run this driver opened
            starts = int(state.run.client.get_run(state.run.run_id).data.tags.get(TAG_ATTEMPTS, "0"))
            state.run.set_tags({TAG_ATTEMPTS: starts + 1, TAG_ATTEMPT_STARTED: utc_now()})
            state.counted = True
        for epoch in sorted(state.pending):
            state.epochs.add(epoch, state.pending.pop(epoch))
        state.epochs.flush()
        if state.pending_node is not None and state.node != state.pending_node:
            state.run.set_tags({TAG_NODE: state.pending_node})
            state.node = state.pending_node

    def _end_attempt(self, state: _TrialRun, at: float) -> None:
        """Log the open attempt's wall time (from its start to ``at``)."""
        if state.started is None:
            return
        wall = at - state.started
        if state.run is not None:
            state.run.log_metrics({"attempt_wall_s": wall}, step=state.attempt)
            state.attempt += 1
        state.earlier_wall_s += wall
        state.started = None

    def _close(self, trial: _TrialView, at: float, status: str | None) -> None:
        """Close the trial's run: ``status``, or by its epochs when None (FINISHED with every
        epoch, else KILLED: stopped early). A server away leaves it to :func:`sync_runs`."""
        state = self.trials.get(trial.trial_id)
        if state is None or state.done:
            return

        def close() -> None:
            self._send(trial, state)
            if state.run is None:
                return
            attempt_wall = None  # the open attempt, timed with the cost
            if state.started is not None:
                attempt_wall = (state.attempt, at - state.started)
            complete = state.last_epoch + 1 >= self.trial_setup.experiment.train.epochs
            final = status or ("FINISHED" if complete else "KILLED")
            close_run(
                state.run,
                final,
                attempt_wall=attempt_wall,
                wall_s=state.earlier_wall_s + (attempt_wall[1] if attempt_wall else 0.0),
                resources=self._resources,
                step=max(state.last_epoch + 1, 0),
                stopped_early=final == "KILLED",
            )
            state.started, state.done = None, True
            if (trial.last_result or {}).get(ARTIFACTS_UNLOGGED) and trial.checkpoint is not None:
                _log_policy_from(trial.checkpoint, state.run)

        self._write(trial, close, retry_now=True)

    def _write(self, trial: _TrialView, write: Callable[[], None], *, retry_now: bool = False) -> None:
        """Run ``write``; a server away is said once and asked again at most every ``RETRY_S``."""
        now = time.monotonic()
        if self.lost and not retry_now and now < self._retry_at:
            return
        try:
            write()
        except Exception as error:  # MlflowException, requests' and OSError kinds: the server is away
            self._retry_at = now + self.RETRY_S
            self.behind.add(trial.trial_id)
            if not self.lost:
                self.lost = True
                logger.warning(
                    "autopose: MLflow tracking server at %s does not answer (trial %s could not log "
                    "epoch %s: %s); training goes on, the unlogged epochs are kept and sent when it "
                    "answers again",
                    self.trial_setup.experiment.tracking_uri,
                    _trial_name(trial),
                    self.trials[trial.trial_id].last_epoch if trial.trial_id in self.trials else -1,
                    first_line(error),
                )
            return
        if self._caught_up(trial.trial_id) and self.lost and not self.behind:
            self.lost = False
            logger.warning(
                "autopose: MLflow tracking server at %s answers again; the waiting epochs are logged",
                self.trial_setup.experiment.tracking_uri,
            )

    def _caught_up(self, trial_id: str) -> bool:
        """Whether trial ``trial_id``'s run holds all it reported (then it is no longer behind)."""
        state = self.trials.get(trial_id)
        if state is not None and state.unsent():
            return False
        self.behind.discard(trial_id)
        return True


def _epoch_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The metrics a trial's result logs for its epoch (Tune's own keys left out)."""
    return {k: v for k, v in result.items() if k not in _NOT_LOGGED}


def _log_policy_from(checkpoint, run: TrackedRun) -> None:
    """Log the trial's final policy from its checkpoint (the trial could not log it)."""
    if POLICY_ARTIFACT in {a.path for a in run.client.list_artifacts(run.run_id, "policy")}:
        return
    with checkpoint.as_directory() as folder:
        policy = Path(folder) / POLICY_FILE
        if policy.is_file():
            run.log_artifact(policy, "policy")


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
    trial = setup.trial_function or run_trial
    return ray.tune.with_resources(ray.tune.with_parameters(trial, setup=setup), resources)


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
            callbacks=[TrialRuns(setup)],
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
    trial_function: Callable[[dict[str, Any], TrialSetup], None] | None = None,
) -> list[TrialOutcome]:
    """Run (or with ``resume`` finish) the search the config describes.

    Args:
        experiment: the loaded config (checked already: nothing below fails on it).
        name: the MLflow experiment and Tune run name (default: the config's).
        address: Ray address (default: the running Ray, ``$RAY_ADDRESS``, or a new local one).
        resume: finish an interrupted search of the same name.
        verbose: Tune's console output (0 silent, 1 the trial table).
        say: where the driver's own progress lines go (the warm start's base model).
        trial_function: what each trial runs (default :func:`run_trial`); a stand-in gets the
            trial's Tune config and the :class:`TrialSetup`, and reports to Tune like it.

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
        trial_function=trial_function,
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


# Keys Tune adds to every result, and what a trial tells the driver: never logged as metrics.
_NOT_LOGGED = {
    *AUTO_RESULT_KEYS,
    "done",
    "trial_id",
    "should_checkpoint",
    "experiment_tag",
    NODE_KEY,
    ARTIFACTS_UNLOGGED,
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


def sync_runs(results, setup: TrialSetup) -> dict[str, str] | None:
    """Complete from Tune's results the MLflow run of every trial the driver could not: open it
    when it never was, log the epochs it misses (same steps), the final policy from the last
    checkpoint when the trial could not log it, and close it with its cost as Tune saw the trial
    end. A closed run is complete (:class:`TrialRuns` closes a run only once it has every
    reported epoch), so only runs missing or RUNNING are touched: those of trials that ended
    while the server was away, or under a driver that was killed.

    Returns:
        None when every run is complete, else ``{trial id: what its run misses}`` (the
        tracking server does not answer).
    """
    experiment = setup.experiment
    try:
        runs = _runs_by_trial(experiment.tracking_uri, setup.experiment_id, setup.search_name)
    except Exception:  # the server is away: every trial's run is in doubt
        runs = None
    missing: dict[str, str] = {}
    for result in results:
        trial_id = _trial_id(result)
        rows = _reported_rows(result)
        reported = _reported_epochs(rows)
        if not reported:
            continue  # never trained an epoch: nothing to log
        if runs is None:
            missing[trial_id] = "the epochs it did not log, and its close"
            continue
        tags = trial_tags(setup, result.config, trial_id)
        found = runs.get(tags[TAG_TRIAL])
        if found is not None and found.info.status != "RUNNING":
            continue  # closed by the driver: complete
        try:
            _sync_run(result, setup, tags, found, reported)
        except Exception as error:  # the server went away again
            missing[trial_id] = f"not completed ({first_line(error)})"
    return missing or None


def _sync_run(result, setup: TrialSetup, tags: dict[str, str], found, reported) -> None:
    if found is None:
        run = open_trial_run(setup, trial_spec(result.config, setup.experiment), tags, None)
    else:
        run = TrackedRun.attach(setup.experiment.tracking_uri, found.info.run_id)
    epochs = EpochLog(run)
    for epoch, metrics in reported.items():
        epochs.add(epoch, metrics)
    epochs.flush()
    trained_all = len(reported) >= setup.experiment.train.epochs
    if trained_all and result.checkpoint is not None:
        _log_policy_from(result.checkpoint, run)
    status = "FAILED" if result.error else ("FINISHED" if trained_all else "KILLED")
    # The attempts the driver timed, else (a killed driver timed none) as long as Tune measured.
    walls = run.client.get_metric_history(run.run_id, "attempt_wall_s")
    wall = sum(m.value for m in walls) or float((result.metrics or {}).get("time_total_s", 0.0))
    close_run(
        run,
        status,
        wall_s=wall,
        resources=resources_of(setup.experiment.train),
        step=len(reported),
        stopped_early=status == "KILLED",
    )


def _fail_orphaned_runs(tracking_uri: str, experiment_id: str, search_name: str) -> None:
    """Mark FAILED the runs of this search still RUNNING once every trial has ended.

    Only a killed driver leaves one: a trial it started that Tune had not yet saved
    is started again under a new trial id (a new run), and its old run has no owner.
    """
    mlflow_client = client(tracking_uri)
    for run in mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_SEARCH}` = '{search_name}' and attributes.status = 'RUNNING'",
        max_results=_MAX_RUNS,
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
        runs = _runs_by_trial(experiment.tracking_uri, experiment_id, search_name)
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
