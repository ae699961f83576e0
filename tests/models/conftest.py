"""Model tests run single-threaded (tests/conftest.py's one_thread says why)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield
