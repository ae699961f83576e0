"""The GPU check runs end to end at toy sizes on the CPU (a check of the script, not a figure),
and says in one line that it needs a GPU when asked for one where there is none; the platform's
scale benchmark runs end to end at a few trials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
SCALE = GPU_CHECK.with_name("platform_scale.py")


def test_the_gpu_check_prints_every_part_as_json_lines_on_the_cpu_at_toy_sizes():
    done = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--device", "cpu", "--quick", "--skip-platform"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    benches = [line["bench"] for line in lines]
    assert benches == ["setting", "train_step", "train_step", "policy", "policy", "search_step"]
    steps = {line["model"]: line for line in lines if line["bench"] == "train_step"}
    assert set(steps) == {"p2net_r50", "simplebaseline_r50"}
    assert all(line["images_per_s"] > 0 and line["gflop_per_image_fwd_bwd"] > 0 for line in steps.values())
    assert all(line["share_of_p2net_r50_train_step"] > 0 for line in lines if line["bench"] == "policy")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_where_there_is_none_is_one_line_and_exit_2():
    done = subprocess.run(
        [sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.platform
@pytest.mark.slow
def test_the_scale_benchmark_logs_every_epoch_of_every_report_only_trial_once():
    """A few report-only trials through the search's driver on SQLite (the benchmark's own Ray,
    its own temporary folder, removed at its end): every run FINISHED with each epoch once, and
    compare and the report read them back."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, str(SCALE), "--trials", "4", "--epochs", "3", "--stores", "sqlite"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,  # not a TMPDIR below pytest's: Ray's socket paths must stay under 108 bytes
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [json.loads(text) for text in done.stdout.splitlines() if text.startswith("{")]
    assert (line["runs"], line["finished"], line["compare_rows"]) == (4, 4, 4)
    assert line["epochs_complete"] is True and line["results"] == 12
    assert line["results_per_s"] > 0 and line["tune_alone_results_per_s"] > 0
