"""Hostile input: fuzzed configs and policies, path traversal, unpickling, network binding.

Only :class:`AutoposeError`, naming the file (and the field when the file parses),
may escape from loading a user's file; no KeyError, TypeError, ValueError …
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

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
    for split in ("train", "val"):
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
