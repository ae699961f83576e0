"""The training loop: one trial's (or one full training's) work, without Ray.

:class:`Trainer` builds the model, loss and optimizer, the data loaders (the
Parquet proxy, or on-the-fly COCO crops), and the trial's augmentation; each
step augments the batch on tensors, rebuilds the heatmap targets from the moved
keypoints with the codec, and takes an optimizer step (for a search trial, the
bi-level step of :class:`autopose.engine.search.BilevelSearch`, which also moves
the policy). After every epoch it scores OKS AP on the val proxy (pycocotools)
and calls the hooks, which is where the platform reports to Ray and MLflow and
saves checkpoints.

Distributed: when a ``torch.distributed`` process group exists (Ray Train, or
torchrun) the model is wrapped in DDP and the training data sharded with a
``DistributedSampler``; rank 0 evaluates and shares the metrics, so every rank
reports the same numbers equally often. Nothing here imports Ray.

Resuming: :meth:`Trainer.state_dict` holds everything a continued run needs
(weights, optimizers, the policy and its optimizer, epoch, optimizer-step
count, every random generator); :meth:`Trainer.save` writes it as an autopose
checkpoint that ``autopose evaluate`` can also read. A run resumed from the
checkpoint of epoch ``e`` continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate

from autopose.augment import (
    Handcrafted,
    Policy,
    RandAugment,
    RelaxedPolicy,
    SearchSpace,
    TemperatureSchedule,
    TrivialAugment,
    no_policy,
    random_policy,
)
from autopose.augment.policy import as_float_images
from autopose.augment.schedule import PolicySchedule, policy_from_document, schedule_document
from autopose.data import CocoCropDataset, HeatmapCodec, ProxyDataset, load_coco
from autopose.data.proxy import ProxyMetadata, read_proxy_metadata
from autopose.data.transforms import cut_window
from autopose.engine.checkpoint import load_checkpoint, save_checkpoint
from autopose.engine.config import (
    RUN_URI_PREFIX,
    AugmentSpec,
    BilevelConfig,
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from autopose.engine.proxy_scoring import evaluate_proxy
from autopose.errors import AutoposeError

Tensor = torch.Tensor
Augment = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
BASELINE_FORMAT = "autopose.baseline/1"
MPII_UPPER_BODY = tuple(range(7, 16))  # thorax … wrists in MPII's joint order
# The random orders below are seeded by numbers, not by a generator's state, so that a resumed run
# draws what the uninterrupted one would. seed·SEED_STRIDE + (epoch, or VAL_ORDER_OFFSET + round)
# keeps the streams of nearby seeds apart (the stride exceeds any epoch or round count) and the
# val-batch order apart from the training order of the same seed; RANK_OFFSET starts each DDP
# rank's val batches that many search steps further on, so that ranks read different batches;
# PASS_STRIDE does for a further pass within one epoch what the stride does for seeds. Primes, to
# land apart; the values stay as they are, since results depend on them.
SEED_STRIDE, VAL_ORDER_OFFSET, RANK_OFFSET = 100_003, 17, 7919
PASS_STRIDE = 1_000_003
# The appearance moments' target reads at most this many crops of the val split, decoded once at
# the start of a search trial (the demo's holdout split holds fewer; a mean and a spread of three
# features are known to about 2 % of the spread from this many)
APPEARANCE_TARGET_SAMPLES = 2048


# -- what the loop hands to its hooks -----------------------------------------------------------------
@dataclass
class EpochReport:
    """The outcome of one epoch, given to :meth:`TrainHooks.on_epoch_end`.

    Attributes:
        epoch: the epoch just finished, counted from 0.
        step: optimizer steps taken so far (the weights' optimizer).
        metrics: ``train_loss``, ``val_ap`` … (the same on every rank).
        is_last: the run's final epoch.
    """

    epoch: int
    step: int
    metrics: dict[str, float]
    is_last: bool


class TrainHooks:
    """Callbacks of :meth:`Trainer.run`; the platform subclasses this (the defaults do nothing).

    ``on_epoch_end`` runs on every rank after every epoch (Ray's ``report`` is a
    barrier: each rank must call it equally often); use ``trainer.is_main`` for
    what only one rank should do.
    """

    def on_epoch_end(self, report: EpochReport, trainer: Trainer) -> None:
        pass


@dataclass
class TrainResult:
    """What :meth:`Trainer.run` returns."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    epochs: int = 0
    wall_s: float = 0.0


# -- helpers ---------------------------------------------------------------------------------------------
def distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _generator_state(augment: Any) -> Tensor | None:
    generator = getattr(augment, "generator", None)
    return generator.get_state() if isinstance(generator, torch.Generator) else None


def _python_rng_state() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _set_python_rng_state(saved: list) -> None:
    version, state, gauss = saved
    random.setstate((version, tuple(state), gauss))


def _numpy_rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def _set_numpy_rng_state(saved: dict) -> None:
    keys = saved["keys"].numpy().astype(np.uint32)
    np.random.set_state((saved["name"], keys, saved["pos"], saved["has_gauss"], saved["cached"]))


def search_space_from(
    space: SearchSpace | dict[str, Any], bilevel: BilevelConfig | None = None
) -> SearchSpace:
    """The space as a :class:`SearchSpace`, with the search config's K and N applied."""
    if isinstance(space, dict):
        space = SearchSpace.from_dict(space)
    if bilevel is not None and (bilevel.num_sub_policies or bilevel.ops_per_sub_policy):
        space = dataclasses.replace(
            space,
            num_sub_policies=bilevel.num_sub_policies or space.num_sub_policies,
            ops_per_sub_policy=bilevel.ops_per_sub_policy or space.ops_per_sub_policy,
        )
    return space


def build_augment(
    spec: AugmentSpec,
    space: SearchSpace,
    *,
    flip_pairs: tuple[tuple[int, int], ...],
    dataset: str,
    total_steps: int,
) -> Augment:
    """The augmentation a trial trains with (see :class:`~autopose.engine.config.AugmentSpec`);
    its space bound to the dataset's left/right keypoint pairs (which FlipLR swaps)."""
    space = space.with_flip_pairs(flip_pairs)
    if spec.kind == "search":
        bilevel = spec.bilevel or BilevelConfig()
        bilevel._check(None, "search")  # before RelaxedPolicy, whose errors name no field
        bilevel.require_resolved()
        anneal = bilevel.tau1_final is not None or bilevel.tau2_final is not None
        schedule = TemperatureSchedule(
            tau1=bilevel.tau1,
            tau2=bilevel.tau2,
            tau1_final=bilevel.tau1_final,
            tau2_final=bilevel.tau2_final,
            anneal_steps=total_steps if anneal else 0,
        )
        return RelaxedPolicy(
            search_space_from(space, bilevel),
            schedule,
            init_magnitude=bilevel.init_magnitude,
            seed=spec.seed,
            hard=bilevel.sampling == "hard",
        )
    if spec.kind == "random":
        return random_policy(space, spec.seed)
    if spec.kind == "handcrafted":
        upper = MPII_UPPER_BODY if dataset == "mpii" else None
        kwargs = {"upper_body": upper} if upper is not None else {}
        return Handcrafted(flip_pairs=flip_pairs, seed=spec.seed, **kwargs)
    if spec.kind == "none":
        return no_policy()
    if spec.kind == "randaugment":
        return RandAugment(space, seed=spec.seed)
    if spec.kind == "trivialaugment":
        return TrivialAugment(space, seed=spec.seed)
    if spec.kind == "policy":
        if spec.policy is None:
            raise AutoposeError("a 'policy' trial needs the policy's JSON", field="policy")
        if spec.policy.get("format") == BASELINE_FORMAT:
            baseline = dataclasses.replace(spec, kind=spec.policy.get("kind", "none"), policy=None)
            return build_augment(
                baseline, space, flip_pairs=flip_pairs, dataset=dataset, total_steps=total_steps
            )
        policy = policy_from_document(spec.policy, space=space, seed=spec.seed)
        # A schedule covers the same shares of this training as of the one it was found in.
        return policy.stretched(total_steps) if isinstance(policy, PolicySchedule) else policy
    raise AutoposeError(f"unknown trial kind {spec.kind!r}", field="kind")


def policy_document(augment: Any, kind: str, seed: int) -> dict[str, Any]:
    """What ``policy/policy.json`` holds: the policy's JSON (the searched one exported),
    or for baselines that are not a :class:`Policy` a small description of them."""
    if isinstance(augment, RelaxedPolicy):
        return augment.export().to_dict()
    if isinstance(augment, Policy | PolicySchedule):
        return augment.to_dict()
    return {"format": BASELINE_FORMAT, "kind": kind, "seed": seed, "description": repr(augment)}


def discrete_augment(augment: Any) -> Augment:
    """A callable for pictures and final policies: the exported policy of a search, the last
    policy of a schedule."""
    if isinstance(augment, RelaxedPolicy):
        return augment.export(seed=0)
    if isinstance(augment, PolicySchedule):
        return augment.final_policy
    return augment


def _continued(saved: list, current: dict[str, Any], step: int) -> list[tuple[int, dict[str, Any]]]:
    """The policies a run resumed at ``step`` has trained with: the checkpoint's (``saved``),
    then ``current`` from ``step`` on when it is another policy."""
    trained = [(int(start), dict(document)) for start, document in saved]
    if trained[-1][1] == current:
        return trained
    if trained[-1][0] >= step:  # changed again before a step was taken with the last one
        trained.pop()
    return [*trained, (step, current)]


def _fitted_optimizer_state(
    saved: dict[str, Any], policy_state: dict[str, Tensor], policy: RelaxedPolicy
) -> dict[str, Any]:
    """The policy optimizer's saved state, fitted to a policy that has gained parameters since.

    A search checkpoint from before ``sign_logits`` existed lists 4 parameters in its one param
    group, the policy now has 5 (torch refuses a group of another size). The parameters its
    policy state lacks are the last ones registered (``RelaxedPolicy`` registers ``sign_logits``
    last): their indices are appended to the group with no state, so that the optimizer treats
    them as fresh parameters (Adam starts their moments at its first step). Anything else is
    returned as it is, for torch to judge.
    """
    names = [name for name, _ in policy.named_parameters()]
    missing = [name for name in names if name not in policy_state]
    groups = saved.get("param_groups", [])
    if not missing or names[-len(missing) :] != missing or len(groups) != 1:
        return saved
    params = list(groups[0]["params"])
    if len(params) != len(names) - len(missing):
        return saved
    first = max(params, default=-1) + 1
    added = list(range(first, first + len(missing)))
    return {**saved, "param_groups": [{**groups[0], "params": params + added}]}


# -- the trainer -----------------------------------------------------------------------------------------
def check_data(data: DataConfig, model: ModelConfig) -> None:
    """Before anything starts: every proxy ``data`` names exists, is an autopose proxy, and holds
    the crops and keypoints ``model`` takes; a COCO training set's files exist. Reads the proxies'
    footers only (milliseconds).

    Raises:
        AutoposeError: naming the file and the field (``data.train``, ``model.input_size`` …).
    """
    if data.train_ann is not None:
        if not Path(data.train_ann).is_file():
            raise AutoposeError("annotation file not found", path=data.train_ann, field="data.train_ann")
        if data.train_images is None or not Path(data.train_images).is_dir():
            raise AutoposeError("image folder not found", path=data.train_images, field="data.train_images")
    splits = {"train": data.train if data.train_ann is None else None, "val": data.val}
    splits["search_val"] = data.search_val
    for name, path in splits.items():
        if path is None:
            continue
        try:
            meta = read_proxy_metadata(Path(path))
        except AutoposeError as error:
            raise AutoposeError(error.message, path=path, field=error.field or f"data.{name}") from None
        field = "data.search_val" if name == "search_val" else None
        _check_proxy_fits(meta, name, model, path=path, field=field)


def _check_proxy_fits(
    meta: ProxyMetadata, name: str, model: ModelConfig, *, path: str, field: str | None = None
) -> None:
    """The proxy's crops and keypoints are what the model takes (``field``: where the error
    points; by default at the model setting that disagrees)."""
    height, width = model.input_size
    if tuple(meta.input_size) != (height, width):
        raise AutoposeError(
            f"the {name} proxy holds {meta.input_size[0]}x{meta.input_size[1]} crops, the model takes "
            f"{height}x{width}: rebuild it with --input {height}x{width}",
            path=path,
            field=field or "model.input_size",
        )
    if meta.num_keypoints != model.num_joints:
        raise AutoposeError(
            f"the {name} proxy has {meta.num_keypoints} keypoints, model.num_joints is {model.num_joints}",
            path=path,
            field=field or "model.num_joints",
        )


class Trainer:
    """One training run, without Ray (see the module docstring).

    Args:
        data: where the crops come from (proxy, or COCO json + images).
        model: architecture, input size, joints.
        train: the budget and optimisation settings.
        augment: the trial's augmentation (``search`` trains a RelaxedPolicy).
        space: the search space (a :class:`SearchSpace` or its mapping).
        device: where to train (default: ``cuda:LOCAL_RANK`` when CUDA is there, else CPU).
    """

    def __init__(
        self,
        data: DataConfig,
        model: ModelConfig,
        train: TrainConfig,
        augment: AugmentSpec,
        space: SearchSpace | dict[str, Any],
        *,
        device: torch.device | str | None = None,
    ):
        self.data_config, self.model_config, self.train_config, self.spec = data, model, train, augment
        self.rank, self.world_size = distributed()
        self.is_main = self.rank == 0
        if train.threads_per_worker:
            torch.set_num_threads(train.threads_per_worker)
        self.device = torch.device(device) if device is not None else self._default_device()
        seed_everything(train.seed + self.rank)

        self.val_set = ProxyDataset(Path(data.val))
        meta = self.val_set.metadata
        self.keypoint_names, self.flip_pairs = tuple(meta.keypoint_names), tuple(meta.flip_pairs)
        self.dataset_name = meta.dataset
        _check_proxy_fits(self.val_set.metadata, "val", model, path=data.val)
        self.train_set = self._train_dataset()
        self.canvas_pad: tuple[int, int] = self.train_set.canvas_pad
        # A split held out from the val distribution: the search's policy step reads it, and every
        # run scores it once at the end (``holdout_ap``) so that choices can be made without val.
        self.holdout_set: ProxyDataset | None = None
        if data.search_val is not None:
            self.holdout_set = ProxyDataset(Path(data.search_val))
            _check_proxy_fits(
                self.holdout_set.metadata, "search_val", model, path=data.search_val, field="data.search_val"
            )
        self.codec = HeatmapCodec(tuple(model.input_size), sigma=model.heatmap_sigma)
        self.space = search_space_from(space)

        from autopose.models import build_model
        from autopose.models.losses import PoseLoss

        self.net = build_model(
            model.arch,
            num_joints=model.num_joints,
            input_size=tuple(model.input_size),
            pretrained=model.pretrained,
            **model.build_kwargs(),
        ).to(self.device)
        if train.init_from is not None:
            self._load_initial_weights(train.init_from)
        self.loss_fn = PoseLoss(ohkm_topk=train.ohkm_topk)
        self.model: nn.Module = self.net
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=device_ids)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(train.lr_milestones), gamma=train.lr_gamma
        )

        self.sampler, self.loader = self._train_loader()
        if len(self.loader) == 0:
            raise AutoposeError(
                f"{len(self.train_set)} training crops make no batch of {train.batch_size}"
                + (f" per each of {self.world_size} workers" if self.world_size > 1 else ""),
                field="train.batch_size",
            )
        # An epoch is train.steps_per_epoch steps, passing over the data again when one pass (of
        # this worker's shard) holds fewer batches: the count in the config is the count done.
        self.steps_per_epoch = train.steps_per_epoch or len(self.loader)
        total_steps = self.steps_per_epoch * train.epochs
        self.total_steps = total_steps
        self.augment = build_augment(
            augment,
            self.space,
            flip_pairs=self.flip_pairs,
            dataset=self.dataset_name,
            total_steps=total_steps,
        )
        if isinstance(self.augment, nn.Module):
            self.augment.to(self.device)  # the relaxed policy's parameters live beside the images
        self.search = None
        self.policy_optimizer = None
        self.policy_every = 1
        if isinstance(self.augment, RelaxedPolicy):
            self._build_search(augment.bilevel or BilevelConfig())

        self.epoch = 0  # the next epoch to run
        self.step = 0  # optimizer steps taken
        self.wall_s = 0.0  # training time so far, across resumptions
        self.history: list[dict[str, float]] = []
        # A discrete policy's run: the policies it trained with, as (start step, document). A run
        # resumed with another policy than its checkpoint's (Population Based Augmentation hands a
        # trial a better one's checkpoint and a perturbed policy) trained with a schedule.
        self.trained_policies: list[tuple[int, dict[str, Any]]] = []
        if isinstance(self.augment, Policy):
            self.trained_policies = [(0, self.augment.to_dict())]

    # -- construction ---------------------------------------------------------------------------------
    def _default_device(self) -> torch.device:
        if torch.cuda.is_available():
            import os

            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")

    def _load_initial_weights(self, path: str) -> None:
        """Start from another run's weights (``train.init_from``); the checkpoint must hold
        the same network."""
        if path.startswith(RUN_URI_PREFIX):
            raise AutoposeError(
                f"{path} names an MLflow run: the platform resolves it to its checkpoint first",
                field="train.init_from",
            )
        model_state, meta = load_checkpoint(path)
        config = self.model_config
        mine = (config.arch, tuple(config.input_size), config.num_joints, config.build_kwargs())
        theirs = (meta["arch"], tuple(meta["input_size"]), meta["num_joints"], meta["model_kwargs"])
        if mine != theirs:
            raise AutoposeError(
                f"the checkpoint holds {theirs[0]} {theirs[1][0]}x{theirs[1][1]} with {theirs[2]} joints "
                f"and options {theirs[3]}, the model is {mine[0]} {mine[1][0]}x{mine[1][1]} with "
                f"{mine[2]} joints and options {mine[3]}",
                path=path,
                field="train.init_from",
            )
        self.net.load_state_dict(model_state)

    def _train_dataset(self) -> ProxyDataset | CocoCropDataset:
        data = self.data_config
        if data.train_ann is not None:
            instances = load_coco(Path(data.train_ann), Path(data.train_images), labelled_only=True)
            return CocoCropDataset(instances, tuple(self.model_config.input_size), margin=data.train_margin)
        # Canvases, when the proxy stores them: the policy's geometric ops bring in the image
        # around each crop, and the crop is cut after the policy (_plain_step, the search's augment).
        dataset = ProxyDataset(Path(data.train), canvas=True)
        _check_proxy_fits(dataset.metadata, "train", self.model_config, path=data.train)
        return dataset

    def _train_loader(self) -> tuple[DistributedSampler | None, DataLoader]:
        train = self.train_config
        sampler = None
        if self.world_size > 1:
            sampler = DistributedSampler(self.train_set, shuffle=True, seed=train.seed, drop_last=True)
        loader = DataLoader(
            self.train_set,
            batch_size=train.batch_size,
            shuffle=False,  # the order comes from _epoch_order / the sampler (reproducible on resume)
            sampler=sampler if sampler is not None else _EpochPermutation(len(self.train_set), train.seed),
            num_workers=train.loader_workers,
            drop_last=True,
            # A GPU copies from pinned pages without a staging copy (the batch moves non_blocking);
            # loaders outlive an epoch, which makes several passes over a small proxy.
            pin_memory=self.device.type == "cuda",
            persistent_workers=train.loader_workers > 0,
        )
        return sampler, loader

    def _build_search(self, bilevel: BilevelConfig) -> None:
        from autopose.engine.search import BilevelSearch, make_policy_optimizer

        # The α step's un-augmented batches come from the val distribution (see BilevelSearch):
        # from a held-out split of it when there is one, so the scored val split stays unseen.
        self.search_val_set = self.holdout_set if self.holdout_set is not None else self.val_set
        self.search_val_batch = min(
            bilevel.val_batch_size or self.train_config.batch_size, len(self.search_val_set)
        )
        self.policy_optimizer = make_policy_optimizer(
            bilevel.policy_optimizer,
            self.augment.parameters(),
            lr=bilevel.policy_lr,
            betas=tuple(bilevel.policy_betas),
        )
        self.search = BilevelSearch(
            model=self.model,
            policy=self.augment,
            loss_fn=self.loss_fn,
            codec=self.codec,
            weight_optimizer=self.optimizer,
            policy_optimizer=self.policy_optimizer,
            unroll_lr=bilevel.unroll_lr if bilevel.unroll_lr is not None else self.train_config.lr,
            hessian="exact" if bilevel.hessian == "exact" else "finite_difference",
            central=bilevel.hessian != "forward_difference",
            val_batchnorm=bilevel.val_batchnorm,
            batchnorm_path=bilevel.batchnorm_path,
            batchnorm_scope=bilevel.batchnorm_scope,
            balance_paths=bilevel.balance_paths,
            choice_gradient=bilevel.choice_gradient,
            pose_path=bilevel.pose_path,
            canvas_pad=self.canvas_pad,
            pose_target=self._split_pose_moments(self.search_val_set) if bilevel.pose_every_step else None,
            appearance=bilevel.appearance_moments,
            appearance_target=(
                self._split_appearance_moments(self.search_val_set)
                if bilevel.appearance_moments and bilevel.pose_every_step
                else None
            ),
        )
        self.policy_every = bilevel.policy_every

    def _split_pose_moments(self, split: ProxyDataset) -> tuple[Tensor, Tensor]:
        """The pose moments of every labelled sample of ``split`` (the pose term's target)."""
        from autopose.engine.search import feature_moments, pose_descriptors

        keypoints, visibility = split.labels()
        descriptors = pose_descriptors(keypoints.float(), visibility.float(), split.metadata.input_size)
        return tuple(m.to(self.device) for m in feature_moments(*descriptors))

    def _split_appearance_moments(self, split: ProxyDataset) -> tuple[Tensor, Tensor]:
        """The appearance moments of the first :data:`APPEARANCE_TARGET_SAMPLES` crops of
        ``split`` (the appearance term's target), in file order."""
        from autopose.engine.search import appearance_descriptors, feature_moments

        features, count = [], 0
        for batch in split.iter_batches(batch_size=64):
            images = as_float_images(batch["image"][: APPEARANCE_TARGET_SAMPLES - count])
            features.append(appearance_descriptors(images))
            count += images.shape[0]
            if count >= APPEARANCE_TARGET_SAMPLES:
                break
        stacked = torch.cat(features)
        valid = torch.ones(stacked.shape[0], dtype=torch.bool)
        return tuple(m.to(self.device) for m in feature_moments(stacked, valid))

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors and plain values only)."""
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "wall_s": self.wall_s,
            "history": [dict(h) for h in self.history],
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": _numpy_rng_state(),
                "python": _python_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "augment_generator": _generator_state(self.augment),
            "kind": self.spec.kind,
            "trained_policies": [[start, document] for start, document in self.trained_policies],
        }
        if isinstance(self.augment, RelaxedPolicy):
            state["policy"] = {k: v.detach().cpu() for k, v in self.augment.state_dict().items()}
            state["policy_optimizer"] = self.policy_optimizer.state_dict()
            state["search"] = self.search.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], model_state: dict[str, Tensor] | None = None) -> None:
        if state.get("kind") != self.spec.kind:
            raise AutoposeError(
                f"checkpoint is of a {state.get('kind')!r} run, not {self.spec.kind!r}", field="resume"
            )
        if model_state is not None:
            self.net.load_state_dict(model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.wall_s = float(state.get("wall_s", 0.0))
        self.history = [dict(h) for h in state.get("history", [])]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        _set_numpy_rng_state(rng["numpy"])
        _set_python_rng_state(rng["python"])
        if torch.cuda.is_available() and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
        generator = getattr(self.augment, "generator", None)
        if isinstance(generator, torch.Generator) and state.get("augment_generator") is not None:
            generator.set_state(state["augment_generator"])
        if self.trained_policies and state.get("trained_policies"):
            self.trained_policies = _continued(state["trained_policies"], self.augment.to_dict(), self.step)
        if isinstance(self.augment, RelaxedPolicy):
            self.augment.load_state_dict(state["policy"])
            self.policy_optimizer.load_state_dict(
                _fitted_optimizer_state(state["policy_optimizer"], state["policy"], self.augment)
            )
            self.search.load_state_dict(state.get("search", {}))  # older checkpoints lack it
            self.augment.set_step(self.step)

    def save(self, path: str | Path) -> Path:
        """Write an autopose checkpoint (weights + meta) whose ``extra`` is the training state."""
        return save_checkpoint(
            path,
            self.net,
            arch=self.model_config.arch,
            num_joints=self.model_config.num_joints,
            input_size=self.model_config.input_size,
            keypoint_names=self.keypoint_names,
            flip_pairs=self.flip_pairs,
            dataset=self.dataset_name,
            model_kwargs=self.model_config.build_kwargs(),
            extra={"training_state": self.state_dict()},
        )

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint written by :meth:`save`."""
        model_state, meta = load_checkpoint(path)
        state = meta["extra"].get("training_state")
        if state is None:
            raise AutoposeError("checkpoint holds no training state to resume from", path=path)
        self.load_state_dict(state, model_state)

    # -- the policy, for tracking ------------------------------------------------------------------
    def policy_document(self) -> dict[str, Any]:
        """What ``policy/policy.json`` holds: the trained policy, or the schedule of the policies
        a resumed run trained with when they differ."""
        if len(self.trained_policies) > 1:
            return schedule_document(self.trained_policies, self.total_steps)
        return policy_document(self.augment, self.spec.kind, self.spec.seed)

    def policy_metrics(self) -> dict[str, float]:
        """The learned policy in numbers (search only): ``op_prob/<op>`` (op probabilities),
        ``op_p/<op>`` (application probabilities), ``op_m/<op>`` (magnitudes), ``op_sign/<op>``
        (signed ops only: the chance the op runs at ``value(m)`` rather than mirrored),
        ``exported_share`` (the share of the policy's distribution that the exported policy
        keeps), ``tau1`` and ``tau2``.

        Like ``op_m``, ``op_sign`` averages over the sub-policies: two that turn opposite ways
        read as 1/2, as one that has not chosen its direction does (the exported policy tells
        them apart)."""
        if not isinstance(self.augment, RelaxedPolicy):
            return {}
        metrics = {"tau1": self.augment.tau1, "tau2": self.augment.tau2}
        signed = dict(zip(self.augment.space.op_names, self.augment.space.signed, strict=True))
        signs = {name: v for name, v in self.augment.sign_probabilities().items() if signed[name]}
        for prefix, values in (
            ("op_prob", self.augment.op_probabilities()),
            ("op_p", self.augment.application_probabilities()),
            ("op_m", self.augment.magnitudes()),
            ("op_sign", signs),  # an unsigned op's sign is always 1: not worth a series
        ):
            metrics.update({f"{prefix}/{name}": float(v) for name, v in values.items()})
        # The export's defaults: what policy/policy.json keeps (a beam of ≤ 64 per sub-policy).
        metrics["exported_share"] = self.augment.exported_share()
        return metrics

    # -- steps ---------------------------------------------------------------------------------
    def _targets(self, keypoints: Tensor, visibility: Tensor) -> tuple[Tensor, Tensor]:
        # Targets follow the moved keypoints but carry no gradient to the magnitudes.
        return self.codec.encode(keypoints.detach(), visibility.detach())

    def _batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        images = batch["image"].to(self.device, non_blocking=True).float().div_(255.0)
        keypoints = batch["keypoints"].to(self.device, non_blocking=True).float()
        visibility = batch["visibility"].to(self.device, non_blocking=True).float()
        return images, keypoints, visibility

    def _search_val_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """The val batch of the current search step: a function of the step alone, so that a
        resumed search sees the batches the uninterrupted one would have seen. Counted in
        search steps (``step // policy_every``), so that every batch of a pass is read."""
        size = self.search_val_batch
        per_pass = len(self.search_val_set) // size
        rounds, within = divmod(self.step // self.policy_every + self.rank * RANK_OFFSET, per_pass)
        seed = self.train_config.seed * SEED_STRIDE + VAL_ORDER_OFFSET + rounds
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.search_val_set), generator=generator)[
            within * size : (within + 1) * size
        ]
        batch = default_collate([self.search_val_set[int(i)] for i in order])
        return self._batch(batch)

    def _plain_step(self, images: Tensor, keypoints: Tensor, visibility: Tensor) -> dict[str, float]:
        """A weight step on the augmented batch; the augmentation (the relaxed policy of a search
        between its policy steps, too) runs without gradient, but for the pose term a search
        gathers on every step (``search.pose_every_step``)."""
        if isinstance(self.augment, RelaxedPolicy | PolicySchedule):
            self.augment.set_step(self.step)
        if self.search is not None and self.search.pose_target is not None:
            images, keypoints, visibility = self.search.augment_between_policy_steps(
                (images, keypoints, visibility)
            )
        else:
            with torch.no_grad():
                images, keypoints, visibility = self.augment(
                    images, keypoints, visibility, pad=self.canvas_pad
                )
                images, keypoints = cut_window(images, keypoints, self.canvas_pad)
        heatmaps, weight = self._targets(keypoints, visibility)
        outputs = self.model(images)
        loss = self.loss_fn(outputs, heatmaps, weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"train_loss": float(loss.detach())}

    def _search_step(self, images: Tensor, keypoints: Tensor, visibility: Tensor) -> dict[str, float]:
        self.augment.set_step(self.step)
        val_images, val_keypoints, val_visibility = self._search_val_batch()
        losses = self.search.step(
            (images, keypoints, visibility), (val_images, val_keypoints, val_visibility)
        )
        return {key: float(value) for key, value in losses.items()}

    def is_search_step(self) -> bool:
        """Whether the next step moves the policy: a search trial's every ``policy_every``-th
        step, counted from 0 (a function of ``self.step``, so a resumed run picks the same)."""
        return self.search is not None and self.step % self.policy_every == 0

    def train_epoch(self) -> dict[str, float]:
        """One epoch (at most ``steps_per_epoch`` optimizer steps); returns the mean of each
        value the steps report, over the steps that report it (a search trial's policy metrics
        over its search steps only)."""
        self.model.train()
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for batch in self._epoch_batches():
            images, keypoints, visibility = self._batch(batch)
            if self.is_search_step():
                losses = self._search_step(images, keypoints, visibility)
            else:
                losses = self._plain_step(images, keypoints, visibility)
            if not all(math.isfinite(v) for k, v in losses.items() if k.endswith("_loss")):
                raise FloatingPointError(f"loss is not finite at step {self.step}: {losses}")
            self.step += 1
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
        return {key: value / counts[key] for key, value in totals.items()}

    def _epoch_batches(self) -> Iterator[dict[str, Tensor]]:
        """The epoch's ``steps_per_epoch`` batches: its pass over the data in the epoch's order,
        then, when that pass is shorter, further passes each shuffled afresh (pass ``k`` of epoch
        ``e`` in the order of ``e + k·PASS_STRIDE``: a function of the epoch, as on resume)."""
        sampler = self.sampler if self.sampler is not None else self.loader.sampler
        taken, passes = 0, 0
        while taken < self.steps_per_epoch:
            sampler.set_epoch(self.epoch + passes * PASS_STRIDE)
            for batch in self.loader:
                if taken >= self.steps_per_epoch:
                    return
                taken += 1
                yield batch
            passes += 1

    def proxy_scores(self, rows: Dataset) -> dict[str, float]:
        """pycocotools' keypoint scores (``AP``, ``AP50``, ``AP75``, ``AR`` …; NaN read as 0) of
        the network as it is on proxy ``rows``, flip test on, capped at ``data.max_val_samples``."""
        if self.data_config.max_val_samples is not None and self.data_config.max_val_samples < len(rows):
            rows = Subset(rows, range(self.data_config.max_val_samples))
        loader = DataLoader(rows, batch_size=self.train_config.val_batch_size, shuffle=False)
        scores = evaluate_proxy(
            self.net,
            loader,
            self.codec,
            flip_pairs=self.flip_pairs,
            batch_size=self.train_config.val_batch_size,
            keypoint_names=self.keypoint_names,
        )
        return {k: (0.0 if math.isnan(v) else float(v)) for k, v in scores.items()}

    @torch.no_grad()
    def evaluate(self, *, holdout: bool = False) -> dict[str, float]:
        """OKS AP of the current weights on the val proxy (rank 0 computes, all ranks get it);
        with ``holdout`` also on the held-out split (``holdout_ap``), when there is one."""
        metrics: dict[str, float] = {}
        if self.is_main:
            scores = self.proxy_scores(self.val_set)
            metrics = {
                "val_ap": scores["AP"],
                "val_ap50": scores["AP50"],
                "val_ap75": scores["AP75"],
                "val_ar": scores["AR"],
            }
            if holdout and self.holdout_set is not None:
                metrics["holdout_ap"] = self.proxy_scores(self.holdout_set)["AP"]
        if self.world_size > 1:
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0)
            metrics = shared[0]
        return metrics

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, hooks: TrainHooks | None = None, *, epochs: int | None = None) -> TrainResult:
        """Train from the current epoch to ``train.epochs`` (or ``epochs`` more only).

        Every epoch: train, evaluate, then ``hooks.on_epoch_end`` on every rank.
        """
        hooks = hooks or TrainHooks()
        last = (
            self.train_config.epochs if epochs is None else min(self.epoch + epochs, self.train_config.epochs)
        )
        while self.epoch < last:
            started = time.perf_counter()
            losses = self.train_epoch()
            train_s = time.perf_counter() - started
            is_last = self.epoch + 1 >= self.train_config.epochs
            holdout = is_last or self.train_config.holdout_every_epoch
            metrics = {**losses, **self.evaluate(holdout=holdout), **self.policy_metrics()}
            epoch_s = time.perf_counter() - started
            self.wall_s += epoch_s
            samples = self.steps_per_epoch * self.train_config.batch_size * self.world_size
            metrics.update(
                {
                    "epoch": float(self.epoch),
                    "step": float(self.step),
                    "epoch_s": epoch_s,
                    "train_samples_per_s": samples / max(train_s, 1e-9),
                    "lr": float(self.optimizer.param_groups[0]["lr"]),
                }
            )
            if self.device.type == "cuda":  # the device's high-water mark, on every rank's own
                metrics["gpu_memory_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.history.append(metrics)
            self.lr_schedule.step()
            self.epoch += 1
            report = EpochReport(self.epoch - 1, self.step, metrics, self.epoch >= self.train_config.epochs)
            hooks.on_epoch_end(report, self)
        return TrainResult(history=list(self.history), steps=self.step, epochs=self.epoch, wall_s=self.wall_s)


class _EpochPermutation(torch.utils.data.Sampler[int]):
    """A fresh shuffle every epoch, fixed by ``(seed, epoch)``: the order of a resumed run
    matches the uninterrupted run's (a DataLoader's own shuffle would depend on the
    global generator's state)."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length
