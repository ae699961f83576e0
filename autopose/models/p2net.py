"""P2Net: the Augmented Parallel-Pyramid Net (Hou et al., "Augmented Parallel-Pyramid
Net for Attention Guided Pose Estimation", 2020), in one file.

The network, for an input ``B×3×H×W`` in 0…1 (level ``l`` = 0…3 has stride
``4·2^l``; ``K`` joints)::

    ImageNet normalization
    ResNet backbone            C2 … C5          strides 4, 8, 16, 32
    PyramidNet                 P2 … P5          1×1 laterals, nearest upsample, sum
    fusion, one of
      ParallelNet              X2 … X5          branches keep their resolution; exchange units
      ProgressiveFusion        F5 → F4 → … F2   coarse to fine, one level after the other
      (nothing: ``use_parallel=False``)
      + a 3×3 heatmap head per level          → 4 intermediate heatmaps
    RefineNet                                   APM → dilated bottlenecks per level,
                                                upsample, concatenate, bottleneck, 3×3 head

Training mode returns ``[head(level 0), head(level 1), head(level 2), head(level 3),
refined]``, every one ``B×K×H/4×W/4``: the heads of the coarser levels are
predicted at their own resolution by a 3×3 conv and upsampled bilinearly to 1/4
(CPN's GlobalNet supervises its coarse levels at 1/4 too, so all targets come from
one codec). Eval mode returns only the last, RefineNet's heatmaps.

Parallel Fusion (the paper's Eq. 1–3). Branch ``r`` keeps its resolution across
stages (``R_sr = R_(s+1)r``). A stage runs ``parallel_blocks`` basic residual blocks
on every branch, then an exchange unit ``Y_r = ReLU(Σ_s f_sr(X_s))`` with
``f_sr`` = identity when ``s = r``; one strided 3×3 conv (+BN) per 2× when ``s`` is
finer (ReLU between them; two convs for 4×, three for 8×); a 1×1 conv (+BN) then
nearest upsampling when ``s`` is coarser.

Progressive Fusion (the paper's second version names it without more detail; this
is its plainest reading). Levels are fused one after another, coarse to fine:
``F5 = blocks(ReLU(T5(P5)))`` and ``F_l = blocks(ReLU(up(T(F_(l+1))) + T_l(P_l)))``,
where ``T`` are 1×1 convs (+BN) that set the level's width, ``up`` is nearest
upsampling to level ``l`` and ``blocks`` are ``parallel_stages × parallel_blocks``
basic residual blocks (as many as a ParallelNet branch runs, so the two fusions
cost about the same).

Attention Partial Module (Eq. 4–5): ``x · sigmoid(W · GAP(x) + b)``, a channel
reweighting with one 1×1 conv on the globally pooled features.

Channel widths (the defaults of :class:`P2NetConfig`) and why. The paper's table gives
P2Net-R101 at 384×288: 42.5M parameters and 26.3 GFLOPs. ResNet-101 without its
classifier alone has 42.50M parameters and 17.19 G multiply-adds (MACs) at 384×288,
so the neck may add at most ~4M parameters (+10%) yet must add 6.5–11.7 G MACs:
its weight has to sit at the fine levels, where a parameter is used most often.

* ``pyramid_channels=128``: CPN's pyramid is 256 wide, but there the 2048→256
  lateral alone holds 0.5M parameters; at 128 all four laterals hold 0.49M.
* ``parallel_channels=(64, 64, 64, 64)``: one width on every level, as in FPN and
  CPN pyramids. HRNet's doubling widths (32, 64, 128, 256) put the parameters at the
  coarse levels, where they add little computation, and overshoot the budget.
* ``parallel_stages=2``, ``parallel_blocks=1``: two exchange units, each after one
  basic block per branch (0.69M parameters, 0.96 G MACs per stage).
* ``refine_channels=256`` (CPN's RefineNet width) and ``refine_blocks=(1, 1, 2, 3)``
  (finest first): the paper stacks more dilated bottlenecks into the deeper levels without
  giving a count. CPN's RefineNet uses 0–3 (``(0, 1, 2, 3)``), which drops the finest level's
  bottleneck and lands at 46.36M and 22.87 GFLOPs (MACs/2^30, −13%); one on every level as in
  earlier versions of this model, ``(1, 1, 1, 1)``, gives 45.90M and 23.95. ``(1, 1, 2, 3)``
  keeps one at the finest level and adds one per deeper level from the third. The 4×256-channel
  concatenation at stride 4 and its bottleneck carry most of the neck's computation.

Result (``autopose model-info --arch p2net_r101 --input 384x288``; MACs counted as
described in :mod:`autopose.models.complexity`):

==================== ============== ================== ===================
                     parameters     GFLOPs MACs/2^30   GFLOPs MACs/1e9
==================== ============== ================== ===================
paper                42.5M          26.3               26.3
this P2Net-R101      46.55M (+9.5%) 24.08 (−8.4%)      25.85 (−1.7%)
==================== ============== ================== ===================

Both GFLOP conventions land within ±10%; MACs/1e9 is the closer match. (The
paper's 42.5M equals ResNet-101 without its classifier, so any neck lands above it.)
The same neck on ResNet-50 at 256×192: 7.31 GFLOPs (MACs/2^30; 27.6M parameters) against
SimpleBaseline-R50's 5.05 (its deconvolutions counted exactly; HRNet's code counts
them 4× and prints 8.9).

Speed: matching the paper's cost needs 1.45× SimpleBaseline-R50's multiply-adds at 256×192;
the train-step target is that P2Net costs no more per multiply-add (``benchmarks/models.py``).
A CPU train step measured 1.56–1.6× with one bottleneck per level (single thread, process CPU
time, batch 8), an H200 1.9–2.3× (bf16, batch 128): the fusion's many small convolutions, sums
and upsamplings cost more than their multiply-adds. ``refine_channels=128`` brings the MACs to
1.07×, but P2Net-R101 then lands 19–25% below the paper. The defaults follow the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from autopose.models.backbone import ImageNormalize, ResNetBackbone

# The paper's table: P2Net-R101, 384×288 input.
PAPER_R101_384x288 = {"params": 42.5e6, "gflops": 26.3}
# RefineNet's dilated bottlenecks per level, finest first: more in the deeper levels, as the paper
# stacks them (see the module docstring for the layouts measured against its table).
PAPER_REFINE_BLOCKS = (1, 1, 2, 3)


@dataclass(frozen=True)
class P2NetConfig:
    """Everything that shapes a P2Net (see the module docstring for the defaults' reasons).

    Attributes:
        depth: ResNet depth (18, 34, 50, 101, 152).
        num_joints: heatmap channels ``K``.
        pyramid_channels: width of PyramidNet's levels.
        parallel_channels: width of each fusion level, finest first.
        parallel_stages: exchange units in ParallelNet.
        parallel_blocks: basic residual blocks per branch per stage.
        refine_channels: width of RefineNet's levels (the concatenation has four times this).
        refine_blocks: dilated bottlenecks per RefineNet level, finest first.
        fusion: ``"parallel"`` (ParallelNet) or ``"progressive"``.
        use_apm: Attention Partial Modules in RefineNet (ablation: off).
        use_parallel: the fusion stage at all (ablation: off → heads and RefineNet
            read PyramidNet's levels directly).
    """

    depth: int = 50
    num_joints: int = 17
    pyramid_channels: int = 128
    parallel_channels: tuple[int, int, int, int] = (64, 64, 64, 64)
    parallel_stages: int = 2
    parallel_blocks: int = 1
    refine_channels: int = 256
    refine_blocks: tuple[int, int, int, int] = PAPER_REFINE_BLOCKS
    fusion: Literal["parallel", "progressive"] = "parallel"
    use_apm: bool = True
    use_parallel: bool = True


# -- building blocks ------------------------------------------------------------------------
def conv_bn(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias: BN follows) + BatchNorm; padding keeps the size at stride 1."""
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
    )


def resize_to(x: torch.Tensor, like: torch.Tensor | tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Resample ``x`` to the spatial size of ``like`` (sizes need not be exact multiples)."""
    size = tuple(like.shape[-2:]) if isinstance(like, torch.Tensor) else like
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity shortcut: ``B×C×h×w → B×C×h×w``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels, 3)
        self.conv2 = conv_bn(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class DilatedBottleneck(nn.Module):
    """1×1 → dilated 3×3 → 1×1 with a shortcut: ``B×in×h×w → B×out×h×w``.

    The dilation widens the receptive field at no cost in resolution or parameters.
    """

    def __init__(self, in_ch: int, out_ch: int, dilation: int = 2):
        super().__init__()
        mid = out_ch // 2
        self.reduce = conv_bn(in_ch, mid, 1)
        self.spatial = conv_bn(mid, mid, 3, dilation=dilation)
        self.expand = conv_bn(mid, out_ch, 1)
        self.shortcut = nn.Identity() if in_ch == out_ch else conv_bn(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(F.relu(self.spatial(F.relu(self.reduce(x)))))
        return F.relu(y + self.shortcut(x))


class AttentionPartialModule(nn.Module):
    """Channel attention (Eq. 4–5): ``x · sigmoid(conv1×1(GAP(x)))``, shape kept ``B×C×h×w``."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))  # B×C×1×1
        return x * weights


# -- the neck ---------------------------------------------------------------------------------
class PyramidNet(nn.Module):
    """Top-down pyramid: ``P5 = L5(C5)``, ``P_l = L_l(C_l) + up(P_(l+1))``.

    ``[C2…C5]`` (backbone widths) → ``[P2…P5]``, all ``channels`` wide, same resolutions.
    """

    def __init__(self, in_channels: tuple[int, ...], channels: int):
        super().__init__()
        self.laterals = nn.ModuleList(conv_bn(c, channels, 1) for c in in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        levels = [lateral(x) for lateral, x in zip(self.laterals, features, strict=True)]
        for i in range(len(levels) - 2, -1, -1):
            levels[i] = levels[i] + resize_to(levels[i + 1], levels[i])
        return [F.relu(x) for x in levels]


class ExchangeUnit(nn.Module):
    """Eq. 1–3: every output branch sums every input branch brought to its resolution and width."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.paths = nn.ModuleList()
        for r, out_ch in enumerate(channels):
            row = nn.ModuleList()
            for s, in_ch in enumerate(channels):
                if s == r:
                    row.append(nn.Identity())
                elif s > r:  # coarser → finer: 1×1 conv at the coarse level, then nearest upsample
                    row.append(conv_bn(in_ch, out_ch, 1))
                else:  # finer → coarser: one strided 3×3 conv per 2×
                    steps: list[nn.Module] = []
                    for _ in range(r - s - 1):
                        steps += [conv_bn(in_ch, in_ch, 3, stride=2), nn.ReLU(inplace=True)]
                    steps.append(conv_bn(in_ch, out_ch, 3, stride=2))
                    row.append(nn.Sequential(*steps))
            self.paths.append(row)

    def forward(self, branches: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for r, row in enumerate(self.paths):
            total = branches[r]
            for s, path in enumerate(row):
                if s != r:
                    total = total + resize_to(path(branches[s]), branches[r])
            outputs.append(F.relu(total))
        return outputs


class ParallelNet(nn.Module):
    """Parallel Fusion: ``[P2…P5]`` → ``[X2…X5]`` (widths ``channels``, resolutions kept)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], stages: int, blocks: int):
        super().__init__()
        self.entry = nn.ModuleList(
            nn.Sequential(conv_bn(in_channels, c, 1), nn.ReLU(inplace=True)) for c in channels
        )
        self.stages = nn.ModuleList()
        for _ in range(stages):
            branch_blocks = nn.ModuleList(
                nn.Sequential(*(BasicBlock(c) for _ in range(blocks))) for c in channels
            )
            self.stages.append(nn.ModuleList([branch_blocks, ExchangeUnit(channels)]))

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        branches = [entry(x) for entry, x in zip(self.entry, levels, strict=True)]
        for branch_blocks, exchange in self.stages:
            branches = exchange([blocks(x) for blocks, x in zip(branch_blocks, branches, strict=True)])
        return branches


class ProgressiveFusion(nn.Module):
    """Progressive Fusion: coarse to fine, ``[P2…P5]`` → ``[F2…F5]`` (widths ``channels``)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], blocks: int):
        super().__init__()
        self.level_in = nn.ModuleList(conv_bn(in_channels, c, 1) for c in channels)
        # carry[i] brings the running map from level i+1's width to level i's, at the coarse level.
        self.carry = nn.ModuleList(conv_bn(channels[i + 1], channels[i], 1) for i in range(len(channels) - 1))
        self.refine = nn.ModuleList(nn.Sequential(*(BasicBlock(c) for _ in range(blocks))) for c in channels)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        coarsest = len(levels) - 1
        fused: list[torch.Tensor] = [None] * len(levels)  # type: ignore[list-item]
        fused[coarsest] = self.refine[coarsest](F.relu(self.level_in[coarsest](levels[coarsest])))
        for i in range(coarsest - 1, -1, -1):
            running = resize_to(self.carry[i](fused[i + 1]), levels[i])
            fused[i] = self.refine[i](F.relu(running + self.level_in[i](levels[i])))
        return fused


class RefineNet(nn.Module):
    """Per level APM → dilated bottlenecks; upsample to 1/4; concatenate; bottleneck; 3×3 head.

    ``[X2…X5]`` → ``B×K×H/4×W/4``.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...],
        channels: int,
        blocks: tuple[int, ...],
        num_joints: int,
        use_apm: bool,
    ):
        super().__init__()
        self.levels = nn.ModuleList()
        for in_ch, count in zip(in_channels, blocks, strict=True):
            layers: list[nn.Module] = [AttentionPartialModule(in_ch)] if use_apm else []
            layers += [DilatedBottleneck(in_ch if i == 0 else channels, channels) for i in range(count)]
            if count == 0 and in_ch != channels:
                layers.append(nn.Sequential(conv_bn(in_ch, channels, 1), nn.ReLU(inplace=True)))
            self.levels.append(nn.Sequential(*layers))
        self.fuse = DilatedBottleneck(channels * len(in_channels), channels, dilation=1)
        self.head = nn.Conv2d(channels, num_joints, 3, padding=1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        finest = levels[0]
        refined = [resize_to(net(x), finest, "bilinear") for net, x in zip(self.levels, levels, strict=True)]
        return self.head(self.fuse(torch.cat(refined, dim=1)))


# -- the network ---------------------------------------------------------------------------
class P2Net(nn.Module):
    """Backbone → PyramidNet → fusion (+ intermediate heads) → RefineNet.

    Forward: ``B×3×H×W`` in 0…1 (H, W multiples of 4; normalized inside) →
    training: list of 5 tensors ``B×K×H/4×W/4`` (4 intermediate heads finest
    first, RefineNet last); eval: the RefineNet tensor.
    """

    def __init__(self, config: P2NetConfig):
        super().__init__()
        self.config = config
        self.normalize = ImageNormalize()
        self.backbone = ResNetBackbone(config.depth)
        self.pyramid = PyramidNet(self.backbone.out_channels, config.pyramid_channels)
        widths = tuple(config.parallel_channels)
        self.fusion: nn.Module
        if not config.use_parallel:
            self.fusion = nn.Identity()
            widths = (config.pyramid_channels,) * 4
        elif config.fusion == "parallel":
            self.fusion = ParallelNet(
                config.pyramid_channels, widths, config.parallel_stages, config.parallel_blocks
            )
        elif config.fusion == "progressive":
            self.fusion = ProgressiveFusion(
                config.pyramid_channels, widths, config.parallel_stages * config.parallel_blocks
            )
        else:
            raise ValueError(f"fusion must be 'parallel' or 'progressive', got {config.fusion!r}")
        self.heads = nn.ModuleList(nn.Conv2d(c, config.num_joints, 3, padding=1) for c in widths)
        self.refine = RefineNet(
            widths, config.refine_channels, config.refine_blocks, config.num_joints, config.use_apm
        )
        self._init_weights()

    def _init_weights(self) -> None:
        backbone = set(self.backbone.modules())
        for module in self.modules():
            if module in backbone:
                continue  # torchvision's own initialization (or the pretrained weights)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for head in [*self.heads, self.refine.head]:
            # Small heads start near zero, like the all-zero background of the targets.
            nn.init.normal_(head.weight, std=0.001)
            nn.init.zeros_(head.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        features = self.backbone(self.normalize(images))
        levels = self.fusion(self.pyramid(features))
        refined = self.refine(levels)
        if not self.training:
            return refined
        size = refined.shape[-2:]
        intermediate = [
            resize_to(head(x), size, "bilinear") for head, x in zip(self.heads, levels, strict=True)
        ]
        return [*intermediate, refined]
