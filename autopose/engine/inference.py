"""Top-down inference: person boxes → crops → heatmaps (with flip test) → keypoints → COCO results.

The pipeline, one function per step so that each can be tested alone:

* :func:`predict_heatmaps` runs the model in eval mode under ``torch.no_grad`` and,
  with the flip test, averages with the heatmaps of the mirrored crop
  (:func:`flip_back`, no shift: see the note above :func:`flip_permutation`).
* :func:`predict` crops every person box of a dataset (detections or ground
  truth), decodes with :class:`~autopose.data.codec.HeatmapCodec` to image pixels,
  scores each person (:func:`person_score`) and removes duplicates per image with
  :func:`oks_nms`; :func:`write_results` writes the COCO results json.
* :func:`proxy_ground_truth` / :func:`evaluate_proxy` score the already-cropped
  Parquet proxy with pycocotools, each crop its own COCO image in crop pixels.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch import nn
from tqdm import tqdm

from autopose.data.coco import flip_pairs_from_names, load_coco, load_coco_detections
from autopose.data.codec import HeatmapCodec
from autopose.data.instances import PersonInstance
from autopose.data.mpii import MPII_FLIP_PAIRS, MPII_KEYPOINTS, is_mpii_layout, load_mpii
from autopose.data.transforms import crop_matrix, transform_points, warp_image
from autopose.engine.evaluation import (
    HEAD_SIZE_RULE,
    coco_from_dict,
    coco_keypoint_ap,
    format_table,
    load_ground_truth,
    mpii_head_sizes,
    oks_sigmas,
    pckh,
    read_json,
)
from autopose.errors import AutoposeError
from autopose.files import atomic_write

PERSON_CATEGORY_ID = 1
KEYPOINT_SCORE_THRESHOLD = 0.2
OKS_NMS_THRESHOLD = 0.9

# The flip test averages the upright heatmaps with the mirrored crop's, flipped back, and
# shifts nothing. The codec's unbiased convention (heatmap x = (x + 0.5) / stride − 0.5)
# makes mirroring exact on the heatmap grid: input column x ↦ W − 1 − x maps heatmap column
# j ↦ w − 1 − j, so ``flip_back(encode(mirrored)) == encode(original)`` (to 6e-7). A one-pixel
# shift (HRNet's reference code, argued from a stem with fixed weights) cut the val AP of the
# demo's trained trials 2.5–3× (none: 0.161 without flip test, 0.150 flipped back unshifted,
# 0.066 shifted) and costs a perfect flip-consistent model AP 1.0 → 0.90 on 64×48 crops.


# -- flip test ----------------------------------------------------------------------------
def flip_permutation(num_joints: int, flip_pairs: Iterable[Sequence[int]]) -> list[int]:
    """Channel order that swaps every (left, right) pair: ``index[left] = right`` and back."""
    index = list(range(num_joints))
    for left, right in flip_pairs:
        index[left], index[right] = right, left
    return index


def flip_back(heatmaps: torch.Tensor, flip_pairs: Iterable[Sequence[int]]) -> torch.Tensor:
    """Heatmaps of a horizontally mirrored input, mapped back to the unmirrored frame.

    Mirrors the width and swaps the left/right channels. Its own inverse:
    ``flip_back(flip_back(h, p), p) == h``.

    Args:
        heatmaps: ``B×K×h×w``.
        flip_pairs: (left, right) channel index pairs.

    Returns:
        ``B×K×h×w``.
    """
    index = flip_permutation(heatmaps.shape[1], flip_pairs)
    return heatmaps.flip(-1)[:, index]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block; the model's own mode is put back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _final_heatmaps(output: Any) -> torch.Tensor:
    """The last output if the model returns one per stage."""
    if isinstance(output, list | tuple):
        output = output[-1]
    if not isinstance(output, torch.Tensor) or output.ndim != 4:
        raise TypeError(f"expected B×K×h×w heatmaps from the model, got {type(output).__name__}")
    return output


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def predict_heatmaps(
    model: nn.Module,
    images: torch.Tensor,
    *,
    flip_pairs: Iterable[Sequence[int]] = (),
    flip: bool = True,
) -> torch.Tensor:
    """The model's heatmaps for a batch of crops, with the flip test.

    Args:
        model: returns ``B×K×h×w`` heatmaps (or a list whose last entry is); a
            DistributedDataParallel / DataParallel wrapper is looked through.
        images: ``B×3×H×W`` float 0…1 (uint8 is scaled); moved to the model's device.
        flip_pairs: (left, right) joint index pairs.
        flip: average with the flipped-back heatmaps of the mirrored crops.

    Returns:
        ``B×K×h×w`` float32 on the CPU.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        # The bare module: DDP's forward broadcasts buffers to every rank, and inference
        # typically runs on rank 0 alone, where that collective would wait forever.
        model = model.module
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    images = images.to(_model_device(model), torch.float32)
    with _eval_mode(model):
        heatmaps = _final_heatmaps(model(images)).float()
        if flip:
            mirrored = _final_heatmaps(model(images.flip(-1))).float()
            heatmaps = 0.5 * (heatmaps + flip_back(mirrored, flip_pairs))
    return heatmaps.cpu()


def predict_crops(
    model: nn.Module,
    images: torch.Tensor,
    codec: HeatmapCodec,
    *,
    flip_pairs: Iterable[Sequence[int]] = (),
    flip: bool = True,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints in crop pixels for already-cropped images.

    Args:
        images: ``B×3×H×W`` (H×W the codec's input size), float 0…1 or uint8.

    Returns:
        ``keypoints B×K×2`` (crop pixels, float64) and ``scores B×K`` (heatmap peaks).
    """
    flip_pairs = [tuple(p) for p in flip_pairs]
    keypoints, scores = [], []
    for start in range(0, images.shape[0], batch_size):
        heatmaps = predict_heatmaps(
            model, images[start : start + batch_size], flip_pairs=flip_pairs, flip=flip
        )
        _check_heatmap_size(heatmaps, codec)
        coords, peak = codec.decode(heatmaps)
        keypoints.append(coords.numpy().astype(np.float64))
        scores.append(peak.numpy().astype(np.float64))
    if not keypoints:
        return np.zeros((0, 0, 2)), np.zeros((0, 0))
    return np.concatenate(keypoints), np.concatenate(scores)


def _check_heatmap_size(heatmaps: torch.Tensor, codec: HeatmapCodec) -> None:
    if tuple(heatmaps.shape[-2:]) != codec.heatmap_size:
        raise ValueError(
            f"the model gives {tuple(heatmaps.shape[-2:])} heatmaps, the codec expects {codec.heatmap_size}"
        )


# -- scoring and OKS-NMS ------------------------------------------------------------------
def person_score(
    box_score: float, keypoint_scores: np.ndarray, threshold: float = KEYPOINT_SCORE_THRESHOLD
) -> float:
    """A person's score: box score × mean of the keypoint scores above ``threshold``.

    Keypoint scores are the heatmap peaks, clipped at 0. When none is above the
    threshold the mean of all of them is used instead (so at most ``threshold``):
    the person ranks below confident ones with the same box score, and weak
    persons stay ordered among themselves instead of all tying at 0 (HRNet's
    reference gives 0 there).
    """
    scores = np.clip(np.asarray(keypoint_scores, dtype=np.float64), 0.0, None)
    confident = scores[scores > threshold]
    keypoint_mean = confident.mean() if confident.size else (scores.mean() if scores.size else 0.0)
    return float(box_score) * float(keypoint_mean)


def oks_iou(
    keypoints: np.ndarray,
    others: np.ndarray,
    area: float,
    other_areas: np.ndarray,
    sigmas: np.ndarray,
) -> np.ndarray:
    """Object keypoint similarity between one pose and several others (all keypoints count).

    COCO's formula, ``mean_k exp(−d_k² / (2 · s² · (2σ_k)²))``, with the squared
    object scale ``s²`` the mean of the two areas (HRNet's choice for comparing two
    predictions).

    Args:
        keypoints: ``K×2`` (extra columns such as scores are ignored).
        others: ``N×K×2``.
        area: area of ``keypoints``' person.
        other_areas: ``N`` areas.
        sigmas: ``K`` OKS constants.

    Returns:
        ``N`` similarities in 0…1.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)[:, :2]
    others = np.asarray(others, dtype=np.float64)[..., :2]
    variances = (2.0 * np.asarray(sigmas, dtype=np.float64)) ** 2
    squared_distance = ((others - keypoints[None]) ** 2).sum(axis=-1)  # N×K
    scale = (area + np.asarray(other_areas, dtype=np.float64)) / 2.0 + np.spacing(1)
    exponent = squared_distance / variances[None] / scale[:, None] / 2.0
    return np.exp(-exponent).mean(axis=-1)


def oks_nms(
    keypoints: np.ndarray,
    scores: np.ndarray,
    areas: np.ndarray,
    *,
    threshold: float = OKS_NMS_THRESHOLD,
    sigmas: np.ndarray,
) -> list[int]:
    """Greedy non-maximum suppression by OKS (one image's persons).

    Take the best-scoring pose, drop every other pose whose OKS with it is above
    ``threshold``, repeat with what is left.

    Args:
        keypoints: ``N×K×2`` (or ``N×K×3``).
        scores: ``N`` person scores.
        areas: ``N`` person areas.
        threshold: OKS above which two poses are the same person.
        sigmas: ``K`` OKS constants.

    Returns:
        Indices of the kept poses, best first.
    """
    scores = np.asarray(scores, dtype=np.float64)
    areas = np.asarray(areas, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        if rest.size == 0:
            break
        similarity = oks_iou(keypoints[best], keypoints[rest], areas[best], areas[rest], sigmas)
        order = rest[similarity <= threshold]
    return keep


# -- top-down inference on full images ----------------------------------------------------
def _read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise AutoposeError("image not found", path=path) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise AutoposeError(f"cannot read image ({error})", path=path) from None


def _crops(instances: Sequence[PersonInstance], input_size: tuple[int, int]) -> Iterator[np.ndarray]:
    """``H×W×3`` uint8 crops in instance order; each image is read once per run of its persons."""
    current_path, image = None, None
    for instance in instances:
        if instance.image_path != current_path:
            current_path, image = instance.image_path, _read_image(instance.image_path)
        matrix = crop_matrix(instance.center, instance.scale, input_size)
        yield warp_image(image, matrix, input_size)


def predict_instances(
    model: nn.Module,
    instances: Sequence[PersonInstance],
    codec: HeatmapCodec,
    *,
    flip_pairs: Iterable[Sequence[int]],
    flip: bool = True,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints in image pixels for each person box, in the order given.

    Args:
        model: heatmap model (run in eval mode; its mode is restored).
        instances: persons with ``center``/``scale`` crops.
        codec: the codec of the model's input size.
        flip_pairs: (left, right) joint index pairs of the dataset.
        flip: flip test on.
        batch_size: crops per forward pass.
        progress: show a progress bar on stderr.

    Returns:
        ``keypoints N×K×2`` (image pixels, float64) and ``scores N×K`` (heatmap peaks).

    Raises:
        AutoposeError: an image is missing or unreadable.
    """
    flip_pairs = [tuple(int(i) for i in pair) for pair in flip_pairs]
    # Process the persons grouped by image so each image is read once; answer in the given order.
    order = sorted(range(len(instances)), key=lambda i: instances[i].image_path)
    ordered = [instances[i] for i in order]
    all_keypoints, all_scores = [], []
    crops = _crops(ordered, codec.input_size)
    with tqdm(total=len(ordered), desc="inference", unit="person", disable=not progress) as bar:
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            images = np.stack([next(crops) for _ in batch])
            images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
            heatmaps = predict_heatmaps(model, images, flip_pairs=flip_pairs, flip=flip)
            _check_heatmap_size(heatmaps, codec)
            centers = np.stack([np.asarray(inst.center, dtype=np.float64) for inst in batch])
            scales = np.stack([np.asarray(inst.scale, dtype=np.float64) for inst in batch])
            keypoints, scores = codec.decode_to_image(heatmaps, centers, scales)
            all_keypoints.append(keypoints)
            all_scores.append(scores.astype(np.float64))
            bar.update(len(batch))
    if not ordered:
        return np.zeros((0, 0, 2)), np.zeros((0, 0))
    keypoints, scores = (
        np.empty_like(np.concatenate(all_keypoints)),
        np.empty_like(np.concatenate(all_scores)),
    )
    keypoints[order], scores[order] = np.concatenate(all_keypoints), np.concatenate(all_scores)
    return keypoints, scores


def predict(
    model: nn.Module,
    instances: Sequence[PersonInstance],
    codec: HeatmapCodec,
    *,
    flip_pairs: Iterable[Sequence[int]],
    flip: bool = True,
    batch_size: int = 32,
    nms_threshold: float | None = OKS_NMS_THRESHOLD,
    sigmas: np.ndarray | None = None,
    category_id: int = PERSON_CATEGORY_ID,
    progress: bool = False,
) -> list[dict]:
    """Top-down inference on person boxes: COCO keypoint results in image pixels.

    Args:
        model: heatmap model (run in eval mode; its mode is restored).
        instances: persons with ``center``/``scale`` crops and box ``score`` (from
            :func:`~autopose.data.coco.load_coco_detections` or ground-truth boxes
            from :func:`~autopose.data.coco.load_coco`).
        codec: the codec of the model's input size.
        flip_pairs: (left, right) joint index pairs of the dataset.
        flip: flip test on.
        batch_size: crops per forward pass.
        nms_threshold: OKS-NMS per image at this OKS (``None``: no NMS). Person
            areas for NMS are the crop extents' ``w·h``, as in HRNet's reference.
        sigmas: OKS constants for NMS (default from K, see
            :func:`~autopose.engine.evaluation.oks_sigmas`).
        category_id: the results' ``category_id``.
        progress: show a progress bar on stderr.

    Returns:
        ``[{"image_id", "category_id", "keypoints": [x, y, s] × K, "score"}]``, ordered
        by image id then score, best first. The person score is :func:`person_score`.

    Raises:
        AutoposeError: an image is missing or unreadable.
    """
    if not instances:
        return []
    keypoints, keypoint_scores = predict_instances(
        model, instances, codec, flip_pairs=flip_pairs, flip=flip, batch_size=batch_size, progress=progress
    )
    person_scores = np.array(
        [person_score(inst.score, s) for inst, s in zip(instances, keypoint_scores, strict=True)]
    )
    areas = np.array([float(inst.scale[0]) * float(inst.scale[1]) for inst in instances])
    if nms_threshold is not None:
        constants = oks_sigmas(keypoints.shape[1]) if sigmas is None else np.asarray(sigmas)

    results = []
    by_image: dict[int, list[int]] = {}
    for i, inst in enumerate(instances):
        by_image.setdefault(int(inst.image_id), []).append(i)
    for image_id in sorted(by_image):
        members = np.array(by_image[image_id])
        if nms_threshold is None:
            kept = members[np.argsort(-person_scores[members], kind="stable")]
        else:
            order = oks_nms(
                keypoints[members],
                person_scores[members],
                areas[members],
                threshold=nms_threshold,
                sigmas=constants,
            )
            kept = members[order]
        results += [
            _result(image_id, keypoints[i], keypoint_scores[i], person_scores[i], category_id) for i in kept
        ]
    return results


def _result(
    image_id: int, keypoints: np.ndarray, keypoint_scores: np.ndarray, score: float, category_id: int
) -> dict:
    triples = np.concatenate([keypoints, keypoint_scores[:, None]], axis=1)
    return {
        "image_id": int(image_id),
        "category_id": int(category_id),
        "keypoints": [round(float(v), 4) for v in triples.ravel()],
        "score": float(score),
    }


def write_results(results: list[dict], path: Path | str) -> Path:
    """Write COCO keypoint results as json, atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as stream:
        json.dump(results, stream)
    return path


# -- the Parquet proxy: crops that are already cut ----------------------------------------
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
    return coco_from_dict({"images": images, "annotations": annotations, "categories": [category]})


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
        _result(int(image_id), keypoints[i], scores[i], person_score(1.0, scores[i]), PERSON_CATEGORY_ID)
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


# -- `autopose evaluate` --------------------------------------------------------------------
@dataclass
class EvaluationReport:
    """What ``autopose evaluate`` prints: a titled metrics table with notes."""

    title: str
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    results: list[dict] | None = None

    def table(self) -> str:
        return format_table(self.metrics, title=self.title, notes=self.notes)


def evaluate_results_file(results_path: Path, ann_path: Path) -> EvaluationReport:
    """Score an existing COCO keypoint results json against a COCO ground truth."""
    if is_mpii_layout(read_json(Path(ann_path))):
        raise AutoposeError(
            "an MPII json is scored with PCKh from a model: use --checkpoint C --images DIR "
            "(--results takes COCO keypoint results and a COCO ground truth)",
            path=ann_path,
        )
    gt = load_ground_truth(Path(ann_path))
    results = read_json(Path(results_path))  # read twice (tiny next to scoring) to word the note
    metrics = coco_keypoint_ap(gt, Path(results_path))
    notes = [] if results else [f"{results_path} holds no results: every metric is 0"]
    return EvaluationReport(f"COCO keypoint AP (pycocotools) — {results_path}", metrics, notes)


def evaluate_checkpoint(
    checkpoint: Path,
    ann_path: Path,
    images_dir: Path,
    *,
    dets_path: Path | None = None,
    flip: bool = True,
    batch_size: int = 32,
    results_out: Path | None = None,
    progress: bool = False,
) -> EvaluationReport:
    """Run a checkpoint on a dataset and score it: COCO OKS AP, or PCKh@0.5 for an MPII json.

    Args:
        checkpoint: a file from :func:`~autopose.engine.checkpoint.save_checkpoint`.
        ann_path: COCO keypoint json, or an HRNet-layout MPII json.
        images_dir: the images.
        dets_path: COCO person detections (COCO only); default: ground-truth boxes.
        flip: flip test on.
        batch_size: crops per forward pass.
        results_out: also write the COCO results json there (COCO only).
        progress: progress bar on stderr.
    """
    from autopose.engine.checkpoint import load_model  # models are only needed here

    ann_path, images_dir = Path(ann_path), Path(images_dir)
    if not images_dir.is_dir():
        raise AutoposeError("image folder not found", path=images_dir)
    mpii = is_mpii_layout(read_json(ann_path))
    if mpii and dets_path is not None:
        raise AutoposeError("--dets is for COCO; MPII is evaluated on its annotated persons", path=dets_path)
    if mpii and results_out is not None:
        raise AutoposeError("--out writes COCO results; not available for MPII", path=results_out)
    model, meta = load_model(checkpoint)
    height, width = meta["input_size"]
    codec = HeatmapCodec((height, width))
    box_source = "ground-truth boxes" if dets_path is None else f"detections {Path(dets_path).name}"
    setting = f"{meta['arch']} {height}x{width}, flip test {'on' if flip else 'off'}"

    if mpii:
        instances = load_mpii(ann_path, images_dir, aspect_ratio=width / height)
        _check_joints(meta, len(MPII_KEYPOINTS), checkpoint, ann_path)
        pairs = meta["flip_pairs"] if meta["flip_pairs"] is not None else MPII_FLIP_PAIRS
        keypoints, _ = predict_instances(
            model, instances, codec, flip_pairs=pairs, flip=flip, batch_size=batch_size, progress=progress
        )
        truth = np.stack([inst.keypoints[:, :2] for inst in instances])
        visible = np.stack([inst.keypoints[:, 2] for inst in instances])
        headboxes = [inst.extra.get("headbox") for inst in instances]
        boxes = np.stack(headboxes) if all(box is not None for box in headboxes) else None
        metrics = pckh(keypoints, truth, visible, mpii_head_sizes(truth, visible, boxes))
        rule = "MPII head boxes: head size = 0.6 × head-box diagonal" if boxes is not None else HEAD_SIZE_RULE
        return EvaluationReport(f"MPII PCKh@0.5 (%) — {ann_path.name}, {setting}", metrics, [rule])

    gt = load_ground_truth(ann_path)
    category = next(c for c in gt.dataset["categories"] if isinstance(c.get("keypoints"), list))
    names = list(category["keypoints"])
    _check_joints(meta, len(names), checkpoint, ann_path)
    aspect_ratio = width / height
    if dets_path is None:
        # As HRNet scores with ground-truth boxes: the labelled, non-crowd persons (a crowd box or
        # a person without keypoints could only add false positives), so that numbers compare.
        instances = load_coco(ann_path, images_dir, labelled_only=True, aspect_ratio=aspect_ratio)
    else:
        instances = load_coco_detections(
            dets_path, ann_path, images_dir, aspect_ratio=aspect_ratio, num_keypoints=len(names)
        )
    pairs = meta["flip_pairs"] if meta["flip_pairs"] is not None else flip_pairs_from_names(names)
    results = predict(
        model, instances, codec, flip_pairs=pairs, flip=flip, batch_size=batch_size, progress=progress
    )
    notes = []
    if results_out is not None:
        write_results(results, results_out)
        notes.append(f"results written to {results_out}")
    if not results:
        notes.append("no person boxes: every metric is 0")
    metrics = coco_keypoint_ap(gt, results)
    title = f"COCO keypoint AP (pycocotools) — {ann_path.name}, {box_source}, {setting}"
    return EvaluationReport(title, metrics, notes, results)


def _check_joints(meta: dict, num_joints: int, checkpoint: Path, ann_path: Path) -> None:
    if meta["num_joints"] != num_joints:
        raise AutoposeError(
            f"the model predicts {meta['num_joints']} keypoints, {Path(ann_path).name} has {num_joints}",
            path=checkpoint,
            field="meta.num_joints",
        )
