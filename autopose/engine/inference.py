"""Top-down prediction: person boxes → crops → heatmaps (with the flip test) → keypoints → COCO results.

The pipeline, one function per step so that each can be tested alone:

* :func:`predict_heatmaps` runs the model in eval mode under ``torch.no_grad`` and,
  with the flip test, averages with the heatmaps of the mirrored crop
  (:func:`flip_back`, no shift: see the note above :func:`flip_permutation`).
* :func:`predict` crops every person box of a dataset (detections or ground
  truth), decodes with :class:`~autopose.data.codec.HeatmapCodec` to image pixels,
  scores each person and removes duplicates per image (:mod:`autopose.engine.nms`);
  :func:`write_results` writes the COCO results json.

Kept apart, as in mmpose: person scores and OKS-NMS (:mod:`autopose.engine.nms`), the metrics
(:mod:`autopose.engine.evaluation`), scoring a model on the cropped Parquet proxy
(:mod:`autopose.engine.proxy_scoring`) and the ``autopose evaluate`` command
(:mod:`autopose.engine.evaluate_command`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

from autopose.data.codec import HeatmapCodec
from autopose.data.instances import PersonInstance
from autopose.data.transforms import crop_matrix, warp_image
from autopose.engine.evaluation import (
    oks_sigmas,
)
from autopose.engine.nms import OKS_NMS_THRESHOLD, oks_nms, person_score
from autopose.errors import AutoposeError
from autopose.files import atomic_write

PERSON_CATEGORY_ID = 1

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
            coco_result(image_id, keypoints[i], keypoint_scores[i], person_scores[i], category_id)
            for i in kept
        ]
    return results


def coco_result(
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
