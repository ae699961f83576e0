"""Shared fixtures: the bundled real samples and a scratch folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
COCO_SAMPLES = DATA / "coco_samples"
MPII_SAMPLES = DATA / "mpii_samples"

# Tests run Ray locally without its token authentication; outside tests it stays on.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny tensors and models run fastest so, and stay fast on a
    shared 2-core machine, where a second thread mostly waits for a busy core and the many small
    ops of a tiny P2Net then run tens of times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def coco_ann() -> Path:
    return COCO_SAMPLES / "test_coco.json"


@pytest.fixture(scope="session")
def coco_images() -> Path:
    return COCO_SAMPLES


@pytest.fixture(scope="session")
def coco_dets() -> Path:
    return COCO_SAMPLES / "test_coco_det_AP_H_56.json"


@pytest.fixture(scope="session")
def mpii_ann() -> Path:
    return MPII_SAMPLES / "test_mpii.json"


@pytest.fixture(scope="session")
def mpii_images() -> Path:
    return MPII_SAMPLES


# -- the platform's shared fixtures: a tiny synthetic dataset and one Ray instance -------------
SMOKE_INPUT = (64, 48)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic train/val split (val rotated and darker) and a holdout split drawn like
    val, as 64×48 Parquet proxies; train stores each crop on a canvas (margin 1.5), as the demo's
    does, so that every training in the tests runs its policy there and cuts the crop after."""
    from autopose.data import build_synth_proxies, generate_synth

    root = tmp_path_factory.mktemp("smoke-data")
    generate_synth(
        root,
        images=16,
        val_images=6,
        holdout_images=6,
        seed=0,
        shift="rotate=45,brightness=0.5",
        progress=False,
    )
    paths = {split: root / f"{split}.parquet" for split in ("train", "val", "holdout")}
    build_synth_proxies(root, paths, input_size=SMOKE_INPUT, train_margin=1.5)
    return paths


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (starting Ray costs 10–25 s here).

    Two CPUs, the dashboard on 127.0.0.1 (Ray Train V2 leaks placement groups
    without it). Tests that need a Ray of their own (``ray start``, a multi-node
    ``Cluster``) run it in a subprocess with its own ports and folder.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()
