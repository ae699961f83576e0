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

Distributed: the weights' gradient is synchronised by DDP in step 2 (``w'`` and
``v`` then agree across ranks up to each rank's validation batch); the policy's
gradient is averaged over ranks before its step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from autopose.augment import RelaxedPolicy
from autopose.augment.policy import PolicyNoise, as_float_images
from autopose.data.codec import HeatmapCodec

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor, Tensor]  # images, keypoints, visibility
LossFn = Callable[[object, Tensor, Tensor], Tensor]
FD_RADIUS = 0.01  # DARTS: ε = 0.01 / ‖v‖


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


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (functional passes bypass the wrapper)."""
    return model.module if isinstance(getattr(model, "module", None), nn.Module) else model


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum((t.detach().float() ** 2).sum() for t in tensors))


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
    ):
        if val_batchnorm not in ("batch", "running"):
            raise ValueError(f"val_batchnorm must be 'batch' or 'running', got {val_batchnorm!r}")
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

    # -- pieces ----------------------------------------------------------------------------------
    @property
    def _net(self) -> nn.Module:
        return _unwrap(self.model)

    def _weights(self) -> tuple[list[str], list[Tensor]]:
        named = [(n, p) for n, p in self._net.named_parameters() if p.requires_grad]
        return [n for n, _ in named], [p for _, p in named]

    def augment(self, train: Batch, noise: PolicyNoise | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Augmented images (with the policy's graph) and their heatmap targets and weights."""
        images, keypoints, visibility = train
        images = as_float_images(images)
        if noise is None:
            noise = self.policy.sample_noise(images.shape[0])
        augmented, moved, moved_visibility = self.policy(images, keypoints, visibility, noise)
        if self.differentiate_targets:
            heatmaps, weight = self.codec.encode(moved, moved_visibility.detach())
        else:
            heatmaps, weight = self.codec.encode(moved.detach(), moved_visibility.detach())
        return augmented, heatmaps, weight

    def _val_targets(self, val: Batch) -> tuple[Tensor, Tensor, Tensor]:
        images, keypoints, visibility = val
        heatmaps, weight = self.codec.encode(keypoints, visibility)
        return as_float_images(images), heatmaps, weight

    def _loss_at(
        self, names: list[str], weights: Sequence[Tensor], images: Tensor, heatmaps, weight
    ) -> Tensor:
        outputs = functional_call(self._net, dict(zip(names, weights, strict=True)), (images,))
        return self.loss_fn(outputs, heatmaps, weight)

    def _unrolled_val_gradient(
        self, names: list[str], weights: list[Tensor], train_grad: list[Tensor], val: Batch
    ) -> tuple[list[Tensor], Tensor]:
        """``v = ∇w' L_val(w')`` with ``w' = w − ζ g``; also returns ``L_val(w')``."""
        images, heatmaps, weight = self._val_targets(val)
        unrolled = [
            (w.detach() - self.unroll_lr * g).requires_grad_(True)
            for w, g in zip(weights, train_grad, strict=True)
        ]
        statistics = running_batchnorm_stats if self.val_batchnorm == "running" else frozen_batchnorm_stats
        with statistics(self._net):
            loss = self._loss_at(names, unrolled, images, heatmaps, weight)
            v = torch.autograd.grad(loss, unrolled, allow_unused=True)
        v = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, v, strict=True)]
        return v, loss.detach()

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
        self, augmented: Tensor, heatmaps: Tensor, product: tuple[Tensor, ...]
    ) -> list[Tensor | None]:
        """``−ζ Jᵀ product``: one backward through the policy's graph."""
        outputs = [augmented]
        if self.differentiate_targets:
            outputs.append(heatmaps)
        return list(
            torch.autograd.grad(
                outputs,
                list(self.policy.parameters()),
                grad_outputs=[-self.unroll_lr * p for p in product],
                allow_unused=True,
            )
        )

    # -- public ----------------------------------------------------------------------------------
    def hypergradient(
        self,
        train: Batch,
        val: Batch,
        noise: PolicyNoise | None = None,
        hessian: Literal["finite_difference", "exact"] | None = None,
    ) -> list[Tensor]:
        """The policy's gradient of Eq. 8 without changing anything (no steps, no BN
        statistics, no ``.grad``): for checks and tests. One tensor per policy parameter."""
        saved = self.hessian
        self.hessian = hessian or self.hessian
        try:
            names, weights = self._weights()
            augmented, heatmaps, weight = self.augment(train, noise)
            leaves, target = self._input_leaves(augmented, heatmaps)
            with frozen_batchnorm_stats(self._net):
                loss = self._loss_at(names, weights, leaves[0], target, weight)
                grads = torch.autograd.grad(loss, [*weights, *leaves], allow_unused=True)
            train_grad = [
                torch.zeros_like(w) if g is None else g
                for w, g in zip(weights, grads[: len(weights)], strict=True)
            ]
            at_w = tuple(grads[len(weights) :])
            v, _ = self._unrolled_val_gradient(names, weights, train_grad, val)
            product, _ = self._mixed_product(names, weights, v, augmented, heatmaps, weight, at_w)
            grads = self._policy_gradient_from(augmented, heatmaps, product)
            return [
                torch.zeros_like(p) if g is None else g
                for p, g in zip(self.policy.parameters(), grads, strict=True)
            ]
        finally:
            self.hessian = saved

    def step(self, train: Batch, val: Batch, noise: PolicyNoise | None = None) -> dict[str, float]:
        """One search step: moves the policy (Eq. 8) and the weights (augmented training loss).

        Args:
            train: ``(images, keypoints, visibility)`` to augment: ``B×3×H×W`` uint8 or
                float 0…1, ``B×K×2`` pixels, ``B×K``.
            val: the un-augmented validation batch, same layout (targets are encoded here).
            noise: the policy's random draws (fresh ones if ``None``).

        Returns:
            ``train_loss`` (at ``w``, augmented), ``val_loss`` (at the unrolled ``w'``),
            ``weight_grad_norm``, ``policy_grad_norm``, ``fd_epsilon`` (0 for exact).
        """
        names, weights = self._weights()
        augmented, heatmaps, weight = self.augment(train, noise)

        # Step 2: the plain training pass through the real (possibly DDP) model.
        images_leaf = augmented.detach().requires_grad_(True)
        target_leaf = heatmaps.detach().requires_grad_(self.differentiate_targets)
        self.weight_optimizer.zero_grad(set_to_none=True)
        train_loss = self.loss_fn(self.model(images_leaf), target_leaf, weight)
        train_loss.backward()
        train_grad = [torch.zeros_like(w) if w.grad is None else w.grad.detach().clone() for w in weights]
        at_w = (images_leaf.grad,) + ((target_leaf.grad,) if self.differentiate_targets else ())

        # Steps 3–4: the unrolled validation gradient and the hypergradient.
        v, val_loss = self._unrolled_val_gradient(names, weights, train_grad, val)
        product, epsilon = self._mixed_product(names, weights, v, augmented, heatmaps, weight, at_w)
        grads = self._policy_gradient_from(augmented, heatmaps, product)

        # Step 5: both optimizers (the weights' .grad is still step 2's).
        self.policy_optimizer.zero_grad(set_to_none=True)
        for parameter, grad in zip(self.policy.parameters(), grads, strict=True):
            parameter.grad = torch.zeros_like(parameter) if grad is None else grad
        if dist.is_available() and dist.is_initialized():
            for parameter in self.policy.parameters():
                dist.all_reduce(parameter.grad)
                parameter.grad /= dist.get_world_size()
        policy_grad_norm = float(_global_norm([p.grad for p in self.policy.parameters()]))
        self.policy_optimizer.step()
        self.weight_optimizer.step()
        return {
            "train_loss": float(train_loss.detach()),
            "val_loss": float(val_loss),
            "weight_grad_norm": float(_global_norm(train_grad)),
            "policy_grad_norm": policy_grad_norm if math.isfinite(policy_grad_norm) else float("nan"),
            "fd_epsilon": epsilon,
        }
