"""The augmentation tests use tiny tensors: one thread is fastest, and it stays fast when the
machine is shared (two threads on a busy two-core machine spin and run many times slower)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
