"""A failed trial's outcome says what went wrong and where Tune kept the traceback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autopose.errors import error_cause
from autopose.platform.tune import _error_file

# What str(result.error) held for a trial that raised (Ray 2.60, copied from a real run).
RAY_ERROR = (
    "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=27072, ip=192.0.2.2, actor_id=6547e63, repr=run_trial)\n"
    "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/x/ray/tune/trainable/trainable.py", line 329, in train\n'
    "    raise skipped from exception_cause(skipped)\n"
    '  File "/x/autopose/platform/runner.py", line 334, in fit\n'
    "    return trainer.fit()\n"
    "autopose.errors.AutoposeError: data.train: the train proxy holds 64x48 crops, the model takes 128x96\n"
)


def test_the_cause_is_the_tracebacks_last_line_not_rays_banner():
    assert error_cause(RAY_ERROR) == (
        "autopose.errors.AutoposeError: data.train: the train proxy holds 64x48 crops, the model takes 128x96"
    )
    assert error_cause(ValueError("one line")) == "one line"
    assert error_cause("") == "str"  # nothing to say: the type at least
    assert len(error_cause("x" * 1000)) == 300


@dataclass
class Result:
    path: str


def test_the_error_file_is_tunes_error_txt_when_it_is_there(tmp_path):
    assert _error_file(Result(str(tmp_path))) is None
    (tmp_path / "error.txt").write_text(RAY_ERROR)
    assert _error_file(Result(str(tmp_path))) == str(Path(tmp_path) / "error.txt")
