"""autopose.augment: pose-aware augmentation ops, policies and baselines.

Ops are pure functions over batched tensors (:mod:`autopose.augment.ops`);
:class:`Policy` is a discrete policy (JSON on disk), :class:`RelaxedPolicy`
the differentiable one the search trains; :mod:`autopose.augment.baselines`
holds the hand-crafted, random, none, RandAugment and TrivialAugment baselines.
"""

from autopose.augment.baselines import (
    Handcrafted,
    NoAugmentation,
    RandAugment,
    TrivialAugment,
    no_policy,
    random_policy,
)
from autopose.augment.ops import OP_NAMES, OPS, PAPER_OP_NAMES, OpSpec, magnitude_to_value
from autopose.augment.policy import Policy, PolicyNoise, PolicyStep, RelaxedPolicy, TemperatureSchedule
from autopose.augment.space import OpRange, SearchSpace, load_search_space, p2net_space

__all__ = [
    "OPS",
    "OP_NAMES",
    "PAPER_OP_NAMES",
    "Handcrafted",
    "NoAugmentation",
    "OpRange",
    "OpSpec",
    "Policy",
    "PolicyNoise",
    "PolicyStep",
    "RandAugment",
    "RelaxedPolicy",
    "SearchSpace",
    "TemperatureSchedule",
    "TrivialAugment",
    "load_search_space",
    "magnitude_to_value",
    "no_policy",
    "p2net_space",
    "random_policy",
]
