"""Scoring a model on the Parquet proxy: crops that are already cut, each its own COCO image.

:func:`proxy_ground_truth` / :func:`evaluate_proxy` score the proxy with pycocotools, keypoints
in crop pixels; the prediction is :mod:`autopose.engine.inference`'s, the person score
:mod:`autopose.engine.nms`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import nn

from autopose.data.coco import coco_api
from autopose.data.codec import HeatmapCodec
from autopose.data.transforms import crop_matrix, transform_points
from autopose.engine.evaluation import (
    coco_keypoint_ap,
)
from autopose.engine.inference import PERSON_CATEGORY_ID, coco_result, predict_crops
from autopose.engine.nms import person_score


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def iter_rows(source: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """Proxy rows one by one, from rows (``ProxyDataset`` items) or collated batches.

    A batch is recognised by a 4-d ``image`` (``B×3×H×W``); it is split into rows.
    """
    for item in source:
        image = item["image"]
        if getattr(image, "ndim", 3) == 4:
            for i in range(image.shape[0]):
                yield {key: value[i] for key, value in item.items()}
        else:
            yield dict(item)


def _row_keypoints(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    keypoints = _as_numpy(row["keypoints"]).astype(np.float64)
    if "visibility" in row:
        return keypoints[:, :2], _as_numpy(row["visibility"]).astype(np.float64)
    return keypoints[:, :2], keypoints[:, 2]  # the Parquet layout: K×3 (x, y, v)


def _crop_annotation(row: Mapping[str, Any], input_size: tuple[int, int], ann_id: int) -> dict:
    """A COCO annotation in crop pixels for one proxy row (its crop is image ``ann_id``)."""
    keypoints, visibility = _row_keypoints(row)
    center = _as_numpy(row["center"]).astype(np.float64)
    scale = _as_numpy(row["scale"]).astype(np.float64)
    x, y, w, h = _as_numpy(row["bbox"]).astype(np.float64)
    height, width = input_size
    sx, sy = width / scale[0], height / scale[1]
    # The box's top-left edge is the pixel-center point (x − 0.5, y − 0.5); map it, then back to edges.
    corner = transform_points(np.array([[x - 0.5, y - 0.5]]), crop_matrix(center, scale, input_size))[0] + 0.5
    labelled = visibility > 0
    triples = np.zeros((keypoints.shape[0], 3))
    triples[labelled, :2] = keypoints[labelled]
    triples[labelled, 2] = visibility[labelled]
    return {
        "id": ann_id,
        "image_id": ann_id,
        "category_id": PERSON_CATEGORY_ID,
        "keypoints": [float(v) for v in triples.ravel()],
        "num_keypoints": int(labelled.sum()),
        "area": float(row["area"]) * sx * sy,
        "bbox": [float(corner[0]), float(corner[1]), float(w * sx), float(h * sy)],
        "iscrowd": 0,
        "source_image_id": int(row["image_id"]),
        "source_instance_id": int(row["instance_id"]),
    }


def proxy_ground_truth(
    rows: Iterable[Mapping[str, Any]],
    *,
    input_size: tuple[int, int],
    keypoint_names: Sequence[str] | None = None,
) -> COCO:
    """An in-memory COCO ground truth for proxy crops, in crop pixels.

    Each row (crop) becomes its own COCO image, id = 1 + its position, because the
    coordinates of two crops of the same photo are not comparable. The box and
    area are mapped into the crop with its scale: ``area · (W/scale_w) · (H/scale_h)``,
    so OKS matches what it would be in the photo. (Area ranges of APM/APL then refer
    to crop pixels: on the proxy read AP and AR, not APM/APL.)

    Args:
        rows: ``ProxyDataset`` items or collated batches: ``keypoints`` ``K×2`` (crop
            px) with ``visibility`` ``K`` (or ``K×3``), ``center``, ``scale``, ``bbox``
            and ``area`` in image pixels, ``image_id``, ``instance_id``.
        input_size: crop ``(height, width)``.
        keypoint_names: the K names (default ``keypoint_0`` …).
    """
    height, width = (int(v) for v in input_size)
    annotations = [_crop_annotation(row, (height, width), i + 1) for i, row in enumerate(iter_rows(rows))]
    return _proxy_coco(annotations, (height, width), keypoint_names)


def _proxy_coco(
    annotations: list[dict], input_size: tuple[int, int], keypoint_names: Sequence[str] | None
) -> COCO:
    height, width = input_size
    num_joints = len(annotations[0]["keypoints"]) // 3 if annotations else len(keypoint_names or ())
    if keypoint_names is None:
        keypoint_names = [f"keypoint_{k}" for k in range(num_joints)]
    if annotations and len(keypoint_names) != num_joints:
        raise ValueError(f"{len(keypoint_names)} keypoint names for {num_joints} keypoints")
    images = [
        {"id": a["id"], "width": width, "height": height, "file_name": f"crop_{a['id']}"} for a in annotations
    ]
    category = {"id": PERSON_CATEGORY_ID, "name": "person", "keypoints": list(keypoint_names), "skeleton": []}
    return coco_api({"images": images, "annotations": annotations, "categories": [category]})


def proxy_results(
    keypoints: np.ndarray, scores: np.ndarray, image_ids: Sequence[int] | None = None
) -> list[dict]:
    """COCO results for crops: ``keypoints B×K×2`` and ``scores B×K`` in crop pixels.

    ``image_ids`` default to 1…B (the ids :func:`proxy_ground_truth` gives). The
    person score is :func:`person_score` with box score 1.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    ids = range(1, keypoints.shape[0] + 1) if image_ids is None else image_ids
    return [
        coco_result(int(image_id), keypoints[i], scores[i], person_score(1.0, scores[i]), PERSON_CATEGORY_ID)
        for i, image_id in enumerate(ids)
    ]


def evaluate_proxy(
    model: nn.Module,
    rows: Iterable[Mapping[str, Any]],
    codec: HeatmapCodec,
    *,
    flip_pairs: Iterable[Sequence[int]],
    flip: bool = True,
    batch_size: int = 64,
    keypoint_names: Sequence[str] | None = None,
    sigmas: np.ndarray | None = None,
) -> dict[str, float]:
    """OKS AP (pycocotools) of a model on proxy crops: what a training loop reports per epoch.

    Args:
        model: the heatmap model (its train/eval mode is restored afterwards).
        rows: ``ProxyDataset`` items, or batches from a ``DataLoader`` over it.
        codec: the codec of the crop size.
        flip_pairs: (left, right) joint index pairs.
        flip: flip test on.
        batch_size: crops per forward pass.
        keypoint_names: K names for the ground truth.
        sigmas: OKS constants (default from K).

    Returns:
        The metrics of :func:`~autopose.engine.evaluation.coco_keypoint_ap`.
    """
    flip_pairs = [tuple(pair) for pair in flip_pairs]
    input_size = codec.input_size
    annotations: list[dict] = []
    keypoints, scores, pending = [], [], []

    def flush() -> None:
        coords, peaks = predict_crops(
            model, torch.stack(pending), codec, flip_pairs=flip_pairs, flip=flip, batch_size=batch_size
        )
        keypoints.append(coords)
        scores.append(peaks)
        pending.clear()

    # Streamed: only one batch of crops is held at a time.
    for row in iter_rows(rows):
        annotations.append(_crop_annotation(row, input_size, len(annotations) + 1))
        pending.append(torch.as_tensor(_as_numpy(row["image"])))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    gt = _proxy_coco(annotations, input_size, keypoint_names)
    if not annotations:
        return coco_keypoint_ap(gt, [], sigmas=sigmas)
    results = proxy_results(np.concatenate(keypoints), np.concatenate(scores))
    return coco_keypoint_ap(gt, results, sigmas=sigmas)
