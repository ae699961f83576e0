"""The warm start on a real local Ray and MLflow: one base model, trained once, cached by content."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mlflow import MlflowClient

from autopose.errors import AutoposeError
from autopose.platform.config import load_experiment
from autopose.platform.tracking import TAG_CHECKPOINT, TAG_KIND, ensure_experiment
from autopose.platform.tune import run_search
from autopose.platform.warm_start import TAG_BASE, TAG_REUSED, base_key, prepare_warm_start, resolve_init_from

pytestmark = [pytest.mark.platform, pytest.mark.slow]

WARM = {
    "warm_start": {"epochs": 1, "steps_per_epoch": 3},
    "search": {"trials": 0},
    "baselines": {"random_seeds": [], "handcrafted": False, "none": True},
}


def _runs(config, kind: str) -> list:
    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment)
    return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get(TAG_KIND) == kind]


def test_a_search_trains_the_base_once_and_every_trial_starts_from_it(
    ray_cluster, write_smoke_config, tmp_path
):
    config = load_experiment(write_smoke_config(tmp_path, WARM))
    outcomes = run_search(config, verbose=0)
    assert [o.status for o in outcomes] == ["TERMINATED"]
    (base,) = _runs(config, "base")
    cached = Path(config.storage_path) / "base" / base_key(config) / "checkpoint.pt"
    assert base.info.status == "FINISHED" and cached.is_file()
    assert base.data.tags[TAG_CHECKPOINT] == str(cached) and TAG_REUSED not in base.data.tags
    assert len(MlflowClient(config.tracking_uri).get_metric_history(base.info.run_id, "val_ap")) == 1
    (trial,) = _runs(config, "none")
    assert trial.data.params["train.init_from"] == str(cached)
    assert [r.info.run_id for r in _runs(config, "base")] == [base.info.run_id]  # not a search candidate

    # Another search of the same setting (another experiment) reuses the cached base: a run of its
    # own, logged from the checkpoint's history, nothing trained; the file is untouched.
    stamp = cached.stat().st_mtime_ns
    other = config.replace(experiment="smoke-again")
    experiment_id = ensure_experiment(other.tracking_uri, other.experiment)
    warmed = prepare_warm_start(other, experiment_id, other.experiment)
    assert warmed.train.init_from == str(cached) and cached.stat().st_mtime_ns == stamp
    (reused,) = _runs(other, "base")
    assert reused.data.tags[TAG_REUSED] == "true" and reused.data.tags[TAG_BASE] == base_key(config)
    assert reused.data.metrics["val_ap"] == pytest.approx(base.data.metrics["val_ap"])
    prepare_warm_start(other, experiment_id, other.experiment)  # a third time: still one run there
    assert len(_runs(other, "base")) == 1

    # A warm start given as the base's run resolves to its checkpoint; an unknown run is named.
    by_run = dataclasses.replace(
        config, train=dataclasses.replace(config.train, init_from=f"runs:/{base.info.run_id}")
    )
    assert resolve_init_from(by_run).train.init_from == str(cached)
    unknown = config.replace(train=dataclasses.replace(config.train, init_from="runs:/0123abc"))
    with pytest.raises(AutoposeError, match="no MLflow run") as error:
        resolve_init_from(unknown)
    assert error.value.field == "train.init_from"


def test_the_base_key_follows_what_the_base_learns_from_not_where_it_runs(write_smoke_config, tmp_path):
    config = load_experiment(write_smoke_config(tmp_path, WARM))
    longer = load_experiment(write_smoke_config(tmp_path, {**WARM, "warm_start": {"epochs": 2}}))
    elsewhere = load_experiment(write_smoke_config(tmp_path, {**WARM, "train": {"cpus_per_worker": 2}}))
    other_seed = load_experiment(write_smoke_config(tmp_path, {**WARM, "train": {"seed": 7}}))
    scored = load_experiment(write_smoke_config(tmp_path, {**WARM, "train": {"holdout_every_epoch": True}}))
    assert base_key(config) != base_key(longer)
    assert base_key(config) == base_key(elsewhere) == base_key(other_seed)  # trials' seeds share one base
    assert base_key(config) == base_key(scored)  # the tpe method's trials: one base with the others
    placed = {**WARM, "warm_start": {**WARM["warm_start"], "cpus_per_worker": 2, "threads_per_worker": 2}}
    wider = load_experiment(write_smoke_config(tmp_path, placed))
    assert (wider.warm_start_config().cpus_per_worker, wider.warm_start_config().threads_per_worker) == (2, 2)
    assert config.warm_start_config().threads_per_worker == config.train.threads_per_worker  # null: train's
    assert base_key(config) == base_key(wider)  # where the base trains is not what it learns


def test_a_warm_start_needs_a_folder_for_its_cache(write_smoke_config, tmp_path):
    with pytest.raises(AutoposeError, match="shared folder") as error:
        load_experiment(write_smoke_config(tmp_path, {**WARM, "storage_path": "s3://bucket/runs"}))
    assert error.value.field == "storage_path"
    with pytest.raises(AutoposeError) as error:
        load_experiment(write_smoke_config(tmp_path, {"warm_start": {"epochs": 0}}))
    assert error.value.field == "warm_start.epochs"
