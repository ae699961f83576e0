"""Augmentation policies: the discrete :class:`Policy` and the differentiable :class:`RelaxedPolicy`.

A policy is ``K`` sub-policies of ``N`` steps; a step is ``(op, p, m, sign)``:
apply ``op`` with probability ``p`` at normalized magnitude ``m ∈ [0, 10]``
(mapped to the op's real range by the search space). Each sample of a batch
draws its own sub-policy, by the policy's sub-policy weights.

Signed ops. An op whose identity lies strictly inside its range in the space
(:attr:`SearchSpace.signed`: Rotate in [-45°, 45°], Brightness in [0.1, 1.9],
Scale in [0.7, 1.35]; not Cutout in [0, 0.5]) moves either way from it. Its
step applies it at ``value(m)`` with probability ``sign``, and otherwise at the
value mirrored about the identity, ``2·identity − value(m)`` clamped to the
range. ``m`` keeps its meaning (a position in [low, high]), so a step with
``sign = 1`` is a step of an ``autopose.policy/1`` file; ``sign`` does nothing
for an unsigned op.

Policy file (``autopose.policy/2``)::

    {"format": "autopose.policy/2", "space": "p2net",
     "sub_policy_weights": [0.7, 0.3],
     "sub_policies": [[{"op": "Rotate", "p": 0.6, "m": 7.0, "sign": 0.8},
                       {"op": "Cutout", "p": 0.3, "m": 4.0}], ...]}

* ``sub_policy_weights`` (optional): one number ≥ 0 per sub-policy, summing to 1
  (within 1e-3); the chance that a sample draws that sub-policy. Uniform when absent.
* ``sign`` (optional, default 1): in [0, 1]; only a signed op may have a sign
  other than 1 (an unsigned op's step may carry ``"sign": 1``, nothing else).

``autopose.policy/1`` is the same without these two fields (uniform weights,
every sign 1) and loads as before: such a policy draws the same random numbers
for the same seed as it did under /1. :meth:`Policy.to_dict` writes /1 when the
policy is one (uniform weights and every sign 1 at the file's six decimals), so
that readers of /1 keep reading it, and /2 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from autopose.augment.apply import apply_step
from autopose.augment.ops import MAX_MAGNITUDE
from autopose.augment.space import OpRange, SearchSpace, space_of_document
from autopose.errors import AutoposeError
from autopose.files import atomic_write, read_json

Tensor = torch.Tensor
POLICY_FORMAT_V1 = "autopose.policy/1"
POLICY_FORMAT_V2 = "autopose.policy/2"
POLICY_FORMAT = POLICY_FORMAT_V1  # what a policy without weights or signs writes
POLICY_FORMATS = (POLICY_FORMAT_V1, POLICY_FORMAT_V2)
WEIGHT_TOLERANCE = 1e-3  # how far from 1 a file's sub-policy weights may sum
_DECIMALS = 6  # what a policy file keeps of each number
_STEP_KEYS = ("op", "p", "m")
_STEP_KEYS_V2 = (*_STEP_KEYS, "sign")
_TOP_KEYS = ("format", "space", "sub_policies")
_TOP_KEYS_V2 = ("format", "space", "sub_policy_weights", "sub_policies")


def as_float_images(images: Tensor) -> Tensor:
    """uint8 ``B×3×H×W`` → float 0…1; float images pass through."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    return images


def _check_batch(images: Tensor, keypoints: Tensor, visibility: Tensor) -> None:
    if images.ndim != 4 or keypoints.ndim != 3 or visibility.ndim != 2:
        raise ValueError(
            "expected images B×3×H×W, keypoints B×K×2, visibility B×K; got "
            f"{tuple(images.shape)}, {tuple(keypoints.shape)}, {tuple(visibility.shape)}"
        )
    if not images.shape[0] == keypoints.shape[0] == visibility.shape[0]:
        raise ValueError("images, keypoints and visibility disagree on the batch size")


# -- the discrete policy --------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyStep:
    """Apply ``op`` with probability ``p`` at normalized magnitude ``m`` (0–10); a signed op runs
    at ``value(m)`` with probability ``sign`` and mirrored about its identity otherwise."""

    op: str
    p: float
    m: float
    sign: float = 1.0


def _uniform(weights: Sequence[float]) -> bool:
    # Judged at the file's precision, so that a policy and its reloaded file agree.
    return len({round(w, _DECIMALS) for w in weights}) == 1


class Policy:
    """A discrete augmentation policy.

    Args:
        sub_policies: ``K`` lists of :class:`PolicyStep` (lengths may differ).
        space: the search space that gives each op's real range.
        seed: seeds the policy's own random generator (sub-policy choice, the
            ``p`` and ``sign`` draws, Cutout's position); ``None`` draws from torch's global one.
        sub_policy_weights: ``K`` numbers ≥ 0 summing to 1 (within 1e-3): the chance of each
            sub-policy; uniform when ``None``.

    Calling it: ``images, keypoints, visibility = policy(images, keypoints, visibility)``
    with ``images B×3×H×W`` float 0…1 (uint8 is converted), ``keypoints B×K×2``
    pixels, ``visibility B×K``; a ``generator=`` argument overrides the policy's.

    Random numbers: uniform weights draw the sub-policies with ``randint`` and a step whose
    signs are all 1 draws no sign, so a policy that ``autopose.policy/1`` can write draws
    exactly what it drew before signs and weights existed.
    """

    def __init__(
        self,
        sub_policies: Sequence[Sequence[PolicyStep]],
        space: SearchSpace,
        seed: int | None = None,
        sub_policy_weights: Sequence[float] | None = None,
    ):
        if not sub_policies or any(len(steps) == 0 for steps in sub_policies):
            raise ValueError("a policy needs at least one sub-policy, each with at least one step")
        for steps in sub_policies:
            for step in steps:
                if step.op not in space.op_names:
                    raise ValueError(f"op {step.op!r} is not in search space {space.name!r}")
                if not (0.0 <= step.p <= 1.0 and 0.0 <= step.m <= MAX_MAGNITUDE and 0.0 <= step.sign <= 1.0):
                    raise ValueError(f"step {step} has p, m or sign out of range")
                if step.sign != 1.0 and not space.signed[space.index(step.op)]:
                    raise ValueError(f"step {step}: {step.op} is not signed in space {space.name!r}")
        self.sub_policies: tuple[tuple[PolicyStep, ...], ...] = tuple(tuple(s) for s in sub_policies)
        self.space = space
        count = len(self.sub_policies)
        if sub_policy_weights is None:
            sub_policy_weights = [1.0 / count] * count
        weights = tuple(float(w) for w in sub_policy_weights)
        if len(weights) != count or not all(math.isfinite(w) and w >= 0.0 for w in weights):
            raise ValueError(f"expected {count} sub-policy weights ≥ 0, got {list(sub_policy_weights)}")
        if abs(sum(weights) - 1.0) > WEIGHT_TOLERANCE:
            raise ValueError(f"sub-policy weights sum to {sum(weights):.6g}, not 1")
        self.sub_policy_weights: tuple[float, ...] = weights
        self.uniform_weights = _uniform(weights)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        steps = max(len(s) for s in self.sub_policies)
        # K×N tables; a missing step (shorter sub-policy) has op -1 and sign 1.
        self._ops = torch.full((count, steps), -1, dtype=torch.long)
        self._p = torch.zeros(count, steps)
        self._m = torch.zeros(count, steps)
        self._sign = torch.ones(count, steps)
        for k, sub in enumerate(self.sub_policies):
            for n, step in enumerate(sub):
                self._ops[k, n] = space.index(step.op)
                self._p[k, n] = step.p
                self._m[k, n] = step.m
                self._sign[k, n] = step.sign
        self._weights = torch.tensor(weights, dtype=torch.float64)
        self._signed = torch.tensor(space.signed, dtype=torch.bool)

    def __call__(
        self,
        images: Tensor,
        keypoints: Tensor,
        visibility: Tensor,
        generator: torch.Generator | None = None,
        pad: tuple[int, int] = (0, 0),
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Augment a batch (``pad``: the images are canvases around their crops, see
        :func:`~autopose.augment.apply.apply_step`)."""
        images = as_float_images(images)
        _check_batch(images, keypoints, visibility)
        generator = generator if generator is not None else self.generator
        batch, device = images.shape[0], images.device
        num_ops = len(self.space.ops)
        if self.uniform_weights:
            chosen = torch.randint(len(self.sub_policies), (batch,), generator=generator)
        else:
            chosen = torch.multinomial(self._weights, batch, replacement=True, generator=generator)
        for n in range(self._ops.shape[1]):
            op = self._ops[chosen, n]
            applied = (torch.rand(batch, generator=generator) < self._p[chosen, n]) & (op >= 0)
            uniform = torch.rand(batch, 2, generator=generator)
            strengths = F.one_hot(op.clamp(min=0), num_ops).float() * applied[:, None]
            values = self.space.values(self._m[chosen, n][:, None].expand(batch, num_ops))
            if bool((self._sign[:, n] < 1.0).any()):  # no draw otherwise: /1 seeds reproduce
                mirrored = torch.rand(batch, generator=generator) >= self._sign[chosen, n]
                mirrored &= self._signed[op.clamp(min=0)]
                values = torch.where(mirrored[:, None], self.space.mirror(values), values)
            images, keypoints, visibility = apply_step(
                images,
                keypoints,
                visibility,
                self.space.specs,
                strengths.to(device),
                values.to(device),
                cutout_uniform=uniform,
                flip_pairs=self.space.flip_pairs,
                pad=pad,
            )
        return images, keypoints, visibility

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The policy file's JSON: ``autopose.policy/1`` when that format can hold the policy
        (uniform weights, every sign 1 at six decimals), ``autopose.policy/2`` otherwise."""
        signed = self.space.signed
        subs = []
        needs_v2 = not self.uniform_weights
        for sub in self.sub_policies:
            steps = []
            for s in sub:
                step: dict[str, Any] = {"op": s.op, "p": round(float(s.p), _DECIMALS)}
                step["m"] = round(float(s.m), _DECIMALS)
                if signed[self.space.index(s.op)]:
                    step["sign"] = round(float(s.sign), _DECIMALS)
                    needs_v2 |= step["sign"] != 1.0
                steps.append(step)
            subs.append(steps)
        if not needs_v2:
            for steps in subs:
                for step in steps:
                    step.pop("sign", None)
            return {"format": POLICY_FORMAT_V1, "space": self.space.name, "sub_policies": subs}
        return {
            "format": POLICY_FORMAT_V2,
            "space": self.space.name,
            "sub_policy_weights": [round(w, _DECIMALS) for w in self.sub_policy_weights],
            "sub_policies": subs,
        }

    @classmethod
    def from_dict(
        cls,
        data: Any,
        space: SearchSpace | None = None,
        path: str | Path | None = None,
        seed: int | None = None,
    ) -> Policy:
        """Validate a parsed policy (``autopose.policy/1`` or ``/2``; see the module docstring).

        Args:
            data: the parsed JSON.
            space: the search space the policy was searched in; by default the
                built-in space its ``space`` field names (``p2net``).
            path: the file it came from, for error messages.

        Raises:
            AutoposeError: naming ``path`` and the bad field (``sub_policies[1][0].op``,
                ``sub_policy_weights[2]``).
        """

        def fail(message: str, where: str | None = None) -> AutoposeError:
            return AutoposeError(message, path=path, field=where)

        if not isinstance(data, Mapping):
            raise fail(f"expected a JSON object with keys {', '.join(_TOP_KEYS)}")
        for key in data:
            if key not in _TOP_KEYS_V2:
                raise fail(
                    f"unknown field; expected {', '.join(_TOP_KEYS)} (and sub_policy_weights in "
                    f"{POLICY_FORMAT_V2})",
                    str(key),
                )
        for key in _TOP_KEYS:
            if key not in data:
                raise fail("missing", key)
        version = data["format"]
        if version not in POLICY_FORMATS:
            raise fail(f"expected {' or '.join(map(repr, POLICY_FORMATS))}, got {version!r}", "format")
        if version == POLICY_FORMAT_V1 and "sub_policy_weights" in data:
            raise fail(
                f"{POLICY_FORMAT_V1} has no sub-policy weights: write {POLICY_FORMAT_V2}",
                "sub_policy_weights",
            )
        space = space_of_document(data["space"], space, document="policy", path=path)
        subs = data["sub_policies"]
        if not isinstance(subs, list) or not subs:
            raise fail("must be a non-empty list of sub-policies", "sub_policies")
        keys = _STEP_KEYS_V2 if version == POLICY_FORMAT_V2 else _STEP_KEYS
        parsed = []
        for k, sub in enumerate(subs):
            if not isinstance(sub, list) or not sub:
                raise fail("must be a non-empty list of steps", f"sub_policies[{k}]")
            steps = []
            for n, step in enumerate(sub):
                steps.append(_parse_step(step, space, f"sub_policies[{k}][{n}]", fail, keys))
            parsed.append(steps)
        weights = None
        if "sub_policy_weights" in data:
            weights = _parse_weights(data["sub_policy_weights"], len(parsed), fail)
        return cls(parsed, space, seed=seed, sub_policy_weights=weights)

    @classmethod
    def from_file(cls, path: str | Path, space: SearchSpace | None = None, seed: int | None = None) -> Policy:
        """Read and validate a policy JSON file (see :meth:`from_dict`)."""
        path = Path(path)
        data = read_json(path)
        return cls.from_dict(data, space=space, path=path, seed=seed)

    def to_file(self, path: str | Path) -> None:
        """Write the JSON atomically (temporary file in the same folder, then rename)."""
        with atomic_write(path) as out:
            json.dump(self.to_dict(), out, indent=2)
            out.write("\n")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        signed = self.space.signed

        def step(s: PolicyStep) -> str:
            sign = f", sign={s.sign:.2f}" if signed[self.space.index(s.op)] and s.sign != 1.0 else ""
            return f"{s.op}(p={s.p:.2f}, m={s.m:.1f}{sign})"

        subs = "; ".join(", ".join(step(s) for s in sub) for sub in self.sub_policies)
        if not self.uniform_weights:
            weights = ", ".join(f"{w:.2f}" for w in self.sub_policy_weights)
            return f"Policy[{self.space.name}]({subs}; weights {weights})"
        return f"Policy[{self.space.name}]({subs})"


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _parse_step(step: Any, space: SearchSpace, where: str, fail, keys: Sequence[str]) -> PolicyStep:
    if not isinstance(step, Mapping):
        raise fail('must be an object {"op": …, "p": …, "m": …}', where)
    for key in step:
        if key not in keys:
            hint = f" (sign needs {POLICY_FORMAT_V2})" if key == "sign" else ""
            raise fail(f"unknown field; a step has {', '.join(keys)}{hint}", f"{where}.{key}")
    for key in _STEP_KEYS:
        if key not in step:
            raise fail("missing", f"{where}.{key}")
    op = step["op"]
    if not isinstance(op, str) or op not in space.op_names:
        raise fail(f"unknown op {op!r}; space {space.name!r} has {', '.join(space.op_names)}", f"{where}.op")
    values = {"sign": 1.0}
    for key, high in (("p", 1.0), ("m", MAX_MAGNITUDE), ("sign", 1.0)):
        if key not in step:
            continue
        value = step[key]
        if not _number(value):
            raise fail(f"must be a number in [0, {high:g}], got {value!r}", f"{where}.{key}")
        if not 0.0 <= value <= high:
            raise fail(f"{value} is outside [0, {high:g}]", f"{where}.{key}")
        values[key] = float(value)
    if values["sign"] != 1.0 and not space.signed[space.index(op)]:
        raise fail(
            f"{op} is not signed in space {space.name!r} (its identity is not inside its range), "
            "so its sign must be 1",
            f"{where}.sign",
        )
    return PolicyStep(op, values["p"], values["m"], values["sign"])


def _parse_weights(weights: Any, count: int, fail) -> list[float]:
    where = "sub_policy_weights"
    if not isinstance(weights, list):
        raise fail(f"must be a list of {count} numbers ≥ 0 summing to 1, got {weights!r}", where)
    for i, weight in enumerate(weights):
        if not _number(weight):
            raise fail(f"must be a number ≥ 0, got {weight!r}", f"{where}[{i}]")
        if weight < 0:
            raise fail(f"{weight} is negative", f"{where}[{i}]")
    if len(weights) != count:
        raise fail(f"expected {count} weights, one per sub-policy, got {len(weights)}", where)
    total = math.fsum(weights)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise fail(f"the weights sum to {total:.6g}, not 1 (within {WEIGHT_TOLERANCE:g})", where)
    return [float(w) for w in weights]


# -- the relaxed (differentiable) policy ------------------------------------------------------------


@dataclass
class TemperatureSchedule:
    """Temperatures of the relaxations and their annealing.

    ``tau1`` (τ1) is the Gumbel-softmax temperature of the sub-policy choice, ``tau2``
    (τ2) the relaxed-Bernoulli temperature of each op's ``p`` and of its sign, named as in
    :class:`autopose.engine.config.BilevelConfig`. Each goes geometrically from its start
    value to its ``*_final`` value over ``anneal_steps`` steps and stays there (no annealing when
    ``anneal_steps`` is 0 or a final value is ``None``).
    """

    tau1: float = 1.0
    tau2: float = 0.5
    tau1_final: float | None = None
    tau2_final: float | None = None
    anneal_steps: int = 0

    def __post_init__(self) -> None:
        for value in (self.tau1, self.tau2, self.tau1_final, self.tau2_final):
            if value is not None and not value > 0:
                raise ValueError("temperatures must be positive")

    def at(self, step: int) -> tuple[float, float]:
        """``(τ1, τ2)`` after ``step`` search steps."""
        fraction = 1.0 if self.anneal_steps <= 0 else min(max(step, 0) / self.anneal_steps, 1.0)

        def anneal(start: float, final: float | None) -> float:
            if final is None or self.anneal_steps <= 0:
                return start
            return start * (final / start) ** fraction

        return anneal(self.tau1, self.tau1_final), anneal(self.tau2, self.tau2_final)


@dataclass
class PolicyNoise:
    """The random draws of one :class:`RelaxedPolicy` application, kept so that the
    search can apply the same augmentation again (all uniform in (0, 1)).

    Attributes:
        sub_policy: ``B×K`` for the Gumbel noise of the sub-policy choice.
        bernoulli: ``B×N×O`` for the relaxed Bernoulli gates.
        cutout: ``B×N×2`` for Cutout's centers.
        sign: ``B×N×O`` for the relaxed Bernoulli directions of the signed ops. ``None``
            (noise built from the first three draws alone, as before signs existed): every
            signed op runs at ``value(m)``, and ``sign_logits`` get no gradient.
        op: ``B×N×O`` for the Gumbel noise of the op draw (needed with ``hard=True``).
    """

    sub_policy: Tensor
    bernoulli: Tensor
    cutout: Tensor
    sign: Tensor | None = None
    op: Tensor | None = None

    def to(self, *args: Any, **kwargs: Any) -> PolicyNoise:
        """Every draw moved or cast as :meth:`torch.Tensor.to` would (a device, a dtype)."""
        moved = (getattr(self, f.name) for f in dataclasses.fields(self))
        return PolicyNoise(*(None if t is None else t.to(*args, **kwargs) for t in moved))


def _open_uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    # Keep away from 0 and 1 so that the logs below stay finite.
    return torch.rand(shape, generator=generator).clamp(1e-6, 1.0 - 1e-6)


def _relaxed_bernoulli(logits: Tensor, uniform: Tensor, temperature: float) -> Tensor:
    """Binary Concrete sample ``sigmoid((logit + logistic noise) / τ)``: above 1/2 with
    probability exactly ``sigmoid(logit)``, whatever ``τ``."""
    return torch.sigmoid((logits + torch.log(uniform) - torch.log1p(-uniform)) / temperature)


def _straight_through(value: Tensor, soft: Tensor) -> Tensor:
    """``value`` in the forward pass, ``soft``'s gradient in the backward pass. Written as
    ``value + (soft - soft.detach())``: the bracket is exactly 0, so ``value`` is kept to the bit
    (``value + soft - soft.detach()`` rounds, 1 becoming 1 ± 1 ulp)."""
    return value + (soft - soft.detach())


# A state dict saved before the signs existed ran every op in the direction its m gives (sign 1).
# It loads with this logit: the relaxed sign sample is then 1.0 in float32 for any logistic draw
# (|noise| ≤ 14 with the clamp of _open_uniform) at τ2 ≤ 1, so the policy augments as when saved.
LEGACY_SIGN_LOGIT = 30.0


class RelaxedPolicy(nn.Module):
    """The differentiable policy of the paper (DA², after DADA), with a direction for signed ops.

    Parameters (``K`` sub-policies, ``N`` steps, ``O`` ops of the space):

    * ``sub_policy_logits (K,)``: each sample picks a sub-policy by Gumbel-softmax
      at temperature ``τ1``. The pick is hard (one sub-policy runs per sample) and
      the gradient goes through the soft sample at the picked index, as in GDAS
      (Dong & Yang 2019): running all ``K`` would cost ``K`` times as much.
    * ``op_logits (K, N, O)``: each step mixes all ops with ``softmax`` weights (Eq. 6).
    * ``probability_logits (K, N, O)``: ``p = sigmoid(·)``; each op is gated by a
      relaxed Bernoulli sample of ``p`` at temperature ``τ2`` (Eq. 7).
    * ``magnitude_logits (K, N, O)``: ``m = 10 · sigmoid(·)``. The sigmoid keeps
      ``m`` inside [0, 10] for any optimizer step, with no projection to forget;
      its price is a slower move near the ends.
    * ``sign_logits (K, N, O)``: ``sign = sigmoid(·)``, the chance that a signed op
      (:attr:`SearchSpace.signed`) runs at ``value(m)`` rather than mirrored about its
      identity. A relaxed Bernoulli sample ``s`` of it at ``τ2`` gives the direction
      ``d = 2s − 1`` and the value ``identity + d · (value(m) − identity)``, clamped to the
      op's range (the discrete :class:`Policy` clamps the mirrored value alike). Unsigned
      ops ignore it (their ``sign_logits`` get no gradient). Starts at 0 (sign 1/2).

    An op's strength for a sample is ``h · w_o · b_o`` (``h`` = 1 in value, the
    straight-through weight of the picked sub-policy); see
    :mod:`autopose.augment.apply` for how the strengths mix ops while keeping
    keypoints exact. Ops with weight at or below ``min_weight`` are skipped for
    speed (their share of output and gradient is that small): once three ops per
    step dominate, the forward pass runs 6–14× faster than with uniform weights
    (``benchmarks/augment.py``); early in a search, with near-uniform weights,
    every op runs on every sample.

    ``hard=True`` trains with what :meth:`export` exports: per sample and step ONE op is
    drawn from the softmax weights (Gumbel-max, noise in :attr:`PolicyNoise.op`), its gate is
    open when the relaxed sample exceeds 1/2 (probability exactly ``p``), its direction is
    ``value(m)`` when the relaxed sign sample exceeds 1/2 (probability exactly ``sign``) and
    mirrored otherwise. The drawn op runs at full strength; each of the three choices carries
    a straight-through gradient (of the drawn op's softmax weight, of the relaxed gate, of
    the relaxed direction), as the sub-policy pick does. A forward pass then applies exactly
    what the discrete policy with these parameters applies for the same draws. A closed gate
    runs no op, so that sample gives the drawn op's ``p``, weight, ``m`` and sign no gradient; an
    open one moves ``p`` either way.

    Args:
        space: the search space.
        temperatures: ``τ1``, ``τ2`` and their annealing (see :meth:`set_step`).
        init_probability: starting ``p`` of every op.
        init_magnitude: starting ``m`` of every op; ``None`` (default) starts no op at its
            identity: a signed op halfway between its identity and its value at ``m = 10``
            (Rotate in [-45°, 45°] at 22.5°, ``m = 7.5``), an unsigned op at ``m = 5``. With
            sign 1/2 that start is symmetric, yet every op changes the images, so its ``p``
            and its op weight have a gradient from the first step. A number starts every op
            there (``m = 5`` is the identity of ops with symmetric ranges: their op weights
            and ``p`` then start with no gradient).
        min_weight: skip an op for a sample whose mixing weight is at or below this (soft
            mixing only; the hard draw runs one op per step).
        seed: seeds the small random start of the logits (to break the symmetry
            between sub-policies) and the noise generator.
        hard: sample one op per step with hard gates and directions (see above).

    State dicts: one saved before ``sign_logits`` existed loads with ``sign_logits`` =
    :data:`LEGACY_SIGN_LOGIT` (sign ≈ 1: every op in the direction its ``m`` gives, as that
    policy ran), see :meth:`_load_from_state_dict`.
    """

    def __init__(
        self,
        space: SearchSpace,
        temperatures: TemperatureSchedule | None = None,
        init_probability: float = 0.5,
        init_magnitude: float | None = None,
        min_weight: float = 1e-3,
        seed: int | None = 0,
        hard: bool = False,
    ):
        super().__init__()
        if not 0.0 < init_probability < 1.0:
            raise ValueError("init_probability must lie in (0, 1)")
        if init_magnitude is not None and not 0.0 < init_magnitude < MAX_MAGNITUDE:
            raise ValueError("init_magnitude must be None or lie in (0, 10)")
        self.space = space
        self.temperatures = temperatures or TemperatureSchedule()
        self.tau1, self.tau2 = self.temperatures.at(0)
        self.min_weight = float(min_weight)
        self.hard = bool(hard)
        k, n, o = space.K, space.N, len(space.ops)
        start = torch.Generator().manual_seed(0 if seed is None else seed)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed + 1)
        if init_magnitude is None:
            starts = [_logit(_start_magnitude(space, r) / MAX_MAGNITUDE) for r in space.ops]
        else:
            starts = [_logit(init_magnitude / MAX_MAGNITUDE)] * o  # as before the default start
        # Registered in this order: the search's tests index parameters() (3 = magnitude_logits).
        self.sub_policy_logits = nn.Parameter(1e-3 * torch.randn(k, generator=start))
        self.op_logits = nn.Parameter(1e-3 * torch.randn(k, n, o, generator=start))
        self.probability_logits = nn.Parameter(torch.full((k, n, o), _logit(init_probability)))
        self.magnitude_logits = nn.Parameter(torch.tensor(starts).expand(k, n, o).clone())
        self.sign_logits = nn.Parameter(torch.zeros(k, n, o))
        low, high = space.range_tensors()
        identity, signed = space.identity_tensors()
        self.register_buffer("_low", low, persistent=False)
        self.register_buffer("_high", high, persistent=False)
        self.register_buffer("_identity", identity, persistent=False)
        self.register_buffer("_signed", signed, persistent=False)

    # -- parameters in their natural units -------------------------------------------------------
    def probabilities(self) -> Tensor:
        """``K×N×O`` application probabilities ``p``."""
        return torch.sigmoid(self.probability_logits)

    def magnitude_tensor(self) -> Tensor:
        """``K×N×O`` normalized magnitudes ``m`` in [0, 10]."""
        return MAX_MAGNITUDE * torch.sigmoid(self.magnitude_logits)

    def sign_tensor(self) -> Tensor:
        """``K×N×O`` signs: the chance that an op runs at ``value(m)`` rather than mirrored
        (1 for unsigned ops, which have one direction)."""
        return torch.where(self._signed, torch.sigmoid(self.sign_logits), torch.ones_like(self.sign_logits))

    def op_weights(self) -> Tensor:
        """``K×N×O`` mixing weights (softmax over ops)."""
        return torch.softmax(self.op_logits, dim=-1)

    def sub_policy_probabilities(self) -> Tensor:
        """``(K,)`` the chance of each sub-policy (the Gumbel-max pick follows it exactly)."""
        return torch.softmax(self.sub_policy_logits, dim=0)

    def set_step(self, step: int) -> None:
        """Set the temperatures to the schedule's values after ``step`` search steps."""
        self.tau1, self.tau2 = self.temperatures.at(step)

    # -- summaries for tracking ------------------------------------------------------------------
    @torch.no_grad()
    def _expected(self, per_op: Tensor) -> dict[str, float]:
        # Weighted by how often each (sub-policy, step) runs each op.
        share = self.sub_policy_probabilities()[:, None, None] * self.op_weights() / self.space.N
        total = share.sum(dim=(0, 1)).clamp_min(1e-12)
        mean = (share * per_op).sum(dim=(0, 1)) / total
        return {name: float(v) for name, v in zip(self.space.op_names, mean, strict=True)}

    @torch.no_grad()
    def op_probabilities(self) -> dict[str, float]:
        """Op name → the chance that a step of a randomly drawn sub-policy is that op
        (sub-policy probability × softmax weight, averaged over steps; sums to 1)."""
        share = self.sub_policy_probabilities()[:, None, None] * self.op_weights() / self.space.N
        return {name: float(v) for name, v in zip(self.space.op_names, share.sum(dim=(0, 1)), strict=True)}

    def application_probabilities(self) -> dict[str, float]:
        """Op name → its ``p``, averaged over the places it appears (weighted as above)."""
        return self._expected(self.probabilities())

    def magnitudes(self) -> dict[str, float]:
        """Op name → its ``m`` (0–10), averaged over the places it appears (weighted as above)."""
        return self._expected(self.magnitude_tensor())

    def sign_probabilities(self) -> dict[str, float]:
        """Op name → its sign (the chance it runs at ``value(m)``, not mirrored), averaged over the
        places it appears (weighted as above); 1 for unsigned ops."""
        return self._expected(self.sign_tensor())

    # -- sampling ----------------------------------------------------------------------------------
    def sample_noise(self, batch: int, generator: torch.Generator | None = None) -> PolicyNoise:
        """Fresh random draws for a batch (from ``generator`` or the policy's own). The draws
        that existed before ``sign`` and ``op`` come first, in their old order."""
        generator = generator if generator is not None else self.generator
        k, n, o = self.op_logits.shape
        return PolicyNoise(
            sub_policy=_open_uniform((batch, k), generator),
            bernoulli=_open_uniform((batch, n, o), generator),
            cutout=torch.rand((batch, n, 2), generator=generator),
            sign=_open_uniform((batch, n, o), generator),
            op=_open_uniform((batch, n, o), generator),
        )

    def choose_sub_policies(self, noise: PolicyNoise) -> tuple[Tensor, Tensor]:
        """Gumbel-softmax pick: ``(index (B,), weight (B,))``; the weight is 1 in value and
        carries the gradient of the soft sample at the picked index."""
        uniform = noise.sub_policy.to(self.sub_policy_logits.device)
        gumbel = -torch.log(-torch.log(uniform))
        soft = torch.softmax((self.sub_policy_logits + gumbel) / self.tau1, dim=-1)
        index = soft.argmax(dim=-1)
        picked = soft.gather(1, index[:, None]).squeeze(1)
        return index, _straight_through(torch.ones_like(picked), picked)

    def strengths_and_values(self, noise: PolicyNoise) -> tuple[Tensor, Tensor]:
        """What each step applies to each sample: ``(strengths, values)``, both ``B×N×O``.

        ``strengths[b, n, o]`` is how much of op ``o`` step ``n`` gives sample ``b``
        (sub-policy weight × op weight × gate; with ``hard=True`` 1 for the drawn op when its
        gate is open and 0 elsewhere, in value); ``values[b, n, o]`` is the op's real value,
        its direction applied for signed ops. Differentiable in every parameter.
        """
        noise = noise.to(self.op_logits.device)
        index, weight = self.choose_sub_policies(noise)
        op_weights = self.op_weights()[index]  # B×N×O
        gates = _relaxed_bernoulli(self.probability_logits[index], noise.bernoulli, self.tau2)
        values = self._low + (self._high - self._low) * self.magnitude_tensor()[index] / MAX_MAGNITUDE
        if self.hard:
            drawn = self._drawn_ops(index, noise)
            one_hot = F.one_hot(drawn, op_weights.shape[-1]).to(op_weights.dtype)
            mixing = _straight_through(one_hot, op_weights * one_hot)
            gates = _straight_through((gates > 0.5).to(gates.dtype), gates)
        else:
            # Skip by mixing weight (not by strength): a gate near zero still has a p gradient.
            mixing = torch.where(op_weights > self.min_weight, op_weights, torch.zeros_like(op_weights))
        strengths = weight[:, None, None] * mixing * gates
        if noise.sign is None:  # noise without sign draws: every op in the direction m gives
            return strengths, values
        signs = _relaxed_bernoulli(self.sign_logits[index], noise.sign, self.tau2)
        if self.hard:
            signs = _straight_through((signs > 0.5).to(signs.dtype), signs)
        low, high = self._low.minimum(self._high), self._low.maximum(self._high)
        directed = self._identity + (2.0 * signs - 1.0) * (values - self._identity)
        directed = torch.minimum(torch.maximum(directed, low), high)
        if self.hard:
            # Forward: exactly the discrete policy's value or its mirror (the formula above may
            # round differently); backward: the formula's gradient.
            exact = torch.where(signs > 0.5, values, self.space.mirror(values))
            directed = _straight_through(exact.detach(), directed)
        return strengths, torch.where(self._signed, directed, values)

    def _drawn_ops(self, index: Tensor, noise: PolicyNoise) -> Tensor:
        """``B×N``: the op each step of a hard draw runs, for samples of sub-policies ``index``.
        Gumbel-max over the op logits: the drawn op follows the softmax weights exactly."""
        if noise.op is None:
            raise ValueError("hard sampling draws the ops from noise.op: use sample_noise")
        return (self.op_logits[index] - torch.log(-torch.log(noise.op))).argmax(dim=-1)

    def draw_log_probabilities(self, noise: PolicyNoise) -> Tensor:
        """``(B,)``: the log-probability of what the hard draws ``noise`` applied to each sample,
        differentiable in the sub-policy, op, probability and sign logits (the score function of
        a policy-gradient estimate; magnitudes are not drawn).

        Per sample: the sub-policy picked, then per step the outcome: nothing (the drawn op's
        gate closed: ``log Σ_o w_o (1 − p_o)``, whichever op was drawn, since the images do
        not depend on it) or op ``o`` applied (``log w_o + log p_o``, plus ``log sign_o`` or
        ``log (1 − sign_o)`` for the direction of a signed op).
        """
        if noise.sign is None:
            raise ValueError("the draws' log-probability needs noise.sign: use sample_noise")
        noise = noise.to(self.op_logits.device)
        index, _ = self.choose_sub_policies(noise)
        op_logits = self.op_logits[index]  # B×N×O
        with torch.no_grad():  # which op, gate and direction were drawn (as strengths_and_values)
            drawn = self._drawn_ops(index, noise)[..., None]
            gate = _relaxed_bernoulli(self.probability_logits[index], noise.bernoulli, self.tau2) > 0.5
            upward = _relaxed_bernoulli(self.sign_logits[index], noise.sign, self.tau2) > 0.5
            opened = gate.gather(-1, drawn).squeeze(-1)  # B×N
            signed = self._signed.expand_as(gate).gather(-1, drawn).squeeze(-1)
        log_weight = torch.log_softmax(op_logits, dim=-1)
        probability_logits, sign_logits = self.probability_logits[index], self.sign_logits[index]
        nothing = torch.logsumexp(log_weight + F.logsigmoid(-probability_logits), dim=-1)
        applied = (log_weight + F.logsigmoid(probability_logits)).gather(-1, drawn).squeeze(-1)
        direction = F.logsigmoid(torch.where(upward, sign_logits, -sign_logits)).gather(-1, drawn).squeeze(-1)
        applied = applied + torch.where(signed, direction, torch.zeros_like(direction))
        steps = torch.where(opened, applied, nothing).sum(dim=-1)
        return torch.log_softmax(self.sub_policy_logits, dim=0)[index] + steps

    def forward(
        self,
        images: Tensor,
        keypoints: Tensor,
        visibility: Tensor,
        noise: PolicyNoise | None = None,
        pad: tuple[int, int] = (0, 0),
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Augment a batch, differentiably in every parameter.

        Args:
            images: ``B×3×H×W`` float 0…1 (uint8 is converted).
            keypoints: ``B×K×2`` pixels; visibility: ``B×K``.
            noise: the draws to use (see :meth:`sample_noise`); fresh ones if ``None``.
                Passing the same noise again reproduces the same augmentation.
            pad: ``(rows, cols)``: the images are canvases around their crops (see
                :func:`~autopose.augment.apply.apply_step`).

        Returns:
            ``images, keypoints, visibility``; keypoints depend on the magnitudes
            (callers that build targets from them usually detach them).
        """
        images = as_float_images(images)
        _check_batch(images, keypoints, visibility)
        if noise is None:
            noise = self.sample_noise(images.shape[0])
        noise = noise.to(images.device)
        strengths, values = self.strengths_and_values(noise)
        for n in range(self.space.N):
            images, keypoints, visibility = apply_step(
                images,
                keypoints,
                visibility,
                self.space.specs,
                strengths[:, n],
                values[:, n],
                cutout_uniform=noise.cutout[:, n],
                min_strength=0.0,
                flip_pairs=self.space.flip_pairs,
                pad=pad,
            )
        return images, keypoints, visibility

    # -- export ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _export_terms(
        self, min_share: float, max_sub_policies: int
    ) -> list[tuple[float, int, tuple[int, ...]]]:
        """The kept ``(weight, k, ops)``: sub-policy ``k`` with op ``ops[n]`` at step ``n``, weighted
        ``π_k · Π_n w[k, n, ops[n]]`` (not renormalised), heaviest first."""
        if not 0.0 <= min_share < 1.0 or max_sub_policies < 1:
            raise ValueError("min_share must lie in [0, 1) and max_sub_policies be at least 1")
        pi = self.sub_policy_probabilities().double().cpu()
        w = self.op_weights().double().cpu()
        terms: list[tuple[float, int, tuple[int, ...]]] = []
        for k in range(self.space.K):
            # Beam of the max_sub_policies heaviest prefixes: the factors are independent, so the
            # heaviest complete combinations all grow from kept prefixes (the beam is exact).
            beam: list[tuple[float, tuple[int, ...]]] = [(float(pi[k]), ())]
            for n in range(self.space.N):
                grown = [
                    (weight * float(w[k, n, o]), (*ops, o))
                    for weight, ops in beam
                    for o in range(w.shape[-1])
                ]
                beam = sorted(grown, key=lambda t: (-t[0], t[1]))[:max_sub_policies]
            terms.extend((weight, k, ops) for weight, ops in beam)
        terms.sort(key=lambda t: (-t[0], t[1], t[2]))
        kept = [t for t in terms if t[0] >= min_share][:max_sub_policies]
        return kept or terms[:1]  # nothing reaches min_share (near-uniform weights): the heaviest

    def exported_share(self, min_share: float = 0.01, max_sub_policies: int = 64) -> float:
        """The share of the hard-sampled distribution that :meth:`export` keeps (1 − what it drops
        below ``min_share`` or beyond ``max_sub_policies``)."""
        return math.fsum(weight for weight, _, _ in self._export_terms(min_share, max_sub_policies))

    @torch.no_grad()
    def export(self, seed: int | None = None, min_share: float = 0.01, max_sub_policies: int = 64) -> Policy:
        """The discrete policy that samples what the hard forward pass samples.

        Each sub-policy ``k`` becomes one discrete sub-policy per combination ``(o_1, …, o_N)`` of
        its steps' ops, weighted ``π_k · Π_n w[k, n, o_n]`` (``π``: :meth:`sub_policy_probabilities`,
        ``w``: :meth:`op_weights`); step ``n`` carries op ``o_n``'s ``p``, ``m`` and sign
        (:meth:`sign_tensor`). Combinations below ``min_share`` are dropped (all but the heaviest
        when none reaches it), at most ``max_sub_policies`` of the heaviest are kept, and the kept
        weights are renormalised. A search with ``hard=True`` trained on exactly this distribution
        up to the dropped share (``1 −`` :meth:`exported_share`); a soft search trained on its
        mixture.

        Args:
            seed: the discrete policy's seed.
            min_share: the smallest weight a combination needs to be kept.
            max_sub_policies: how many combinations are kept at most.
        """
        kept = self._export_terms(min_share, max_sub_policies)
        total = math.fsum(weight for weight, _, _ in kept)
        p, m, sign = self.probabilities(), self.magnitude_tensor(), self.sign_tensor()
        names = self.space.op_names
        subs = [
            [
                PolicyStep(names[o], float(p[k, n, o]), float(m[k, n, o]), float(sign[k, n, o]))
                for n, o in enumerate(ops)
            ]
            for _, k, ops in kept
        ]
        weights = [weight / total for weight, _, _ in kept]
        return Policy(subs, self.space, seed=seed, sub_policy_weights=weights)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint from before the signs: every op ran in the direction its m gives.
        # (nn.Module.load_state_dict works on its own copy of the mapping, so adding is safe.)
        key = prefix + "sign_logits"
        if key not in state_dict and prefix + "magnitude_logits" in state_dict:
            state_dict[key] = torch.full_like(self.sign_logits.detach(), LEGACY_SIGN_LOGIT)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"space={self.space.name}, K={self.space.K}, N={self.space.N}, ops={len(self.space.ops)}, "
            f"tau=({self.tau1:.3g}, {self.tau2:.3g}), hard={self.hard}"
        )


def _start_magnitude(space: SearchSpace, op_range: OpRange) -> float:
    """``m`` of the default start: halfway from a signed op's identity to its value at ``m = 10``;
    5 for an unsigned op."""
    if not op_range.signed:
        return 5.0
    at_identity = space.magnitude(op_range.op, op_range.spec.identity)
    return (at_identity + MAX_MAGNITUDE) / 2.0


def _logit(probability: float) -> float:
    return math.log(probability / (1.0 - probability))
