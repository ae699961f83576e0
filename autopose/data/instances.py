"""The person instance: one annotated (or detected) person in one image."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PersonInstance:
    """One person, in image pixels.

    Attributes:
        image_path: path of the source image.
        image_id: dataset image id.
        instance_id: annotation id (or detection index).
        bbox: ``(x, y, w, h)`` in image pixels, float.
        keypoints: ``K×3`` float array ``(x, y, v)`` in image pixels; ``v`` is
            0 (absent), 1 (occluded) or 2 (seen).
        area: segmentation area (COCO) or box area.
        center: ``(2,)`` crop center in image pixels (from :func:`box_to_center_scale`).
        scale: ``(2,)`` crop size ``(w, h)`` in image pixels, padded and with the
            crop's aspect ratio.
        score: box score (1.0 for ground truth).
        dataset: ``"coco"``, ``"mpii"`` or ``"synth"``.
    """

    image_path: str
    image_id: int
    instance_id: int
    bbox: np.ndarray
    keypoints: np.ndarray
    area: float
    center: np.ndarray
    scale: np.ndarray
    score: float = 1.0
    dataset: str = "coco"
    extra: dict = field(default_factory=dict)

    @property
    def num_visible(self) -> int:
        return int((self.keypoints[:, 2] > 0).sum())
