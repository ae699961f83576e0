"""Fixtures of the platform tests: the smoke experiment pointed at temporary data and stores."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "search_spaces" / "smoke.yaml"


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "space":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture(scope="session")
def write_smoke_config(smoke_data) -> Callable[..., Path]:
    """``write(folder, overrides=None)``: search_spaces/smoke.yaml with its data, MLflow
    database and storage in ``folder``, plus ``overrides``; returns the file.

    Without a ``data.search_val`` override there is no holdout split (so no selection stage),
    and without a ``tpe.trials`` or ``pba.population`` override no tpe or pba method: most tests
    look at one trial at a time."""

    def write(folder: Path, overrides: dict[str, Any] | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(SMOKE.read_text())
        config = _merge(
            config,
            {
                "data": {
                    "train": str(smoke_data["train"]),
                    "val": str(smoke_data["val"]),
                    "search_val": None,
                },
                "tpe": {"trials": 0},
                "pba": {"population": 0},
                "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
                "storage_path": str(folder / "runs"),
            },
        )
        config = _merge(config, overrides or {})
        path = folder / "experiment.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return write


@pytest.fixture
def smoke_config(write_smoke_config, tmp_path) -> Callable[..., Path]:
    """``write(overrides=None)``: the smoke experiment in the test's tmp_path."""

    def write(overrides: dict[str, Any] | None = None) -> Path:
        return write_smoke_config(tmp_path, overrides)

    return write
