"""COCO keypoint annotations → :class:`PersonInstance` lists (through pycocotools).

The json is checked before pycocotools sees it, so that a file that is not a
COCO keypoint file fails with one line naming the file and the field, not with
a ``KeyError`` deep inside pycocotools.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from autopose.data.instances import PersonInstance
from autopose.data.transforms import box_to_center_scale
from autopose.errors import AutoposeError
from autopose.files import is_finite_number, read_json

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)

# (left, right) index pairs, 0-based.
COCO_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (1, 2),
    (3, 4),
    (5, 6),
    (7, 8),
    (9, 10),
    (11, 12),
    (13, 14),
    (15, 16),
)

# The person category's skeleton in the COCO json (1-based there), 0-based here.
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13),
    (13, 11),
    (16, 14),
    (14, 12),
    (11, 12),
    (5, 11),
    (6, 12),
    (5, 6),
    (5, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (1, 2),
    (0, 1),
    (0, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
)

# Per-keypoint OKS constants, the values pycocotools' COCOeval uses (kpt_oks_sigmas).
COCO_SIGMAS: np.ndarray = (
    np.array(
        [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89]
    )
    / 10.0
)
COCO_SIGMAS.setflags(write=False)

PERSON_CATEGORY_ID = 1


def flip_pairs_from_names(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """(left, right) index pairs found by name: ``left_x`` ↔ ``right_x`` (also ``l_x`` ↔ ``r_x``)."""
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        for left, right in (("left_", "right_"), ("l_", "r_")):
            if name.startswith(left) and right + name[len(left) :] in index:
                pairs.append((i, index[right + name[len(left) :]]))
    return tuple(pairs)


# -- validation ---------------------------------------------------------------------------


def _check_list(data: Mapping, key: str, path: Path) -> list:
    if key not in data:
        raise AutoposeError("missing field (not a COCO keypoint file)", path=path, field=key)
    if not isinstance(data[key], list):
        raise AutoposeError(f"expected a list, got {type(data[key]).__name__}", path=path, field=key)
    return data[key]


def _bbox(value: Any, path: Path, field: str) -> np.ndarray:
    if not (isinstance(value, list | tuple) and len(value) == 4 and all(is_finite_number(v) for v in value)):
        raise AutoposeError(f"expected [x, y, w, h] numbers, got {value!r:.60}", path=path, field=field)
    return np.asarray(value, dtype=np.float64)


def _person_category(data: Mapping, path: Path) -> tuple[int, tuple[str, ...]]:
    categories = _check_list(data, "categories", path)
    candidates = []
    for i, category in enumerate(categories):
        if not isinstance(category, dict):
            raise AutoposeError("expected an object", path=path, field=f"categories[{i}]")
        if "keypoints" not in category:
            continue
        names = category["keypoints"]
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise AutoposeError(
                "expected a list of keypoint names", path=path, field=f"categories[{i}].keypoints"
            )
        if not isinstance(category.get("id"), int):
            raise AutoposeError("expected an integer id", path=path, field=f"categories[{i}].id")
        candidates.append((category.get("name") == "person", category["id"], tuple(names)))
    if not candidates:
        raise AutoposeError(
            "no category with keypoints (not a COCO keypoint file)", path=path, field="categories"
        )
    candidates.sort(key=lambda c: not c[0])  # the one named "person" first
    _, category_id, names = candidates[0]
    return category_id, names


def _validated_dataset(path: Path) -> tuple[dict, int, tuple[str, ...]]:
    """Read and check a COCO keypoint json; returns (dataset, person category id, keypoint names)."""
    return validate_coco_dict(read_json(path), path)


def validate_coco_dict(data: Any, path: Path) -> tuple[dict, int, tuple[str, ...]]:
    """Check an already parsed COCO keypoint json (``path`` only names it in errors)."""
    if not isinstance(data, dict):
        raise AutoposeError(
            f"expected a json object with images/annotations/categories, got {type(data).__name__}",
            path=path,
        )
    images = _check_list(data, "images", path)
    annotations = _check_list(data, "annotations", path)
    category_id, names = _person_category(data, path)
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            raise AutoposeError("expected an object", path=path, field=f"images[{i}]")
        if not isinstance(image.get("id"), int):
            raise AutoposeError("missing or non-integer id", path=path, field=f"images[{i}].id")
        if not isinstance(image.get("file_name"), str):
            raise AutoposeError("missing or non-string file_name", path=path, field=f"images[{i}].file_name")
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise AutoposeError("expected an object", path=path, field=where)
        for key in ("id", "image_id", "category_id"):
            if not isinstance(ann.get(key), int):
                raise AutoposeError("missing or non-integer", path=path, field=f"{where}.{key}")
        if ann["category_id"] != category_id:
            continue
        keypoints = ann.get("keypoints")
        if not isinstance(keypoints, list) or not all(is_finite_number(v) for v in keypoints):
            raise AutoposeError("missing or not a list of numbers", path=path, field=f"{where}.keypoints")
        if len(keypoints) % 3:
            raise AutoposeError(
                f"length {len(keypoints)} is not a multiple of 3", path=path, field=f"{where}.keypoints"
            )
        if len(keypoints) != 3 * len(names):
            raise AutoposeError(
                f"{len(keypoints) // 3} keypoints, the category names {len(names)}",
                path=path,
                field=f"{where}.keypoints",
            )
        _bbox(ann.get("bbox"), path, f"{where}.bbox")
        for key in ("area", "iscrowd", "num_keypoints"):
            if key in ann and not is_finite_number(ann[key]):
                raise AutoposeError("expected a number", path=path, field=f"{where}.{key}")
    return data, category_id, names


def coco_api(dataset: dict) -> COCO:
    """A pycocotools COCO over an already loaded dict (its progress prints silenced)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _clip_box(bbox: np.ndarray, width: float | None, height: float | None) -> np.ndarray:
    """Clip ``(x, y, w, h)`` to the image's pixel area ``[0, W] × [0, H]``."""
    x0, y0, w, h = bbox
    x1, y1 = x0 + max(w, 0.0), y0 + max(h, 0.0)
    if width is not None and height is not None:
        x0, x1 = np.clip([x0, x1], 0.0, width)
        y0, y1 = np.clip([y0, y1], 0.0, height)
    return np.array([x0, y0, x1 - x0, y1 - y0], dtype=np.float64)


# -- loaders ------------------------------------------------------------------------------
def load_coco(
    ann_path: Path,
    images_dir: Path,
    *,
    labelled_only: bool = True,
    aspect_ratio: float = 0.75,
) -> list[PersonInstance]:
    """Person instances from a COCO keypoint json.

    Args:
        ann_path: ``person_keypoints_*.json`` (or any COCO-format keypoint file).
        images_dir: folder holding the images named by ``file_name``.
        labelled_only: True skips crowd annotations, annotations without labelled
            keypoints and boxes with no area: what a training set wants, and the persons
            HRNet scores with ground-truth boxes (a prediction for a person without
            keypoints can only be a false positive); False keeps every person annotation.
        aspect_ratio: crop ``width / height`` for center/scale.

    Returns:
        Instances ordered by image id then annotation order; ``keypoints`` are
        ``K×3`` float64 in image pixels (COCO stores them on pixel centers already),
        ``extra`` holds ``image_size (h, w)``, ``iscrowd``, ``num_keypoints`` and
        ``keypoint_names``.

    Raises:
        AutoposeError: the file is missing or is not a COCO keypoint json (names
            the file and field).
    """
    ann_path, images_dir = Path(ann_path), Path(images_dir)
    dataset, category_id, names = _validated_dataset(ann_path)
    return coco_instances(
        dataset, category_id, names, images_dir, labelled_only=labelled_only, aspect_ratio=aspect_ratio
    )


def coco_instances(
    dataset: dict,
    category_id: int,
    names: tuple[str, ...],
    images_dir: Path,
    *,
    labelled_only: bool,
    aspect_ratio: float,
) -> list[PersonInstance]:
    """:func:`load_coco` on a dict already checked by :func:`validate_coco_dict`."""
    images_dir = Path(images_dir)
    coco = coco_api(dataset)
    instances: list[PersonInstance] = []
    for image_id in sorted(coco.getImgIds()):
        image = coco.imgs[image_id]
        width, height = image.get("width"), image.get("height")
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=[category_id], iscrowd=None)):
            keypoints = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
            num_keypoints = int(ann.get("num_keypoints", int((keypoints[:, 2] > 0).sum())))
            iscrowd = int(ann.get("iscrowd", 0))
            bbox = _clip_box(np.asarray(ann["bbox"], dtype=np.float64), width, height)
            if labelled_only and (iscrowd or num_keypoints == 0 or bbox[2] <= 0 or bbox[3] <= 0):
                continue
            # A zero-size box (kept for evaluation) still needs a crop: give it one pixel.
            center, scale = box_to_center_scale(
                [bbox[0], bbox[1], max(bbox[2], 1.0), max(bbox[3], 1.0)], aspect_ratio
            )
            instances.append(
                PersonInstance(
                    image_path=str(images_dir / image["file_name"]),
                    image_id=int(image_id),
                    instance_id=int(ann["id"]),
                    bbox=bbox,
                    keypoints=keypoints,
                    area=float(ann.get("area", bbox[2] * bbox[3])),
                    center=center,
                    scale=scale,
                    score=1.0,
                    dataset="coco",
                    extra={
                        "image_size": (height, width),
                        "iscrowd": iscrowd,
                        "num_keypoints": num_keypoints,
                        "keypoint_names": names,
                    },
                )
            )
    return instances


def coco_image_index(ann_path: Path) -> dict[int, dict]:
    """``image_id → image record`` (``file_name``, ``width``, ``height``) of a COCO json."""
    data = read_json(Path(ann_path))
    if not isinstance(data, dict):
        raise AutoposeError("expected a json object", path=ann_path)
    images = _check_list(data, "images", Path(ann_path))
    index = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int):
            raise AutoposeError("missing or non-integer id", path=ann_path, field=f"images[{i}].id")
        if not isinstance(image.get("file_name"), str):
            raise AutoposeError("missing file_name", path=ann_path, field=f"images[{i}].file_name")
        index[image["id"]] = image
    return index


def load_coco_detections(
    dets_path: Path,
    ann_path_or_image_index: Path | Mapping[int, str | Mapping],
    images_dir: Path,
    *,
    aspect_ratio: float = 0.75,
    score_thr: float = 0.0,
    num_keypoints: int = len(COCO_KEYPOINTS),
) -> list[PersonInstance]:
    """Person boxes from a COCO detection-results json as instances.

    Args:
        dets_path: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``.
        ann_path_or_image_index: the COCO annotation json of the same images, or a
            mapping ``image_id → file_name`` (or ``→ image record``), to find the files.
        images_dir: image folder.
        aspect_ratio: crop ``width / height``.
        score_thr: detections scoring below it are dropped.
        num_keypoints: K of the all-zero ``K×3`` keypoints each instance carries.

    Returns:
        One instance per kept person detection, in file order; ``instance_id`` is the
        detection's index in the file, ``score`` its box score, ``area`` the box area.
        Detections with a ``category_id`` other than 1 (person) are ignored.

    Raises:
        AutoposeError: malformed file, or no detection's image is in the index (the
            wrong annotation file). Detections of images outside the index are skipped,
            so a full detection file can serve an annotation file of a few images.
    """
    dets_path = Path(dets_path)
    if isinstance(ann_path_or_image_index, str | Path):
        index_source = Path(ann_path_or_image_index)
        index: Mapping = coco_image_index(index_source)
    else:
        index_source, index = None, ann_path_or_image_index
    detections = read_json(dets_path)
    if not isinstance(detections, list):
        raise AutoposeError(f"expected a list of detections, got {type(detections).__name__}", path=dets_path)
    images_dir = Path(images_dir)
    instances = []
    unknown_images = 0
    for i, det in enumerate(detections):
        if not isinstance(det, dict):
            raise AutoposeError("expected an object", path=dets_path, field=f"[{i}]")
        if det.get("category_id", PERSON_CATEGORY_ID) != PERSON_CATEGORY_ID:
            continue
        score = det.get("score", 1.0)
        if not is_finite_number(score):
            raise AutoposeError("expected a number", path=dets_path, field=f"[{i}].score")
        if score < score_thr:
            continue
        image_id = det.get("image_id")
        if not isinstance(image_id, int):
            raise AutoposeError("missing or non-integer", path=dets_path, field=f"[{i}].image_id")
        if image_id not in index:
            unknown_images += 1
            continue
        record = index[image_id]
        file_name = record if isinstance(record, str) else record["file_name"]
        size = None if isinstance(record, str) else (record.get("height"), record.get("width"))
        bbox = _bbox(det.get("bbox"), dets_path, f"[{i}].bbox")
        if size is not None:
            bbox = _clip_box(bbox, size[1], size[0])
        if bbox[2] <= 0 or bbox[3] <= 0:
            continue
        center, scale = box_to_center_scale(bbox, aspect_ratio)
        instances.append(
            PersonInstance(
                image_path=str(images_dir / file_name),
                image_id=image_id,
                instance_id=i,
                bbox=bbox,
                keypoints=np.zeros((num_keypoints, 3), dtype=np.float64),
                area=float(bbox[2] * bbox[3]),
                center=center,
                scale=scale,
                score=float(score),
                dataset="coco",
                extra={"image_size": size},
            )
        )
    if detections and unknown_images == len(detections):
        where = f" {index_source}" if index_source else " the image index"
        raise AutoposeError(f"no detection's image is in{where}", path=dets_path, field="image_id")
    return instances
