"""Hostile input: fuzzed configs and policies, path traversal, unpickling, network binding.

Only :class:`AutoposeError`, naming the file (and the field when the file parses),
may escape from loading a user's file; no KeyError, TypeError, ValueError …
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopose.augment.policy import Policy
from autopose.augment.space import load_search_space
from autopose.errors import AutoposeError
from autopose.platform.config import load_experiment

REPO = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values YAML and JSON can hold, the awkward ones included.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "..", "../../etc/passwd", "/", "1e400", "nan", "Rotate", "p2net", "optuna"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _locations(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside a nested mapping (the root excluded)."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found.append((*prefix, key))
        found += _locations(child, (*prefix, key))
    return found


def _mutate(document: dict, location: tuple, value: Any, action: str) -> dict:
    document = copy.deepcopy(document)
    parent = document
    for key in location[:-1]:
        parent = parent[key]
    if action == "replace":
        parent[location[-1]] = value
    elif action == "delete":
        del parent[location[-1]]
    elif isinstance(parent, dict):  # "add": an unknown key beside it
        parent[f"{location[-1]}_x"] = value
    else:
        parent.append(value)
    return document


def mutations(document: dict):
    spots = _locations(document)
    return st.tuples(st.sampled_from(spots), values, st.sampled_from(["replace", "delete", "add"])).map(
        lambda m: _mutate(document, *m)
    )


def _check_only_clear_errors(load, path: Path, *, structured: bool) -> None:
    try:
        load(path)
    except AutoposeError as error:
        assert error.path is not None and Path(error.path).name == path.name, str(error)
        if structured:
            assert error.field, str(error)
        assert "\n" not in str(error)


def _experiment_document(folder: Path) -> dict:
    document = copy.deepcopy(SMOKE)
    for split in ("train", "val", "search_val"):
        (folder / f"{split}.parquet").write_bytes(b"")
        document["data"][split] = str(folder / f"{split}.parquet")
    document["tracking_uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    document["storage_path"] = str(folder / "runs")
    return document


EXPERIMENT_FOLDER = Path(tempfile.mkdtemp(prefix="autopose-fuzz-"))
EXPERIMENT = _experiment_document(EXPERIMENT_FOLDER)


@FUZZ
@given(mutations(EXPERIMENT))
def test_fuzzed_experiment_config_raises_only_clear_errors(document):
    path = EXPERIMENT_FOLDER / "experiment.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    _check_only_clear_errors(load_experiment, path, structured=True)


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=120))
def test_garbled_yaml_raises_only_clear_errors(content):
    for name, load in (("garbled.yaml", load_experiment), ("garbled-space.yaml", load_search_space)):
        path = EXPERIMENT_FOLDER / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        _check_only_clear_errors(load, path, structured=False)


@FUZZ
@given(mutations(SMOKE["space"]))
def test_fuzzed_search_space_raises_only_clear_errors(document):
    path = EXPERIMENT_FOLDER / "space.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    _check_only_clear_errors(load_search_space, path, structured=True)


POLICY = {
    "format": "autopose.policy/1",
    "space": "p2net",
    "sub_policies": [
        [{"op": "Rotate", "p": 0.5, "m": 0.3}, {"op": "Brightness", "p": 0.2, "m": 0.9}],
        [{"op": "Scale", "p": 1.0, "m": 0.0}],
    ],
}


def test_the_unmutated_documents_load():
    Policy.from_dict(POLICY)
    path = EXPERIMENT_FOLDER / "plain.yaml"
    path.write_text(yaml.safe_dump(EXPERIMENT))
    load_experiment(path)


@FUZZ
@given(mutations(POLICY))
def test_fuzzed_policy_json_raises_only_clear_errors(document):
    path = EXPERIMENT_FOLDER / "policy.json"
    path.write_text(json.dumps(document))  # NaN and Infinity too: Python's json reads them back
    _check_only_clear_errors(Policy.from_file, path, structured=True)


@FUZZ
@given(st.binary(max_size=120))
def test_garbled_policy_file_raises_only_clear_errors(raw):
    path = EXPERIMENT_FOLDER / "garbled.json"
    path.write_bytes(raw)
    _check_only_clear_errors(Policy.from_file, path, structured=False)


# -- names that become folders or artifact paths ---------------------------------------------------
ESCAPES = ["../escape", "../../etc", "/tmp/abs", "a/b", ".hidden", "..", "a\\..\\b", "", "  "]


@pytest.mark.parametrize("name", ESCAPES)
def test_experiment_names_cannot_leave_the_storage_folder(name, tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({**EXPERIMENT, "experiment": name}))
    with pytest.raises(AutoposeError) as caught:
        load_experiment(path)
    assert caught.value.field == "experiment" and caught.value.path == str(path)


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b"])
def test_search_and_training_names_are_checked_before_anything_starts(name, tmp_path):
    from autopose.platform.train import run_training
    from autopose.platform.tune import run_search

    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(EXPERIMENT))
    config = load_experiment(path)
    with pytest.raises(AutoposeError, match="plain name") as caught:
        run_search(config, name=name, verbose=0)
    assert caught.value.field == "--experiment"
    with pytest.raises(AutoposeError, match="plain name"):
        run_training(config, "none", name=name)
    assert not (tmp_path / "mlflow.db").exists()  # refused before the tracking store was touched
    assert not any(p.name in ("escape", "abs") for p in tmp_path.parent.rglob("*") if p.is_dir())


@pytest.mark.parametrize("artifact", ["../escape.txt", "../../escape.txt", "/tmp/escape.txt", "a/../../b"])
def test_artifact_paths_stay_inside_the_run(artifact, tmp_path):
    from autopose.platform.tracking import TrackedRun, client, download_artifact, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "names")
    run_id = client(uri).create_run(experiment_id).info.run_id
    run = TrackedRun(uri, run_id)
    run.log_text("kept", "notes/ok.txt")
    with pytest.raises(AutoposeError, match="inside the run"):
        run.log_text("escaped", artifact)
    with pytest.raises(AutoposeError, match="inside the run"):
        run.log_artifact(__file__, artifact)
    with pytest.raises(AutoposeError, match="inside the run"):
        download_artifact(uri, run_id, artifact, tmp_path / "download")
    written = [p for p in tmp_path.rglob("*.txt")]
    assert [p.name for p in written] == ["ok.txt"]
    assert download_artifact(uri, run_id, "notes/ok.txt", tmp_path / "download").read_text() == "kept"


# -- nothing the user gives is unpickled ------------------------------------------------------------
class _Payload:
    """Unpickling it creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_no_unsafe_loader_in_the_code():
    """torch.load only with weights_only=True; no pickle.load, no yaml.load without SafeLoader."""
    import re

    offenders = []
    for source in (REPO / "autopose").rglob("*.py"):
        for number, line in enumerate(source.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"torch\.load\(", code) and "weights_only=True" not in code:
                offenders.append(f"{source}:{number}")
            if re.search(
                r"\bpickle\.loads?\(|\byaml\.(load|unsafe_load|full_load)\(|(?<![.\w])(eval|exec)\(", code
            ):
                offenders.append(f"{source}:{number}")
    assert offenders == []


def test_searcher_state_in_the_resume_folder_is_never_unpickled(tmp_path):
    import pickle

    from autopose.platform.tune import PlannedTrials

    marker = tmp_path / "unpickled"
    state = tmp_path / "searcher-state.pkl"
    state.write_bytes(pickle.dumps(_Payload(marker)))
    searcher = PlannedTrials([], inner=None, count=0, seed_base=0)
    with pytest.raises(AutoposeError, match="never unpickled"):
        searcher.restore(str(state))
    assert not marker.exists()


def test_malicious_checkpoint_in_the_resume_folder_is_refused(tmp_path, smoke_data):
    """A run resuming from its checkpoint folder (Ray's or the local one) never unpickles code."""
    import pickle

    from autopose.platform.runner import CHECKPOINT_FILE, TrainingJob, train_loop_per_worker

    path = tmp_path / "experiment.yaml"
    splits = {"train": smoke_data["train"], "val": smoke_data["val"], "search_val": smoke_data["holdout"]}
    document = {**EXPERIMENT, "data": {**EXPERIMENT["data"], **{k: str(v) for k, v in splits.items()}}}
    path.write_text(yaml.safe_dump(document))
    config = load_experiment(path)
    marker = tmp_path / "unpickled"
    folder = tmp_path / "resume"
    folder.mkdir()
    (folder / CHECKPOINT_FILE).write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    from autopose.engine.config import AugmentSpec

    job = TrainingJob(
        data=config.data,
        model=config.model,
        train=config.train,
        augment=AugmentSpec(kind="none", seed=0),
        space=config.space_dict,
        examples=0,
        checkpoint_dir=str(folder),
    )
    with pytest.raises(AutoposeError, match="never unpickled"):
        train_loop_per_worker({"job": job})
    assert not marker.exists()


# -- what the project starts listens on 127.0.0.1 ---------------------------------------------------
def test_servers_the_project_starts_bind_to_localhost():
    import inspect

    from autopose.platform import cluster, demo

    # Ray started by the platform (CLI, demo): dashboard on 127.0.0.1.
    for module in (cluster, demo):
        source = inspect.getsource(module)
        hosts = re.findall(r"dashboard_host=([^,)\n]+)", source)
        assert hosts and set(hosts) == {'"127.0.0.1"'}, (module.__name__, hosts)
    # The MLflow UI the CLI and the demo suggest, and the cluster's Ray dashboard.
    for text in (
        (REPO / "autopose" / "cli.py").read_text(),
        inspect.getsource(demo),
    ):
        for command in re.findall(r"mlflow (?:ui|server)[^\"\n]*", text):
            assert "--host 127.0.0.1" in command, command
    head = yaml.safe_load((REPO / "cluster.yaml").read_text())["head_start_ray_commands"]
    ray_start = next(c for c in head if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in ray_start
    # The cluster's MLflow server listens on the head's private address (its GPU workers log to it),
    # never on every interface.
    assert "0.0.0.0" not in (REPO / "cluster.yaml").read_text()


def test_ray_token_authentication_is_left_on_outside_tests():
    """Only the tests switch Ray's token authentication off; the code and the cluster never do."""
    offenders = [
        str(p)
        for folder in ("autopose", "jobs")
        for p in (REPO / folder).rglob("*.py")
        if "RAY_AUTH_MODE" in p.read_text()
    ]
    offenders += ["cluster.yaml"] if "RAY_AUTH_MODE" in (REPO / "cluster.yaml").read_text() else []
    assert offenders == []
