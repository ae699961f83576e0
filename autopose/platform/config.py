"""The experiment config: one YAML file describes a whole search and its full training.

Loaded and checked completely before Ray starts: an unknown key, a wrong type
or an unknown augmentation op fails in one line naming the file and field.
This module imports neither Ray nor MLflow, so that checking a config is
instant.

Layout (every section optional except ``data``; see search_spaces/smoke.yaml)::

    experiment: smoke            # MLflow experiment and Ray Tune run name
    tracking_uri: null           # null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    storage_path: null           # null: <cwd>/runs (checkpoints, Tune state)
    data:       {train, val, train_ann, train_images, max_val_samples}
    model:      {arch, input_size, num_joints}
    train:      {epochs, steps_per_epoch, batch_size, lr, ..., num_workers, cpus_per_worker, ...}
    space:      p2net              # a built-in space's name, a space file, or the space inline
    search:     {trials, tau1, tau2, policy_lr, unroll_lr, hessian, num_sub_policies, ...}
    baselines:  {random_seeds, handcrafted, none, randaugment, trivialaugment}
    tune:       {max_concurrent, search_alg, scheduler, max_failures, ...}
    full_train: {epochs, num_workers, backend, registered_model, alias, ...}
    warm_start: {epochs, steps_per_epoch, batch_size, lr, seed}   # a base model every trial starts from
    tpe:        {trials, startup_trials}   # the tpe method: Optuna TPE over discrete policies
    pba:        {population, perturbation_interval, quantile_fraction, resample_probability}
                                           # the pba method: Population Based Augmentation (PBT)
    selection:  {enabled, seeds}   # the candidates retrained and chosen on data.search_val
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autopose.engine.config import (
    AugmentSpec,
    BilevelConfig,
    DataConfig,
    ModelConfig,
    TrainConfig,
    absolute_path,
    build_dataclass,
    check_margin,
    load_yaml,
    to_plain,
)
from autopose.errors import AutoposeError

BASELINE_KINDS = ("random", "handcrafted", "none", "randaugment", "trivialaugment")


@dataclass
class BaselinesConfig:
    """Baseline trials trained under the same budget as the search trials."""

    random_seeds: list[int] = field(default_factory=lambda: [0, 1])
    handcrafted: bool = True
    none: bool = True
    randaugment: bool = False
    trivialaugment: bool = False


@dataclass
class TuneSettings:
    """How Ray Tune runs the trials.

    ``max_concurrent`` caps trials running at once (null: as many as the
    cluster's resources allow). ``search_alg: optuna`` samples the search
    trials' ranged hyperparameters; ``scheduler: asha`` stops weak trials early
    (by ``val_ap`` per epoch). ``max_failures``: retries of a failed trial, which
    resumes from its latest checkpoint.
    """

    max_concurrent: int | None = None
    search_alg: Literal["optuna"] | None = None
    scheduler: Literal["asha"] | None = None
    grace_period: int = 1
    reduction_factor: int = 2
    max_failures: int = 1

    def _check(self, path, field_: str) -> None:
        if self.max_concurrent is not None and self.max_concurrent <= 0:
            raise AutoposeError("must be > 0", path=path, field=f"{field_}.max_concurrent")
        if self.grace_period <= 0:
            raise AutoposeError("must be > 0", path=path, field=f"{field_}.grace_period")
        if self.reduction_factor < 2:
            raise AutoposeError("must be ≥ 2", path=path, field=f"{field_}.reduction_factor")


@dataclass
class FullTrainConfig:
    """The full training of a promoted (or given) policy on Ray Train.

    Fields left null take the value from ``train``. ``train_ann`` +
    ``train_images`` train on a COCO file with crops made on the fly (the
    whole train2017 needs no cache); null trains on ``data.train``. ``train_margin``: those
    crops' canvas (see :class:`~autopose.engine.config.DataConfig`).
    ``backend``: ``auto`` is NCCL with GPUs, gloo without.
    """

    epochs: int = 20
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_milestones: list[int] | None = None
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    max_failures: int = 2
    train_ann: str | None = None
    train_images: str | None = None
    train_margin: float = 1.0
    registered_model: str = "autopose-pose"
    alias: str = "promoted"

    def _check(self, path, field_: str) -> None:
        self.train_ann = absolute_path(self.train_ann)
        self.train_images = absolute_path(self.train_images)
        if (self.train_ann is None) != (self.train_images is None):
            raise AutoposeError(
                "train_ann and train_images go together", path=path, field=f"{field_}.train_ann"
            )
        for name in ("epochs",):
            if getattr(self, name) <= 0:
                raise AutoposeError("must be > 0", path=path, field=f"{field_}.{name}")
        if self.num_workers < 0:
            raise AutoposeError("must be ≥ 0", path=path, field=f"{field_}.num_workers")
        check_margin(self.train_margin, path, f"{field_}.train_margin")


@dataclass
class WarmStartConfig:
    """A base model every trial fine-tunes from (``warm_start``), trained once without
    augmentation on ``data.train`` and cached by the content of what it depends on (the
    training data, the model, this budget), so every trial and every search of the same
    setting reuses it. Fields left null take the value from ``train``.

    Why: trials trained from scratch under a search's budget stop while every learning curve
    still climbs steeply, and the ranking of their policies is mostly noise; cheap policy
    searches pre-train or warm up the network first (DeepAA, MADAO).

    ``cpus_per_worker`` and ``threads_per_worker`` place the base's training (it runs before any
    trial, so the CPUs the trials will share are free); they are not part of the cache key.
    """

    epochs: int = 5
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    cpus_per_worker: float | None = None
    threads_per_worker: int | None = None

    def _check(self, path, field_: str) -> None:
        if self.epochs <= 0:
            raise AutoposeError("must be > 0", path=path, field=f"{field_}.epochs")
        for name in ("steps_per_epoch", "batch_size", "lr", "cpus_per_worker", "threads_per_worker"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise AutoposeError("must be > 0", path=path, field=f"{field_}.{name}")


@dataclass
class TpeConfig:
    """The ``tpe`` search method: Optuna's TPE sampler over the discrete policy (each step's op,
    probability in steps of 0.1 and magnitude 0–10), the way Fast AutoAugment searched on Ray
    Tune. Each candidate policy fine-tunes from the same start as every trial, under their
    budget, and is scored on the holdout split (``data.search_val``) after every epoch; ASHA
    (``tune.grace_period``, ``tune.reduction_factor``) stops weak ones early. The best finished
    candidate on holdout is the method's policy, a candidate of the selection stage.

    ``trials``: candidate policies TPE proposes (0: the method is off). ``startup_trials``:
    random proposals before TPE models the results (Optuna's ``n_startup_trials``).
    """

    trials: int = 0
    startup_trials: int = 4

    def _check(self, path, field_: str) -> None:
        for name in ("trials", "startup_trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or value < 0:
                raise AutoposeError(
                    f"must be an integer ≥ 0, got {value!r}", path=path, field=f"{field_}.{name}".lstrip(".")
                )


@dataclass
class PbaConfig:
    """The ``pba`` search method: Population Based Augmentation (Ho et al. 2019) on Ray Tune's
    PBT scheduler. A population of discrete policies (each step's op, probability in steps of
    0.1 and magnitude 0–10, drawn at random) fine-tunes from the same start as every trial,
    under their budget, scored on the holdout split (``data.search_val``) after every epoch.
    Every ``perturbation_interval`` epochs the members in the bottom ``quantile_fraction`` copy
    the weights and policy of one in the top and perturb the policy: each step's op, p and m is
    drawn afresh with ``resample_probability``, else p moves by 0–3 tenths and m by 0–3 either
    way (PBA's explore). The best member on holdout trained under a schedule of policies
    (``autopose.schedule/1``): the method's result, a candidate of the selection stage.

    ``population``: members (0: the method is off; PBT needs 2 or more).
    """

    population: int = 0
    perturbation_interval: int = 1
    quantile_fraction: float = 0.25
    resample_probability: float = 0.2

    def _check(self, path, field_: str) -> None:
        def fail(name: str, message: str) -> AutoposeError:
            return AutoposeError(message, path=path, field=f"{field_}.{name}".lstrip("."))

        if isinstance(self.population, bool) or self.population < 0 or self.population == 1:
            raise fail("population", f"must be 0 (off) or ≥ 2 members, got {self.population!r}")
        if isinstance(self.perturbation_interval, bool) or self.perturbation_interval < 1:
            raise fail("perturbation_interval", f"must be ≥ 1 epoch, got {self.perturbation_interval!r}")
        if not 0.0 < self.quantile_fraction <= 0.5:
            raise fail("quantile_fraction", f"must be in (0, 0.5], got {self.quantile_fraction!r}")
        if not 0.0 <= self.resample_probability <= 1.0:
            raise fail("resample_probability", f"must be in [0, 1], got {self.resample_probability!r}")


@dataclass
class SelectionConfig:
    """The selection stage after a search's trials (:mod:`autopose.platform.selection`).

    Every search trial's exported policy, ``none`` and the hand-crafted recipe fine-tune from
    the same start as the trials, under their budget, once per seed in ``seeds``, and are
    scored on the holdout split (``data.search_val``); the best mean holdout AP is the policy
    to promote, and val AP only reports. ``none`` is always a candidate, so the selected policy
    is never below training without augmentation on held-out data. A baseline trial of the
    search with the same kind and seed is the same training and is reused, not repeated.

    Why: a search's trials are ranked on val, the split the user reports; promoting the best
    of them picks noise as often as a gain (the demo once promoted a random policy on a
    +0.0006 lead over none, from one seed), and a searched policy's trial trained on the
    search's moving policy, not on the policy it exports.

    ``enabled``: null runs the stage when ``data.search_val`` is given; true without it is an
    error. ``seeds``: null is ``[train.seed]`` (one retraining per exported policy; the summary
    then cannot say whether the gain is above the noise: two or more seeds measure it).
    """

    enabled: bool | None = None
    seeds: list[int] | None = None

    def _check(self, path, field_: str) -> None:
        if self.seeds is not None:
            if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
                raise AutoposeError(
                    f"must be a non-empty list of integers, got {self.seeds!r}",
                    path=path,
                    field=f"{field_}.seeds".lstrip("."),
                )
            if len(set(self.seeds)) != len(self.seeds):
                raise AutoposeError(
                    f"repeats a seed: {self.seeds}", path=path, field=f"{field_}.seeds".lstrip(".")
                )


@dataclass
class ExperimentConfig:
    """The whole experiment (see the module docstring for the YAML layout)."""

    data: DataConfig
    experiment: str = "autopose"
    tracking_uri: str | None = None
    storage_path: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    space: str | dict[str, Any] = "p2net"  # the paper's, built in: the same from any folder
    search: BilevelConfig = field(default_factory=BilevelConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    tune: TuneSettings = field(default_factory=TuneSettings)
    full_train: FullTrainConfig = field(default_factory=FullTrainConfig)
    warm_start: WarmStartConfig | None = None
    tpe: TpeConfig = field(default_factory=TpeConfig)
    pba: PbaConfig = field(default_factory=PbaConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    examples: int = 8
    # filled by load_experiment: where the config came from, the space as a plain mapping
    source: str | None = field(default=None, init=False)
    space_dict: dict[str, Any] = field(default_factory=dict, init=False)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """``dataclasses.replace`` that keeps what :func:`load_experiment` filled in (the source
        file, the space mapping), which ``replace`` alone would reset."""
        copy_ = dataclasses.replace(self, **changes)
        copy_.source, copy_.space_dict = self.source, self.space_dict
        return copy_

    # -- derived -------------------------------------------------------------------------
    def trial_plan(self) -> list[AugmentSpec]:
        """The fixed trials of a search: ``search.trials`` differentiable searches, then
        the baselines. Seeds of search trials count up from ``train.seed``."""
        plan = [
            AugmentSpec(kind="search", seed=self.train.seed + i, bilevel=self.search)
            for i in range(self.search.trials)
        ]
        plan += [AugmentSpec(kind="random", seed=seed) for seed in self.baselines.random_seeds]
        for kind in ("handcrafted", "none", "randaugment", "trivialaugment"):
            if getattr(self.baselines, kind):
                plan.append(AugmentSpec(kind=kind, seed=self.train.seed))
        return plan

    def runs_selection(self) -> bool:
        """Whether the search ends with the selection stage (see :class:`SelectionConfig`)."""
        if self.selection.enabled is None:
            return self.data.search_val is not None
        return self.selection.enabled

    def selection_seeds(self) -> list[int]:
        return list(self.selection.seeds) if self.selection.seeds is not None else [self.train.seed]

    def full_train_config(self) -> TrainConfig:
        """``train`` with the ``full_train`` overrides applied."""
        full = self.full_train
        return dataclasses.replace(
            self.train,
            epochs=full.epochs,
            steps_per_epoch=full.steps_per_epoch,
            batch_size=full.batch_size if full.batch_size is not None else self.train.batch_size,
            lr=full.lr if full.lr is not None else self.train.lr,
            lr_milestones=list(full.lr_milestones)
            if full.lr_milestones is not None
            else self.train.lr_milestones,
            num_workers=full.num_workers,
            cpus_per_worker=full.cpus_per_worker,
            gpus_per_worker=full.gpus_per_worker,
            threads_per_worker=full.threads_per_worker,
            max_failures=full.max_failures,
        )

    def warm_start_config(self) -> TrainConfig:
        """``train`` with the ``warm_start`` overrides applied: the base model's budget."""
        warm = self.warm_start or WarmStartConfig()
        return dataclasses.replace(
            self.train,
            epochs=warm.epochs,
            steps_per_epoch=warm.steps_per_epoch
            if warm.steps_per_epoch is not None
            else self.train.steps_per_epoch,
            batch_size=warm.batch_size if warm.batch_size is not None else self.train.batch_size,
            lr=warm.lr if warm.lr is not None else self.train.lr,
            lr_milestones=[],
            seed=warm.seed,
            init_from=None,
            cpus_per_worker=warm.cpus_per_worker
            if warm.cpus_per_worker is not None
            else self.train.cpus_per_worker,
            threads_per_worker=warm.threads_per_worker
            if warm.threads_per_worker is not None
            else self.train.threads_per_worker,
        )

    def full_train_data(self) -> DataConfig:
        if self.full_train.train_ann is None:
            return self.data
        return dataclasses.replace(
            self.data,
            train=None,
            train_ann=self.full_train.train_ann,
            train_images=self.full_train.train_images,
            train_margin=self.full_train.train_margin,
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (resolved paths, the space inline): what is logged to
        MLflow and what a promoted run is trained with."""
        plain = to_plain(self)
        plain["space"] = copy.deepcopy(self.space_dict)
        return plain


# -- loading ------------------------------------------------------------------------------
def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "space":
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI every process uses: the config's, else ``$MLFLOW_TRACKING_URI``,
    else a SQLite file in the working directory. A relative SQLite path is made
    absolute: Ray trials run in their own folders and would each open their own."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        if db and db != ":memory:" and not db.startswith("/"):
            uri = f"sqlite:///{Path(db).absolute()}"
        return uri
    if "://" not in uri:
        raise AutoposeError(
            f"tracking URI {uri!r} has no scheme: use sqlite:///path/to/mlflow.db or http://host:port",
            field="tracking_uri",
        )
    return uri


def check_name(name: str, *, path: str | Path | None = None, field: str = "experiment") -> str:
    """A name that becomes one folder under the storage path (Tune and Train runs):
    letters, digits, ``. _ -`` and spaces, not starting with a dot, so that it can
    never point outside that folder (``..``, ``/``, an absolute path).

    Raises:
        AutoposeError: naming ``path`` and ``field``.
    """
    if not isinstance(name, str) or not name.strip():
        raise AutoposeError("must not be empty", path=path, field=field)
    if name.startswith(".") or len(name) > 200 or not all(c.isalnum() or c in "._- " for c in name):
        raise AutoposeError(
            f"{name[:60]!r} is not a plain name (letters, digits, '.', '_', '-', spaces; no leading "
            "dot, no '/'): it names a folder under storage_path",
            path=path,
            field=field,
        )
    return name


def storage_location(value: str | None) -> str:
    """Where checkpoints and Tune state go: a local folder (made absolute; default
    ``./runs``) or a URI Ray's storage understands (``s3://…``, ``gs://…``) kept as is."""
    if value and "://" in value:
        return value.rstrip("/")
    return absolute_path(value or "runs")


def storage_join(base: str, *parts: str) -> str:
    """``base/part/…`` for local folders and URIs alike (``Path`` would fold ``s3://``)."""
    return "/".join([base.rstrip("/"), *parts])


def load_space_mapping(space: str | dict[str, Any], *, path: str | Path | None) -> dict[str, Any]:
    """The search space as a plain mapping: a built-in space's name (``p2net``, the paper's), a
    space file (found from the working folder or beside the experiment file), or the space
    inline; checked by the augment layer's own loader (unknown ops and keys are named with the
    file and field)."""
    from autopose.augment.space import BUILTIN_SPACES, SearchSpace, load_search_space

    if isinstance(space, dict):
        return SearchSpace.from_dict(space, path=path, field_prefix="space").to_dict()
    if space in BUILTIN_SPACES:
        return BUILTIN_SPACES[space]().to_dict()
    space_path = Path(space)
    if not space_path.is_absolute() and not space_path.exists() and path is not None:
        # also look beside the experiment file (search_spaces/smoke.yaml names p2net.yaml)
        beside = Path(path).parent / space_path
        if beside.exists():
            space_path = beside
    if not space_path.is_file():
        raise AutoposeError(
            f"search space file not found: {space} (built in: {', '.join(BUILTIN_SPACES)})",
            path=path,
            field="space",
        )
    return load_search_space(space_path).to_dict()


def load_experiment(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Read and check an experiment config; nothing is started.

    Args:
        path: the YAML file (None: ``overrides`` alone describe the experiment).
        overrides: a nested mapping merged over the file's content (for tests and
            CLI flags), checked the same way.

    Raises:
        AutoposeError: one line naming the file and the field at fault.
    """
    data = load_yaml(path) if path is not None else {}
    if overrides:
        data = _deep_merge(data, overrides)
    if "data" not in data:
        raise AutoposeError("missing section", path=path, field="data")
    config = build_dataclass(ExperimentConfig, data, path=path)
    config.source = str(Path(path).absolute()) if path is not None else None
    config.tracking_uri = resolve_tracking_uri(config.tracking_uri)
    config.storage_path = storage_location(config.storage_path)
    check_name(config.experiment, path=path, field="experiment")
    if config.examples < 0:
        raise AutoposeError("must be ≥ 0", path=path, field="examples")
    config.space_dict = load_space_mapping(config.space, path=path)
    _check_search_alg(config, path)
    if config.tpe.trials and config.data.search_val is None:
        raise AutoposeError(
            "the tpe method scores its candidates on a holdout split: give data.search_val",
            path=path,
            field="tpe.trials",
        )
    if config.pba.population and config.data.search_val is None:
        raise AutoposeError(
            "the pba method scores its population on a holdout split: give data.search_val",
            path=path,
            field="pba.population",
        )
    if config.pba.population and config.train.num_workers > 0:
        raise AutoposeError(
            "the pba method hands one member's checkpoint to another through Tune: it needs "
            "train.num_workers: 0 (each member trains in its trial's process)",
            path=path,
            field="pba.population",
        )
    if config.selection.enabled and config.data.search_val is None:
        raise AutoposeError(
            "the selection stage scores candidates on a holdout split: give data.search_val, "
            "or set selection.enabled: false",
            path=path,
            field="selection.enabled",
        )
    if config.warm_start is not None and "://" in config.storage_path:
        raise AutoposeError(
            "warm_start caches its base model in a folder every node reads: give a shared folder",
            path=path,
            field="storage_path",
        )
    return config


def experiment_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config from :meth:`ExperimentConfig.to_dict` (a promoted run's own config)."""
    data = dict(data)
    space = data.get("space")
    config = build_dataclass(
        ExperimentConfig, {k: v for k, v in data.items() if k not in ("source", "space_dict")}, path=None
    )
    config.tracking_uri = resolve_tracking_uri(config.tracking_uri)
    config.storage_path = storage_location(config.storage_path)
    config.space_dict = load_space_mapping(space, path=None) if space is not None else {}
    return config


def _check_search_alg(config: ExperimentConfig, path) -> None:
    ranged = [name for name in ("tau1", "tau2", "policy_lr") if config.search.is_range(name)]
    if ranged and config.tune.search_alg is None:
        raise AutoposeError(
            "a [low, high] range needs tune.search_alg: optuna", path=path, field=f"search.{ranged[0]}"
        )
