"""The picture of a policy: it applied to real crops, keypoints drawn (``policy/examples.png``).

Kept beside the other pictures' code, apart from MLflow's: a trial's run logs it, the report
shows it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autopose.files import save_figure

AugmentFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


def render_policy_examples(
    augment: AugmentFn,
    rows: Sequence[Mapping[str, Any]],
    out: str | Path,
    *,
    title: str,
    skeleton: Sequence[Sequence[int]] = (),
    draws: int = 2,
    seed: int = 0,
) -> Path:
    """A PNG of a policy applied to real crops, keypoints drawn.

    The first row shows the crops as they are; each further row one random draw
    of the policy on the same crops. Visible keypoints are filled dots, occluded
    ones hollow; keypoints the policy pushed out of the crop are not drawn.

    Args:
        augment: ``(images B×3×H×W float, keypoints B×K×2, visibility B×K)`` →
            the same, augmented.
        rows: proxy items (``image`` uint8 3×H×W, ``keypoints``, ``visibility``).
        out: the PNG file (written atomically).
        title: the figure's title.
        skeleton: joint index pairs to draw as limbs.
        draws: augmented rows below the originals.
        seed: seeds torch's generator around the draws (restored afterwards).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = torch.stack([torch.as_tensor(np.asarray(r["image"])) for r in rows]).float() / 255.0
    keypoints = torch.stack([torch.as_tensor(np.asarray(r["keypoints"]), dtype=torch.float32) for r in rows])
    visibility = torch.stack(
        [torch.as_tensor(np.asarray(r["visibility"]), dtype=torch.float32) for r in rows]
    )
    panels = [(images, keypoints, visibility)]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for _ in range(draws):
            panels.append(
                tuple(t.detach() for t in augment(images.clone(), keypoints.clone(), visibility.clone()))
            )

    count = images.shape[0]
    height, width = images.shape[-2:]
    scale = 1.6 / max(height, width) * 100
    figure, axes = plt.subplots(
        len(panels),
        count,
        figsize=(max(count * width * scale / 100, 4), len(panels) * height * scale / 100 + 0.5),
        squeeze=False,
    )
    for row, (batch_images, batch_keypoints, batch_visibility) in enumerate(panels):
        for column in range(count):
            axis = axes[row][column]
            axis.imshow(batch_images[column].clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            points = batch_keypoints[column].numpy()
            seen = batch_visibility[column].numpy()
            for a, b in skeleton:
                if seen[a] > 0 and seen[b] > 0:
                    axis.plot(points[[a, b], 0], points[[a, b], 1], color="yellow", linewidth=0.8)
            for value, style in ((2, {"c": "red"}), (1, {"facecolors": "none", "edgecolors": "red"})):
                picked = seen == value
                axis.scatter(points[picked, 0], points[picked, 1], s=6, linewidths=0.6, **style)
            axis.set_xlim(-0.5, width - 0.5)
            axis.set_ylim(height - 0.5, -0.5)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row][0].set_ylabel("original" if row == 0 else f"draw {row}", fontsize=7)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return save_figure(figure, out, dpi=150)
