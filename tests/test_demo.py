"""``autopose demo --budget tiny`` end to end on the session's local Ray: the MLflow runs, the
report, and a second run that reuses every finished stage."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

import pytest

from autopose.cli import main

pytestmark = [pytest.mark.platform, pytest.mark.slow]

# the trials, and the selection stage's retraining of the search trial's export ("policy")
KINDS = {"search", "random", "handcrafted", "none", "policy"}


@pytest.fixture(scope="module")
def demo_run(ray_cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--workdir", str(workdir), "--budget", "tiny"]) == 0
    return workdir


def _runs(workdir: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("autopose-demo-tiny")
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], max_results=100)


def _trials(runs: list) -> list:
    return [r for r in runs if r.data.tags.get("autopose.kind") not in ("full-train", "base")]


def test_every_trial_kind_finished_with_a_finite_val_ap(demo_run):
    trials = _trials(_runs(demo_run))
    assert {r.data.tags["autopose.kind"] for r in trials} == KINDS
    for run in trials:
        assert run.info.status == "FINISHED"
        assert math.isfinite(run.data.metrics["val_ap"]) and 0.0 <= run.data.metrics["val_ap"] <= 1.0
        assert run.data.metrics["cost_cpu_s"] > 0
    search = next(r for r in trials if r.data.tags["autopose.kind"] == "search")
    probabilities = [v for k, v in search.data.metrics.items() if k.startswith("op_prob/")]
    assert len(probabilities) >= 2 and sum(probabilities) == pytest.approx(1.0, abs=1e-4)


def test_the_holdout_best_candidate_is_promoted_and_trained_on_two_workers(demo_run):
    runs = _runs(demo_run)
    trials = _trials(runs)
    full = [r for r in runs if r.data.tags.get("autopose.kind") == "full-train"]
    assert len(full) == 1 and full[0].info.status == "FINISHED"
    parent = next(r for r in trials if r.info.run_id == full[0].data.tags["autopose.parent_run"])
    assert parent.data.tags["autopose.promoted"] == "true" and parent.data.tags["autopose.selected"] == "true"
    # the candidates: the search trial's export retrained, and the search's own none and hand-crafted
    candidates = {
        r.data.tags.get("autopose.candidate", r.data.tags["autopose.kind"]): r.data.metrics["holdout_ap"]
        for r in trials
        if "autopose.candidate" in r.data.tags or r.data.tags["autopose.kind"] in ("none", "handcrafted")
    }
    assert set(candidates) == {"search-0", "none", "handcrafted"}
    assert parent.data.metrics["holdout_ap"] == max(candidates.values()) >= candidates["none"]
    assert full[0].data.params["train.num_workers"] == "2"
    metrics = full[0].data.metrics
    for key in ("final_val_ap", "demo_val_split_ap", "coco_samples_ap"):
        assert math.isfinite(metrics[key]) and 0.0 <= metrics[key] <= 1.0, key


def test_the_report_shows_existing_pictures(demo_run):
    page = demo_run / "report-tiny" / "index.html"
    text = page.read_text()
    pictures = re.findall(r"<img src='([^']+)'", text)
    assert {"ap_by_kind.png", "search_ops.png", "cost.png", "val_ap_curves.png"} <= set(pictures)
    assert any(p.startswith("policy_search-") for p in pictures)
    for name in pictures:
        assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "mlflow ui --backend-store-uri sqlite:///" in text
    for run in _runs(demo_run):
        assert run.info.run_id in text or run.data.tags.get("autopose.kind") == "full-train"
    assert "<h2>Against no augmentation</h2>" in text and "<td>none</td>" in text
    # the first line says what won and by how much over none (the selection's own summary)
    summary = html.unescape(re.search(r"<p class='summary'>([^<]+)</p>", text).group(1))
    assert text.index("class='summary'") < text.index("<h2>") and summary.startswith("selected: ")


def test_every_trial_fine_tunes_the_one_base_model(demo_run):
    runs = _runs(demo_run)
    (base,) = [r for r in runs if r.data.tags.get("autopose.kind") == "base"]
    assert base.info.status == "FINISHED"
    checkpoint = base.data.tags["autopose.checkpoint"]
    assert all(r.data.params["train.init_from"] == checkpoint for r in _trials(runs))
    (full,) = [r for r in runs if r.data.tags.get("autopose.kind") == "full-train"]
    assert full.data.params["train.init_from"] == checkpoint  # promoted: trained on from the same base


def test_the_search_trial_steps_its_policy_as_the_suite_measured_best(demo_run):
    from autopose.engine.config import load_yaml
    from autopose.platform.demo import BUDGETS

    (search,) = [r for r in _trials(_runs(demo_run)) if r.data.tags.get("autopose.kind") == "search"]
    measured = ("sampling", "batchnorm_path", "batchnorm_scope", "pose_path", "pose_every_step")
    measured += ("balance_paths", "policy_every")
    measured += ("policy_optimizer", "unroll_lr", "hessian")
    policy_step = {
        key: value
        for key, value in load_yaml(BUDGETS["tiny"].experiment)["search"].items()
        if key in measured
    }
    assert policy_step == {
        "sampling": "hard",
        "batchnorm_path": 0.5,
        "batchnorm_scope": "photometric",
        "pose_path": 0.5,
        "pose_every_step": True,
        "balance_paths": True,
        "policy_every": 8,
        "policy_optimizer": "normalized",
        "unroll_lr": 0.1,
        "hessian": "forward_difference",
    }
    for key, value in policy_step.items():
        assert search.data.params[f"search.{key}"] == str(value)
    # the learned direction of each signed op, and the share of the policy the export keeps
    assert {k for k in search.data.metrics if k.startswith("op_sign/")} == {
        "op_sign/TranslateX",
        "op_sign/Rotate",
        "op_sign/Scale",
        "op_sign/Brightness",
        "op_sign/Sharpness",
    }
    assert 0.9 <= search.data.metrics["exported_share"] <= 1.0 + 1e-6  # float32 weights


def test_a_second_run_reuses_every_finished_stage(demo_run, capsys):
    runs_before = {r.info.run_id for r in _runs(demo_run)}
    assert main(["demo", "--workdir", str(demo_run), "--budget", "tiny"]) == 0
    out = capsys.readouterr().out
    for stage in ("data", "proxies", "search", "promote"):
        assert re.search(rf"\] {stage}: reused in", out), (stage, out)
    assert {r.info.run_id for r in _runs(demo_run)} == runs_before
    assert "mlflow ui --backend-store-uri" in out


def test_policy_betas_outside_zero_one_are_refused_before_anything_starts(smoke_data):
    from autopose.errors import AutoposeError
    from autopose.platform.config import load_experiment

    data = {"train": str(smoke_data["train"]), "val": str(smoke_data["val"])}
    loaded = load_experiment(None, {"data": data, "search": {"policy_betas": [0.5, 0.9]}})
    assert loaded.search.policy_betas == (0.5, 0.9)
    with pytest.raises(AutoposeError, match=r"search\.policy_betas"):
        load_experiment(None, {"data": data, "search": {"policy_betas": [0.5, 1.0]}})
