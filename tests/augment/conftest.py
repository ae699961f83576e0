"""The augmentation tests use tiny tensors: every one runs on one thread (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield
