"""``autopose evaluate``: a checkpoint on a COCO or MPII annotation file, or a results file, scored.

COCO: ground-truth boxes (the labelled, non-crowd persons, as HRNet counts) or a detector's
boxes, pycocotools OKS AP; MPII: PCKh@0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autopose.data.coco import flip_pairs_from_names, load_coco, load_coco_detections
from autopose.data.codec import HeatmapCodec
from autopose.data.mpii import MPII_FLIP_PAIRS, MPII_KEYPOINTS, is_mpii_layout, load_mpii
from autopose.engine.evaluation import (
    HEAD_SIZE_RULE,
    coco_keypoint_ap,
    format_table,
    load_ground_truth,
    mpii_head_sizes,
    pckh,
    read_json,
)
from autopose.engine.inference import predict, predict_instances, write_results
from autopose.errors import AutoposeError


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
