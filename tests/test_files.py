"""The one way files are written (whole or not at all, with the permissions open() would give)
and read (one line naming the file, in the same words for text, JSON and YAML)."""

from __future__ import annotations

import os
import stat

import pytest

from autopose.errors import AutoposeError
from autopose.files import atomic_write, read_json, read_text, read_yaml, save_figure


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


@pytest.mark.parametrize(
    ("content", "reader", "words", "field"),
    [
        (None, read_text, "file not found", None),
        (b"ok\xff", read_text, "not UTF-8 text (byte 2)", None),
        (b'{"a": [1, 2', read_json, "not valid JSON (line 1, column 12", None),
        (b"\xff{}", read_json, "not UTF-8 text (byte 0)", None),
        (b"a: 1\nb: [unclosed\n", read_yaml, "not valid YAML (", "line 3"),
    ],
)
def test_every_reader_names_the_file_in_one_line_with_the_same_words(tmp_path, content, reader, words, field):
    path = tmp_path / "input"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AutoposeError) as error:
        reader(path)
    assert words in str(error.value) and "\n" not in str(error.value)
    assert error.value.path == str(path) and error.value.field == field


def test_the_readers_parse_what_they_are_given(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2.5]}')
    (tmp_path / "a.yaml").write_text("x: [1, 2.5]\n")
    assert read_json(tmp_path / "a.json") == read_yaml(tmp_path / "a.yaml") == {"x": [1, 2.5]}
    assert read_text(tmp_path / "a.yaml") == "x: [1, 2.5]\n"
