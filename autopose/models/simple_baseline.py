"""SimpleBaseline (Xiao et al., "Simple Baselines for Human Pose Estimation and
Tracking", ECCV 2018): a ResNet, three deconvolutions and a 1×1 heatmap head.

The comparison model for P2Net. Shapes: ``B×3×H×W`` (0…1) → C5 ``B×8C×H/32×W/32``
→ three 4×4 stride-2 deconvolutions (256 channels, BN, ReLU) → ``B×256×H/4×W/4``
→ 1×1 conv → heatmaps ``B×K×H/4×W/4``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autopose.models.backbone import ImageNormalize, ResNetBackbone


class SimpleBaseline(nn.Module):
    """ResNet + 3 deconvolutions + 1×1 head.

    Args:
        depth: ResNet depth (18, 34, 50, 101, 152).
        num_joints: heatmap channels ``K``.
        deconv_channels: width of the deconvolution layers (256 in the paper).

    Forward: ``B×3×H×W`` in 0…1 (exact for multiples of 32; other multiples of 4
    are resized to 1/4 before the head) → in training mode a one-element list
    ``[B×K×H/4×W/4]`` (the same layout as P2Net's list of stage outputs), in eval
    mode the tensor itself.
    """

    def __init__(self, depth: int = 50, num_joints: int = 17, deconv_channels: int = 256):
        super().__init__()
        self.normalize = ImageNormalize()
        self.backbone = ResNetBackbone(depth)
        layers: list[nn.Module] = []
        channels = self.backbone.out_channels[-1]
        for _ in range(3):
            layers += [
                nn.ConvTranspose2d(channels, deconv_channels, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(deconv_channels),
                nn.ReLU(inplace=True),
            ]
            channels = deconv_channels
        self.deconv = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, num_joints, 1)
        for module in self.deconv.modules():
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.normal_(module.weight, std=0.001)
        nn.init.normal_(self.head.weight, std=0.001)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        features = self.deconv(self.backbone(self.normalize(images))[-1])
        size = (images.shape[-2] // 4, images.shape[-1] // 4)
        if features.shape[-2:] != size:
            # Inputs that are not multiples of 32 round C5 up; bring the map back to 1/4.
            features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        heatmaps = self.head(features)
        return [heatmaps] if self.training else heatmaps
