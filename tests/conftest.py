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
