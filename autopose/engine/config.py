"""Typed training configuration, loaded from YAML mappings with strict checks.

The sections here describe one training run (data, model, optimisation, the
bi-level search's hyperparameters); :mod:`autopose.platform.config` adds the
experiment-level sections (tracking, trials, Tune) on top. Nothing here knows
Ray or MLflow.

Every value is checked against its dataclass field's type when the file is
read, so that a typo fails at once, in one line naming the file and the dotted
field (``train.epochs``), long before any worker starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autopose.errors import AutoposeError
from autopose.files import read_yaml

RUN_URI_PREFIX = "runs:/"  # train.init_from naming an MLflow run instead of a file


# -- the generic loader ----------------------------------------------------------------
def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AutoposeError(f"expected a mapping at the top level, got {type(data).__name__}", path=path)
    return data


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple):
        return str(annotation).replace("typing.", "")
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _convert(value: Any, annotation: Any, *, path: str | Path | None, where: str) -> Any:
    """``value`` checked (and gently converted) against ``annotation``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    def fail() -> typing.NoReturn:
        raise AutoposeError(
            f"expected {_type_name(annotation)}, got {value!r} ({type(value).__name__})",
            path=path,
            field=where,
        )

    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path=path, where=where)
            except AutoposeError as error:
                errors.append(error)
        # a single non-null option gives the more precise message
        if len([arg for arg in args if arg is not type(None)]) == 1:
            raise errors[0]
        fail()
    if origin is Literal:
        if value in args:
            return value
        raise AutoposeError(
            f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}", path=path, field=where
        )
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            fail()
        return build_dataclass(annotation, value, path=path, field=where)
    if origin is list:
        if not isinstance(value, list | tuple):
            fail()
        (item,) = args
        return [_convert(v, item, path=path, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            fail()
        return tuple(
            _convert(v, a, path=path, where=f"{where}[{i}]")
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if annotation is float:
        # YAML reads "1e-3" as a string (it wants "1.0e-3"): accept numeric strings for floats.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail()
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail()
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            fail()
        return value
    raise TypeError(f"config field {where}: unsupported annotation {annotation!r}")


def build_dataclass(cls: type, data: dict[str, Any], *, path: str | Path | None = None, field: str = ""):
    """An instance of dataclass ``cls`` from a mapping, every key and value checked.

    Unknown keys, wrong types and values outside a ``Literal`` raise
    :class:`AutoposeError` naming ``path`` and the dotted field. A dataclass may
    define ``_check(self, path, field)`` for checks across fields.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{field}." if field else ""
    for key in data:
        if key not in known:
            close = _closest(str(key), known)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise AutoposeError(
                f"unknown key{hint}; expected one of: {', '.join(known)}", path=path, field=f"{prefix}{key}"
            )
    values = {
        key: _convert(value, hints[key], path=path, where=f"{prefix}{key}") for key, value in data.items()
    }
    instance = cls(**values)
    check = getattr(instance, "_check", None)
    if check is not None:
        check(path, field)
    return instance


def _closest(key: str, candidates: typing.Iterable[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def to_plain(value: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for YAML, MLflow params and Ray configs)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def absolute_path(value: str | None) -> str | None:
    """Relative paths in configs are taken from the working directory, made absolute at load
    time so that Ray workers (which change directory) still find them."""
    if value is None:
        return None
    return str(Path(os.path.expanduser(value)).absolute())


def _positive(value: float | int | None, name: str, path, field_: str, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise AutoposeError(f"must be {bound}, got {value}", path=path, field=f"{field_}.{name}".lstrip("."))


# -- the sections ----------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where the crops come from.

    Either Parquet proxies (``train`` / ``val``, from ``autopose data
    build-proxy``) or, for full training, a COCO annotation file with its image
    folder (``train_ann`` + ``train_images``: crops made on the fly by the
    DataLoader workers). Validation always reads a proxy (``val``).

    ``search_val``: the proxy a search trial's policy step reads, a split held out from
    the val distribution (``autopose data synth --holdout-images``, or part of the target
    data you will not score on). Null: the policy steps on ``val`` itself, and the search
    trials' val AP is optimistic against the baselines'.

    ``train_margin``: crops made on the fly from ``train_ann`` are cut on a canvas this many
    times their sides, so that the policy's geometric ops bring in the image around the person
    (a proxy stores its own canvas: ``build-proxy --margin``); 1 cuts the crop alone.
    """

    train: str | None = None
    val: str | None = None
    search_val: str | None = None
    train_ann: str | None = None
    train_images: str | None = None
    max_val_samples: int | None = None
    train_margin: float = 1.0

    def _check(self, path, field_: str) -> None:
        for name in ("train", "val", "search_val", "train_ann", "train_images"):
            setattr(self, name, absolute_path(getattr(self, name)))
        if (self.train_ann is None) != (self.train_images is None):
            raise AutoposeError(
                "train_ann and train_images go together", path=path, field=f"{field_}.train_ann".lstrip(".")
            )
        if self.train is None and self.train_ann is None:
            raise AutoposeError(
                "no training data: give a proxy (train) or train_ann + train_images",
                path=path,
                field=f"{field_}.train".lstrip("."),
            )
        if self.val is None:
            raise AutoposeError("the val proxy is required", path=path, field=f"{field_}.val".lstrip("."))
        for name in ("train", "val", "search_val", "train_ann"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                hint = " (build it with `autopose data build-proxy`)" if name != "train_ann" else ""
                raise AutoposeError(
                    f"file not found: {value}{hint}", path=path, field=f"{field_}.{name}".lstrip(".")
                )
        if self.train_images is not None and not Path(self.train_images).is_dir():
            raise AutoposeError(
                f"folder not found: {self.train_images}",
                path=path,
                field=f"{field_}.train_images".lstrip("."),
            )
        _positive(self.max_val_samples, "max_val_samples", path, field_)
        check_margin(self.train_margin, path, f"{field_}.train_margin".lstrip("."))


def check_margin(margin: float, path, field_: str) -> None:
    """A canvas margin as :func:`autopose.data.transforms.check_margin` accepts it, or the field
    is named."""
    from autopose.data import transforms

    try:
        transforms.check_margin(margin)
    except ValueError as error:
        raise AutoposeError(str(error), path=path, field=field_) from None


@dataclass
class ModelConfig:
    """The network: ``build_model(arch, num_joints, input_size, **options)``.

    ``options`` are P2Net's switches (``use_apm: false``, ``pyramid_channels: 32``
    for tiny test models …); lists become tuples. ``pretrained``: a local ImageNet
    ResNet checkpoint for the backbone (nothing is downloaded). ``heatmap_sigma``: the
    training targets' Gaussian σ in heatmap pixels; null derives it from the input size
    (2 at 256×192, 3 at 384×288: :func:`autopose.data.codec.heatmap_sigma`).
    """

    arch: str = "p2net_r50"
    input_size: tuple[int, int] = (256, 192)
    num_joints: int = 17
    options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    heatmap_sigma: float | None = None

    def build_kwargs(self) -> dict[str, Any]:
        return {key: tuple(v) if isinstance(v, list) else v for key, v in self.options.items()}

    def _check(self, path, field_: str) -> None:
        from autopose.models import ARCHITECTURES

        self.pretrained = absolute_path(self.pretrained)
        if self.pretrained is not None and not Path(self.pretrained).is_file():
            raise AutoposeError(
                f"file not found: {self.pretrained}", path=path, field=f"{field_}.pretrained".lstrip(".")
            )
        if self.arch not in ARCHITECTURES:
            raise AutoposeError(
                f"unknown architecture {self.arch!r}; valid: {', '.join(ARCHITECTURES)}",
                path=path,
                field=f"{field_}.arch".lstrip("."),
            )
        height, width = self.input_size
        if height <= 0 or width <= 0 or height % 4 or width % 4:
            raise AutoposeError(
                f"input_size must be positive multiples of 4, got {list(self.input_size)}",
                path=path,
                field=f"{field_}.input_size".lstrip("."),
            )
        _positive(self.num_joints, "num_joints", path, field_)
        _positive(self.heatmap_sigma, "heatmap_sigma", path, field_)


@dataclass
class TrainConfig:
    """One training run's budget and its place on the cluster.

    ``num_workers`` is the number of Ray Train workers (DDP); 0 runs the loop in
    the trial's own process (the fast path for tiny CPU trials).
    ``steps_per_epoch`` caps an epoch (null: one pass over the data). The learning
    rate is multiplied by ``lr_gamma`` at each epoch in ``lr_milestones`` (SimpleBaseline
    and HRNet: ×0.1 at epochs 90 and 120 of 140).
    ``init_from``: the weights the run starts from (a warm start; optimizer and epochs
    start fresh): an autopose checkpoint file, or ``runs:/<run id>`` of an MLflow run that
    recorded one (resolved by the platform before training starts).
    ``holdout_every_epoch``: score the held-out split (``data.search_val``) after every epoch,
    not only after the last (the ``tpe`` method stops weak candidates early on it).
    """

    epochs: int = 10
    steps_per_epoch: int | None = None
    batch_size: int = 32
    lr: float = 1.0e-3
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    weight_decay: float = 0.0
    ohkm_topk: int = 10  # the paper's α (autopose.models.losses.OHKM_TOPK)
    seed: int = 0
    loader_workers: int = 0
    val_batch_size: int = 64
    num_workers: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None
    max_failures: int = 1
    checkpoint_every: int = 1
    init_from: str | None = None
    holdout_every_epoch: bool = False

    def _check(self, path, field_: str) -> None:
        if self.init_from is not None and not self.init_from.startswith(RUN_URI_PREFIX):
            self.init_from = absolute_path(self.init_from)
            if not Path(self.init_from).is_file():
                raise AutoposeError(
                    f"checkpoint not found: {self.init_from} (a checkpoint file or runs:/<run id>)",
                    path=path,
                    field=f"{field_}.init_from".lstrip("."),
                )
        for name in ("epochs", "batch_size", "val_batch_size", "checkpoint_every"):
            _positive(getattr(self, name), name, path, field_)
        _positive(self.steps_per_epoch, "steps_per_epoch", path, field_)
        _positive(self.lr, "lr", path, field_)
        _positive(self.lr_gamma, "lr_gamma", path, field_)
        if any(m <= 0 for m in self.lr_milestones) or sorted(self.lr_milestones) != self.lr_milestones:
            raise AutoposeError(
                f"must be increasing positive epochs, got {self.lr_milestones}",
                path=path,
                field=f"{field_}.lr_milestones".lstrip("."),
            )
        _positive(self.threads_per_worker, "threads_per_worker", path, field_)
        for name in ("weight_decay", "ohkm_topk", "loader_workers", "num_workers", "gpus_per_worker"):
            _positive(getattr(self, name), name, path, field_, allow_zero=True)
        _positive(self.cpus_per_worker, "cpus_per_worker", path, field_)
        if self.max_failures < -1:
            raise AutoposeError(
                "must be ≥ -1 (-1: retry forever)", path=path, field=f"{field_}.max_failures".lstrip(".")
            )


# The search settings an experiment may give as a [low, high] range that Optuna samples.
RANGED_SETTINGS = ("tau1", "tau2", "policy_lr")


@dataclass
class BilevelConfig:
    """The differentiable search's hyperparameters (the paper's Eq. 6–8).

    ``tau1`` is the Gumbel-softmax temperature over sub-policies, ``tau2`` the
    relaxed-Bernoulli temperature of each op's probability; with ``*_final``
    given they anneal geometrically from the start value to it over the run. ``unroll_lr`` is
    ζ of Eq. 8 (null: the weights' learning rate). ``hessian`` picks the
    second-order term: DARTS' central finite difference (``finite_difference``: two model
    passes at ``w ± εv``, error O(ε²)), the one-sided difference (``forward_difference``: one
    pass at ``w + εv`` against the image gradient the weight step has already taken at ``w``,
    error O(ε), one model pass fewer per policy step), or the exact product.
    ``num_sub_policies`` (K) and ``ops_per_sub_policy`` (N) override the space's.
    ``policy_betas`` are the policy's Adam betas. DARTS' (0.5, 0.999) remember the first
    steps' hypergradients, which on a network trained from scratch are orders of magnitude
    larger than later ones: Adam's second moment then keeps the policy's steps near zero for
    the rest of a short search (measured in the demo: op probabilities frozen after about
    40 steps). A shorter memory, e.g. ``[0.5, 0.9]``, lets the steps follow the gradient's scale.
    ``val_batchnorm``: ``batch`` normalizes the unrolled validation pass by its own batch
    statistics (DARTS); ``running`` by the running statistics, as evaluation does, so that a
    shift every val image shares (a darker val split) stays visible to the search
    (see :class:`autopose.engine.search.BilevelSearch`).

    Three options of the policy step, each off by default (today's search), to be switched on
    only where a benchmark shows them better:

    ``batchnorm_path`` (λ ≥ 0; 0 = off): adds ``λ ∇α L_val(w'; BN statistics of the augmented
    batch)`` to Eq. 8's hypergradient. Eq. 8 reaches the policy only through the unrolled
    weights ``w'``, but what darker (or blurrier …) training images change is largely
    BatchNorm's statistics, which Eq. 8 does not differentiate: in a probe a val split darker
    than train gave Eq. 8 a Brightness gradient that was noise, while this term had the same
    sign in 8 of 8 batches. Alone it matches the two batches' feature statistics and overshoots,
    so it is a weight beside Eq. 8. Costs a forward of the augmented batch and of the val batch
    at ``w'`` and their backward per search step: about 1.1–1.4 plain steps more (a search
    step of 3.3–4.3 plain steps becomes 4.4–5.7; small CPU models, p2net space).

    ``balance_paths``: with ``batchnorm_path > 0``, scales Eq. 8's hypergradient and the
    BatchNorm term each to unit norm per policy tensor before summing them, so that ``λ`` is
    their ratio: raw, the BatchNorm term is 5–150× larger and the sum is that term alone.

    ``batchnorm_scope``: ``all``, or ``photometric``: the BatchNorm term's gradient on the ops
    that move keypoints is dropped (image statistics move with a zoom or a turn too, by how much
    background a crop shows, which the labels do not need), leaving them to Eq. 8 and the pose term.

    ``policy_every`` (k ≥ 1; 1 = every step): the policy steps on every k-th weight step only
    (those whose step count is a multiple of k, so a resumed run picks the same ones); the
    other steps train the weights on the relaxed policy's augmentation without its gradient.
    A search step costs ``c`` ≈ 3–4 plain steps, so k amortises it to about ``1 + (c − 1)/k``;
    the policy sees fewer hypergradients, each as noisy as before (raise ``val_batch_size`` to
    average more val images into each).

    ``policy_optimizer``: ``adam`` (DARTS, with ``policy_betas``) or ``normalized``: each policy
    parameter tensor moves by exactly ``policy_lr`` in L2 along its own hypergradient
    (:class:`autopose.engine.search.NormalizedGradientDescent`). Per-coordinate Adam gives every
    coordinate a step of about ``policy_lr`` whatever the gradient's size, which turns a weak,
    noisy signal into a random walk; the normalized step keeps the relative sizes within a
    tensor. ``policy_lr`` then is a length per tensor, not per coordinate (a tensor of n
    coordinates moves about ``policy_lr·√n`` under Adam): choose it for the optimizer.

    ``sampling``: how the search trial's relaxed policy augments. ``relaxed`` (default): each
    step mixes every op by its softmax weight, gated by relaxed Bernoulli samples (Eq. 6–7); the
    trained network then saw a mixture, not the discrete policy the search exports. ``hard``:
    each sample draws ONE op per step from the weights, a hard gate (probability ``p``) and, for
    a signed op, a hard direction (probability ``sign``), each with a straight-through gradient
    (:class:`autopose.augment.RelaxedPolicy` with ``hard=True``), so the trial trains on the
    distribution that ``export()`` writes (up to the share it drops).

    ``pose_path`` (μ ≥ 0; 0 = off): adds ``μ ∇α`` of the gap between the pose geometry of the
    augmented training batch and of the val batch (:func:`autopose.engine.search.pose_gap`:
    each batch's mean and spread of the labelled keypoints' centroid, size and principal axis in
    the crop). The BatchNorm term's counterpart for where the figures are, how large and how
    turned: a density match on the labels the val batch already carries, with no network pass.
    With ``balance_paths`` it is scaled to unit norm per policy tensor like the others, so ``μ``
    is its ratio to Eq. 8. It only reaches ops that move keypoints. Measured (known-answer
    suite, one base per seed, λ = 0.5 balanced): μ = 0.5 took the exported policy from +0.061 to
    +0.081 over none and the matching op on top from 5 to 10 of 18 cells.

    ``pose_every_step`` (needs ``pose_path > 0``): the pose term compares each training batch
    with the pose moments of the whole val split the search reads (``data.search_val``, else
    ``data.val``) instead of the val batch, and is also taken on the weight steps between policy
    steps; each policy step uses its mean over the batches since the last one (k = ``policy_every``
    times the samples, for one backward through the policy's graph per weight step).

    ``appearance_moments`` (needs ``pose_path > 0``): the pose term also compares the augmented
    crops' brightness, contrast and detail (their mean and spread over the batch) with the val
    side's, in the same units (:func:`autopose.engine.search.appearance_descriptors`), so that
    the photometric ops, which move no keypoint, are judged beside the geometric ones in one gap.
    With ``pose_every_step`` the val side is the moments of the val split's crops (up to
    :data:`autopose.engine.train.APPEARANCE_TARGET_SAMPLES` of them, decoded once).

    ``choice_gradient`` (hard sampling only): how Eq. 8's gradient reaches the drawn choices
    (sub-policy, op, gate, direction). ``straight_through`` (default): through the drawn op's
    strength at 1, a local derivative of how much the drawn op is applied. ``score``: each
    training sample's alignment with the val gradient (``∇w L_i · ∇w' L_val``, the first-order
    change of the val loss a step on that sample makes) credits the choices it was drawn with,
    by the score function (:meth:`autopose.engine.search.BilevelSearch.influence_gradient`):
    an unbiased estimate of Eq. 8's gradient on the draws' probabilities, whatever the op does
    between strength 0 and 1. Magnitudes keep Eq. 8's path; the BatchNorm term is added as
    before. Costs two forward passes of the training batch per search step. Measured: no sharper
    than straight-through at the suite's warm start, and −0.015 ± 0.039 on the suite (README).

    ``init_magnitude``: the ``m`` (0–10) every op starts at; null (default) starts no op at its
    identity (a signed op halfway from its identity to ``m = 10``, an unsigned one at 5), so
    every op's ``p`` and weight have a gradient from the first step; ``5.0`` is the start of
    searches before signs existed (the identity of ops with symmetric ranges).

    To judge the signal, each epoch's metrics hold the search steps' means of
    ``policy_grad_cosine`` (between consecutive hypergradients: near 0, the policy follows
    noise) and ``policy_grad_norm/<parameter>``.

    With ``tune.search_alg: optuna`` any of ``tau1``, ``tau2``, ``policy_lr``
    may be a ``[low, high]`` range that Optuna samples (log-uniform).
    """

    trials: int = 2
    tau1: float | tuple[float, float] = 1.0
    tau2: float | tuple[float, float] = 0.5
    tau1_final: float | None = None
    tau2_final: float | None = None
    policy_lr: float | tuple[float, float] = 3.0e-3
    unroll_lr: float | None = None
    hessian: Literal["finite_difference", "forward_difference", "exact"] = "finite_difference"
    num_sub_policies: int | None = None
    ops_per_sub_policy: int | None = None
    val_batch_size: int | None = None
    policy_betas: tuple[float, float] = (0.5, 0.999)
    val_batchnorm: Literal["batch", "running"] = "batch"
    batchnorm_path: float = 0.0
    balance_paths: bool = False
    batchnorm_scope: Literal["all", "photometric"] = "all"
    pose_path: float = 0.0
    pose_every_step: bool = False
    appearance_moments: bool = False
    policy_every: int = 1
    policy_optimizer: Literal["adam", "normalized"] = "adam"
    sampling: Literal["relaxed", "hard"] = "relaxed"
    choice_gradient: Literal["straight_through", "score"] = "straight_through"
    init_magnitude: float | None = None

    def _check(self, path, field_: str) -> None:
        _positive(self.trials, "trials", path, field_, allow_zero=True)
        if not (isinstance(self.policy_every, int) and self.policy_every >= 1):
            raise AutoposeError(
                f"must be an integer ≥ 1 (1: the policy steps every step), got {self.policy_every!r}",
                path=path,
                field=f"{field_}.policy_every".lstrip("."),
            )
        if not (self.batchnorm_path >= 0 and math.isfinite(self.batchnorm_path)):
            raise AutoposeError(
                f"must be finite and ≥ 0 (0: Eq. 8 alone), got {self.batchnorm_path}",
                path=path,
                field=f"{field_}.batchnorm_path".lstrip("."),
            )
        if not (self.pose_path >= 0 and math.isfinite(self.pose_path)):
            raise AutoposeError(
                f"must be finite and ≥ 0 (0: off), got {self.pose_path}",
                path=path,
                field=f"{field_}.pose_path".lstrip("."),
            )
        if self.pose_every_step and not self.pose_path > 0:
            raise AutoposeError(
                "takes the pose term on every step: it needs pose_path > 0",
                path=path,
                field=f"{field_}.pose_every_step".lstrip("."),
            )
        if self.appearance_moments and not self.pose_path > 0:
            raise AutoposeError(
                "joins the pose term: it needs pose_path > 0",
                path=path,
                field=f"{field_}.appearance_moments".lstrip("."),
            )
        hints = typing.get_type_hints(BilevelConfig)
        for name in ("hessian", "batchnorm_scope", "policy_optimizer", "sampling", "choice_gradient"):
            allowed, value = typing.get_args(hints[name]), getattr(self, name)
            if value not in allowed:
                raise AutoposeError(
                    f"expected one of {', '.join(map(repr, allowed))}, got {value!r}",
                    path=path,
                    field=f"{field_}.{name}".lstrip("."),
                )
        if self.choice_gradient == "score" and self.sampling != "hard":
            raise AutoposeError(
                "'score' credits hard draws: it needs sampling: hard",
                path=path,
                field=f"{field_}.choice_gradient".lstrip("."),
            )
        start = self.init_magnitude
        if start is not None and not (isinstance(start, int | float) and 0.0 < start < 10.0):
            raise AutoposeError(
                f"must lie in (0, 10) (null: start off the identity), got {start!r}",
                path=path,
                field=f"{field_}.init_magnitude".lstrip("."),
            )
        if not all(0.0 <= beta < 1.0 for beta in self.policy_betas):
            raise AutoposeError(
                f"Adam betas must lie in [0, 1), got {list(self.policy_betas)}",
                path=path,
                field=f"{field_}.policy_betas".lstrip("."),
            )
        for name in ("tau1", "tau2", "policy_lr"):
            value = getattr(self, name)
            bounds = value if isinstance(value, tuple) else (value,)
            for bound in bounds:
                _positive(bound, name, path, field_)
            if isinstance(value, tuple) and value[0] > value[1]:
                raise AutoposeError(
                    f"range must be [low, high], got {list(value)}",
                    path=path,
                    field=f"{field_}.{name}".lstrip("."),
                )
        for name in ("tau1_final", "tau2_final", "unroll_lr", "num_sub_policies", "ops_per_sub_policy"):
            _positive(getattr(self, name), name, path, field_)
        _positive(self.val_batch_size, "val_batch_size", path, field_)

    def is_range(self, name: str) -> bool:
        return isinstance(getattr(self, name), tuple)

    def resolved(self, **overrides: float) -> BilevelConfig:
        """A copy with ranges replaced by the sampled values in ``overrides``
        (the range's geometric middle where none is given). Done once, where a trial gets its
        settings (``autopose.platform.tune.trial_spec``); the trial's search reads them as they are."""
        values = {}
        for name in RANGED_SETTINGS:
            value = overrides.get(name, getattr(self, name))
            if isinstance(value, tuple):
                value = (value[0] * value[1]) ** 0.5
            values[name] = float(value)
        return dataclasses.replace(self, **values)

    def require_resolved(self) -> None:
        """Raise unless every setting holds one value (no ``[low, high]`` range left)."""
        for name in RANGED_SETTINGS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                raise AutoposeError(
                    f"is a range {list(value)}: a search trial needs one value (resolved())",
                    field=f"search.{name}",
                )


@dataclass
class AugmentSpec:
    """What one trial trains with.

    ``kind`` is ``search`` (a RelaxedPolicy learned by the bi-level step),
    ``random`` (a random policy from the space, drawn with ``seed``),
    ``handcrafted``, ``none``, ``randaugment``, ``trivialaugment``, or
    ``policy`` (a discrete policy given as its JSON mapping in ``policy``).
    """

    kind: Literal["search", "random", "handcrafted", "none", "randaugment", "trivialaugment", "policy"]
    seed: int = 0
    policy: dict[str, Any] | None = field(default=None)
    bilevel: BilevelConfig | None = None
