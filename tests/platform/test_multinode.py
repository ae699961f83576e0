"""A 2-node Ray cluster (ray.cluster_utils.Cluster) on this machine: trials land on both nodes.

It runs in a subprocess: a Cluster is a Ray of its own, and this session's Ray stays connected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.platform, pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    import ray
    from ray.cluster_utils import Cluster

    with socket.socket() as probe:  # the default 8265 may belong to another Ray on this machine
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
        },
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        from autopose.platform.config import load_experiment
        from autopose.platform.tune import run_search

        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        outcomes = run_search(load_experiment(sys.argv[1]), verbose=0)
        print("RESULT " + json.dumps({"nodes": nodes, "status": [o.status for o in outcomes]}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def test_trials_are_placed_on_both_nodes(smoke_config, tmp_path):
    baselines_only = {
        "experiment": "two-nodes",
        "search": {"trials": 0},
        "baselines": {"random_seeds": [0, 1], "handcrafted": True, "none": True},
        "train": {"epochs": 1, "steps_per_epoch": 2},
    }
    config = smoke_config(baselines_only)
    script = tmp_path / "two_nodes.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(script), str(config)], env=env, capture_output=True, text=True, timeout=400
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert len(result["nodes"]) == 2 and result["status"] == ["TERMINATED"] * 4

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    used = {r.data.tags["autopose.node"] for r in runs}
    assert used == set(result["nodes"])  # one trial per 1-CPU node at a time: both nodes worked
