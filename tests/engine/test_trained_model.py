"""A model trained on the synthetic world: left and right are learnt from the body, not the side.

The world draws figures facing the camera or turned away, with no side colours, so a
mirrored crop with its left/right labels swapped is again a crop of the world. A model
trained there without augmentation must then score the same on mirrored crops as on the
crops themselves, and the flip test (average with the mirrored pass) must not hurt it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from autopose.augment.ops import hflip
from autopose.data import COCO_FLIP_PAIRS, HeatmapCodec, ProxyDataset, build_synth_proxies, generate_synth
from autopose.engine.config import AugmentSpec, DataConfig, ModelConfig, TrainConfig
from autopose.engine.proxy_scoring import evaluate_proxy
from autopose.engine.train import Trainer

INPUT = (64, 48)
WIDTH = 32  # the demo's narrowed P2Net-R18
# 400 steps: AP 0.31–0.36 on the val crops over three seeds (300 steps: 0.21–0.26); about
# 65 s on 2 idle cores, nearly all of it training
STEPS_PER_EPOCH, EPOCHS = 100, 4
TRAIN_IMAGES = STEPS_PER_EPOCH * 8  # one pass of batches of 8 per epoch
VAL_IMAGES = 200
SPACE = {"name": "unused", "num_sub_policies": 1, "ops_per_sub_policy": 1, "ops": {"Rotate": [-45.0, 45.0]}}


@dataclass
class Trained:
    net: torch.nn.Module
    codec: HeatmapCodec
    keypoint_names: tuple[str, ...]
    rows: list[dict[str, Any]]  # the held-out val crops, no shift


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root: Path = tmp_path_factory.mktemp("trained-model")
    generate_synth(
        root,
        images=TRAIN_IMAGES,
        val_images=VAL_IMAGES,
        seed=0,
        max_persons=1,
        clutter=False,
        progress=False,
    )
    paths = {split: root / f"{split}.parquet" for split in ("train", "val")}
    build_synth_proxies(root, paths, input_size=INPUT)
    options = {
        "pyramid_channels": WIDTH,
        "parallel_channels": [WIDTH] * 4,
        "parallel_stages": 1,
        "refine_channels": WIDTH,
        "refine_blocks": [1, 1, 1, 1],
    }
    trainer = Trainer(
        # the loop's own per-epoch val AP is not what is tested: keep it to one crop
        DataConfig(train=str(paths["train"]), val=str(paths["val"]), max_val_samples=1),
        ModelConfig(arch="p2net_r18", input_size=INPUT, options=options),
        TrainConfig(
            epochs=EPOCHS,
            steps_per_epoch=STEPS_PER_EPOCH,
            batch_size=8,
            lr=1e-3,
            ohkm_topk=8,
            seed=0,
            threads_per_worker=2,
        ),
        AugmentSpec(kind="none"),
        SPACE,
    )
    trainer.run()
    val = ProxyDataset(paths["val"])
    return Trained(
        trainer.net.eval(), trainer.codec, trainer.keypoint_names, [val[i] for i in range(len(val))]
    )


def _mirrored(row: dict[str, Any]) -> dict[str, Any]:
    """The crop mirrored (``x → W − 1 − x``) with left/right labels swapped, by the project's op;
    the box mirrored about the crop's centre, ``center`` and ``scale`` kept."""
    image, keypoints, visibility = hflip(
        row["image"][None], row["keypoints"][None], row["visibility"][None], COCO_FLIP_PAIRS
    )
    x, y, w, h = row["bbox"].tolist()
    # box edges [x, x + w] are pixel centres [x − 0.5, x + w − 0.5]; mirror those about center x
    mirrored_x = 2 * float(row["center"][0]) + 1 - x - w
    return {
        **row,
        "image": image[0],
        "keypoints": keypoints[0],
        "visibility": visibility[0],
        "bbox": torch.tensor([mirrored_x, y, w, h], dtype=row["bbox"].dtype),
    }


def _ap(trained: Trained, rows: list[dict[str, Any]], *, flip: bool) -> float:
    scores = evaluate_proxy(
        trained.net,
        rows,
        trained.codec,
        flip_pairs=COCO_FLIP_PAIRS,
        flip=flip,
        keypoint_names=trained.keypoint_names,
    )
    return scores["AP"]


# Measured (plain − mirrored AP, 400 steps, 200 val crops): this world −0.016…+0.007 over three
# seeds of data and weights, +0.010 for this fixture (AP 0.306 vs 0.296); the first world
# (every figure facing the camera, limbs coloured by side) +0.087…+0.149 over three seeds,
# +0.125 for this fixture (0.471 vs 0.347): a model there learnt the colours, which a mirror swaps.
MIRROR_TOLERANCE = 0.05
# Measured (flip test − plain AP): +0.04…+0.05 over three seeds, +0.031 for this fixture
# (0.337 vs 0.306).
FLIP_TOLERANCE = 0.02


def test_mirrored_crops_with_swapped_labels_score_as_the_crops_do(trained):
    plain = _ap(trained, trained.rows, flip=False)
    mirrored = _ap(trained, [_mirrored(row) for row in trained.rows], flip=False)
    assert plain >= 0.2, f"the model did not learn the task (AP {plain:.3f}): the test means nothing"
    assert abs(plain - mirrored) <= MIRROR_TOLERANCE, f"AP {mirrored:.3f} mirrored vs {plain:.3f}"


def test_the_flip_test_does_not_lower_ap(trained):
    plain = _ap(trained, trained.rows, flip=False)
    flipped = _ap(trained, trained.rows, flip=True)
    assert flipped >= plain - FLIP_TOLERANCE, f"AP {flipped:.3f} with the flip test vs {plain:.3f} without"
