"""The user's loop on a real local Ray and a real MLflow (SQLite): search → compare → promote."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from autopose.augment import Policy, SearchSpace
from autopose.errors import AutoposeError
from autopose.platform.compare import collect, format_table, plot, read_selection
from autopose.platform.config import load_experiment
from autopose.platform.promote import promote
from autopose.platform.tracking import (
    EXAMPLES_ARTIFACT,
    EXPERIMENT_KIND,
    MLFLOW_NOTE,
    POLICY_ARTIFACT,
    TAG_ATTEMPTS,
    TAG_CANDIDATE,
    TAG_KIND,
    TAG_PARENT,
    TAG_PROMOTED,
    TAG_REGISTERED_EPOCH,
    TAG_SEED,
    TAG_SELECTED,
    TAG_STAGE,
    TAG_STOPPED_EARLY,
    TAG_TRIAL,
)
from autopose.platform.tune import run_search

pytestmark = [pytest.mark.platform, pytest.mark.slow]

SMOKE = Path(__file__).resolve().parents[2] / "search_spaces" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_search(ray_cluster, write_smoke_config, smoke_data, tmp_path_factory):
    """search_spaces/smoke.yaml as it is (with its holdout split: the tpe and pba methods and the
    selection stage run) searched once for the whole module."""
    folder = tmp_path_factory.mktemp("smoke-search")
    shipped = yaml.safe_load(SMOKE.read_text())
    overrides = {
        "data": {"search_val": str(smoke_data["holdout"])},
        "tpe": shipped["tpe"],
        "pba": shipped["pba"],
    }
    config = load_experiment(write_smoke_config(folder, overrides))
    assert config.tpe.trials == 3 and config.pba.population == 2
    outcomes = run_search(config, verbose=0)
    return config, outcomes


def _runs(config) -> list:
    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment)
    return client.search_runs([experiment.experiment_id], max_results=100)


def test_smoke_search_leaves_one_finished_run_per_trial(smoke_search, tmp_path_factory):
    config, outcomes = smoke_search
    # six trials, three tpe candidates, two pba members, then the selection stage: both search
    # trials' exports, tpe's best and pba's best retrained (seed 0); none-0 and handcrafted-0 are
    # the search's own trials, reused
    assert [o.status for o in outcomes] == ["TERMINATED"] * 15, [o.error for o in outcomes]
    runs = [r for r in _runs(config) if r.data.tags.get(TAG_KIND) != "full-train"]
    assert len(runs) == 15 and {r.data.tags[TAG_TRIAL] for r in runs} == {
        f"smoke/{o.trial_id}" for o in outcomes
    }
    tpe = [r for r in runs if r.data.tags[TAG_KIND] == "tpe"]
    assert len(tpe) == 3 and all(r.data.tags[TAG_SEED] == "0" for r in tpe)
    for run in tpe:  # ASHA may stop a candidate after its first epoch: closed KILLED, so tagged
        stopped = run.data.tags.get(TAG_STOPPED_EARLY) == "true"
        assert run.info.status == ("KILLED" if stopped else "FINISHED")
        assert 0.0 <= run.data.metrics["holdout_ap"] <= 1.0  # scored on holdout after every epoch
    assert any(r.info.status == "FINISHED" for r in tpe)  # the first at each rung goes on
    trials = [r for r in runs if r.data.tags[TAG_KIND] != "tpe"]
    # PBT ranked the two pba members after epoch 0 and handed the worse the better's checkpoint and
    # a perturbed copy of its policy: that member trained under a schedule of two policies
    client = MlflowClient(config.tracking_uri)
    steps = config.train.steps_per_epoch
    schedules = []
    for run in (r for r in runs if r.data.tags[TAG_KIND] == "pba"):
        folder = Path(tmp_path_factory.mktemp("pba"))
        document = json.loads(
            Path(client.download_artifacts(run.info.run_id, POLICY_ARTIFACT, str(folder))).read_text()
        )
        schedules.append([entry["start_step"] for entry in document.get("schedule", [{"start_step": 0}])])
        assert 0.0 <= run.data.metrics["holdout_ap"] <= 1.0
    assert sorted(schedules) == [[0], [0, steps]]
    kinds = sorted(
        (r.data.tags[TAG_KIND], int(r.data.tags[TAG_SEED]), r.data.tags.get(TAG_CANDIDATE, ""))
        for r in trials
    )
    assert kinds == [
        ("handcrafted", 0, ""),
        ("none", 0, ""),
        ("pba", 0, ""),
        ("pba", 0, ""),
        ("policy", 0, "pba"),
        ("policy", 0, "search-0"),
        ("policy", 0, "search-1"),
        ("policy", 0, "tpe"),
        ("random", 0, ""),
        ("random", 1, ""),
        ("search", 0, ""),
        ("search", 1, ""),
    ]
    for run in trials:
        assert run.info.status == "FINISHED"
        metrics = run.data.metrics
        assert 0.0 <= metrics["val_ap"] <= 1.0
        assert metrics["step"] == config.train.epochs * config.train.steps_per_epoch
        assert metrics["cost_cpu_s"] > 0 and metrics["cost_gpu_s"] == 0
        history = client.get_metric_history(run.info.run_id, "val_ap")
        assert sorted(m.step for m in history) == list(range(config.train.epochs))  # one point per epoch
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "policy")}
        assert artifacts == {POLICY_ARTIFACT, EXAMPLES_ARTIFACT}
        assert run.data.params["model.arch"] == "p2net_r18"


def test_the_search_gives_every_cpu_back(smoke_search, ray_cluster):
    """Once, a CPU stayed held after the search (PBT's paused members are the suspect), and the
    2-worker training of the promote test waited for it until it timed out."""
    total = ray_cluster.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60
    while ray_cluster.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
        time.sleep(1.0)
    assert ray_cluster.available_resources().get("CPU", 0.0) == total


def test_search_runs_log_the_learned_policy(smoke_search, tmp_path):
    config, _ = smoke_search
    client = MlflowClient(config.tracking_uri)
    for run in _runs(config):
        if run.data.tags.get(TAG_KIND) != "search":
            continue
        probabilities = {k: v for k, v in run.data.metrics.items() if k.startswith("op_prob/")}
        assert set(probabilities) == {f"op_prob/{op}" for op in config.space_dict["ops"]}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert {f"op_m/{op}" for op in config.space_dict["ops"]} <= set(run.data.metrics)
        assert run.data.params["search.hessian"] == "finite_difference"
        policy = json.loads(
            Path(client.download_artifacts(run.info.run_id, POLICY_ARTIFACT, str(tmp_path))).read_text()
        )
        # The export expands each of the K sub-policies into its combinations of ops, one per step
        # (O^N each, weighted π_k·Π w), dropping those under 1%. After this short search every
        # combination is near 1/(K·O^N) = 1/8: all are kept. Signs start at 1/2, so it is /2.
        space = SearchSpace.from_dict(config.space_dict)
        assert policy["format"] == "autopose.policy/2" and policy["space"] == "smoke"
        exported = Policy.from_dict(policy, space=space)
        k, n, ops = space.K, space.N, space.op_names
        assert len(exported.sub_policies) == k * len(ops) ** n == 8
        assert all(len(steps) == n for steps in exported.sub_policies)
        assert sorted(s.op for steps in exported.sub_policies for s in steps) == sorted(ops * k)
        assert sum(exported.sub_policy_weights) == pytest.approx(1.0, abs=1e-5)
        assert run.data.metrics["exported_share"] == pytest.approx(1.0)
        signed = {op for op, is_signed in zip(ops, space.signed, strict=True) if is_signed}
        signs = {key.split("/", 1)[1]: v for key, v in run.data.metrics.items() if key.startswith("op_sign/")}
        assert set(signs) == signed == {"Rotate", "Scale", "Brightness"}
        assert all(0.0 < v < 1.0 for v in signs.values())
        picture = client.download_artifacts(run.info.run_id, EXAMPLES_ARTIFACT, str(tmp_path))
        assert Path(picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_selection_stage_retrains_the_exports_and_selects_the_holdout_best(smoke_search, tmp_path):
    config, outcomes = smoke_search
    client = MlflowClient(config.tracking_uri)
    runs = {r.info.run_id: r for r in _runs(config)}
    candidates = {
        r.data.tags.get(TAG_CANDIDATE) or r.data.tags[TAG_KIND]: r
        for r in runs.values()
        if r.data.tags.get(TAG_CANDIDATE) or r.data.tags[TAG_KIND] in ("none", "handcrafted")
    }
    assert set(candidates) == {"none", "handcrafted", "search-0", "search-1", "tpe", "pba"}
    for name in ("search-0", "search-1"):
        run = candidates[name]
        assert run.data.tags[TAG_STAGE] == "selection" and run.info.status == "FINISHED"
        # the candidate trains exactly the policy its search trial exported
        search_run = next(
            r
            for r in runs.values()
            if r.data.tags[TAG_KIND] == "search" and r.data.tags[TAG_SEED] == name[-1]
        )
        trained = client.download_artifacts(run.info.run_id, POLICY_ARTIFACT, str(tmp_path / name / "c"))
        exported = client.download_artifacts(
            search_run.info.run_id, POLICY_ARTIFACT, str(tmp_path / name / "s")
        )
        assert json.loads(Path(trained).read_text()) == json.loads(Path(exported).read_text())
    # pba's candidate trains the schedule (or policy) of a member best on holdout (the tiny
    # model's members often tie: any of the best)
    members = [r for r in runs.values() if r.data.tags[TAG_KIND] == "pba"]
    best_ap = max(r.data.metrics["holdout_ap"] for r in members)
    trained = client.download_artifacts(
        candidates["pba"].info.run_id, POLICY_ARTIFACT, str(tmp_path / "pba" / "c")
    )
    best_documents = [
        json.loads(
            Path(
                client.download_artifacts(
                    r.info.run_id, POLICY_ARTIFACT, str(tmp_path / "pba" / r.info.run_id)
                )
            ).read_text()
        )
        for r in members
        if r.data.metrics["holdout_ap"] == best_ap
    ]
    assert json.loads(Path(trained).read_text()) in best_documents
    holdout = {name: run.data.metrics["holdout_ap"] for name, run in candidates.items()}
    best = max(holdout.values())
    selected = [r for r in runs.values() if r.data.tags.get(TAG_SELECTED) == "true"]
    assert len(selected) == 1
    (winner,) = (n for n, r in candidates.items() if r.info.run_id == selected[0].info.run_id)
    assert holdout[winner] == best >= holdout["none"]  # never below none on held-out data
    selection = read_selection(config, config.experiment)
    assert selection.winner.run_id == selected[0].info.run_id
    assert selection.winner.gain == pytest.approx(best - holdout["none"])
    assert {o.candidate for o in outcomes if o.candidate} == {"search-0", "search-1", "tpe", "pba"}


def test_runs_say_what_they_are_in_mlflows_ui(smoke_search):
    """MLflow's UI opens the experiment on its runs (the experiment-kind tag), and each run has
    a description, its command and the code's commit; a trial's start is a tag, not a metric
    that the compare view would plot against val AP."""
    config, outcomes = smoke_search
    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment)
    assert experiment.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    for outcome in outcomes:
        run = client.get_run(outcome.run_id)
        assert run.data.tags["mlflow.source.name"] == "autopose search"
        assert run.data.tags["mlflow.source.git.commit"] == commit.stdout.strip()
        assert config.experiment in run.data.tags[MLFLOW_NOTE]
        assert int(run.data.tags[TAG_ATTEMPTS]) >= 1 and "attempt_started" not in run.data.metrics


def test_compare_reads_the_trials_back(smoke_search, tmp_path):
    config, outcomes = smoke_search
    name, rows = collect(config.tracking_uri, config.experiment)
    assert name == "smoke" and len(rows) == 15
    assert {r.run_id for r in rows} == {o.run_id for o in outcomes}
    assert [r.val_ap for r in rows] == sorted((r.val_ap for r in rows), reverse=True)
    table = format_table(name, rows)
    assert all(r.run_id in table for r in rows) and "random" in table and "CPU-s" in table
    assert collect(config.tracking_uri)[0] == "smoke"  # the latest experiment by default
    png = plot(name, rows, tmp_path / "ap.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_second_search_of_the_same_name_needs_resume(smoke_search):
    config, outcomes = smoke_search
    with pytest.raises(AutoposeError, match="--resume"):
        run_search(config, verbose=0)
    again = run_search(config, resume=True, verbose=0)  # finished: nothing left to run
    assert sorted(o.trial_id for o in again) == sorted(o.trial_id for o in outcomes)
    assert len([r for r in _runs(config) if r.data.tags.get(TAG_KIND) != "full-train"]) == 15


def test_promote_trains_on_two_gloo_workers_and_registers_the_model(smoke_search, capsys):
    config, outcomes = smoke_search
    best = next(o for o in outcomes if o.kind == "search")
    outcome = promote(best.run_id, tracking_uri=config.tracking_uri)
    # MLflow's registry lines stay out of the user's console (the debug log has them)
    assert "Successfully registered" not in capsys.readouterr().err
    client = MlflowClient(config.tracking_uri)
    assert client.get_run(best.run_id).data.tags[TAG_PROMOTED] == "true"
    child = client.get_run(outcome.run_id)
    assert child.info.status == "FINISHED"
    assert child.data.tags[TAG_KIND] == "full-train" and child.data.tags[TAG_PARENT] == best.run_id
    assert child.data.params["train.num_workers"] == "2"
    assert 0.0 <= child.data.metrics["final_val_ap"] <= 1.0
    assert outcome.checkpoint.endswith("checkpoint.pt") and config.storage_path in outcome.checkpoint
    version = client.get_model_version_by_alias(config.full_train.registered_model, config.full_train.alias)
    assert version.run_id == outcome.run_id and str(version.version) == outcome.model_version
    # the registered model is an epoch with the best val AP (which of equals is Ray's choice), and
    # says which
    history = {int(m.step): m.value for m in client.get_metric_history(outcome.run_id, "val_ap")}
    registered = int(child.data.tags[TAG_REGISTERED_EPOCH])
    assert history[registered] == max(history.values())
    assert version.description.startswith(f"Epoch {registered} (0-based) of ")
    assert child.data.tags["mlflow.source.name"] == "autopose promote"
    with pytest.raises(AutoposeError, match="no MLflow run"):
        promote("ffffffffffffffffffffffffffffffff", tracking_uri=config.tracking_uri)
