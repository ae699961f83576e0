"""cluster.yaml against Ray's own autoscaler schema (offline: nothing is launched)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

util = pytest.importorskip("ray.autoscaler._private.util")
jsonschema = pytest.importorskip("jsonschema")

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def check(config: dict) -> dict:
    prepared = util.prepare_config(copy.deepcopy(config))
    util.validate_config(prepared)
    return prepared


def test_cluster_yaml_validates_with_a_cpu_head_and_gpu_workers(cluster):
    prepared = check(cluster)
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [
        n for name, n in nodes.items() if name != prepared["head_node_type"] and n["resources"].get("GPU")
    ]
    assert gpu_workers and all(n["max_workers"] >= 1 for n in gpu_workers)
    start = " ".join(prepared["head_start_ray_commands"])
    assert "mlflow server" in start and "--dashboard-host=127.0.0.1" in start
    assert any("pip install" in c and "autopose" in c for c in prepared["setup_commands"])
    assert any("/mnt/autopose" in c for c in prepared["initialization_commands"])  # shared storage


@pytest.mark.parametrize(
    "misspell",
    [
        lambda c: c.__setitem__("setup_comands", c.pop("setup_commands")),
        lambda c: c["available_node_types"]["worker_gpu"].__setitem__(
            "min_worker", c["available_node_types"]["worker_gpu"].pop("min_workers")
        ),
        lambda c: c["auth"].__setitem__("ssh_usr", c["auth"].pop("ssh_user")),
        lambda c: c.__setitem__("head_start_commands", c.pop("head_start_ray_commands")),
    ],
)
def test_a_misspelled_key_is_rejected(cluster, misspell):
    bad = copy.deepcopy(cluster)
    misspell(bad)
    with pytest.raises(jsonschema.ValidationError, match="was unexpected"):
        check(bad)
