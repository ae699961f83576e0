"""File helpers shared by every layer: atomic writes and strict reads of text, JSON and YAML.

A file autopose writes is either the old one or the complete new one, never a
partial one: it is written beside its destination, flushed to disk, then
renamed over it (a rename within one folder is atomic on POSIX). It gets the
permissions a plain ``open`` would give it (0666 less the umask), whatever
kind of file it is. Every write goes through :func:`atomic_write` (a figure
through :func:`save_figure`); a proxy's Parquet file has its own temporary
names, which a later build recognises and removes (``autopose.data.proxy``).

Every file a user hands autopose is read through :func:`read_text`, :func:`read_json` or
:func:`read_yaml`, which word a problem the same way, in one line naming the file: ``file not
found``, ``cannot read (…)``, ``not UTF-8 text (byte N)``, ``not valid JSON (line L, column C:
…)``, ``not valid YAML (…)`` (its field: the line).
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


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content; a missing or unreadable file, or bytes that are not UTF-8,
    is an :class:`AutoposeError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise AutoposeError("file not found", path=path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise AutoposeError(f"cannot read ({error.strerror or error})", path=path) from None
    except UnicodeDecodeError as error:
        raise AutoposeError(f"not UTF-8 text (byte {error.start})", path=path) from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file (:func:`read_text`'s errors, and text that is not JSON, name it)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}: {error.msg}"
        raise AutoposeError(f"not valid JSON ({where})", path=path) from None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file (:func:`read_text`'s errors, and text that is not YAML, name it; the
    error's field is the line)."""
    import yaml

    text = read_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        problem = " ".join(str(getattr(error, "problem", None) or error).split())  # one line
        raise AutoposeError(f"not valid YAML ({problem})", path=path, field=where) from None


def is_finite_number(value: Any) -> bool:
    """True for an int or float that is finite (booleans are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
