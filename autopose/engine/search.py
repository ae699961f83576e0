"""The bi-level search step: weights on augmented training data, the policy on validation loss.

One :meth:`BilevelSearch.step`:

1. the :class:`~autopose.augment.RelaxedPolicy` augments the training batch
   with one set of random draws (Gumbel, Bernoulli, Cutout), kept for every
   pass below; heatmap targets are encoded from the moved keypoints;
2. the weights' gradient ``g = ∇w L_train(w, α)`` (one forward and backward of
   the real model, which also updates the BatchNorm running statistics);
3. the unrolled weights ``w' = w − ζ g`` and ``v = ∇w' L_val(w')`` on the
   un-augmented validation batch;
4. the policy's gradient, the paper's Eq. 8 ``∇α L_val(w − ζ ∇w L_train(w, α))``.
   The validation batch is not augmented, so ``L_val`` reaches ``α`` only through
   ``w'``: the gradient is ``−ζ ∇²_{α,w} L_train · v`` (plain first order gives
   ``α`` nothing, so it is not offered). The mixed product is computed
   * ``hessian="finite_difference"`` (DARTS, Liu et al. 2019):
     ``[∇α L_train(w + εv) − ∇α L_train(w − εv)] / 2ε`` with ``ε = 0.01 / ‖v‖``;
   * ``hessian="exact"``: forward-mode over reverse-mode autodiff (``torch.func``),
     the directional derivative of the training gradient along ``v`` — a check
     of the finite difference, and slower;
5. the policy's optimizer steps, then the weights' optimizer steps with ``g``
   from step 2 (reused, not recomputed).

What is reused. ``α`` acts on the loss only through the augmented images, so
``∇α L_train(w±) = Jᵀ ∇x L_train(w±)`` with ``J = ∂x_aug/∂α`` (``x`` the augmented
images and their heatmap targets). The policy runs
forward ONCE; the passes at ``w ± εv`` are model passes on the same detached
augmented images that stop at the image gradient (no weight gradients are
computed there), and one backward through the policy's graph applies ``Jᵀ`` to
their difference. The same draws are thus used in every pass by construction.
Cost of a step: one policy forward and one backward; one model forward and
backward on the training batch (step 2, the plain train step itself); one on
the validation batch (step 3); two forwards with image-only backwards at
``w ± εv`` (one with ``central=False``, which reuses step 2's image gradient
as the point at ``w``).

Accuracy of the finite difference. On a smooth network it agrees with the
exact product at DARTS' radius (cosine 1.0000, relative error 1e-4, in float32
and float64; ``tests/engine/test_search.py``). On ReLU / max-pool networks such
as P2Net the image gradient jumps wherever a unit switches on or off, and a
step of 0.01 in weight space crosses many such switches: the finite difference
is then the secant across them, not the pointwise derivative, and the two
differ batch by batch (``benchmarks/augment.py`` prints their agreement on
P2Net). They agree again as the radius shrinks (float64, radius 1e-4), but in
float32 a small radius drowns in rounding; ``fd_radius`` is configurable.

What is detached, and what is not:

* Heatmap targets are NOT detached. They are encoded from the moved keypoints
  by the codec, which is differentiable in the keypoint positions, so in the
  gradient — as in the forward pass — a geometric op's magnitude moves pixels
  and labels together. Detaching the targets (the usual treatment of a label)
  differentiates another perturbation: pixels moving under fixed labels, that
  is, label noise. Measured on a small model (``tests/engine/test_search.py``),
  the detached hypergradient of Rotate's weight and magnitude has the opposite
  sign to a numerical derivative of the unrolled validation loss (and, through
  the softmax that couples the op weights, so do photometric ops' weights). In
  the tests' toy search (validation people turned +40°, six seeds) the kept
  target path made Rotate win every time at +38…+40°; detached, Rotate went to
  −31…−42° (four seeds) or Cutout won (two).
  ``differentiate_targets=False`` gives the detached variant for comparison.
* Target weights and visibility (in or out of the crop) are step functions of
  the magnitudes: detached.
* The training images enter the model as a detached leaf; the policy gets its
  gradient only through the explicit ``Jᵀ`` product above (``J`` covers the
  images and the targets).
* ``w`` inside ``w'`` and ``w ± εv`` are detached copies: Eq. 8 differentiates
  with respect to ``α`` only.

BatchNorm. Step 2 is the real training pass: batch statistics, running
statistics updated once per step as in plain training. Every extra pass (the
validation pass at ``w'``, the passes at ``w ± εv``, the exact product) uses
batch statistics too — so that all passes evaluate the same function
``L_train(·, α)`` that step 2 differentiated, as in DARTS — but leaves the
running statistics untouched (``track_running_stats`` is switched off for their
duration). The validation batch is thus normalized by its own statistics, unless
``val_batchnorm="running"``: then the validation pass at ``w'`` uses the running
statistics, as evaluation does, which keeps a shift that a whole val batch shares
(brightness, contrast) visible to the search.

The BatchNorm-statistics path (``batchnorm_path = λ > 0``). Eq. 8 as above
reaches ``α`` only through ``w'``; the gain that training on, say, darker images
brings lives largely in BatchNorm's statistics, which Eq. 8 does not
differentiate (a probe: with a val split darker than train, Eq. 8's Brightness
term was noise from batch to batch, while the term below had the same sign in 8
of 8 batches). With ``λ > 0`` the hypergradient is
``Eq. 8 + λ ∇α L_val(w'; μ(α), σ²(α))``: the augmented batch runs through the
network at ``w'`` (detached weights, the images carrying the policy's graph),
each BatchNorm layer's input batch mean and biased variance are recorded (as
training-mode BatchNorm normalises, the graph kept), and the validation batch at
``w'`` is normalised layer by layer with those statistics (matched by module, in
call order; the affine weight and bias are ``w'``'s). Alone this term matches
the densities of the two batches' features and overshoots, hence a weight beside
Eq. 8 rather than a replacement. ``w'`` is held fixed in it (its ``α``-dependence
is Eq. 8's). It costs one more forward of the augmented batch and one of the
validation batch at ``w'``, and their backward into the policy's graph (the
policy's own backward is shared with Eq. 8's term: one call for both). Running
statistics are untouched. ``val_batchnorm`` governs only Eq. 8's validation pass.

Balancing the two paths (``balance_paths``). The raw BatchNorm term is 5–150× larger than
Eq. 8's on the op weights (mean |∂/∂ op logit| at the suite's warm start, 24 batches per shift:
1.4e-5 against 6.1e-4 on the combined shift, 7.8e-6 against 1.2e-3 on darkness), so with
``λ = 1`` the sum is the BatchNorm term alone. The two carry different signals there: Eq. 8
points at the matching op's weight on rotation, offset and the combined shift (t = 1.8, 2.6, 1.7
over 24 batches; its top op in each), the BatchNorm term at Scale and Rotate on darkness and
combined (t = 5.3 and 3.7: geometric ops fill a cut crop's corners with black, which darkens it)
while it sets Brightness' direction darker (t = −8.0 on its sign). With ``balance_paths`` each
term is scaled to unit norm per policy tensor before they are summed, so that ``λ`` is their
ratio and neither drowns the other. It costs a second backward through the policy's graph.

The BatchNorm term's scope (``batchnorm_scope``). Image statistics move with geometry too: a
zoom changes how much of the crop is background and how fine its detail is, so the BatchNorm
term credits Scale on darkness and blur (t = 3.9 and 2.8 at the suite's warm start) for
statistics the labels do not need. With ``"photometric"`` its gradient on the ops that move
keypoints (every ``K×N×O`` entry of theirs) is set to 0 before balancing, leaving those ops to
Eq. 8 and the pose term; the sub-policy logits keep it.

The pose-geometry path (``pose_path = μ > 0``). The BatchNorm term sees what a shift does to
the images' statistics; what it does to where the figures stand in the crop (turned, smaller,
off-center) it sees weakly or wrongly (a zoom changes how much of the crop is background). The
val batch carries its keypoints, so that geometry can be matched directly:
:func:`pose_descriptors` reduces each sample's labelled keypoints to their centroid, size and
principal axis, and :func:`pose_gap` compares the augmented batch's mean and spread of those with
the val batch's. The moved keypoints carry the policy's graph (geometric ops move them by the
op's matrix), so ``μ ∇α pose_gap`` reaches the geometric ops' weights, gates, directions and
magnitudes and nothing else; it needs no network pass. Like the BatchNorm term it is a density
match: where train and val share their geometry it pulls every geometric op toward less use.

The pose term on every weight step (``pose_target``). With the policy stepped every k-th weight
step, each of its steps sees one training batch, in which about one sample in ten draws a
given op: the pose term's estimate of that op's effect rests on one or two samples. The term
needs no network pass, so it can be taken on the k − 1 weight steps between too: with the val
split's pose moments as its target (computed once from every labelled sample, so no val batch
is needed there), :meth:`BilevelSearch.augment_between_policy_steps` augments each such batch
with the policy's graph, adds the term's gradient to a running sum and returns the detached
batch for the weight step; the next policy step uses the mean over those batches and its own.
That is k times the samples per policy step for one backward through the policy's graph per
weight step; the training batch's spread carries Bessel's correction against the split's.

The appearance moments (``appearance``). With the pose term on every weight step the geometric
ops found their shift in most cells of the known-answer suite, the photometric ones did not:
on darkness Brightness got the top weight but its gate and direction stayed near their start,
so the exported policy darkened 6–13 % of the samples (the shift-matched policy darkens 90 %).
The BatchNorm term, the only one that sees brightness, is one noisy batch per policy step and,
balanced to unit norm, pushes the photometric ops as hard on a shift that has none of them as on
one that is all theirs. The pose term's counterpart for pixels: :func:`appearance_descriptors`
reduces each crop to its brightness, contrast and detail, and their mean and spread over the
augmented batch join the pose features' in the same gap, in units of the val side's spread. One
sum then weighs a shift's geometry against its appearance in one unit, so the op that closes
the larger gap gets the larger push; its spread part moves the gates (a mixture of darkened
and untouched crops is wider than the val split). It reaches every op (a zoom changes how much
background a crop shows), costs a backward through the policy's image graph on every weight
step that takes the pose term, and, like it, needs no network pass.

The score-function estimate (``choice_gradient="score"``, hard draws only). Eq. 8's gradient
on what the hard draws pick (sub-policy, op, gate, direction) goes, straight-through, through
the drawn op's strength at 1: a local derivative, not the difference between running the op and
not. Its unbiased counterpart: to first order ``L_val(w − ζ g) = L_val(w) − (ζ/B) Σ_i a_i`` with
``a_i = ∇w L_i · v`` each training sample's alignment with the val gradient, so
``∇α E[L_val(w')] = −(ζ/B) E[Σ_i (a_i − b_i) ∇α log π(draws_i)]`` with ``b_i`` the mean of the
other samples' alignments (a baseline that keeps it unbiased). ``a_i`` comes from each sample's
loss at ``w ± εv`` (two forward passes of the training batch, no backward);
:meth:`RelaxedPolicy.draw_log_probabilities` gives ``log π``. The magnitudes are not drawn and
keep Eq. 8's path.

What a step reports besides its losses: the hypergradient's norm per policy
parameter (``policy_grad_norm/<name>``) and its cosine with the previous search
step's hypergradient (``policy_grad_cosine``; absent on the first step): a mean
cosine near 0 over an epoch says the policy follows noise, one clearly above 0 a
signal that persists from batch to batch.

The policy's optimizer (:func:`make_policy_optimizer`): Adam (DARTS), or
:class:`NormalizedGradientDescent`, which moves each parameter tensor by exactly
the learning rate in L2 along its gradient.

Distributed: the weights' gradient is synchronised by DDP in step 2 (``w'`` and
``v`` then agree across ranks up to each rank's validation batch); the policy's
gradient is averaged over ranks before its step. The BatchNorm path uses each
rank's own batch statistics (SyncBatchNorm layers included).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.optim.optimizer import ParamsT

from autopose.augment import RelaxedPolicy
from autopose.augment.policy import PolicyNoise, as_float_images
from autopose.data.codec import HeatmapCodec
from autopose.data.transforms import cut_window

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor, Tensor]  # images, keypoints, visibility
LossFn = Callable[[object, Tensor, Tensor], Tensor]
FD_RADIUS = 0.01  # DARTS: ε = 0.01 / ‖v‖
POLICY_OPTIMIZERS = ("adam", "normalized")
# (layer, batch mean, biased batch variance) per BatchNorm call, in call order
BatchNormStatistics = list[tuple[nn.Module, Tensor, Tensor]]


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Batch statistics, but no running-statistics update, for the duration."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.track_running_stats, m.training) for m in norms]
    try:
        for m in norms:
            m.track_running_stats = False  # with training=True: batch stats, buffers left alone
            m.train(True)
        yield
    finally:
        for m, (track, training) in zip(norms, saved, strict=True):
            m.track_running_stats = track
            m.train(training)


@contextlib.contextmanager
def running_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Running statistics (as in evaluation), left un-updated, for the duration."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.training for m in norms]
    try:
        for m in norms:
            m.train(False)
        yield
    finally:
        for m, training in zip(norms, saved, strict=True):
            m.train(training)


def _batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _normalize(layer: nn.Module, x: Tensor, mean: Tensor, variance: Tensor) -> Tensor:
    """``layer``'s BatchNorm of ``x`` (``B×C×…``) with the given per-channel statistics ``(C,)``.

    Written out rather than ``F.batch_norm(training=False)``: autograd does not differentiate
    that with respect to its running-statistics arguments."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) * torch.rsqrt(variance.reshape(shape) + layer.eps)
    if layer.weight is not None:
        y = y * layer.weight.reshape(shape)
    if layer.bias is not None:
        y = y + layer.bias.reshape(shape)
    return y


@contextlib.contextmanager
def _swapped_batchnorm_forward(
    model: nn.Module, forward: Callable[[nn.Module, Tensor], Tensor]
) -> Iterator[None]:
    """Every BatchNorm layer of ``model`` runs ``forward(layer, x)`` for the duration.

    The layer's own forward is shadowed by an instance attribute, so ``functional_call``'s
    swapped parameters are what ``layer.weight`` / ``layer.bias`` read inside it."""
    layers = _batchnorm_layers(model)
    shadowed = ["forward" in vars(layer) for layer in layers]
    if any(shadowed):
        raise RuntimeError("a BatchNorm layer's forward is already replaced")
    try:
        for layer in layers:
            layer.forward = lambda x, layer=layer: forward(layer, x)
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)


@contextlib.contextmanager
def recorded_batchnorm_stats(model: nn.Module) -> Iterator[BatchNormStatistics]:
    """Batch statistics, recorded: each BatchNorm layer normalises by its input's batch mean
    and biased variance (as training-mode BatchNorm does) and appends ``(layer, mean,
    variance)`` to the yielded list, in call order, with their autograd graph. Running
    statistics are neither used nor updated."""
    statistics: BatchNormStatistics = []

    def forward(layer: nn.Module, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.ndim)]
        mean, variance = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
        statistics.append((layer, mean, variance))
        return _normalize(layer, x, mean, variance)

    with _swapped_batchnorm_forward(model, forward):
        yield statistics


@contextlib.contextmanager
def replayed_batchnorm_stats(model: nn.Module, statistics: BatchNormStatistics) -> Iterator[None]:
    """Each BatchNorm layer normalises by the statistics :func:`recorded_batchnorm_stats`
    recorded for it: the ``i``-th call of a layer takes that layer's ``i``-th record. Raises
    if a layer is called more often than it was recorded, or less often by the end."""
    queues: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for layer, mean, variance in statistics:
        queues.setdefault(id(layer), []).append((mean, variance))

    def forward(layer: nn.Module, x: Tensor) -> Tensor:
        queue = queues.get(id(layer))
        if not queue:
            raise RuntimeError(f"no recorded BatchNorm statistics left for {layer!r}")
        mean, variance = queue.pop(0)
        return _normalize(layer, x, mean, variance)

    with _swapped_batchnorm_forward(model, forward):
        yield
    if any(queues.values()):
        raise RuntimeError("recorded BatchNorm statistics were not all used: the passes differ")


class NormalizedGradientDescent(torch.optim.Optimizer):
    """``p ← p − lr · g / ‖g‖₂`` for each parameter tensor ``p`` on its own; no momentum, no state.

    Every tensor with a nonzero gradient moves by exactly ``lr`` in L2, in the direction of
    its gradient, so the relative sizes within a tensor are kept (per-coordinate Adam
    divides each coordinate by its own running scale, which turns a weak, noisy signal into
    a random walk of fixed step). A zero gradient (or ``None``) leaves the tensor as it is.
    ``lr`` is thus a step length per tensor: a tensor of ``n`` coordinates that Adam moves by
    about ``lr`` per coordinate moves by about ``lr·√n`` there.
    """

    def __init__(self, params: ParamsT, lr: float):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                # Scaled by its largest entry first, so that squaring a tiny gradient cannot
                # underflow; the scaled norm is then ≥ 1 unless the gradient is all zero, and
                # clamping it at 1 leaves a zero gradient a zero move (no host sync).
                scale = grad.abs().amax()
                unit = torch.where(scale > 0, grad / scale, torch.zeros_like(grad))
                norm = torch.linalg.vector_norm(unit).clamp_min(1.0)
                parameter.sub_(unit * (group["lr"] / norm))
        return loss


def make_policy_optimizer(
    name: str, parameters: ParamsT, lr: float, betas: tuple[float, float] = (0.5, 0.999)
) -> torch.optim.Optimizer:
    """The policy's optimizer: ``"adam"`` (DARTS, with ``betas``) or ``"normalized"``
    (:class:`NormalizedGradientDescent`; ``betas`` unused)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=tuple(betas))
    if name == "normalized":
        return NormalizedGradientDescent(parameters, lr=lr)
    raise ValueError(f"policy optimizer must be one of {', '.join(POLICY_OPTIMIZERS)}, got {name!r}")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (functional passes bypass the wrapper)."""
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors))


def _unit(tensor: Tensor | None) -> Tensor | None:
    """``tensor / ‖tensor‖₂`` (a zero tensor, or None, as it is)."""
    if tensor is None:
        return None
    norm = torch.linalg.vector_norm(tensor)
    return torch.where(norm > 0, tensor / norm.clamp_min(torch.finfo(tensor.dtype).tiny), tensor)


def _add_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a + b


POSE_FEATURES = ("centroid_x", "centroid_y", "log_spread", "axis_cos", "axis_sin")
APPEARANCE_FEATURES = ("log_brightness", "log_contrast", "log_detail")
# a feature the val side holds constant is still compared, in these units (both kinds: the pose
# features are fractions of the crop or logs, the appearance features logs)
MOMENT_SCALE_FLOOR = 0.05
APPEARANCE_EPS = 1e-3  # a flat or black crop's logs stay finite; small beside a crop's detail (≈ 0.01)


def pose_descriptors(keypoints: Tensor, visibility: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Each sample's pose geometry in the crop: ``(B×5 features, B valid)``.

    The features (:data:`POSE_FEATURES`) of the labelled keypoints inside the ``size = (H, W)``
    crop, in units of half the crop's longer side from its center (so angles are true): the
    centroid ``(x, y)``; ``log`` of the RMS distance from it (the figure's size); and the
    principal axis as ``(cos 2θ, sin 2θ)`` times the anisotropy ``(λ1 − λ2)/(λ1 + λ2)`` of the
    points' covariance (0 for a round cloud; an upright figure gives ``(−a, 0)``, one turned
    45° gives ``(0, ±a)``). A sample with fewer than 2 such points is not valid (its features
    are 0). Differentiable in ``keypoints``; which points count is not.
    """
    height, width = size
    half = max(height, width) / 2.0
    with torch.no_grad():
        inside = (keypoints[..., 0] >= 0) & (keypoints[..., 0] <= width - 1)
        inside &= (keypoints[..., 1] >= 0) & (keypoints[..., 1] <= height - 1)
        mask = ((visibility > 0) & inside).to(keypoints.dtype)  # B×K
        count = mask.sum(dim=-1)
        valid = count >= 2
    points = (keypoints - keypoints.new_tensor([(width - 1) / 2.0, (height - 1) / 2.0])) / half
    weights = mask / count.clamp_min(1.0)[:, None]
    centroid = (weights[..., None] * points).sum(dim=1)  # B×2
    offsets = points - centroid[:, None, :]
    xx = (weights * offsets[..., 0] ** 2).sum(dim=1)
    yy = (weights * offsets[..., 1] ** 2).sum(dim=1)
    xy = (weights * offsets[..., 0] * offsets[..., 1]).sum(dim=1)
    total = (xx + yy).clamp_min(1e-6)
    features = torch.stack(
        [centroid[:, 0], centroid[:, 1], 0.5 * torch.log(total), (xx - yy) / total, 2 * xy / total], -1
    )
    return torch.where(valid[:, None], features, torch.zeros_like(features)), valid


def appearance_descriptors(images: Tensor) -> Tensor:
    """Each crop's appearance: ``B×3×H×W`` float 0…1 → ``B×3`` features
    (:data:`APPEARANCE_FEATURES`), all logs, of the grey image ``Y`` (the channels' mean):
    brightness ``log(mean Y + ε)``; contrast ``log(std Y + ε)``; detail, the mean absolute
    difference between ``Y`` and its 3×3 average over the contrast (``log(d + ε) − log(std Y
    + ε)``, with ``ε`` :data:`APPEARANCE_EPS`). A factor on every pixel (Brightness) moves the
    first two by its log and leaves detail; a blur (Sharpness below 1) lowers detail alone.
    Differentiable in the images."""
    grey = images.mean(dim=1, keepdim=True)
    contrast = grey.std(dim=(1, 2, 3), unbiased=False)
    smooth = F.avg_pool2d(grey, 3, stride=1, padding=1, count_include_pad=False)
    detail = (grey - smooth).abs().mean(dim=(1, 2, 3))
    log_contrast = torch.log(contrast + APPEARANCE_EPS)
    return torch.stack(
        [
            torch.log(grey.mean(dim=(1, 2, 3)) + APPEARANCE_EPS),
            log_contrast,
            torch.log(detail + APPEARANCE_EPS) - log_contrast,
        ],
        dim=-1,
    )


Moments = tuple[Tensor, Tensor]  # per feature: (mean, spread)


def feature_moments(features: Tensor, valid: Tensor, unbiased: bool = False) -> Moments:
    """Each feature's mean and spread (standard deviation) over the valid samples of
    ``(features B×F, valid B)`` (:func:`pose_descriptors`, or :func:`appearance_descriptors`
    with every sample valid): two ``(F,)`` tensors (zeros when fewer than 2 samples are valid).
    ``unbiased``: Bessel's correction, for a batch compared with a whole split's moments
    (without it a batch of 8 looks 7 % too narrow)."""
    kept = features[valid]
    if kept.shape[0] < 2:
        return features.new_zeros(features.shape[-1]), features.new_zeros(features.shape[-1])
    return kept.mean(dim=0), kept.var(dim=0, unbiased=unbiased).clamp_min(1e-12).sqrt()


def moments_gap(train: Moments, val: Moments) -> Tensor:
    """``Σ_f ((μ_t − μ_v)² + (σ_t − σ_v)²) / (σ_v² + floor²)``: how far the training side's
    feature moments lie from the val side's, in units of the val spread (floored at
    :data:`MOMENT_SCALE_FLOOR`), so that gaps of different features (pose and appearance) add up
    in one unit. The val side is a constant."""
    train_mean, train_spread = train
    val_mean, val_spread = (m.detach() for m in val)
    scale = val_spread**2 + MOMENT_SCALE_FLOOR**2
    return (((train_mean - val_mean) ** 2 + (train_spread - val_spread) ** 2) / scale).sum()


def _appearance_moments(images: Tensor, unbiased: bool = False) -> Moments:
    """:func:`feature_moments` of :func:`appearance_descriptors` (every crop counts)."""
    features = appearance_descriptors(images)
    return feature_moments(features, features.new_ones(features.shape[0], dtype=torch.bool), unbiased)


def pose_gap(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor]) -> Tensor:
    """:func:`moments_gap` between a training batch's and a val batch's pose features
    (:func:`pose_descriptors`, ``(features, valid)``), each batch's moments taken alike."""
    return moments_gap(feature_moments(*train), feature_moments(val[0].detach(), val[1]))


class BilevelSearch:
    """One bi-level search step at a time (see the module docstring).

    Args:
        model: the pose network (DDP-wrapped or not), in training mode; its
            training forward returns a list of heatmaps.
        policy: the :class:`RelaxedPolicy` being searched.
        loss_fn: ``loss_fn(outputs, target_heatmaps, target_weight) -> scalar``
            (:class:`autopose.models.losses.PoseLoss`).
        codec: encodes the moved keypoints into heatmap targets.
        weight_optimizer: steps the model's weights with the training gradient.
        policy_optimizer: steps the policy's parameters with the hypergradient.
        unroll_lr: ``ζ`` of Eq. 8 (usually the weights' learning rate).
        hessian: ``"finite_difference"`` (DARTS) or ``"exact"`` (torch.func).
        central: for the finite difference, ``True`` evaluates at ``w ± εv`` (two
            passes, error O(ε²)); ``False`` reuses the training gradient at ``w``
            as the second point (one pass, error O(ε)).
        differentiate_targets: keep the gradient through the heatmap targets (on by
            default; see "What is detached, and what is not").
        fd_radius: the finite difference's step in weight space, ``ε‖v‖`` (DARTS: 0.01).
        val_batchnorm: how BatchNorm normalizes the validation pass at ``w'``: ``"batch"``
            (its own batch statistics, as DARTS) or ``"running"`` (the running statistics,
            as the model is scored). Batch statistics normalize away whatever a whole batch
            shares: a val split that is uniformly darker than train looks like train to
            ``L_val`` (conv1 is linear and has no bias, its BatchNorm removes the scale), so
            the search cannot see that shift; running statistics keep it.
        batchnorm_path: ``λ ≥ 0``, the weight of the BatchNorm-statistics term added to Eq. 8
            (see "The BatchNorm-statistics path"); 0 (the default) leaves Eq. 8 alone and
            costs nothing.
        balance_paths: scale Eq. 8's hypergradient and each added term (BatchNorm statistics,
            pose geometry) to unit L2 norm per policy tensor before their weights: a weight is
            then the term's ratio to Eq. 8, whatever their raw sizes (see "Balancing the two paths").
        pose_path: ``μ ≥ 0``, the weight of the pose-geometry term (see "The pose-geometry
            path"); 0 (the default) adds nothing and costs nothing.
        choice_gradient: ``"straight_through"`` (the policy's own gradient of its hard draws) or
            ``"score"``: Eq. 8's gradient on the drawn choices (sub-policy, op, gate, direction)
            by the score function of each sample's alignment with the val gradient (see "The
            score-function estimate"); the magnitudes keep Eq. 8's path. Needs ``hard=True``.
        canvas_pad: ``(rows, cols)``: the training batches are canvases around their crops
            (:class:`autopose.data.ProxyDataset` with ``canvas=True``); the policy runs on the
            canvas and the crop is cut from it before the network sees it.
        batchnorm_scope: ``"all"``, or ``"photometric"``: the BatchNorm term reaches only the
            ops that leave keypoints in place (see "The BatchNorm term's scope").
        pose_target: the val split's pose moments (:func:`feature_moments` of every labelled
            sample): the pose term then compares each training batch with them instead of with
            the val batch, and it can be taken between policy steps too
            (:meth:`augment_between_policy_steps`; see "The pose term on every weight step").
        appearance: the pose term also compares the augmented crops' appearance moments
            (:func:`appearance_descriptors`) with the val side's, in the same units (see "The
            appearance moments"); needs ``pose_path > 0``.
        appearance_target: the val split's appearance moments, the counterpart of
            ``pose_target`` (needed with it when ``appearance`` is on).
    """

    def __init__(
        self,
        model: nn.Module,
        policy: RelaxedPolicy,
        loss_fn: LossFn,
        codec: HeatmapCodec,
        weight_optimizer: torch.optim.Optimizer,
        policy_optimizer: torch.optim.Optimizer,
        unroll_lr: float,
        hessian: Literal["finite_difference", "exact"] = "finite_difference",
        central: bool = True,
        differentiate_targets: bool = True,
        fd_radius: float = FD_RADIUS,
        val_batchnorm: Literal["batch", "running"] = "batch",
        batchnorm_path: float = 0.0,
        balance_paths: bool = False,
        choice_gradient: Literal["straight_through", "score"] = "straight_through",
        pose_path: float = 0.0,
        canvas_pad: tuple[int, int] = (0, 0),
        pose_target: Moments | None = None,
        batchnorm_scope: Literal["all", "photometric"] = "all",
        appearance: bool = False,
        appearance_target: Moments | None = None,
    ):
        for name, weight in (("batchnorm_path", batchnorm_path), ("pose_path", pose_path)):
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"{name} must be finite and ≥ 0, got {weight}")
        if val_batchnorm not in ("batch", "running"):
            raise ValueError(f"val_batchnorm must be 'batch' or 'running', got {val_batchnorm!r}")
        if choice_gradient not in ("straight_through", "score"):
            raise ValueError(
                f"choice_gradient must be 'straight_through' or 'score', got {choice_gradient!r}"
            )
        if batchnorm_scope not in ("all", "photometric"):
            raise ValueError(f"batchnorm_scope must be 'all' or 'photometric', got {batchnorm_scope!r}")
        if choice_gradient == "score" and not policy.hard:
            raise ValueError("choice_gradient='score' credits hard draws: the policy needs hard=True")
        if appearance and not pose_path > 0:
            raise ValueError("appearance joins the pose term: it needs pose_path > 0")
        if appearance and (pose_target is None) != (appearance_target is None):
            raise ValueError("with appearance, pose_target and appearance_target come together")
        if hessian not in ("finite_difference", "exact"):
            raise ValueError(f"hessian must be 'finite_difference' or 'exact', got {hessian!r}")
        if not unroll_lr > 0:
            raise ValueError(f"unroll_lr must be positive, got {unroll_lr}")
        self.model = model
        self.policy = policy
        self.loss_fn = loss_fn
        self.codec = codec
        self.weight_optimizer = weight_optimizer
        self.policy_optimizer = policy_optimizer
        self.unroll_lr = float(unroll_lr)
        self.hessian = hessian
        self.central = central
        self.differentiate_targets = differentiate_targets
        self.fd_radius = float(fd_radius)
        self.val_batchnorm = val_batchnorm
        self.batchnorm_path = float(batchnorm_path)
        self.balance_paths = bool(balance_paths)
        self.choice_gradient = choice_gradient
        self.pose_path = float(pose_path)
        self.canvas_pad = (int(canvas_pad[0]), int(canvas_pad[1]))
        self.pose_target = None if pose_target is None else tuple(m.detach() for m in pose_target)
        self.batchnorm_scope = batchnorm_scope
        self.appearance = bool(appearance)
        self.appearance_target = (
            None if appearance_target is None else tuple(m.detach() for m in appearance_target)
        )
        # per op: it leaves the keypoints where they are (what the BatchNorm term may judge alone)
        self._keypoints_kept = torch.tensor(
            [not spec.moves_keypoints for spec in policy.space.specs],
            device=next(policy.parameters()).device,
        )
        # the pose term's gradients taken since the last policy step, and how many batches
        self.pose_gradient_sum: list[Tensor | None] | None = None
        self.pose_batches = 0
        # the last search step's hypergradient (flat, after the ranks' average), for the cosine
        self.previous_hypergradient: Tensor | None = None

    # -- pieces ----------------------------------------------------------------------------------
    @property
    def _net(self) -> nn.Module:
        return _unwrap(self.model)

    def _weights(self) -> tuple[list[str], list[Tensor]]:
        named = [(n, p) for n, p in self._net.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def augment(self, train: Batch, noise: PolicyNoise | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Augmented images (with the policy's graph) and their heatmap targets and weights."""
        return self._augmented(train, noise)[:3]

    def _augmented(self, train: Batch, noise: PolicyNoise | None = None) -> tuple[Tensor, ...]:
        """:meth:`augment`'s three, and the moved keypoints (with the policy's graph) and their
        visibility in the crop."""
        images, keypoints, visibility = train
        images = as_float_images(images)
        if noise is None:
            noise = self.policy.sample_noise(images.shape[0])
        augmented, moved, moved_visibility = self.policy(
            images, keypoints, visibility, noise, pad=self.canvas_pad
        )
        augmented, moved = cut_window(augmented, moved, self.canvas_pad)
        if self.differentiate_targets:
            heatmaps, weight = self.codec.encode(moved, moved_visibility.detach())
        else:
            heatmaps, weight = self.codec.encode(moved.detach(), moved_visibility.detach())
        return augmented, heatmaps, weight, moved, moved_visibility.detach()

    def _pose_gap_to(self, augmented: Tensor, moved: Tensor, moved_visibility: Tensor, val: Batch) -> Tensor:
        """The pose term: the gap between the augmented batch (its moved keypoints and, with
        ``appearance``, its crops) and the val side (crops of the val images' size): the val
        split's moments (``pose_target``) or, without them, the val batch's (:func:`pose_gap`)."""
        size = tuple(val[0].shape[-2:])
        if self.pose_target is not None:
            return self._pose_gap_to_target(augmented, moved, moved_visibility, size)
        gap = pose_gap(
            pose_descriptors(moved, moved_visibility, size), pose_descriptors(val[1], val[2], size)
        )
        if self.appearance:
            val_appearance = _appearance_moments(as_float_images(val[0]).detach())
            gap = gap + moments_gap(_appearance_moments(augmented), val_appearance)
        return gap

    def _pose_gap_to_target(
        self, augmented: Tensor, moved: Tensor, moved_visibility: Tensor, size: tuple[int, int]
    ) -> Tensor:
        """The pose term against the val split's moments (``pose_target``, and
        ``appearance_target`` with ``appearance``) for an augmented batch (its crops, of
        ``size``, and moved keypoints); the batch's spreads with Bessel's correction."""
        train = pose_descriptors(moved, moved_visibility, size)
        gap = moments_gap(feature_moments(*train, unbiased=True), self.pose_target)
        if self.appearance:
            gap = gap + moments_gap(_appearance_moments(augmented, unbiased=True), self.appearance_target)
        return gap

    def augment_between_policy_steps(
        self, train: Batch, noise: PolicyNoise | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Augments a training batch on a weight step that does not move the policy, and adds
        its pose term's gradient (against ``pose_target``) to those the next policy step
        averages. Returns the crops, their moved keypoints and visibility, detached: what a
        plain step trains on (the same draws as the policy's own forward, ``noise`` or fresh)."""
        if self.pose_target is None:
            raise ValueError("the pose term between policy steps needs pose_target (the val split's)")
        images, keypoints, visibility = train
        augmented, moved, moved_visibility = self.policy(
            as_float_images(images), keypoints, visibility, noise, pad=self.canvas_pad
        )
        augmented, moved = cut_window(augmented, moved, self.canvas_pad)
        moved_visibility = moved_visibility.detach()
        loss = self._pose_gap_to_target(augmented, moved, moved_visibility, tuple(augmented.shape[-2:]))
        grads = self._backward_to_policy([loss], [torch.ones_like(loss)])
        previous = self.pose_gradient_sum or [None] * len(grads)
        self.pose_gradient_sum = [_add_optional(a, b) for a, b in zip(previous, grads, strict=True)]
        self.pose_batches += 1
        return augmented.detach(), moved.detach(), moved_visibility

    def _photometric_only(self, grad: Tensor | None) -> Tensor | None:
        """A per-op (``K×N×O``) policy gradient with the entries of ops that move keypoints set
        to 0; the sub-policy logits' (``K``) as they are."""
        if grad is None or grad.dim() != 3:
            return grad
        return torch.where(self._keypoints_kept, grad, torch.zeros_like(grad))

    def _take_pose_gradients(self) -> tuple[list[Tensor | None], int] | None:
        """The pose gradients gathered since the last policy step and their count (None if
        none), which the policy step now uses up."""
        if self.pose_batches == 0:
            return None
        taken = (self.pose_gradient_sum, self.pose_batches)
        self.pose_gradient_sum, self.pose_batches = None, 0
        return taken

    def _val_targets(self, val: Batch) -> tuple[Tensor, Tensor, Tensor]:
        images, keypoints, visibility = val
        heatmaps, weight = self.codec.encode(keypoints, visibility)
        return as_float_images(images), heatmaps, weight

    def _loss_at(
        self, names: list[str], weights: Sequence[Tensor], images: Tensor, heatmaps, weight
    ) -> Tensor:
        outputs = functional_call(self._net, dict(zip(names, weights, strict=True)), (images,))
        return self.loss_fn(outputs, heatmaps, weight)

    def _unrolled_weights(self, weights: Sequence[Tensor], train_grad: Sequence[Tensor]) -> list[Tensor]:
        """``w' = w − ζ g``, detached from ``w`` and from the training pass's graph."""
        return [(w.detach() - self.unroll_lr * g.detach()) for w, g in zip(weights, train_grad, strict=True)]

    def _unrolled_val_gradient(
        self, names: list[str], weights: list[Tensor], train_grad: list[Tensor], val: Batch
    ) -> tuple[list[Tensor], Tensor]:
        """``v = ∇w' L_val(w')`` with ``w' = w − ζ g``; also returns ``L_val(w')``."""
        images, heatmaps, weight = self._val_targets(val)
        unrolled = [w.requires_grad_(True) for w in self._unrolled_weights(weights, train_grad)]
        statistics = running_batchnorm_stats if self.val_batchnorm == "running" else frozen_batchnorm_stats
        with statistics(self._net):
            loss = self._loss_at(names, unrolled, images, heatmaps, weight)
            v = torch.autograd.grad(loss, unrolled, allow_unused=True)
        v = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, v, strict=True)]
        return v, loss.detach()

    def _batchnorm_path_loss(
        self, names: list[str], unrolled: Sequence[Tensor], augmented: Tensor, val: Batch
    ) -> Tensor:
        """``L_val(w'; μ(α), σ²(α))``: the validation loss at ``w'`` with every BatchNorm layer
        normalising by the statistics the augmented batch (with its policy graph) has there."""
        images, heatmaps, weight = self._val_targets(val)
        unrolled = [w.detach() for w in unrolled]
        parameters = dict(zip(names, unrolled, strict=True))
        with recorded_batchnorm_stats(self._net) as statistics:
            functional_call(self._net, parameters, (augmented,))
        with replayed_batchnorm_stats(self._net, statistics):
            return self._loss_at(names, unrolled, images, heatmaps, weight)

    def _input_leaves(self, images: Tensor, heatmaps: Tensor) -> tuple[list[Tensor], Tensor]:
        """Detached leaves that take ``∇ L_train``: the images, and the targets if they are kept
        differentiable; returns them and the target tensor the loss should read."""
        leaves = [images.detach().requires_grad_(True)]
        if self.differentiate_targets:
            leaves.append(heatmaps.detach().requires_grad_(True))
        return leaves, (leaves[1] if self.differentiate_targets else heatmaps)

    def _input_gradients(
        self, names: list[str], weights: Sequence[Tensor], images: Tensor, heatmaps: Tensor, weight: Tensor
    ) -> tuple[Tensor, ...]:
        """``∇ L_train`` with respect to the augmented images (and targets, if kept) at ``weights``."""
        leaves, target = self._input_leaves(images, heatmaps)
        with frozen_batchnorm_stats(self._net):
            loss = self._loss_at(names, [w.detach() for w in weights], leaves[0], target, weight)
            return torch.autograd.grad(loss, leaves)

    def _mixed_product(
        self,
        names: list[str],
        weights: list[Tensor],
        v: list[Tensor],
        images: Tensor,
        heatmaps: Tensor,
        weight: Tensor,
        input_grad_at_w: tuple[Tensor, ...] | None,
    ) -> tuple[tuple[Tensor, ...], float]:
        """``∂/∂t ∇x L_train(w + t v)`` at ``t = 0`` (per input leaf); returns it and ε (0 if exact)."""
        if self.hessian == "exact":
            return self._exact_mixed_product(names, weights, v, images, heatmaps, weight), 0.0
        epsilon = self.fd_radius / max(float(_global_norm(v)), 1e-12)
        plus = self._input_gradients(
            names, [w + epsilon * d for w, d in zip(weights, v, strict=True)], images, heatmaps, weight
        )
        if self.central or input_grad_at_w is None:
            minus = self._input_gradients(
                names, [w - epsilon * d for w, d in zip(weights, v, strict=True)], images, heatmaps, weight
            )
            return tuple((p - m) / (2 * epsilon) for p, m in zip(plus, minus, strict=True)), epsilon
        return tuple((p - m) / epsilon for p, m in zip(plus, input_grad_at_w, strict=True)), epsilon

    def _exact_mixed_product(
        self,
        names: list[str],
        weights: list[Tensor],
        v: list[Tensor],
        images: Tensor,
        heatmaps: Tensor,
        weight: Tensor,
    ) -> tuple[Tensor, ...]:
        images = images.detach()
        heatmaps = heatmaps.detach()
        argnums = (0, 1) if self.differentiate_targets else 0

        def input_gradient(*flat_weights: Tensor):
            def loss_of(x: Tensor, h: Tensor) -> Tensor:
                return self._loss_at(names, flat_weights, x, h, weight)

            grads = torch.func.grad(loss_of, argnums=argnums)(images, heatmaps)
            return grads if isinstance(grads, tuple) else (grads,)

        with frozen_batchnorm_stats(self._net):
            _, tangent = torch.func.jvp(
                input_gradient, tuple(w.detach() for w in weights), tuple(d.detach() for d in v)
            )
        return tangent

    def _policy_gradient_from(
        self,
        augmented: Tensor,
        heatmaps: Tensor,
        product: tuple[Tensor, ...],
        batchnorm_loss: Tensor | None = None,
        choices: list[Tensor | None] | None = None,
        pose_loss: Tensor | None = None,
        pose_gathered: tuple[list[Tensor | None], int] | None = None,
    ) -> list[Tensor | None]:
        """``−ζ Jᵀ product`` (+ ``λ ∇α batchnorm_loss`` + ``μ ∇α pose_loss``): one backward
        through the policy's graph (one per term with ``balance_paths``: each is then scaled to
        unit norm per policy tensor). ``choices``: Eq. 8's score-function estimate, which
        replaces ``−ζ Jᵀ product`` on every parameter it reaches (all but the magnitudes).
        ``pose_gathered``: the pose term's gradient sum over earlier batches and their count;
        the pose term is then the mean over those and this batch. With ``batchnorm_scope``
        ``"photometric"`` the BatchNorm term loses its entries on the ops that move keypoints."""
        outputs = [augmented]
        if self.differentiate_targets:
            outputs.append(heatmaps)
        grad_outputs = [-self.unroll_lr * p for p in product]
        terms = ((batchnorm_loss, self.batchnorm_path), (pose_loss, self.pose_path))
        added = [(loss, weight) for loss, weight in terms if loss is not None]
        separate = (
            self.balance_paths
            or (pose_loss is not None and pose_gathered is not None)
            or (batchnorm_loss is not None and self.batchnorm_scope == "photometric")
        )
        if choices is None and not (added and separate):
            for loss, weight in added:
                outputs.append(loss)
                grad_outputs.append(torch.full_like(loss, weight))
            return self._backward_to_policy(outputs, grad_outputs)
        total = self._backward_to_policy(outputs, grad_outputs, retain_graph=bool(added))
        if choices is not None:
            total = [path if score is None else score for path, score in zip(total, choices, strict=True)]
        if self.balance_paths:
            total = [_unit(a) for a in total]
        for index, (loss, weight) in enumerate(added):
            retain = index + 1 < len(added)
            path = self._backward_to_policy([loss], [torch.ones_like(loss)], retain_graph=retain)
            if loss is batchnorm_loss and self.batchnorm_scope == "photometric":
                path = [self._photometric_only(g) for g in path]
            if loss is pose_loss and pose_gathered is not None:
                gathered, count = pose_gathered
                path = [
                    None if c is None else c / (count + 1)
                    for c in (_add_optional(a, b) for a, b in zip(path, gathered, strict=True))
                ]
            if self.balance_paths:
                path = [_unit(b) for b in path]
            total = [
                _add_optional(a, None if b is None else weight * b) for a, b in zip(total, path, strict=True)
            ]
        return total

    def _policy_gradient(
        self,
        names: list[str],
        weights: list[Tensor],
        train_grad: list[Tensor],
        at_w: tuple[Tensor, ...],
        augmented: tuple[Tensor, ...],
        val: Batch,
        noise: PolicyNoise,
        pose_gathered: tuple[list[Tensor | None], int] | None = None,
    ) -> tuple[list[Tensor | None], Tensor, float]:
        """Steps 3–4 from the training gradient ``g`` (and the input gradient at ``w``): the
        policy's gradient (Eq. 8 and the added terms), ``L_val(w')`` and the finite difference's ε.
        ``augmented``: :meth:`_augmented`'s five; ``pose_gathered``: see
        :meth:`_policy_gradient_from`."""
        images, heatmaps, weight, moved, moved_visibility = augmented
        v, val_loss = self._unrolled_val_gradient(names, weights, train_grad, val)
        product, epsilon = self._mixed_product(names, weights, v, images, heatmaps, weight, at_w)
        batchnorm_loss = None
        if self.batchnorm_path > 0:
            unrolled = self._unrolled_weights(weights, train_grad)
            batchnorm_loss = self._batchnorm_path_loss(names, unrolled, images, val)
        choices = self._choices(names, weights, v, images, heatmaps, weight, noise)
        pose_loss = self._pose_gap_to(images, moved, moved_visibility, val) if self.pose_path > 0 else None
        grads = self._policy_gradient_from(
            images, heatmaps, product, batchnorm_loss, choices, pose_loss, pose_gathered
        )
        return grads, val_loss, epsilon

    def _backward_to_policy(
        self, outputs: list[Tensor], grad_outputs: list[Tensor], retain_graph: bool = False
    ) -> list[Tensor | None]:
        """``Σ ∂outputs/∂α · grad_outputs`` per policy parameter (None where none reaches it)."""
        # A space of photometric ops only leaves the targets without a graph: skip what has none.
        kept = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
        if not kept:
            return [None for _ in self.policy.parameters()]
        return list(
            torch.autograd.grad(
                [o for o, _ in kept],
                list(self.policy.parameters()),
                grad_outputs=[g for _, g in kept],
                allow_unused=True,
                retain_graph=retain_graph,
            )
        )

    def _train_gradient_at_w(
        self, names: list[str], weights: list[Tensor], augmented: Tensor, heatmaps: Tensor, weight: Tensor
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        """``g = ∇w L_train(w, α)`` and the input gradient at ``w``, without touching the model."""
        leaves, target = self._input_leaves(augmented, heatmaps)
        with frozen_batchnorm_stats(self._net):
            loss = self._loss_at(names, weights, leaves[0], target, weight)
            grads = torch.autograd.grad(loss, [*weights, *leaves], allow_unused=True)
        train_grad = [
            torch.zeros_like(w) if g is None else g
            for w, g in zip(weights, grads[: len(weights)], strict=True)
        ]
        return train_grad, tuple(grads[len(weights) :])

    def _dense(self, grads: Sequence[Tensor | None]) -> list[Tensor]:
        return [
            torch.zeros_like(p) if g is None else g
            for p, g in zip(self.policy.parameters(), grads, strict=True)
        ]

    # -- public ----------------------------------------------------------------------------------
    def hypergradient(
        self,
        train: Batch,
        val: Batch,
        noise: PolicyNoise | None = None,
        hessian: Literal["finite_difference", "exact"] | None = None,
    ) -> list[Tensor]:
        """The policy's gradient (Eq. 8, plus ``λ`` times the BatchNorm-statistics term when
        ``batchnorm_path > 0``) without changing anything (no steps, no BN statistics, no
        ``.grad``): for checks and tests. One tensor per policy parameter."""
        saved = self.hessian
        self.hessian = hessian or self.hessian
        try:
            names, weights = self._weights()
            if noise is None:
                noise = self.policy.sample_noise(train[0].shape[0])
            augmented = self._augmented(train, noise)
            train_grad, at_w = self._train_gradient_at_w(names, weights, *augmented[:3])
            grads, _, _ = self._policy_gradient(names, weights, train_grad, at_w, augmented, val, noise)
            return self._dense(grads)
        finally:
            self.hessian = saved

    def batchnorm_path_gradient(
        self, train: Batch, val: Batch, noise: PolicyNoise | None = None
    ) -> list[Tensor]:
        """``∇α L_val(w'; μ(α), σ²(α))`` alone (not weighted by ``λ``, whatever ``λ`` is), without
        changing anything: the term ``batchnorm_path`` adds to Eq. 8. One tensor per policy
        parameter (zeros for a network without BatchNorm)."""
        names, weights = self._weights()
        augmented, heatmaps, weight = self.augment(train, noise)
        train_grad, _ = self._train_gradient_at_w(names, weights, augmented, heatmaps, weight)
        loss = self._batchnorm_path_loss(names, self._unrolled_weights(weights, train_grad), augmented, val)
        if not loss.requires_grad:
            return [torch.zeros_like(p) for p in self.policy.parameters()]
        return self._dense(torch.autograd.grad(loss, list(self.policy.parameters()), allow_unused=True))

    def _sample_alignments(
        self,
        names: list[str],
        weights: Sequence[Tensor],
        v: Sequence[Tensor],
        images: Tensor,
        heatmaps,
        weight,
    ) -> Tensor:
        """``(B,)``: ``∇w L_i · v`` for each training sample's own loss ``L_i`` (the batch loss is
        their mean), by the central difference of ``L_i`` at ``w ± εv`` (batch statistics,
        running ones untouched). Positive: a step on sample ``i`` lowers the val loss."""
        epsilon = self.fd_radius / max(float(_global_norm(v)), 1e-12)
        losses = []
        for direction in (1.0, -1.0):
            shifted = [w.detach() + direction * epsilon * d for w, d in zip(weights, v, strict=True)]
            with torch.no_grad(), frozen_batchnorm_stats(self._net):
                outputs = functional_call(
                    self._net, dict(zip(names, shifted, strict=True)), (images.detach(),)
                )
                losses.append(self._per_sample_losses(outputs, heatmaps.detach(), weight))
        return (losses[0] - losses[1]) / (2 * epsilon)

    def _per_sample_losses(self, outputs: object, heatmaps: Tensor, weight: Tensor) -> Tensor:
        def sample(i: int) -> object:
            return (
                [o[i : i + 1] for o in outputs] if isinstance(outputs, (list, tuple)) else outputs[i : i + 1]
            )

        return torch.stack(
            [
                self.loss_fn(sample(i), heatmaps[i : i + 1], weight[i : i + 1])
                for i in range(heatmaps.shape[0])
            ]
        )

    def _score_gradient(self, alignment: Tensor, noise: PolicyNoise) -> list[Tensor | None]:
        """``−(ζ/B) Σ_i (a_i − b_i) ∇α log π(draws_i)``: the score-function estimate of the
        gradient of ``E[L_val(w − ζ g)]`` through the hard draws (``b_i`` the mean of the other
        samples' alignments, a baseline that keeps the estimate unbiased)."""
        batch = alignment.shape[0]
        baseline = (alignment.sum() - alignment) / max(batch - 1, 1)
        log_probability = self.policy.draw_log_probabilities(noise)
        surrogate = -(self.unroll_lr / batch) * ((alignment - baseline).detach() * log_probability).sum()
        return list(torch.autograd.grad(surrogate, list(self.policy.parameters()), allow_unused=True))

    def _choices(
        self, names, weights, v, augmented: Tensor, heatmaps: Tensor, weight: Tensor, noise: PolicyNoise
    ) -> list[Tensor | None] | None:
        """With ``choice_gradient="score"``, Eq. 8's score-function estimate on the draws' logits
        (None on the magnitudes); else None."""
        if self.choice_gradient != "score":
            return None
        alignment = self._sample_alignments(names, weights, v, augmented, heatmaps, weight)
        return self._score_gradient(alignment, noise)

    def pose_path_gradient(self, train: Batch, val: Batch, noise: PolicyNoise | None = None) -> list[Tensor]:
        """``∇α`` of the pose-geometry gap alone (not weighted by ``μ``), without changing
        anything: the term ``pose_path`` adds to Eq. 8. One tensor per policy parameter."""
        augmented, _, _, moved, moved_visibility = self._augmented(train, noise)
        loss = self._pose_gap_to(augmented, moved, moved_visibility, val)
        if not loss.requires_grad:
            return [torch.zeros_like(p) for p in self.policy.parameters()]
        return self._dense(torch.autograd.grad(loss, list(self.policy.parameters()), allow_unused=True))

    def _plain_batch(self, train: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The training batch without augmentation (crops cut from their canvases), its targets."""
        images, keypoints, visibility = train
        images, keypoints = cut_window(as_float_images(images), keypoints, self.canvas_pad)
        heatmaps, weight = self.codec.encode(keypoints, visibility)
        return images, heatmaps, weight

    def influence_gradient(
        self, train: Batch, val: Batch, noise: PolicyNoise | None = None, plain_control: bool = False
    ) -> list[Tensor]:
        """The score-function estimate of the policy's gradient on its hard draws (sub-policy,
        op, gate, direction), without changing anything: each sample's alignment
        ``∇w L_i · ∇w' L_val(w')`` credits the choices it was drawn with. One tensor per policy
        parameter (zeros for the magnitudes, which are not drawn). ``plain_control``: each
        alignment minus the same sample's without augmentation (a control variate that does not
        depend on the draws; ``benchmarks/search_signal.py`` measures both)."""
        if not self.policy.hard:
            raise ValueError("the draws' score function needs a policy with hard=True")
        names, weights = self._weights()
        if noise is None:
            noise = self.policy.sample_noise(train[0].shape[0])
        augmented, heatmaps, weight = self.augment(train, noise)
        train_grad, _ = self._train_gradient_at_w(names, weights, augmented, heatmaps, weight)
        v, _ = self._unrolled_val_gradient(names, weights, train_grad, val)
        alignment = self._sample_alignments(names, weights, v, augmented, heatmaps, weight)
        if plain_control:
            alignment = alignment - self._sample_alignments(names, weights, v, *self._plain_batch(train))
        return self._dense(self._score_gradient(alignment, noise))

    def state_dict(self) -> dict[str, Any]:
        """What a resumed search needs beyond the optimizers: the last hypergradient (for the
        cosine the next step reports) and the pose gradients gathered since the last policy
        step."""
        previous = self.previous_hypergradient
        gathered = self.pose_gradient_sum or []
        return {
            "previous_hypergradient": None if previous is None else previous.detach().cpu(),
            "pose_gradient_sum": [None if g is None else g.detach().cpu() for g in gathered],
            "pose_batches": self.pose_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        previous = state.get("previous_hypergradient")
        device = next(self.policy.parameters()).device
        self.previous_hypergradient = None if previous is None else previous.to(device)
        gathered = state.get("pose_gradient_sum") or []  # older checkpoints lack it
        self.pose_gradient_sum = [None if g is None else g.to(device) for g in gathered] or None
        self.pose_batches = int(state.get("pose_batches", 0))

    def step(self, train: Batch, val: Batch, noise: PolicyNoise | None = None) -> dict[str, float]:
        """One search step: moves the policy (Eq. 8) and the weights (augmented training loss).

        Args:
            train: ``(images, keypoints, visibility)`` to augment: ``B×3×H×W`` uint8 or
                float 0…1, ``B×K×2`` pixels, ``B×K``.
            val: the un-augmented validation batch, same layout (targets are encoded here).
            noise: the policy's random draws (fresh ones if ``None``).

        Returns:
            ``train_loss`` (at ``w``, augmented), ``val_loss`` (at the unrolled ``w'``, Eq. 8's
            pass), ``weight_grad_norm``, ``policy_grad_norm`` (all policy parameters) and
            ``policy_grad_norm/<parameter>`` (each), ``policy_grad_cosine`` (with the previous
            step's hypergradient; absent on the first step), ``fd_epsilon`` (0 for exact).
        """
        names, weights = self._weights()
        if noise is None:
            noise = self.policy.sample_noise(train[0].shape[0])
        augmented, heatmaps, weight, moved, moved_visibility = self._augmented(train, noise)

        # Step 2: the plain training pass through the real (possibly DDP) model.
        images_leaf = augmented.detach().requires_grad_(True)
        target_leaf = heatmaps.detach().requires_grad_(self.differentiate_targets)
        self.weight_optimizer.zero_grad(set_to_none=True)
        train_loss = self.loss_fn(self.model(images_leaf), target_leaf, weight)
        train_loss.backward()
        train_grad = [torch.zeros_like(w) if w.grad is None else w.grad.detach().clone() for w in weights]
        at_w = (images_leaf.grad,) + ((target_leaf.grad,) if self.differentiate_targets else ())

        # Steps 3–4: the unrolled validation gradient and the hypergradient.
        grads, val_loss, epsilon = self._policy_gradient(
            names,
            weights,
            train_grad,
            at_w,
            (augmented, heatmaps, weight, moved, moved_visibility),
            val,
            noise,
            self._take_pose_gradients() if self.pose_path > 0 else None,
        )

        # Step 5: both optimizers (the weights' .grad is still step 2's).
        self.policy_optimizer.zero_grad(set_to_none=True)
        for parameter, grad in zip(self.policy.parameters(), grads, strict=True):
            parameter.grad = torch.zeros_like(parameter) if grad is None else grad
        if dist.is_available() and dist.is_initialized():
            for parameter in self.policy.parameters():
                dist.all_reduce(parameter.grad)
                parameter.grad /= dist.get_world_size()
        policy_grad_norm = float(_global_norm([p.grad for p in self.policy.parameters()]))
        signal = self._signal_metrics()
        self.policy_optimizer.step()
        self.weight_optimizer.step()
        return {
            "train_loss": float(train_loss.detach()),
            "val_loss": float(val_loss),
            "weight_grad_norm": float(_global_norm(train_grad)),
            "policy_grad_norm": policy_grad_norm if math.isfinite(policy_grad_norm) else float("nan"),
            **signal,
            "fd_epsilon": epsilon,
        }

    def _signal_metrics(self) -> dict[str, float]:
        """Per-parameter norms of the hypergradient now in ``.grad``, and its cosine with the
        previous step's (which it then replaces)."""
        named = list(self.policy.named_parameters())
        metrics = {f"policy_grad_norm/{name}": float(p.grad.detach().norm()) for name, p in named}
        current = torch.cat([p.grad.detach().flatten() for _, p in named]).double()
        previous = self.previous_hypergradient
        norms = float(current.norm() * previous.norm()) if previous is not None else 0.0
        if norms > 0 and previous.shape == current.shape:  # a zero gradient has no direction
            metrics["policy_grad_cosine"] = float(current @ previous) / norms
        self.previous_hypergradient = current
        return metrics
