"""MPII in the HRNet json layout → :class:`PersonInstance` lists.

Each entry of the json list is one person::

    {"image": "005808361.jpg", "center": [x, y], "scale": s,
     "joints": [[x, y] × 16], "joints_vis": [0/1 × 16]}

``scale`` is the person's size over 200 px and the coordinates are MATLAB
1-based. How this maps onto our center/scale (crop extent in pixels, padded):

* HRNet's MPII loader (and mmpose's after it) moves the center down by
  ``15 · s`` px, multiplies ``s`` by 1.25 so that limbs are not cut, and
  subtracts 1 from the center and the joints (1-based → 0-based). We do the
  same, so that crops match the published MPII pipelines.
* The unpadded person box is then the square of side ``200 · s`` around that
  center; we store it as ``bbox`` and pass it through
  :func:`~autopose.data.transforms.box_to_center_scale` with the usual 1.25
  padding, which gives a crop extent of ``200 · s · 1.25`` px in width and,
  for a 3:4 crop, ``/ aspect_ratio`` in height — the same extent HRNet's affine
  transform takes (it fixes the width and lets the height follow the output
  aspect ratio).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from autopose.data.instances import PersonInstance
from autopose.data.transforms import BOX_PADDING, box_to_center_scale
from autopose.errors import AutoposeError
from autopose.files import is_finite_number, read_json

MPII_KEYPOINTS: tuple[str, ...] = (
    "right_ankle",
    "right_knee",
    "right_hip",
    "left_hip",
    "left_knee",
    "left_ankle",
    "pelvis",
    "thorax",
    "upper_neck",
    "head_top",
    "right_wrist",
    "right_elbow",
    "right_shoulder",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
)

# (left, right) index pairs, 0-based.
MPII_FLIP_PAIRS: tuple[tuple[int, int], ...] = ((5, 0), (4, 1), (3, 2), (15, 10), (14, 11), (13, 12))

PIXEL_STD = 200.0  # MPII's scale unit: the person's size over 200 px
CENTER_SHIFT = 15.0  # px per scale unit, HRNet's downward center shift


def is_mpii_layout(data: object) -> bool:
    """True for an HRNet-style MPII json (a list of dicts with ``joints``)."""
    return isinstance(data, list) and bool(data) and isinstance(data[0], dict) and "joints" in data[0]


def _image_id(name: str, fallback: int) -> int:
    stem = Path(name).stem
    return int(stem) if stem.isdigit() else fallback


def load_mpii(json_path: Path, images_dir: Path, *, aspect_ratio: float = 0.75) -> list[PersonInstance]:
    """Person instances from an HRNet-layout MPII json.

    Args:
        json_path: the json list (``train.json`` / ``valid.json`` of HRNet, or the samples).
        images_dir: folder holding the images named by ``image``.
        aspect_ratio: crop ``width / height``.

    Returns:
        One instance per entry, ``dataset="mpii"``; ``image_id`` is the numeric image
        name (``005808361.jpg`` → 5808361), ``instance_id`` the entry's index.
        Keypoints are ``16×3`` 0-based image pixels with ``v = 2`` for labelled
        joints (MPII's ``joints_vis`` marks labelled, not seen) and ``0`` otherwise.
        ``extra`` keeps the raw ``mpii_center`` / ``mpii_scale`` and, when present,
        ``headbox``.

    Raises:
        AutoposeError: the file is missing or not in this layout (names file and field).
    """
    json_path = Path(json_path)
    return mpii_instances(read_json(json_path), json_path, images_dir, aspect_ratio=aspect_ratio)


def mpii_instances(
    data: Any, json_path: Path, images_dir: Path, *, aspect_ratio: float = 0.75
) -> list[PersonInstance]:
    """:func:`load_mpii` on an already parsed json (``json_path`` only names it in errors)."""
    images_dir = Path(images_dir)
    if not isinstance(data, list):
        raise AutoposeError(
            f"expected a list of MPII entries (HRNet layout), got {type(data).__name__}", path=json_path
        )
    num_joints = len(MPII_KEYPOINTS)
    instances = []
    for i, entry in enumerate(data):
        where = f"[{i}]"
        if not isinstance(entry, dict):
            raise AutoposeError("expected an object", path=json_path, field=where)
        name = entry.get("image")
        if not isinstance(name, str):
            raise AutoposeError("missing or non-string", path=json_path, field=f"{where}.image")
        center = entry.get("center")
        if not (isinstance(center, list) and len(center) == 2 and all(is_finite_number(v) for v in center)):
            raise AutoposeError("expected [x, y]", path=json_path, field=f"{where}.center")
        scale = entry.get("scale")
        if not is_finite_number(scale) or scale <= 0:
            raise AutoposeError("expected a positive number", path=json_path, field=f"{where}.scale")
        joints = np.asarray(entry.get("joints", []), dtype=object)
        if joints.shape != (num_joints, 2) or not all(is_finite_number(v) for v in joints.ravel()):
            raise AutoposeError(
                f"expected {num_joints} [x, y] pairs", path=json_path, field=f"{where}.joints"
            )
        vis = entry.get("joints_vis", [1] * num_joints)
        if not (isinstance(vis, list) and len(vis) == num_joints and all(is_finite_number(v) for v in vis)):
            raise AutoposeError(f"expected {num_joints} numbers", path=json_path, field=f"{where}.joints_vis")

        cx, cy = float(center[0]), float(center[1])
        if cx != -1:  # HRNet marks a missing center with -1
            cy += CENTER_SHIFT * float(scale)
        cx, cy = cx - 1.0, cy - 1.0
        side = PIXEL_STD * float(scale)
        # box_to_center_scale puts the center at x + w/2 - 0.5; place the box so it lands on (cx, cy).
        bbox = np.array([cx - side / 2 + 0.5, cy - side / 2 + 0.5, side, side], dtype=np.float64)
        crop_center, crop_scale = box_to_center_scale(bbox, aspect_ratio, BOX_PADDING)

        labelled = np.asarray(vis, dtype=np.float64) > 0
        keypoints = np.zeros((num_joints, 3), dtype=np.float64)
        keypoints[labelled, :2] = joints.astype(np.float64)[labelled] - 1.0
        keypoints[labelled, 2] = 2.0
        extra = {"mpii_center": (float(center[0]), float(center[1])), "mpii_scale": float(scale)}
        if "headbox" in entry:
            extra["headbox"] = np.asarray(entry["headbox"], dtype=np.float64)
        instances.append(
            PersonInstance(
                image_path=str(images_dir / name),
                image_id=_image_id(name, i),
                instance_id=i,
                bbox=bbox,
                keypoints=keypoints,
                area=side * side,
                center=crop_center,
                scale=crop_scale,
                score=1.0,
                dataset="mpii",
                extra=extra,
            )
        )
    return instances
