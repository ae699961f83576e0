"""The warm start: one base model, trained once without augmentation, that every trial fine-tunes.

:func:`prepare_warm_start` runs before a search's trials. With a ``warm_start`` section it
trains the base model (kind ``none``, the section's budget, on Ray Train like any run) unless
a finished one of the same inputs is in the cache, ``<storage_path>/base/<key>/checkpoint.pt``;
the key hashes what the base depends on: the training data's content, the model, the budget.
Every search of the same setting (other seeds, other shifts of the val split) reuses it.

Each search's MLflow experiment holds the base as a run of its own (kind ``base``, tagged with
the key and the checkpoint): trained there, or logged from the cache with the history the
checkpoint carries and tagged ``autopose.reused``. The trials then start from the checkpoint
(``train.init_from``). A ``train.init_from`` of ``runs:/<run id>`` is resolved here to the
checkpoint that run recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from autopose.engine.config import RUN_URI_PREFIX, AugmentSpec, TrainConfig, to_plain
from autopose.errors import AutoposeError
from autopose.files import atomic_write
from autopose.platform.cluster import ray_session
from autopose.platform.config import ExperimentConfig, storage_join
from autopose.platform.runner import CHECKPOINT_FILE, TrainingJob, fit, local_checkpoint, resources_of
from autopose.platform.tracking import (
    MLFLOW_NOTE,
    TAG_CHECKPOINT,
    TAG_KIND,
    TAG_SEED,
    TrackedRun,
    client,
    close_run,
    epochs_logged,
    flatten,
    source_tags,
)

BASE_KIND = "base"
TAG_BASE = "autopose.base"  # the base model's cache key
TAG_USED_BY = "autopose.base_of"  # the search whose trials start from it
TAG_REUSED = "autopose.reused"  # the run was logged from a cached base, not trained here
_KEY_VERSION = 1
# Settings that change where and how fast the base trains, or what is scored, not what it learns.
_PLACEMENT = ("num_workers", "cpus_per_worker", "gpus_per_worker", "threads_per_worker", "loader_workers")
_PLACEMENT += ("max_failures", "checkpoint_every", "val_batch_size", "holdout_every_epoch")


def _data_identity(experiment: ExperimentConfig) -> dict[str, str]:
    """What the base's training data is, by content: the proxy's own content hash, or the
    annotation file's digest with the image folder."""
    data = experiment.data
    if data.train is not None:
        from autopose.data import ProxyDataset

        return {"proxy": ProxyDataset(Path(data.train)).metadata.content_hash}
    digest = hashlib.sha256(Path(data.train_ann).read_bytes()).hexdigest()
    return {"annotations": digest, "images": str(data.train_images)}


def base_key(experiment: ExperimentConfig) -> str:
    """The cache key of the experiment's base model (hex, 20 characters)."""
    train = {k: v for k, v in to_plain(experiment.warm_start_config()).items() if k not in _PLACEMENT}
    identity = {
        "version": _KEY_VERSION,
        "data": _data_identity(experiment),
        "model": to_plain(experiment.model),
        "train": train,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def resolve_init_from(experiment: ExperimentConfig) -> ExperimentConfig:
    """The config with ``train.init_from: runs:/<id>`` replaced by that run's checkpoint file."""
    init_from = experiment.train.init_from
    if init_from is None or not init_from.startswith(RUN_URI_PREFIX):
        return experiment
    run_id = init_from[len(RUN_URI_PREFIX) :].strip("/")
    try:
        run = client(experiment.tracking_uri).get_run(run_id)
    except Exception:  # MlflowException (unknown id) or the server away
        raise AutoposeError(
            f"no MLflow run {run_id!r} at {experiment.tracking_uri}", field="train.init_from"
        ) from None
    checkpoint = run.data.tags.get(TAG_CHECKPOINT)
    if checkpoint is None or not Path(checkpoint).is_file():
        raise AutoposeError(
            f"run {run_id} recorded no checkpoint file here ({checkpoint or 'no autopose.checkpoint tag'})",
            field="train.init_from",
        )
    return experiment.replace(train=dataclasses.replace(experiment.train, init_from=checkpoint))


def prepare_warm_start(
    experiment: ExperimentConfig,
    experiment_id: str,
    search_name: str,
    say: Callable[[str], None] = lambda _: None,
    address: str | None = None,
) -> ExperimentConfig:
    """The config the trials run with: ``train.init_from`` set to the base model (trained now
    or taken from the cache) when there is a ``warm_start`` section; a ``runs:/`` warm start
    resolved to its file; else the config as it is. The base's MLflow run is in
    ``experiment_id``. Ray is needed (the running one, or ``address``) only to train the base.

    Raises:
        AutoposeError: the ``runs:/`` run is unknown or has no checkpoint, or the base's
            training failed.
    """
    experiment = resolve_init_from(experiment)
    if experiment.warm_start is None:
        return experiment
    key = base_key(experiment)
    cached = Path(experiment.storage_path) / "base" / key / CHECKPOINT_FILE
    # Not tagged with the search (autopose.search): the base is no candidate policy, so it stays
    # out of the search's table and its promotion.
    tags = {
        **source_tags("autopose warm start"),
        TAG_BASE: key,
        TAG_KIND: BASE_KIND,
        TAG_SEED: str(experiment.warm_start.seed),
        TAG_USED_BY: search_name,
        MLFLOW_NOTE: (
            f"Base model {key}: {experiment.warm_start.epochs} epochs without augmentation, "
            "the warm start every trial and full training begins from."
        ),
    }
    found = client(experiment.tracking_uri).search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_BASE}` = '{key}'", max_results=1
    )
    finished = bool(found) and found[0].info.status == "FINISHED"
    if cached.is_file():
        if not finished:
            _log_cached_base(experiment, experiment_id, tags, cached)
        say(f"base model {key} reused from {cached}")
    else:
        say(f"base model {key}: training it once ({experiment.warm_start.epochs} epochs, no augmentation)")
        _train_base(experiment, experiment_id, tags, cached, address)
    train = dataclasses.replace(experiment.train, init_from=str(cached))
    return experiment.replace(train=train)


def base_progress(tracking_uri: str, experiment: str, search_name: str) -> tuple[int, int] | None:
    """``(epochs done, epochs)`` of the base model a search is training now (its run RUNNING in
    MLflow), else None: what the demo's progress line shows before the trials start."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow_client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{TAG_KIND}` = '{BASE_KIND}' and tags.`{TAG_USED_BY}` = '{search_name}'",
        max_results=1,
    )
    if not runs or runs[0].info.status != "RUNNING":
        return None
    run = runs[0]
    return epochs_logged(run.data.metrics), int(run.data.params.get("train.epochs", 0))


def _open_base_run(experiment: ExperimentConfig, experiment_id: str, tags: dict[str, str]) -> TrackedRun:
    train = experiment.warm_start_config()
    run = TrackedRun.open(
        experiment.tracking_uri,
        experiment_id,
        run_name=f"base-{tags[TAG_BASE][:8]}",
        tags=tags,
        key_tag=TAG_BASE,
    )
    run.log_params(
        {
            "kind": BASE_KIND,
            "seed": train.seed,
            **flatten(to_plain(experiment.model), "model."),
            **flatten(to_plain(train), "train."),
            **flatten(to_plain(experiment.data), "data."),
        }
    )
    return run


def _train_base(
    experiment: ExperimentConfig, experiment_id: str, tags: dict[str, str], cached: Path, address: str | None
) -> None:
    train: TrainConfig = experiment.warm_start_config()
    run = _open_base_run(experiment, experiment_id, tags)
    job = TrainingJob(
        data=experiment.data,
        model=experiment.model,
        train=train,
        augment=AugmentSpec(kind="none", seed=train.seed),
        space=experiment.space_dict,
        tracking_uri=experiment.tracking_uri,
        run_id=run.run_id,
        examples=0,
        title=f"base model {tags[TAG_BASE]}",
    )
    started, status = time.perf_counter(), "FAILED"  # until the checkpoint is cached
    try:
        with ray_session(address):
            result = fit(
                job,
                name=f"base-{tags[TAG_BASE]}",
                storage_path=storage_join(experiment.storage_path, "base", "train"),
            )
        with (
            local_checkpoint(result, job) as local,
            open(local, "rb") as source,
            atomic_write(cached, "wb") as target,
        ):
            shutil.copyfileobj(source, target)
        run.set_tags({TAG_CHECKPOINT: str(cached)})
        status = "FINISHED"
    finally:
        wall = time.perf_counter() - started
        close_run(run, status, wall_s=wall, resources=resources_of(train), step=train.epochs)


def _log_cached_base(
    experiment: ExperimentConfig, experiment_id: str, tags: dict[str, str], cached: Path
) -> None:
    """The cached base as a run of this experiment: its per-epoch history, no training."""
    from autopose.engine.checkpoint import load_checkpoint

    _, meta = load_checkpoint(cached)
    history = meta["extra"].get("training_state", {}).get("history", [])
    run = _open_base_run(experiment, experiment_id, tags)
    for epoch, metrics in enumerate(history):
        run.log_metrics(metrics, step=epoch)
    run.set_tags({TAG_CHECKPOINT: str(cached), TAG_REUSED: "true"})
    run.finish("FINISHED")
