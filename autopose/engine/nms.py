"""Person scores and OKS-based non-maximum suppression of top-down predictions (HRNet's rules)."""

from __future__ import annotations

import numpy as np

KEYPOINT_SCORE_THRESHOLD = 0.2
OKS_NMS_THRESHOLD = 0.9


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
