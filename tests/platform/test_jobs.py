"""`ray start --head` on 127.0.0.1, then `ray job submit` of jobs/search.py with the smoke config.

The Ray here is a second instance, beside the session's: its own ports and folder, started
with ``--block`` so that stopping it means signalling that one process (never ``ray stop``,
which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.platform, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 with its dashboard (the job server); yields (address, env)."""
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, client = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in the job = this venv's
        "RAY_AUTH_MODE": "disabled",
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                    break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start --head did not come up (exit {head.poll()})") from None
                time.sleep(1)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # only the head we started: it takes its processes along
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_smoke_search(ray_head, smoke_config):
    address, env = ray_head
    config = smoke_config({"experiment": "job"})
    submit = subprocess.run(
        [
            str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
            "--", "python", "jobs/search.py", "--config", str(config),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )  # fmt: skip
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0, output[-3000:]
    assert "succeeded" in output, output[-3000:]
    assert "promote the best on val: autopose promote" in output  # the CLI's own summary (no holdout split)

    client = MlflowClient(f"sqlite:///{config.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("job")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
