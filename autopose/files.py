"""File helpers shared by every layer: atomic writes and strict JSON reads.

A file autopose writes is either the old one or the complete new one, never a
partial one: it is written beside its destination, flushed to disk, then
renamed over it (a rename within one folder is atomic on POSIX). It gets the
permissions a plain ``open`` would give it (0666 less the umask), whatever
kind of file it is. Every write goes through :func:`atomic_write` (a figure
through :func:`save_figure`); a proxy's Parquet file has its own temporary
names, which a later build recognises and removes (``autopose.data.proxy``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from autopose.errors import AutoposeError


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, make_parents: bool = True) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``.

    On any exception (or interrupt) the temporary file is removed and an
    existing ``path`` is left untouched.

    Args:
        path: the destination.
        mode: ``"w"`` (text, UTF-8) or ``"wb"``.
        make_parents: create missing parent folders.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(handle, mode, encoding=encoding) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_figure(figure: Any, path: str | Path, *, dpi: int) -> Path:
    """Write a matplotlib figure as a PNG through :func:`atomic_write`, then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path, "wb") as stream:
            figure.savefig(stream, format="png", dpi=dpi)
    finally:
        plt.close(figure)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or unreadable file, text that is not UTF-8 or not JSON is an
    :class:`AutoposeError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise AutoposeError("file not found", path=path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as error:
        raise AutoposeError(f"cannot read ({error.strerror or error})", path=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AutoposeError(f"not valid json ({error})", path=path) from None


def is_finite_number(value: Any) -> bool:
    """True for an int or float that is finite (booleans are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
