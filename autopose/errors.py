"""The project's one error type for bad input.

Every problem a user can fix (a corrupt file, a wrong field, a missing folder)
is raised as :class:`AutoposeError`, which names the culprit so that the CLI can
print it as one line and exit with code 2.
"""

from __future__ import annotations

from pathlib import Path


class AutoposeError(Exception):
    """A clear, user-facing error that names the file and field at fault.

    Args:
        message: what is wrong, in a few words.
        path: the file or folder at fault, if any.
        field: the field inside that file (dotted path such as
            ``sub_policies[1][0].op``), if any.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, field: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.path, self.field) if part)
        return f"{where}: {self.message}" if where else self.message

    def __reduce__(self):  # keep path and field when crossing process boundaries (Ray)
        return (_rebuild, (self.message, self.path, self.field))


def _rebuild(message: str, path: str | None, field: str | None) -> AutoposeError:
    return AutoposeError(message, path=path, field=field)


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """An error's first line, at most ``limit`` characters (MLflow's and Ray's messages run
    long), or its type's name when it says nothing."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def error_cause(error: BaseException | str, limit: int = 300) -> str:
    """What went wrong, in one line: the last line of an error's text that is not indented. A
    failure that crossed Ray carries the remote traceback in its text, whose first line is Ray's
    banner of the actor ("ray::ImplicitFunc.train() (pid=…)") or "Training failed due to worker
    errors:", and whose last is the exception and its message."""
    lines = [line for line in str(error).splitlines() if line.strip() and not line[0].isspace()]
    cause = lines[-1] if lines else type(error).__name__
    return cause if len(cause) <= limit else cause[: limit - 1] + "…"
