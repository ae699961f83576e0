"""Person detector: torchvision's Faster R-CNN (ResNet-50-FPN) from a local weights file.

The top-down pipeline starts from person boxes. :func:`detect_persons` writes
them in the COCO detection layout that inference reads::

    [{"image_id": 785, "category_id": 1, "bbox": [x, y, w, h], "score": 0.99}, ...]

Weights. Nothing is downloaded here. Get torchvision's published COCO weights for
``fasterrcnn_resnet50_fpn`` (``FasterRCNN_ResNet50_FPN_Weights.COCO_V1``, box AP
37.0 on COCO val2017; file ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`` from
``https://download.pytorch.org/models/``) on a machine with internet access, e.g.
``torchvision.models.detection.fasterrcnn_resnet50_fpn(weights="COCO_V1")`` then
``torch.save(model.state_dict(), "fasterrcnn_r50_fpn_coco.pth")``, or the ``.pth``
file itself, and copy it in. The model has the 91 COCO category slots; person is 1.

Image ids. A file whose name stem is an integer (COCO's ``000000000785.jpg``) gets
that integer. The others, in sorted file-name order, get ``max(integer stems) + 1``,
``+ 2``, …: stable for a given folder and never colliding with an integer stem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from tqdm import tqdm

from autopose.errors import AutoposeError
from autopose.files import atomic_write

PERSON_CATEGORY = 1  # COCO category id of "person" (also its label in torchvision's detectors)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
MAX_PERSONS_PER_IMAGE = 100


def build_person_detector(
    weights: Path | str | None, *, min_size: int = 800, max_size: int = 1333, **options: Any
) -> nn.Module:
    """Faster R-CNN ResNet-50-FPN in eval mode, weights from a local state dict.

    Args:
        weights: state-dict file (see the module docstring); ``None`` leaves the
            network randomly initialised (for tests of the plumbing).
        min_size, max_size: the detector's internal resize (torchvision defaults;
            smaller is faster and less accurate).
        **options: more settings of torchvision's ``FasterRCNN`` (e.g.
            ``rpn_post_nms_top_n_test=1000``, the proposals per image).

    Raises:
        AutoposeError: the file is missing, unreadable, or its keys do not match
            (missing keys listed).
    """
    model = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=min_size, max_size=max_size, **options
    )
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise AutoposeError("detector weights file not found", path=path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any failure to unpickle means "not a weights file"
            raise AutoposeError(
                f"cannot read detector weights ({type(error).__name__}: {error})", path=path
            ) from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise AutoposeError("expected a Faster R-CNN state dict (name → tensor)", path=path)
        own = model.state_dict()
        # Built without pretrained parts, torchvision uses BatchNorm2d where the published
        # checkpoint has FrozenBatchNorm2d: only BatchNorm's step counters are then absent.
        missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state if k not in own)
        wrong_shape = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
        if missing or unexpected or wrong_shape:
            problems = []
            if missing:
                problems.append(f"{len(missing)} missing keys: {', '.join(missing)}")
            if unexpected:
                problems.append(f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:20])}")
            if wrong_shape:
                problems.append(f"keys of another shape: {', '.join(wrong_shape)}")
            raise AutoposeError(
                "not a fasterrcnn_resnet50_fpn (91 COCO classes) state dict; " + "; ".join(problems),
                path=path,
                field="state_dict",
            )
        own.update(state)
        model.load_state_dict(own)
    return model.eval()


def list_images(folder: Path | str) -> list[Path]:
    """Image files (jpg, jpeg, png, bmp) directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AutoposeError("image folder not found", path=folder)
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise AutoposeError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder", path=folder)
    return images


def image_ids(image_paths: Sequence[Path | str]) -> list[int]:
    """Integer stems as they are; the rest numbered after the largest one (see module docstring)."""
    stems = [Path(p).stem for p in image_paths]
    numeric = [int(s) for s in stems if s.isdigit()]
    next_id = max(numeric, default=-1) + 1
    order = sorted(range(len(stems)), key=lambda i: Path(image_paths[i]).name)
    ids = [int(s) if s.isdigit() else -1 for s in stems]
    for i in order:
        if ids[i] < 0:
            ids[i] = next_id
            next_id += 1
    return ids


@torch.no_grad()
def detect_persons(
    detector: nn.Module,
    image_paths: Sequence[Path | str],
    score_thr: float = 0.0,
    *,
    progress: bool = True,
) -> list[dict]:
    """Person boxes for each image, in the COCO detection layout.

    Args:
        detector: from :func:`build_person_detector`.
        image_paths: image files.
        score_thr: keep person boxes scoring at least this (0 keeps every one the
            detector returns); at most the 100 best per image.
        progress: show a progress bar on stderr.

    Returns:
        ``[{"image_id": int, "category_id": 1, "bbox": [x, y, w, h], "score": float}, ...]``
        with ``bbox`` in image pixels (COCO layout: top-left corner, width, height).
    """
    device = next(detector.parameters()).device
    heads = detector.roi_heads
    saved = (heads.score_thresh, heads.detections_per_img)
    # The detector drops boxes below its own threshold (0.05 by default) before we see them,
    # and keeps its top 100 boxes over all 91 classes: rank persons among more, keep 100 of them.
    heads.score_thresh = min(float(score_thr), heads.score_thresh)
    heads.detections_per_img = max(heads.detections_per_img, 1000)
    try:
        return _detect_in_images(detector, image_paths, score_thr, device, progress)
    finally:
        heads.score_thresh, heads.detections_per_img = saved


def _detect_in_images(
    detector: nn.Module,
    image_paths: Sequence[Path | str],
    score_thr: float,
    device: torch.device,
    progress: bool,
) -> list[dict]:
    results: list[dict] = []
    ids = image_ids(image_paths)
    for image_id, path in tqdm(
        list(zip(ids, image_paths, strict=True)), desc="detect", unit="img", disable=not progress
    ):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        except OSError as error:
            raise AutoposeError(f"cannot read image ({error})", path=path) from None
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).to(device)
        output = detector([tensor])[0]
        persons = output["labels"] == PERSON_CATEGORY
        keep = persons.nonzero().flatten()[:MAX_PERSONS_PER_IMAGE]  # outputs come sorted by score
        output = {key: value[keep] for key, value in output.items()}
        for box, label, score in zip(
            output["boxes"].tolist(), output["labels"].tolist(), output["scores"].tolist(), strict=True
        ):
            if label != PERSON_CATEGORY or score < score_thr:
                continue
            x1, y1, x2, y2 = box
            results.append(
                {
                    "image_id": image_id,
                    "category_id": PERSON_CATEGORY,
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(float(score), 5),
                }
            )
    return results


def write_detections(detections: list[dict], path: Path | str) -> None:
    """Write the detection json atomically (a temporary file in the same folder, then rename)."""
    with atomic_write(path) as file:
        json.dump(detections, file)
