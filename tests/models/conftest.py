"""Model tests run single-threaded: on the shared 2-core machine a second thread mostly waits
for a busy core, and the many small ops of a tiny P2Net then run tens of times slower."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
