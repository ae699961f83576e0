"""A full training keeps its best checkpoint by val AP and registers that one (in-process runs:
``best/`` beside the latest checkpoint; under Ray Train: Ray's scored checkpoints, checked by the
promote test in ``test_search.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from autopose.engine.config import AugmentSpec, DataConfig, ModelConfig, TrainConfig
from autopose.platform.runner import (
    BEST_FOLDER,
    BEST_RECORD,
    CHECKPOINT_FILE,
    TrainingJob,
    best_checkpoint,
    keep_if_best,
)


def _job(folder: Path, epochs: int) -> TrainingJob:
    return TrainingJob(
        data=DataConfig(train="unused.parquet", val="unused.parquet"),
        model=ModelConfig(),
        train=TrainConfig(epochs=epochs),
        augment=AugmentSpec(kind="none"),
        space={},
        checkpoint_dir=str(folder),
        keep_best=True,
    )


def _report(run: Path, epoch: int, val_ap: float) -> bool:
    """One epoch's report as an in-process run makes it: the new checkpoint, then the latest."""
    fresh = run / "fresh"
    fresh.mkdir(parents=True, exist_ok=True)
    (fresh / CHECKPOINT_FILE).write_bytes(f"weights of epoch {epoch}".encode())
    kept = keep_if_best(run, {"val_ap": val_ap, "epoch": float(epoch)}, fresh / CHECKPOINT_FILE)
    (fresh / CHECKPOINT_FILE).replace(run / CHECKPOINT_FILE)
    return kept


def test_the_best_epoch_is_kept_beside_the_latest_and_a_tie_keeps_the_earlier(tmp_path):
    run = tmp_path / "run"
    kept = [_report(run, epoch, ap) for epoch, ap in enumerate([0.10, 0.30, 0.20, 0.30])]
    assert kept == [True, True, False, False]
    assert (run / BEST_FOLDER / CHECKPOINT_FILE).read_bytes() == b"weights of epoch 1"
    assert (run / CHECKPOINT_FILE).read_bytes() == b"weights of epoch 3"  # the latest, to resume
    assert json.loads((run / BEST_RECORD).read_text()) == {"val_ap": 0.30, "epoch": 1}
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [BEST_FOLDER, BEST_RECORD, CHECKPOINT_FILE, "fresh"]
    )

    finished = SimpleNamespace(checkpoint=None, best_checkpoints=None)  # an in-process run's result
    with best_checkpoint(finished, _job(run, epochs=4)) as best:
        assert best.local.read_bytes() == b"weights of epoch 1" and best.epoch == 1
        assert best.location == str(run / BEST_FOLDER / CHECKPOINT_FILE)


def test_a_run_without_a_record_of_its_best_registers_its_final_checkpoint(tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"final weights")
    finished = SimpleNamespace(checkpoint=None, best_checkpoints=None)
    with best_checkpoint(finished, _job(tmp_path, epochs=3)) as best:
        assert best.local.read_bytes() == b"final weights" and best.epoch == 2
