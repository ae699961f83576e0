"""The experiment config: strict checks before anything starts, and the CLI's one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autopose.augment.ops import PAPER_OP_NAMES
from autopose.engine.config import TrainConfig
from autopose.errors import AutoposeError
from autopose.models.losses import PoseLoss
from autopose.platform.config import (
    experiment_from_dict,
    load_experiment,
    resolve_tracking_uri,
    storage_join,
)
from autopose.platform.tracking import check_tracking, ensure_experiment

REPO = Path(__file__).resolve().parents[2]


def edit(path: Path, change) -> Path:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_smoke_config_loads_with_every_trial_kind(smoke_config):
    config = load_experiment(smoke_config())
    plan = [(spec.kind, spec.seed) for spec in config.trial_plan()]
    assert plan == [
        ("search", 0),
        ("search", 1),
        ("random", 0),
        ("random", 1),
        ("handcrafted", 0),
        ("none", 0),
    ]
    assert config.tracking_uri.startswith("sqlite:////")
    assert Path(config.storage_path).is_absolute()
    assert config.space_dict["name"] == "smoke"
    assert config.model.input_size == (64, 48)
    assert config.full_train_config().num_workers == 2


def test_round_trip_through_the_logged_mapping(smoke_config):
    config = load_experiment(smoke_config())
    again = experiment_from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (lambda c: c["train"].update(epoch=3), "train.epoch", "did you mean 'epochs'"),
        (lambda c: c.update(tune_settings={}), "tune_settings", "unknown key"),
        (lambda c: c["train"].update(batch_size="eight"), "train.batch_size", "expected int"),
        (lambda c: c["train"].update(epochs=0), "train.epochs", "must be > 0"),
        (lambda c: c["search"].update(hessian="second"), "search.hessian", "finite_difference"),
        (lambda c: c["space"]["ops"].update(Rotat=[0, 1]), "space.ops.Rotat", "unknown op"),
        (lambda c: c["model"].update(arch="p2net_r17"), "model.arch", "unknown architecture"),
        (lambda c: c["model"].update(input_size=[66, 48]), "model.input_size", "multiples of 4"),
        (lambda c: c["data"].update(val="/nonexistent/val.parquet"), "data.val", "file not found"),
        (lambda c: c["search"].update(tau1=[0.5, 2.0]), "search.tau1", "optuna"),
        (lambda c: c["search"].update(policy_every=0), "search.policy_every", "≥ 1"),
        (lambda c: c["search"].update(policy_every=1.5), "search.policy_every", "expected int"),
        (lambda c: c["search"].update(batchnorm_path=-0.5), "search.batchnorm_path", "≥ 0"),
        (lambda c: c["search"].update(policy_optimizer="sgd"), "search.policy_optimizer", "'normalized'"),
        (lambda c: c["search"].update(sampling="soft"), "search.sampling", "'hard'"),
        (lambda c: c["search"].update(choice_gradient="reinforce"), "search.choice_gradient", "'score'"),
        (lambda c: c["search"].update(pose_path=-1.0), "search.pose_path", "≥ 0"),
        (lambda c: c["search"].update(pose_every_step=True), "search.pose_every_step", "pose_path > 0"),
        (lambda c: c["search"].update(batchnorm_scope="colour"), "search.batchnorm_scope", "'photometric'"),
        (lambda c: c["search"].update(pose_every_step="yes"), "search.pose_every_step", "expected bool"),
        (lambda c: c["search"].update(appearance_moments=True), "search.appearance_moments", "pose_path > 0"),
        (lambda c: c["search"].update(choice_gradient="score"), "search.choice_gradient", "sampling: hard"),
        (lambda c: c["search"].update(init_magnitude=10), "search.init_magnitude", "(0, 10)"),
        (lambda c: c["search"].update(init_magnitude="mid"), "search.init_magnitude", "expected float"),
        (lambda c: c["tune"].update(scheduler="hyperband"), "tune.scheduler", "'asha'"),
        (lambda c: c["data"].update(train_margin=0.5), "data.train_margin", "[1, 3]"),
        (lambda c: c["model"].update(heatmap_sigma=-1.0), "model.heatmap_sigma", "must be > 0"),
        (lambda c: c.update(full_train={"train_margin": 9}), "full_train.train_margin", "canvas side"),
    ],
)
def test_bad_config_fails_naming_file_and_field(smoke_config, change, field, words):
    path = edit(smoke_config(), change)
    with pytest.raises(AutoposeError) as error:
        load_experiment(path)
    assert error.value.path == str(path)
    assert error.value.field == field
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_the_search_options_come_from_the_search_section_and_default_to_todays_search(smoke_config):
    defaults = load_experiment(smoke_config()).search
    assert (defaults.batchnorm_path, defaults.policy_every, defaults.policy_optimizer) == (0.0, 1, "adam")
    assert (defaults.sampling, defaults.init_magnitude) == ("relaxed", None)
    options = {"batchnorm_path": 0.5, "policy_every": 4, "policy_optimizer": "normalized"}
    options.update(sampling="hard", init_magnitude=5)
    config = load_experiment(smoke_config({"search": options}))
    (spec, *_) = (s for s in config.trial_plan() if s.kind == "search")
    bilevel = spec.bilevel
    assert (bilevel.batchnorm_path, bilevel.policy_every, bilevel.policy_optimizer) == (0.5, 4, "normalized")
    assert (bilevel.sampling, bilevel.init_magnitude) == ("hard", 5.0)


def test_unknown_op_in_a_space_file_names_that_file(smoke_config, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump({"name": "s", "num_sub_policies": 1, "ops_per_sub_policy": 1, "ops": {"Twirl": None}})
    )
    path = edit(smoke_config(), lambda c: c.update(space=str(space)))
    with pytest.raises(AutoposeError, match="unknown op 'Twirl'") as error:
        load_experiment(path)
    assert error.value.path == str(space) and error.value.field == "ops.Twirl"


def test_the_papers_space_file_is_found_beside_the_config(smoke_config):
    path = edit(smoke_config(), lambda c: c.update(space="p2net.yaml"))
    # not in the working directory, not beside the temporary config: a clear error
    with pytest.raises(AutoposeError, match="search space file not found"):
        load_experiment(path)
    config = load_experiment(path, {"space": str(REPO / "search_spaces" / "p2net.yaml")})
    assert config.space_dict["num_sub_policies"] == 3 and len(config.space_dict["ops"]) == 10


def test_without_a_space_line_the_papers_built_in_space_is_used_from_any_folder(
    smoke_config, monkeypatch, tmp_path
):
    """Was: search_spaces/p2net.yaml looked up in the working folder (newcomer issue)."""
    path = edit(smoke_config(), lambda c: c.pop("space"))
    monkeypatch.chdir(tmp_path)  # no search_spaces/ here
    config = load_experiment(path)
    assert (
        config.space_dict
        == load_experiment(path, {"space": str(REPO / "search_spaces" / "p2net.yaml")}).space_dict
    )
    assert load_experiment(path, {"space": "p2net"}).space_dict == config.space_dict


def test_tracking_uri_defaults_and_storage_uris(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:///sub/m.db") == f"sqlite:///{tmp_path / 'sub' / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    with pytest.raises(AutoposeError, match="no scheme"):
        resolve_tracking_uri("mlruns")
    assert storage_join("s3://bucket/runs/", "tune", "x") == "s3://bucket/runs/tune/x"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_tracking_server_is_one_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(AutoposeError, match="unreachable") as error:
        check_tracking(uri)
    assert error.value.field == "tracking_uri"
    with pytest.raises(AutoposeError, match="does not exist"):
        check_tracking(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run(
        [sys.executable, "-m", "autopose.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_refuses_a_bad_config_before_ray_starts(smoke_config, tmp_path):
    path = edit(smoke_config(), lambda c: c["space"]["ops"].update(Twist=[0, 1]))
    result = _cli("search", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "space.ops.Twist" in lines[0]
    assert "Ray" not in result.stderr + result.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (
            lambda c, tmp: c["data"].update(train=str(tmp / "train.json")),
            "data.train",
            "not a readable Parquet",
        ),
        (lambda c, tmp: c["data"].update(val=str(tmp / "missing.parquet")), "data.val", "not found"),
        (lambda c, tmp: c["model"].update(input_size=[128, 96]), "model.input_size", "--input 128x96"),
        (lambda c, tmp: c["model"].update(num_joints=5), "model.num_joints", "keypoints"),
    ],
)
def test_cli_refuses_data_that_is_no_fitting_proxy_before_ray_starts(
    smoke_config, tmp_path, change, field, words
):
    """Was: Ray started, every trial failed with hundreds of lines of tracebacks (newcomer issue)."""
    (tmp_path / "train.json").write_text("{}")
    path = edit(smoke_config(), lambda c: change(c, tmp_path))
    result = _cli("search", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and words in lines[0], lines
    assert "Started a local Ray instance" not in result.stderr and not (tmp_path / "runs").exists()
    assert not (tmp_path / "mlflow.db").exists()  # nothing written


def test_cli_refuses_an_unreachable_tracking_server_before_ray_starts(smoke_config, tmp_path):
    path = smoke_config({"tracking_uri": f"http://127.0.0.1:{_closed_port()}"})
    result = _cli("search", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "unreachable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Started a local Ray instance" not in result.stderr


def test_cli_promote_of_an_unknown_run_is_one_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    ensure_experiment(uri, "exists")  # a store with nothing of that id in it
    result = _cli("promote", "0123456789abcdef", "--tracking-uri", uri, cwd=tmp_path)
    assert result.returncode == 2
    assert "no MLflow run '0123456789abcdef'" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["promote", "0123456789abcdef"],
        ["compare"],
        ["compare", "--plot", "ap.svg"],  # was: PNG bytes in a file named .svg
    ],
)
def test_a_read_only_command_where_nothing_was_tracked_creates_no_store(tmp_path, command):
    """Was: a 950 KB mlflow.db, MLflow's table-creation lines and 15–47 s (newcomer issue)."""
    env_free = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [sys.executable, "-m", "autopose.cli", *command],
        cwd=tmp_path,
        env={**env_free, "RAY_ADDRESS": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    if "--plot" in command:  # refused before the store is looked for
        assert len(lines) == 1 and "--plot" in lines[0] and "*.png" in lines[0], lines
    else:
        assert len(lines) == 1 and "no MLflow store at" in lines[0] and "--tracking-uri" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_policy_argument_of_train(smoke_config, tmp_path):
    from autopose.platform.train import _check_policy, policy_spec

    assert policy_spec("handcrafted", 3).kind == "handcrafted" and policy_spec("handcrafted", 3).seed == 3
    with pytest.raises(AutoposeError, match="nor one of") as error:
        policy_spec(str(tmp_path / "missing.json"), 0)
    assert error.value.field == "--policy"
    bad = tmp_path / "bad.json"
    step = {"op": "Twirl", "p": 1, "m": 1}
    bad.write_text(json.dumps({"format": "autopose.policy/1", "space": "smoke", "sub_policies": [[step]]}))
    config = load_experiment(smoke_config())
    with pytest.raises(AutoposeError, match="Twirl") as error:
        _check_policy(policy_spec(str(bad), 0), config, bad)  # before Ray starts
    assert (
        error.value.path == str(bad) and error.value.field == "sub_policies[0][0].op"
    )  # the file, not --policy
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")  # not UTF-8: one line naming the file, no traceback
    with pytest.raises(AutoposeError, match="not UTF-8 text") as error:
        policy_spec(str(binary), 0)
    assert error.value.path == str(binary) and "\n" not in str(error.value)
    result = _cli("train", "--policy", str(binary), "--config", str(smoke_config()), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert str(binary) in result.stderr.strip().splitlines()[-1]


def test_the_coco_cluster_config_is_valid(smoke_data, coco_ann, coco_images):
    """search_spaces/p2net_coco.yaml, with its cluster paths swapped for local files."""
    local = {
        "data": {
            "train": str(smoke_data["train"]),
            "val": str(smoke_data["val"]),
            "search_val": str(smoke_data["val"]),
        },
        "model": {"pretrained": None},
        "full_train": {"train_ann": str(coco_ann), "train_images": str(coco_images)},
    }
    shipped = yaml.safe_load((REPO / "search_spaces" / "p2net_coco.yaml").read_text())
    # the cluster loop never ranks trials on the split its search stepped on
    assert shipped["data"]["search_val"] not in (shipped["data"]["train"], shipped["data"]["val"])
    config = load_experiment(REPO / "search_spaces" / "p2net_coco.yaml", local)
    assert config.tune.search_alg == "optuna" and config.search.is_range("tau1")
    # the paper's space and FlipLR, found beside the config
    assert list(config.space_dict["ops"]) == [*PAPER_OP_NAMES, "FlipLR"]
    assert config.full_train_config().lr_milestones == [90, 120]
    assert config.full_train_data().train is None and config.full_train_data().train_ann == str(coco_ann)
    # the paper's optimiser and mining: Adam at 5e-4, weight decay 1e-5, OHKM of the top 10
    for train in (config.train, config.full_train_config()):
        assert (train.lr, train.weight_decay, train.ohkm_topk) == (5.0e-4, 1.0e-5, 10)
    # the full training's crops are cut on a canvas, for turns and zooms to bring in the image
    assert config.full_train_data().train_margin == 1.5 and config.data.train_margin == 1.0


def test_online_hard_keypoint_mining_keeps_the_papers_ten_by_default():
    assert TrainConfig().ohkm_topk == 10 and PoseLoss().ohkm_topk == 10


def test_the_demos_experiments_are_files_that_differ_only_in_size(smoke_data):
    """search_spaces/demo.yaml and demo_tiny.yaml (links to the files the package ships) load like
    any experiment; the tiny one tests what the full one runs: the same model family, space and
    search step, smaller."""
    from autopose.platform.demo import BUDGETS, DEMO_DATA

    splits = {"train": "train", "val": "val", "search_val": "holdout"}
    data = {"data": {key: str(smoke_data[split]) for key, split in splits.items()}}
    for name in ("demo.yaml", "demo_tiny.yaml", "demo_space.yaml"):
        assert (REPO / "search_spaces" / name).resolve() == (DEMO_DATA / name).resolve()
    full = load_experiment(REPO / "search_spaces" / "demo.yaml", data)
    tiny = load_experiment(BUDGETS["tiny"].experiment, data)
    assert BUDGETS["full"].experiment.resolve() == (REPO / "search_spaces" / "demo.yaml").resolve()
    assert full.space_dict == tiny.space_dict and list(full.space_dict["ops"])[:2] == ["TranslateX", "Rotate"]
    assert dataclasses.replace(full.search, trials=1) == dataclasses.replace(tiny.search, trials=1)
    assert full.model.arch == tiny.model.arch and full.model.input_size == tiny.model.input_size
    assert BUDGETS["full"].input_size == tuple(full.model.input_size) == (64, 48)
    assert (full.experiment, tiny.experiment) == ("autopose-demo-full", "autopose-demo-tiny")
