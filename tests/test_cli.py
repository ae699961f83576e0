"""The command line as a newcomer reads it: every option explains itself, --version answers."""

from __future__ import annotations

import argparse

import pytest

from autopose.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, prefix: str = "autopose"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}")


def test_every_option_and_argument_of_every_command_has_help_text():
    missing = [
        f"{command} {action.option_strings or action.dest}"
        for command, parser in _commands(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction) and not action.help
    ]
    assert missing == []


def test_version_is_the_installed_packages(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"autopose {version('autopose')}"


def test_the_printed_mlflow_ui_command_names_an_mlflow_that_exists(tmp_path, monkeypatch):
    """Was: plain `mlflow ui …`, not on PATH after `make demo` (newcomer issue)."""
    import os
    import shlex
    from pathlib import Path

    from autopose.platform.tracking import mlflow_ui_command

    for folder in (Path.cwd(), tmp_path):
        monkeypatch.chdir(folder)
        executable, *rest = shlex.split(mlflow_ui_command("sqlite:////x/mlflow.db"))
        assert os.access(executable, os.X_OK) and rest[:3] == [
            "ui",
            "--backend-store-uri",
            "sqlite:////x/mlflow.db",
        ]
