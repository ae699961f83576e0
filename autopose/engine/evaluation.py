"""Scores: COCO keypoint AP through pycocotools, MPII PCKh, and a printable table.

OKS AP is always pycocotools' own ``COCOeval(iouType="keypoints")``; this module
only checks the inputs (so that a bad results file fails with one line naming
the file and field instead of an ``AssertionError`` inside pycocotools),
silences pycocotools' prints and names the numbers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from autopose.data.coco import COCO_SIGMAS, coco_api
from autopose.data.mpii import MPII_KEYPOINTS
from autopose.errors import AutoposeError
from autopose.files import is_finite_number, read_json

logger = logging.getLogger(__name__)

# The order of COCOeval.stats for iouType="keypoints" (pycocotools' summarize()).
COCO_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")

# OKS constants for MPII's 16 joints, as mmpose's MPII dataset config gives them
# ("adapted from COCO"; configs/_base_/datasets/mpii.py). Used for OKS AP on an MPII
# proxy split; the MPII benchmark itself is PCKh.
MPII_SIGMAS: np.ndarray = np.array(
    [
        *(0.089, 0.083, 0.107, 0.107, 0.083, 0.089),  # right ankle … left ankle
        *(0.026, 0.026, 0.026, 0.026),  # pelvis, thorax, upper neck, head top
        *(0.062, 0.072, 0.179, 0.179, 0.072, 0.062),  # right wrist … left wrist
    ]
)
MPII_SIGMAS.setflags(write=False)

# MPII's PCKh normalizer: 0.6 × the head box diagonal (SC_BIAS of the official evaluation).
PCKH_HEAD_BIAS = 0.6
_MPII_UPPER_NECK, _MPII_HEAD_TOP = MPII_KEYPOINTS.index("upper_neck"), MPII_KEYPOINTS.index("head_top")

HEAD_SIZE_RULE = (
    "head size = 0.6 × head-box diagonal; without head boxes the box is taken as the square whose side "
    "is the upper_neck–head_top distance L, so head size = 0.6·√2·L ≈ 0.849·L; persons without both "
    "joints are left out"
)


def oks_sigmas(num_joints: int) -> np.ndarray:
    """The OKS constants for ``num_joints`` keypoints: COCO's for 17, mmpose's MPII values for 16.

    Raises:
        AutoposeError: no known constants for that many keypoints.
    """
    if num_joints == len(COCO_SIGMAS):
        return np.asarray(COCO_SIGMAS, dtype=np.float64)
    if num_joints == len(MPII_SIGMAS):
        return np.asarray(MPII_SIGMAS, dtype=np.float64)
    raise AutoposeError(f"no OKS sigmas known for {num_joints} keypoints; pass sigmas explicitly")


# -- COCO keypoint AP ---------------------------------------------------------------------


def load_ground_truth(path: Path) -> COCO:
    """A pycocotools ``COCO`` over a COCO keypoint json, read quietly.

    Annotations without ``num_keypoints`` (which COCOeval needs) get it counted
    from their visibility flags; crowd flags default to 0.

    Raises:
        AutoposeError: the file is missing, not json, or not a COCO keypoint json.
    """
    path = Path(path)
    data = read_json(path)
    if isinstance(data, list):
        raise AutoposeError(
            "this is a list (MPII/HRNet layout?), not a COCO keypoint json; MPII is scored with PCKh",
            path=path,
        )
    if not isinstance(data, dict):
        raise AutoposeError(f"expected a json object, got {type(data).__name__}", path=path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AutoposeError("missing or not a list (not a COCO keypoint json)", path=path, field=key)
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise AutoposeError("expected an object", path=path, field=where)
        for key in ("image_id", "category_id"):
            if not isinstance(ann.get(key), int):
                raise AutoposeError("missing or non-integer", path=path, field=f"{where}.{key}")
        keypoints = ann.get("keypoints")
        if not isinstance(keypoints, list) or len(keypoints) % 3 or not all(map(is_finite_number, keypoints)):
            raise AutoposeError("missing or not [x, y, v] × K numbers", path=path, field=f"{where}.keypoints")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(is_finite_number, bbox))):
            raise AutoposeError("expected [x, y, w, h] numbers", path=path, field=f"{where}.bbox")
        if not is_finite_number(ann.get("area")):
            raise AutoposeError("missing or not a number", path=path, field=f"{where}.area")
        ann.setdefault("num_keypoints", sum(1 for v in keypoints[2::3] if v > 0))
        ann.setdefault("iscrowd", 0)
        ann.setdefault("id", i + 1)
    return coco_api(data)


def _keypoint_category(gt: COCO, source: str) -> tuple[int, int]:
    """(category id, K) of the ground truth's keypoint category (``person`` first)."""
    candidates = [c for c in gt.dataset.get("categories", []) if isinstance(c.get("keypoints"), list)]
    candidates.sort(key=lambda c: c.get("name") != "person")
    if not candidates:
        raise AutoposeError("no category with keypoints", path=source, field="categories")
    return int(candidates[0]["id"]), len(candidates[0]["keypoints"])


def validate_results(results: Any, gt: COCO, source: str) -> list[dict]:
    """Check a COCO keypoint results list against the ground truth.

    Args:
        results: the parsed results (expected: a list of
            ``{"image_id", "category_id", "keypoints": [x, y, s] × K, "score"}``).
        gt: the ground truth.
        source: the results' file name (or a description) for error messages.

    Returns:
        ``results`` (unchanged) once checked.

    Raises:
        AutoposeError: naming ``source`` and the first bad field.
    """
    if not isinstance(results, list):
        raise AutoposeError(f"expected a list of keypoint results, got {type(results).__name__}", path=source)
    category_id, num_joints = _keypoint_category(gt, "ground truth")
    image_ids = set(gt.getImgIds())
    for i, result in enumerate(results):
        where = f"[{i}]"
        if not isinstance(result, dict):
            raise AutoposeError("expected an object", path=source, field=where)
        for key in ("image_id", "category_id", "keypoints", "score"):
            if key not in result:
                raise AutoposeError("missing (not a keypoint result)", path=source, field=f"{where}.{key}")
        if not isinstance(result["image_id"], int) or isinstance(result["image_id"], bool):
            raise AutoposeError("expected an integer", path=source, field=f"{where}.image_id")
        if result["image_id"] not in image_ids:
            raise AutoposeError(
                f"image {result['image_id']} is not in the ground truth",
                path=source,
                field=f"{where}.image_id",
            )
        if result["category_id"] != category_id:
            raise AutoposeError(
                f"expected the keypoint category {category_id}, got {result['category_id']!r}",
                path=source,
                field=f"{where}.category_id",
            )
        keypoints = result["keypoints"]
        if not isinstance(keypoints, list) or len(keypoints) != 3 * num_joints:
            length = len(keypoints) if isinstance(keypoints, list) else type(keypoints).__name__
            raise AutoposeError(
                f"expected {3 * num_joints} numbers ([x, y, score] × {num_joints}), got {length}",
                path=source,
                field=f"{where}.keypoints",
            )
        if not all(map(is_finite_number, keypoints)):
            raise AutoposeError("expected finite numbers", path=source, field=f"{where}.keypoints")
        if not is_finite_number(result["score"]):
            raise AutoposeError("expected a finite number", path=source, field=f"{where}.score")
    return results


def coco_keypoint_ap(
    gt: Path | str | COCO,
    results: list[dict] | Path | str,
    *,
    sigmas: Sequence[float] | np.ndarray | None = None,
) -> dict[str, float]:
    """COCO keypoint AP/AR with pycocotools' ``COCOeval(iouType="keypoints")``.

    Args:
        gt: the ground-truth keypoint json, or a ``COCO`` already built (for
            instance by :func:`autopose.engine.proxy_scoring.proxy_ground_truth`).
        results: COCO keypoint results, as a list or a json file.
        sigmas: per-keypoint OKS constants; default :func:`oks_sigmas` for K.

    Returns:
        ``{"AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL"}`` in
        0…1. A metric pycocotools reports as -1 (no ground truth in that area
        range) is NaN. Empty results give 0.0 everywhere (logged as a warning)
        instead of pycocotools' crash.

    Raises:
        AutoposeError: the ground truth or the results are not what they should be
            (names the file and the field).
    """
    gt_source = str(gt) if not isinstance(gt, COCO) else "ground truth"
    gt_api = gt if isinstance(gt, COCO) else load_ground_truth(Path(gt))
    if isinstance(results, str | Path):
        source = str(results)
        results = read_json(Path(results))
    else:
        source = "results"
    validate_results(results, gt_api, source)
    _, num_joints = _keypoint_category(gt_api, gt_source)
    if not results:
        logger.warning("%s: no keypoint results; every metric is 0", source)
        return dict.fromkeys(COCO_METRICS, 0.0)
    constants = np.asarray(sigmas if sigmas is not None else oks_sigmas(num_joints), dtype=np.float64)
    if constants.shape != (num_joints,):
        raise ValueError(f"sigmas has shape {constants.shape}, the ground truth has {num_joints} keypoints")

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table
        try:
            # loadRes writes ids, areas and boxes into the dicts it gets: hand it a copy.
            dt_api = gt_api.loadRes(copy.deepcopy(results))
            evaluator = COCOeval(gt_api, dt_api, iouType="keypoints")
            evaluator.params.kpt_oks_sigmas = constants
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise AutoposeError(f"pycocotools could not score it ({error!r})", path=gt_source) from None
    return {
        name: (float("nan") if value == -1 else float(value))
        for name, value in zip(COCO_METRICS, evaluator.stats, strict=True)
    }


# -- MPII PCKh ----------------------------------------------------------------------------
def mpii_head_sizes(
    joints: np.ndarray, visible: np.ndarray, headboxes: np.ndarray | None = None
) -> np.ndarray:
    """PCKh normalizers, one per person, in pixels.

    With head boxes (``B×2×2`` or ``B×4`` as ``x1, y1, x2, y2``) this is MPII's own
    rule: ``0.6 × ‖(x2, y2) − (x1, y1)‖``. Without them (the HRNet json, the
    bundled samples) the head box is taken as the square whose side is the
    labelled upper_neck → head_top distance ``L``: ``0.6 · √2 · L ≈ 0.849 · L``.
    A person missing either joint gets NaN (left out of PCKh).

    Args:
        joints: ``B×16×2`` ground-truth joints (MPII order), image pixels.
        visible: ``B×16``; > 0 means labelled.
        headboxes: optional head boxes.

    Returns:
        ``B`` float64 head sizes (NaN where none can be had).
    """
    joints = np.asarray(joints, dtype=np.float64)
    visible = np.asarray(visible) > 0
    if headboxes is not None:
        boxes = np.asarray(headboxes, dtype=np.float64).reshape(-1, 2, 2)
        return PCKH_HEAD_BIAS * np.linalg.norm(boxes[:, 1] - boxes[:, 0], axis=-1)
    side = np.linalg.norm(joints[:, _MPII_HEAD_TOP] - joints[:, _MPII_UPPER_NECK], axis=-1)
    sizes = PCKH_HEAD_BIAS * math.sqrt(2.0) * side
    has_both = visible[:, _MPII_HEAD_TOP] & visible[:, _MPII_UPPER_NECK] & (side > 0)
    return np.where(has_both, sizes, np.nan)


# The joint groups the MPII tables report (HRNet's and the paper's column names).
_MPII_GROUPS: dict[str, tuple[str, ...]] = {
    "Head": ("head_top",),
    "Shoulder": ("left_shoulder", "right_shoulder"),
    "Elbow": ("left_elbow", "right_elbow"),
    "Wrist": ("left_wrist", "right_wrist"),
    "Hip": ("left_hip", "right_hip"),
    "Knee": ("left_knee", "right_knee"),
    "Ankle": ("left_ankle", "right_ankle"),
}
# MPII's mean leaves out pelvis and thorax (HRNet's evaluation masks them too).
_MPII_LEFT_OUT_OF_MEAN = ("pelvis", "thorax")


def pckh(
    pred: np.ndarray,
    gt: np.ndarray,
    visible: np.ndarray,
    head_sizes: np.ndarray,
    threshold: float = 0.5,
    joint_names: Sequence[str] = MPII_KEYPOINTS,
) -> dict[str, float]:
    """PCKh: the percentage of labelled joints within ``threshold × head size`` of the truth.

    Args:
        pred: ``B×K×2`` predicted joints, image pixels.
        gt: ``B×K×2`` ground-truth joints.
        visible: ``B×K``; > 0 means labelled (MPII's ``joints_vis``).
        head_sizes: ``B`` normalizers (see :func:`mpii_head_sizes`); a NaN or
            non-positive one leaves that person out.
        threshold: 0.5 for PCKh@0.5.
        joint_names: names of the K joints (MPII's 16 by default).

    Returns:
        Percentages 0…100: one per joint (by name), and for MPII's 16 joints the
        table's groups (``Head``, ``Shoulder``, … ``Ankle``: the mean of left and
        right), then ``Mean`` over all labelled joints except pelvis and thorax
        (weighted by joint count, as MPII's evaluation does); plus ``persons``
        (scored) and ``persons_left_out`` (no head size). A joint never labelled is NaN.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    head_sizes = np.asarray(head_sizes, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be B×K×2")
    if len(joint_names) != gt.shape[1]:
        raise ValueError(f"{len(joint_names)} joint names for {gt.shape[1]} joints")
    scored = np.isfinite(head_sizes) & (head_sizes > 0)
    counted = (np.asarray(visible) > 0) & scored[:, None]
    safe_sizes = np.where(scored, head_sizes, 1.0)
    distance = np.linalg.norm(pred - gt, axis=-1) / safe_sizes[:, None]
    hits = (distance <= threshold) & counted
    hit_count, joint_count = hits.sum(axis=0), counted.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_joint = 100.0 * hit_count / joint_count

    metrics: dict[str, float] = {name: float(v) for name, v in zip(joint_names, per_joint, strict=True)}
    names = list(joint_names)
    if tuple(names) == MPII_KEYPOINTS:
        for group, members in _MPII_GROUPS.items():
            metrics[group] = float(np.mean([metrics[m] for m in members]))
    in_mean = np.array([name not in _MPII_LEFT_OUT_OF_MEAN for name in names])
    total = joint_count[in_mean].sum()
    metrics["Mean"] = float(100.0 * hit_count[in_mean].sum() / total) if total else float("nan")
    metrics["persons"] = float(scored.sum())
    metrics["persons_left_out"] = float((~scored).sum())
    return metrics


# -- presentation -------------------------------------------------------------------------
def format_table(metrics: Mapping[str, float], *, title: str | None = None, notes: Sequence[str] = ()) -> str:
    """A two-column text table of metrics (NaN shown as ``n/a``), with optional notes below.

    Whole numbers (counts) print without decimals, other values with three.
    """
    width = max([len(name) for name in metrics] + [6])
    lines = []
    if title:
        lines += [title, "-" * max(len(title), width + 12)]
    for name, value in metrics.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            text = "n/a"
        elif float(value).is_integer() and name.startswith("persons"):
            text = f"{int(value)}"
        else:
            text = f"{float(value):.3f}"
        lines.append(f"{name:<{width}}  {text:>9}")
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)
