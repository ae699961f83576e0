"""Connecting to Ray: a local instance on a laptop, the cluster inside a Ray job or with --address."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

from autopose.errors import AutoposeError, first_line

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[None]:
    """Make sure Ray is up for the duration of the block.

    Uses the running Ray when this process is already connected (tests, notebooks,
    a Ray job's entrypoint after its own ``ray.init``); otherwise connects to
    ``address`` (or ``$RAY_ADDRESS``, which ``ray job submit`` sets), else starts a
    local instance with its dashboard bound to 127.0.0.1. What it started, it stops.
    The dashboard stays on: Ray Train V2 leaks placement groups without it.
    """
    if ray.is_initialized():
        yield
        return
    kwargs: dict = {"log_to_driver": True}
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        kwargs["address"] = target
    else:
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", num_cpus=num_cpus)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as error:
        first = first_line(error)
        raise AutoposeError(
            f"cannot connect to Ray at {target or 'a new local instance'} ({first})"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()
