"""``autopose train``: full training of one policy on Ray Train, tracked and registered in MLflow.

The run: a ``TorchTrainer`` with ``full_train.num_workers`` DDP workers (gloo on
CPUs, NCCL on GPUs), checkpoints under ``storage_path/full-train`` (a restart with
the same config and policy resumes from the latest; Ray Train retries failed
workers ``full_train.max_failures`` times), one MLflow run of kind
``full-train`` (a child of the promoted search run, when there is one), the
checkpoint with the best val AP (Ray keeps it beside the latest) scored on the val proxy
and registered in MLflow's model registry under ``full_train.registered_model`` with the
alias ``full_train.alias``; the run's ``autopose.registered_epoch`` tag and the model
version's description say which epoch it is.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autopose.engine.config import AugmentSpec, to_plain
from autopose.engine.train import check_data
from autopose.errors import AutoposeError
from autopose.files import read_json
from autopose.platform.cluster import ray_session
from autopose.platform.config import BASELINE_KINDS, ExperimentConfig, check_name, storage_join
from autopose.platform.runner import TrainingJob, best_checkpoint, fit, resources_of
from autopose.platform.tracking import (
    CONFIG_ARTIFACT,
    FULL_TRAIN_KIND,
    MLFLOW_NOTE,
    MLFLOW_PARENT,
    TAG_CHECKPOINT,
    TAG_KIND,
    TAG_PARENT,
    TAG_REGISTERED_EPOCH,
    TAG_SEED,
    TAG_TRIAL,
    TrackedRun,
    check_tracking,
    close_run,
    ensure_experiment,
    flatten,
    log_model,
    source_tags,
)
from autopose.platform.warm_start import prepare_warm_start


@dataclass
class TrainingOutcome:
    """What a full training produced."""

    run_id: str
    checkpoint: str
    metrics: dict[str, float]
    model_uri: str
    model_version: str
    registered_model: str
    alias: str
    registered_epoch: int  # 0-based: the epoch whose checkpoint was registered (best val AP)
    epochs: int


def policy_spec(policy: str | Path | dict[str, Any], seed: int) -> AugmentSpec:
    """``handcrafted`` | ``random`` | ``none`` | ``randaugment`` | ``trivialaugment``, a policy
    JSON file, or a parsed policy document → the augmentation to train with."""
    if isinstance(policy, dict):
        return AugmentSpec(kind="policy", seed=seed, policy=policy)
    text = str(policy)
    if text in BASELINE_KINDS:
        return AugmentSpec(kind=text, seed=seed)
    path = Path(text)
    if not path.is_file():
        raise AutoposeError(
            f"not a policy file, nor one of {', '.join(BASELINE_KINDS)}: {text}", path=path, field="--policy"
        )
    document = read_json(path)  # unreadable, not UTF-8, not JSON: one line naming the file
    if not isinstance(document, dict):
        raise AutoposeError("expected a JSON object", path=path)
    return AugmentSpec(kind="policy", seed=seed, policy=document)


def _policy_key(spec: AugmentSpec) -> str:
    """A short stable name of the policy: the same policy and config resume the same run."""
    if spec.policy is None:
        return spec.kind
    digest = hashlib.sha256(json.dumps(spec.policy, sort_keys=True).encode()).hexdigest()[:10]
    return f"policy-{digest}"


def _check_policy(spec: AugmentSpec, experiment: ExperimentConfig, source: str | Path = "--policy") -> None:
    """Validate a policy document against the space before Ray starts (errors name ``source``:
    the policy file, or ``--policy`` for a document given as it is)."""
    if spec.kind != "policy" or spec.policy is None or spec.policy.get("format") == "autopose.baseline/1":
        return
    from autopose.augment import SearchSpace
    from autopose.augment.schedule import policy_from_document

    policy_from_document(spec.policy, space=SearchSpace.from_dict(experiment.space_dict), path=source)


def run_training(
    experiment: ExperimentConfig,
    policy: str | Path | dict[str, Any],
    *,
    parent_run: str | None = None,
    name: str | None = None,
    address: str | None = None,
) -> TrainingOutcome:
    """Train ``policy`` fully (the config's ``full_train`` section) and register the model.

    Args:
        experiment: the loaded config.
        policy: a baseline name, a policy JSON file, or a parsed policy.
        parent_run: the search run whose policy this is (tags the run as its child).
        name: the MLflow experiment (default: the config's).
        address: Ray address (default: the running Ray, ``$RAY_ADDRESS``, or a new local one).

    Raises:
        AutoposeError: bad policy, unreachable tracking store (both before Ray
            starts), or a failed training run.
    """
    spec = policy_spec(policy, experiment.train.seed)
    _check_policy(spec, experiment, policy if isinstance(policy, str | Path) else "--policy")
    experiment_name = check_name(name or experiment.experiment, field="--experiment")
    check_data(experiment.full_train_data(), experiment.model)
    check_tracking(experiment.tracking_uri)
    experiment_id = ensure_experiment(experiment.tracking_uri, experiment_name)
    # The full training starts where the trials did: the base model (cached, or trained now).
    experiment = prepare_warm_start(experiment, experiment_id, experiment_name, address=address)
    key = f"{parent_run}-{_policy_key(spec)}" if parent_run else _policy_key(spec)
    policy_name = spec.kind if spec.policy is None else spec.policy.get("kind", "policy")
    tags = {
        **source_tags("autopose promote" if parent_run else "autopose train"),
        TAG_TRIAL: f"{FULL_TRAIN_KIND}/{key}",
        TAG_KIND: FULL_TRAIN_KIND,
        TAG_SEED: str(spec.seed),
        "autopose.policy": policy_name,
        MLFLOW_NOTE: f"Full training with {'a policy file' if policy_name == 'policy' else policy_name}, "
        f"seed {spec.seed}.",
    }
    if parent_run is not None:
        tags[TAG_PARENT] = parent_run
        tags[MLFLOW_PARENT] = parent_run
        tags[MLFLOW_NOTE] = (
            f"Full training of the policy of run {parent_run} ({policy_name}), seed {spec.seed}."
        )
    run = TrackedRun.open(
        experiment.tracking_uri, experiment_id, run_name=f"{FULL_TRAIN_KIND}-{_policy_key(spec)}", tags=tags
    )
    train = experiment.full_train_config()
    data = experiment.full_train_data()
    run.log_params(
        {
            **flatten(to_plain(experiment.model), "model."),
            **flatten(to_plain(train), "train."),
            **flatten(to_plain(data), "data."),
            "policy": spec.kind,
        }
    )
    run.log_yaml(experiment.to_dict(), CONFIG_ARTIFACT)
    job = TrainingJob(
        data=data,
        model=experiment.model,
        train=train,
        augment=spec,
        space=experiment.space_dict,
        tracking_uri=experiment.tracking_uri,
        run_id=run.run_id,
        examples=experiment.examples,
        title=f"{experiment_name}: full training ({policy_name})",
        keep_best=True,
    )
    storage = storage_join(experiment.storage_path, "full-train")
    run_name = f"{experiment_name}-{key}"
    started, status = time.perf_counter(), "FAILED"  # until the model is registered
    try:
        with ray_session(address):
            result = fit(job, name=run_name, storage_path=storage, backend=experiment.full_train.backend)
        # The registered model is the epoch with the best val AP (Ray keeps it beside the latest).
        with best_checkpoint(result, job) as kept:
            metrics = _evaluate(kept.local, experiment)
            model_uri, version = _register(kept.local, experiment, run.run_id, kept.epoch, train.epochs)
        checkpoint = kept.location
        run.log_metrics(metrics, step=train.epochs)
        run.set_tags({TAG_CHECKPOINT: checkpoint, TAG_REGISTERED_EPOCH: kept.epoch})
        status = "FINISHED"
    finally:
        wall = time.perf_counter() - started
        close_run(run, status, wall_s=wall, resources=resources_of(train), step=train.epochs)
    return TrainingOutcome(
        run_id=run.run_id,
        checkpoint=checkpoint,
        metrics=metrics,
        model_uri=model_uri,
        model_version=version,
        registered_model=experiment.full_train.registered_model,
        alias=experiment.full_train.alias,
        registered_epoch=kept.epoch,
        epochs=train.epochs,
    )


def _evaluate(checkpoint: Path, experiment: ExperimentConfig) -> dict[str, float]:
    """The final model's OKS AP on the whole val proxy (flip test on)."""
    from torch.utils.data import DataLoader

    from autopose.data import HeatmapCodec, ProxyDataset
    from autopose.engine.checkpoint import load_model
    from autopose.engine.proxy_scoring import evaluate_proxy

    model, meta = load_model(checkpoint)
    val = ProxyDataset(Path(experiment.data.val))
    scores = evaluate_proxy(
        model,
        DataLoader(val, batch_size=experiment.train.val_batch_size),
        HeatmapCodec(tuple(meta["input_size"])),
        flip_pairs=meta["flip_pairs"] or val.metadata.flip_pairs,
        keypoint_names=val.metadata.keypoint_names,
    )
    return {f"final_val_{key.lower()}": float(value) for key, value in scores.items() if value == value}


def _register(
    checkpoint: Path, experiment: ExperimentConfig, run_id: str, epoch: int, epochs: int
) -> tuple[str, str]:
    from autopose.engine.checkpoint import load_model

    model, _ = load_model(checkpoint)
    full = experiment.full_train
    return log_model(
        experiment.tracking_uri,
        run_id,
        model,
        registered_model=full.registered_model,
        alias=full.alias,
        description=f"Epoch {epoch} (0-based) of {epochs}: the best val AP of run {run_id}.",
    )
