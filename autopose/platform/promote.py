"""``autopose promote RUN_ID``: mark a search run's policy promoted, then train it fully."""

from __future__ import annotations

import json
import tempfile

import yaml

from autopose.errors import AutoposeError
from autopose.platform.config import ExperimentConfig, experiment_from_dict, resolve_tracking_uri
from autopose.platform.tracking import (
    CONFIG_ARTIFACT,
    POLICY_ARTIFACT,
    SEARCH_KINDS,
    TAG_KIND,
    TAG_PROMOTED,
    check_tracking,
    client,
    download_artifact,
    get_run,
    require_store,
)
from autopose.platform.train import TrainingOutcome, run_training


def promoted_policy(tracking_uri: str, run_id: str) -> tuple[dict, dict, str]:
    """The policy document, the experiment config (as logged) and the experiment name of a run.

    Raises:
        AutoposeError: unknown run, a run that is not a search or baseline trial,
            or one without its policy.
    """
    run = get_run(tracking_uri, run_id)
    kind = run.data.tags.get(TAG_KIND)
    if kind not in SEARCH_KINDS:
        raise AutoposeError(
            f"run {run_id} is not a search or baseline trial (autopose.kind={kind!r})", field="RUN_ID"
        )
    with tempfile.TemporaryDirectory(prefix="autopose-promote-") as folder:
        policy = json.loads(download_artifact(tracking_uri, run_id, POLICY_ARTIFACT, folder).read_text())
        config = yaml.safe_load(download_artifact(tracking_uri, run_id, CONFIG_ARTIFACT, folder).read_text())
    experiment_name = client(tracking_uri).get_experiment(run.info.experiment_id).name
    return policy, config, experiment_name


def promote(
    run_id: str,
    *,
    config: ExperimentConfig | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
) -> TrainingOutcome:
    """Tag run ``run_id`` ``autopose.promoted=true`` and train its policy fully.

    Args:
        run_id: an MLflow run of a search or baseline trial.
        config: the experiment config for the full training (default: the run's own,
            as it logged it).
        tracking_uri: where the run lives (default: the config's, else
            ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``).
        address: Ray address.

    Raises:
        AutoposeError: unreachable tracking store, unknown run (before anything
            starts), or a failed training.
    """
    uri = resolve_tracking_uri(tracking_uri or (config.tracking_uri if config is not None else None))
    require_store(uri)
    check_tracking(uri)
    policy, logged, experiment_name = promoted_policy(uri, run_id)
    if config is None:
        logged["tracking_uri"] = uri
        config = experiment_from_dict(logged)
    elif config.tracking_uri != uri:
        config.tracking_uri = uri
    client(uri).set_tag(run_id, TAG_PROMOTED, "true")
    return run_training(config, policy, parent_run=run_id, name=experiment_name, address=address)
