"""Heatmap codec: keypoints ↔ Gaussian heatmaps at 1/4 resolution.

One object owns both directions so that the training targets and the decoded
predictions always agree on the geometry. Coordinates follow
:mod:`autopose.data.transforms` (pixel centers on integers). With stride ``s``
the heatmap pixel ``j`` covers input pixels ``[j·s, (j+1)·s)``, so an input
coordinate ``x`` sits at heatmap coordinate ``(x + 0.5) / s − 0.5``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from autopose.data.transforms import crop_matrix, invert_affine

# HRNet and SimpleBaseline train with σ = 2 heatmap pixels at 256×192 and σ = 3 at 384×288: the
# Gaussian keeps its size relative to the person as the input grows.
SIGMA_AT_256 = 2.0


def heatmap_sigma(input_size: tuple[int, int]) -> float:
    """The target Gaussian's σ in heatmap pixels for an input of ``(height, width)``: 2 at 256 rows,
    growing with the height above (3 at 384×288), and never below 2 (at smaller inputs a narrower
    peak falls between heatmap pixels and its argmax is no longer stable)."""
    return SIGMA_AT_256 * max(1.0, input_size[0] / 256.0)


class HeatmapCodec:
    """Encode keypoints as Gaussian heatmaps and decode heatmaps back.

    Args:
        input_size: ``(height, width)`` of the network input (crop).
        stride: input pixels per heatmap pixel (4: 256×192 → 64×48).
        sigma: Gaussian standard deviation in heatmap pixels (``None``: by the input size,
            :func:`heatmap_sigma`).
        blur_kernel: odd size of the Gaussian blur applied before the argmax
            when decoding (0 or 1 turns it off). The blur steadies the argmax of
            noisy predictions; with the default 3 taps an exact target decodes
            within 1 input pixel wherever the keypoint lies at least two heatmap
            pixels inside the border (measured: 5 taps need three). Nearer the
            border the Gaussian is cut off and any blur pulls the peak inward.
    """

    def __init__(
        self,
        input_size: tuple[int, int] = (256, 192),
        stride: int = 4,
        sigma: float | None = None,
        blur_kernel: int = 3,
    ):
        height, width = input_size
        if height % stride or width % stride:
            raise ValueError(f"input size {input_size} is not a multiple of stride {stride}")
        self.input_size = (int(height), int(width))
        self.stride = int(stride)
        self.sigma = float(sigma) if sigma is not None else heatmap_sigma(self.input_size)
        self.heatmap_size = (height // stride, width // stride)
        self.blur_kernel = int(blur_kernel)

    # -- coordinates ---------------------------------------------------------------
    def to_heatmap_coords(self, xy: torch.Tensor) -> torch.Tensor:
        return (xy + 0.5) / self.stride - 0.5

    def to_input_coords(self, xy: torch.Tensor) -> torch.Tensor:
        return (xy + 0.5) * self.stride - 0.5

    # -- encode --------------------------------------------------------------------
    def encode(
        self, keypoints: torch.Tensor | np.ndarray, visibility: torch.Tensor | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian targets for keypoints in input pixels.

        Args:
            keypoints: ``…×K×2`` ``(x, y)`` in input (crop) pixels.
            visibility: ``…×K``; 0 means absent.

        Returns:
            ``heatmaps …×K×h×w`` float32 with peak 1 at each keypoint, and
            ``target_weight …×K`` float32: 1 for a labelled keypoint inside the
            crop, else 0 (its heatmap is all zeros).
        """
        keypoints = torch.as_tensor(keypoints, dtype=torch.float32)
        visibility = torch.as_tensor(visibility, dtype=torch.float32, device=keypoints.device)
        h, w = self.heatmap_size
        in_h, in_w = self.input_size
        x, y = keypoints[..., 0], keypoints[..., 1]
        inside = (x >= -0.5) & (x <= in_w - 0.5) & (y >= -0.5) & (y <= in_h - 0.5)
        weight = ((visibility > 0) & inside).to(torch.float32)
        mu = self.to_heatmap_coords(keypoints)
        xs = torch.arange(w, dtype=torch.float32, device=keypoints.device)
        ys = torch.arange(h, dtype=torch.float32, device=keypoints.device)
        gx = torch.exp(-((xs - mu[..., 0:1]) ** 2) / (2 * self.sigma**2))  # …×K×w
        gy = torch.exp(-((ys - mu[..., 1:2]) ** 2) / (2 * self.sigma**2))  # …×K×h
        heatmaps = gy[..., :, None] * gx[..., None, :] * weight[..., None, None]
        return heatmaps, weight

    # -- decode --------------------------------------------------------------------
    def _blur(self, heatmaps: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur that treats pixels beyond the border as missing
        (normalized convolution), so that a peak near the border does not drift."""
        k = self.blur_kernel
        if k <= 1:
            return heatmaps
        sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # the usual sigma for a k-tap Gaussian
        taps = torch.arange(k, dtype=heatmaps.dtype, device=heatmaps.device) - (k - 1) / 2
        kernel1d = torch.exp(-(taps**2) / (2 * sigma**2))
        b, c, h, w = heatmaps.shape
        flat = torch.cat([heatmaps.reshape(b * c, 1, h, w), heatmaps.new_ones(1, 1, h, w)])
        flat = F.conv2d(flat, kernel1d.view(1, 1, 1, k), padding=(0, k // 2))
        flat = F.conv2d(flat, kernel1d.view(1, 1, k, 1), padding=(k // 2, 0))
        return (flat[:-1] / flat[-1:]).reshape(b, c, h, w)

    @torch.no_grad()
    def decode(self, heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keypoints in input pixels from heatmaps.

        Blur, take the argmax, then move a quarter heatmap pixel toward the
        higher neighbour on each axis.

        Args:
            heatmaps: ``B×K×h×w``.

        Returns:
            ``keypoints B×K×2`` in input pixels and ``scores B×K`` (the peak value
            of the raw heatmap).
        """
        heatmaps = heatmaps.detach().float()
        b, k, h, w = heatmaps.shape
        scores, flat_index = heatmaps.reshape(b, k, -1).max(dim=-1)
        smooth = self._blur(heatmaps)
        _, flat_index = smooth.reshape(b, k, -1).max(dim=-1)
        px = (flat_index % w).long()
        py = (flat_index // w).long()
        coords = torch.stack([px, py], dim=-1).to(torch.float32)

        def at(xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            """Blurred value at (xx, yy); zero beyond the border."""
            inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).unsqueeze(-1)
            return smooth.reshape(b, k, -1).gather(-1, index).squeeze(-1) * inside

        dx = torch.sign(at(px + 1, py) - at(px - 1, py))
        dy = torch.sign(at(px, py + 1) - at(px, py - 1))
        coords = coords + 0.25 * torch.stack([dx, dy], dim=-1)
        return self.to_input_coords(coords), scores

    def decode_to_image(
        self, heatmaps: torch.Tensor, centers: np.ndarray, scales: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode and map back to image pixels.

        Args:
            heatmaps: ``B×K×h×w``.
            centers: ``B×2`` crop centers in image pixels.
            scales: ``B×2`` crop extents ``(w, h)`` in image pixels.

        Returns:
            ``keypoints B×K×2`` in image pixels (float64) and ``scores B×K``.
        """
        coords, scores = self.decode(heatmaps)
        coords = coords.cpu().numpy().astype(np.float64)
        out = np.empty_like(coords)
        for i in range(coords.shape[0]):
            inverse = invert_affine(crop_matrix(centers[i], scales[i], self.input_size))
            out[i] = coords[i] @ inverse[:, :2].T + inverse[:, 2]
        return out, scores.cpu().numpy()

    def __repr__(self) -> str:
        return (
            f"HeatmapCodec(input_size={self.input_size}, heatmap_size={self.heatmap_size}, "
            f"sigma={self.sigma}, blur_kernel={self.blur_kernel})"
        )
