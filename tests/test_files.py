"""The one way files are written: whole or not at all, with the permissions open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from autopose.files import atomic_write, save_figure


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield 0o644
    os.umask(previous)


def test_a_written_file_has_the_permissions_of_a_plain_open(tmp_path, umask_022):
    with open(tmp_path / "plain.txt", "w") as stream:
        stream.write("x")
    with atomic_write(tmp_path / "atomic.txt") as stream:
        stream.write("x")
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "plain.txt") == umask_022


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "kept.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as stream:
        stream.write("new, half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]


def test_a_figure_is_a_png_with_the_same_permissions_and_is_closed(tmp_path, umask_022):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure()
    out = save_figure(figure, tmp_path / "sub" / "f.png", dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and _mode(out) == umask_022
    assert not plt.fignum_exists(figure.number)
