"""Augmentation policies: the discrete :class:`Policy` and the differentiable :class:`RelaxedPolicy`.

A policy is ``K`` sub-policies of ``N`` steps; a step is ``(op, p, m)``: apply
``op`` with probability ``p`` at normalized magnitude ``m ∈ [0, 10]`` (mapped to
the op's real range by the search space). Each sample of a batch draws its own
sub-policy.

Policy file (``autopose.policy/1``)::

    {"format": "autopose.policy/1", "space": "p2net",
     "sub_policies": [[{"op": "Rotate", "p": 0.6, "m": 7.0},
                       {"op": "Brightness", "p": 0.3, "m": 4.0}], ...]}
"""

from __future__ import annotations

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
from autopose.augment.space import BUILTIN_SPACES, SearchSpace
from autopose.errors import AutoposeError
from autopose.files import atomic_write

Tensor = torch.Tensor
POLICY_FORMAT = "autopose.policy/1"
_STEP_KEYS = ("op", "p", "m")
_TOP_KEYS = ("format", "space", "sub_policies")


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
    """Apply ``op`` with probability ``p`` at normalized magnitude ``m`` (0–10)."""

    op: str
    p: float
    m: float


class Policy:
    """A discrete augmentation policy.

    Args:
        sub_policies: ``K`` lists of :class:`PolicyStep` (lengths may differ).
        space: the search space that gives each op's real range.
        seed: seeds the policy's own random generator (sub-policy choice, the
            ``p`` draws, Cutout's position); ``None`` draws from torch's global one.

    Calling it: ``images, keypoints, visibility = policy(images, keypoints, visibility)``
    with ``images B×3×H×W`` float 0…1 (uint8 is converted), ``keypoints B×K×2``
    pixels, ``visibility B×K``; a ``generator=`` argument overrides the policy's.
    """

    def __init__(
        self, sub_policies: Sequence[Sequence[PolicyStep]], space: SearchSpace, seed: int | None = None
    ):
        if not sub_policies or any(len(steps) == 0 for steps in sub_policies):
            raise ValueError("a policy needs at least one sub-policy, each with at least one step")
        for steps in sub_policies:
            for step in steps:
                if step.op not in space.op_names:
                    raise ValueError(f"op {step.op!r} is not in search space {space.name!r}")
                if not (0.0 <= step.p <= 1.0 and 0.0 <= step.m <= MAX_MAGNITUDE):
                    raise ValueError(f"step {step} has p or m out of range")
        self.sub_policies: tuple[tuple[PolicyStep, ...], ...] = tuple(tuple(s) for s in sub_policies)
        self.space = space
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        steps = max(len(s) for s in self.sub_policies)
        # K×N tables; a missing step (shorter sub-policy) has op -1.
        self._ops = torch.full((len(self.sub_policies), steps), -1, dtype=torch.long)
        self._p = torch.zeros(len(self.sub_policies), steps)
        self._m = torch.zeros(len(self.sub_policies), steps)
        for k, sub in enumerate(self.sub_policies):
            for n, step in enumerate(sub):
                self._ops[k, n] = space.index(step.op)
                self._p[k, n] = step.p
                self._m[k, n] = step.m

    def __call__(
        self, images: Tensor, keypoints: Tensor, visibility: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        images = as_float_images(images)
        _check_batch(images, keypoints, visibility)
        generator = generator if generator is not None else self.generator
        batch, device = images.shape[0], images.device
        num_ops = len(self.space.ops)
        chosen = torch.randint(len(self.sub_policies), (batch,), generator=generator)
        for n in range(self._ops.shape[1]):
            op = self._ops[chosen, n]
            applied = (torch.rand(batch, generator=generator) < self._p[chosen, n]) & (op >= 0)
            uniform = torch.rand(batch, 2, generator=generator)
            strengths = F.one_hot(op.clamp(min=0), num_ops).float() * applied[:, None]
            values = self.space.values(self._m[chosen, n][:, None].expand(batch, num_ops))
            images, keypoints, visibility = apply_step(
                images,
                keypoints,
                visibility,
                self.space.specs,
                strengths.to(device),
                values.to(device),
                cutout_uniform=uniform,
            )
        return images, keypoints, visibility

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": POLICY_FORMAT,
            "space": self.space.name,
            "sub_policies": [
                [{"op": s.op, "p": round(float(s.p), 6), "m": round(float(s.m), 6)} for s in sub]
                for sub in self.sub_policies
            ],
        }

    @classmethod
    def from_dict(
        cls,
        data: Any,
        space: SearchSpace | None = None,
        path: str | Path | None = None,
        seed: int | None = None,
    ) -> Policy:
        """Validate a parsed policy.

        Args:
            data: the parsed JSON.
            space: the search space the policy was searched in; by default the
                built-in space its ``space`` field names (``p2net``).
            path: the file it came from, for error messages.

        Raises:
            AutoposeError: naming ``path`` and the bad field (``sub_policies[1][0].op``).
        """

        def fail(message: str, where: str | None = None) -> AutoposeError:
            return AutoposeError(message, path=path, field=where)

        if not isinstance(data, Mapping):
            raise fail(f"expected a JSON object with keys {', '.join(_TOP_KEYS)}")
        for key in data:
            if key not in _TOP_KEYS:
                raise fail(f"unknown field; expected {', '.join(_TOP_KEYS)}", str(key))
        for key in _TOP_KEYS:
            if key not in data:
                raise fail("missing", key)
        if data["format"] != POLICY_FORMAT:
            raise fail(f"expected {POLICY_FORMAT!r}, got {data['format']!r}", "format")
        name = data["space"]
        if not isinstance(name, str):
            raise fail("must be the search space's name (a string)", "space")
        if space is None:
            if name not in BUILTIN_SPACES:
                raise fail(
                    f"unknown search space {name!r}: pass the space it was searched in "
                    f"(built in: {', '.join(BUILTIN_SPACES)})",
                    "space",
                )
            space = BUILTIN_SPACES[name]()
        elif name != space.name:
            raise fail(f"policy was searched in space {name!r}, not {space.name!r}", "space")
        subs = data["sub_policies"]
        if not isinstance(subs, list) or not subs:
            raise fail("must be a non-empty list of sub-policies", "sub_policies")
        parsed = []
        for k, sub in enumerate(subs):
            if not isinstance(sub, list) or not sub:
                raise fail("must be a non-empty list of steps", f"sub_policies[{k}]")
            steps = []
            for n, step in enumerate(sub):
                steps.append(_parse_step(step, space, f"sub_policies[{k}][{n}]", fail))
            parsed.append(steps)
        return cls(parsed, space, seed=seed)

    @classmethod
    def from_file(cls, path: str | Path, space: SearchSpace | None = None, seed: int | None = None) -> Policy:
        """Read and validate a policy JSON file (see :meth:`from_dict`)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise AutoposeError(f"cannot read policy: {error.strerror or error}", path=path) from None
        except UnicodeDecodeError as error:
            raise AutoposeError(f"not UTF-8 text (byte {error.start})", path=path) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise AutoposeError(
                f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})", path=path
            ) from None
        return cls.from_dict(data, space=space, path=path, seed=seed)

    def to_file(self, path: str | Path) -> None:
        """Write the JSON atomically (temporary file in the same folder, then rename)."""
        with atomic_write(path) as out:
            json.dump(self.to_dict(), out, indent=2)
            out.write("\n")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        subs = "; ".join(
            ", ".join(f"{s.op}(p={s.p:.2f}, m={s.m:.1f})" for s in sub) for sub in self.sub_policies
        )
        return f"Policy[{self.space.name}]({subs})"


def _parse_step(step: Any, space: SearchSpace, where: str, fail) -> PolicyStep:
    if not isinstance(step, Mapping):
        raise fail('must be an object {"op": …, "p": …, "m": …}', where)
    for key in step:
        if key not in _STEP_KEYS:
            raise fail("unknown field; a step has op, p, m", f"{where}.{key}")
    for key in _STEP_KEYS:
        if key not in step:
            raise fail("missing", f"{where}.{key}")
    op = step["op"]
    if not isinstance(op, str) or op not in space.op_names:
        raise fail(f"unknown op {op!r}; space {space.name!r} has {', '.join(space.op_names)}", f"{where}.op")
    values = {}
    for key, high in (("p", 1.0), ("m", MAX_MAGNITUDE)):
        value = step[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(f"must be a number in [0, {high:g}], got {value!r}", f"{where}.{key}")
        if not 0.0 <= value <= high:
            raise fail(f"{value} is outside [0, {high:g}]", f"{where}.{key}")
        values[key] = float(value)
    return PolicyStep(op, values["p"], values["m"])


# -- the relaxed (differentiable) policy ------------------------------------------------------------


@dataclass
class TemperatureSchedule:
    """Temperatures of the relaxations and their annealing.

    ``τ1`` (``sub_policy``) is the Gumbel-softmax temperature of the sub-policy
    choice, ``τ2`` (``bernoulli``) the relaxed-Bernoulli temperature of each op's
    ``p``. Each goes geometrically from its start value to its ``*_final``
    value over ``anneal_steps`` steps and stays there (no annealing when
    ``anneal_steps`` is 0 or a final value is ``None``).
    """

    sub_policy: float = 1.0
    bernoulli: float = 0.5
    sub_policy_final: float | None = None
    bernoulli_final: float | None = None
    anneal_steps: int = 0

    def __post_init__(self) -> None:
        for value in (self.sub_policy, self.bernoulli, self.sub_policy_final, self.bernoulli_final):
            if value is not None and not value > 0:
                raise ValueError("temperatures must be positive")

    def at(self, step: int) -> tuple[float, float]:
        """``(τ1, τ2)`` after ``step`` search steps."""
        fraction = 1.0 if self.anneal_steps <= 0 else min(max(step, 0) / self.anneal_steps, 1.0)

        def anneal(start: float, final: float | None) -> float:
            if final is None or self.anneal_steps <= 0:
                return start
            return start * (final / start) ** fraction

        return anneal(self.sub_policy, self.sub_policy_final), anneal(self.bernoulli, self.bernoulli_final)


@dataclass
class PolicyNoise:
    """The random draws of one :class:`RelaxedPolicy` application, kept so that the
    search can apply the same augmentation again (all uniform in (0, 1)).

    Attributes:
        sub_policy: ``B×K`` for the Gumbel noise of the sub-policy choice.
        bernoulli: ``B×N×O`` for the relaxed Bernoulli gates.
        cutout: ``B×N×2`` for Cutout's centers.
    """

    sub_policy: Tensor
    bernoulli: Tensor
    cutout: Tensor

    def to(self, device) -> PolicyNoise:
        return PolicyNoise(self.sub_policy.to(device), self.bernoulli.to(device), self.cutout.to(device))


def _open_uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    # Keep away from 0 and 1 so that the logs below stay finite.
    return torch.rand(shape, generator=generator).clamp(1e-6, 1.0 - 1e-6)


class RelaxedPolicy(nn.Module):
    """The differentiable policy of the paper (DA², after DADA).

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

    An op's strength for a sample is ``h · w_o · b_o`` (``h`` = 1 in value, the
    straight-through weight of the picked sub-policy); see
    :mod:`autopose.augment.apply` for how the strengths mix ops while keeping
    keypoints exact. Ops with weight at or below ``min_weight`` are skipped for
    speed (their share of output and gradient is that small): once three ops per
    step dominate, the forward pass runs 6–14× faster than with uniform weights
    (``benchmarks/augment.py``); early in a search, with near-uniform weights,
    every op runs on every sample.

    Args:
        space: the search space.
        temperatures: ``τ1``, ``τ2`` and their annealing (see :meth:`set_step`).
        init_probability: starting ``p`` of every op.
        init_magnitude: starting ``m`` of every op. With symmetric ranges, ``m = 5``
            is the identity for the geometric ops, Brightness and Sharpness: their
            magnitudes still get gradients but their op weights start with none.
        min_weight: skip an op for a sample whose mixing weight is at or below this.
        seed: seeds the small random start of the logits (to break the symmetry
            between sub-policies) and the noise generator.
    """

    def __init__(
        self,
        space: SearchSpace,
        temperatures: TemperatureSchedule | None = None,
        init_probability: float = 0.5,
        init_magnitude: float = 5.0,
        min_weight: float = 1e-3,
        seed: int | None = 0,
    ):
        super().__init__()
        if not 0.0 < init_probability < 1.0 or not 0.0 < init_magnitude < MAX_MAGNITUDE:
            raise ValueError("init_probability must lie in (0, 1) and init_magnitude in (0, 10)")
        self.space = space
        self.temperatures = temperatures or TemperatureSchedule()
        self.tau_sub_policy, self.tau_bernoulli = self.temperatures.at(0)
        self.min_weight = float(min_weight)
        k, n, o = space.K, space.N, len(space.ops)
        start = torch.Generator().manual_seed(0 if seed is None else seed)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed + 1)
        self.sub_policy_logits = nn.Parameter(1e-3 * torch.randn(k, generator=start))
        self.op_logits = nn.Parameter(1e-3 * torch.randn(k, n, o, generator=start))
        self.probability_logits = nn.Parameter(torch.full((k, n, o), _logit(init_probability)))
        self.magnitude_logits = nn.Parameter(torch.full((k, n, o), _logit(init_magnitude / MAX_MAGNITUDE)))
        self.register_buffer("_low", space.range_tensors()[0], persistent=False)
        self.register_buffer("_high", space.range_tensors()[1], persistent=False)

    # -- parameters in their natural units -------------------------------------------------------
    def probabilities(self) -> Tensor:
        """``K×N×O`` application probabilities ``p``."""
        return torch.sigmoid(self.probability_logits)

    def magnitude_tensor(self) -> Tensor:
        """``K×N×O`` normalized magnitudes ``m`` in [0, 10]."""
        return MAX_MAGNITUDE * torch.sigmoid(self.magnitude_logits)

    def op_weights(self) -> Tensor:
        """``K×N×O`` mixing weights (softmax over ops)."""
        return torch.softmax(self.op_logits, dim=-1)

    def sub_policy_probabilities(self) -> Tensor:
        """``(K,)`` the chance of each sub-policy (the Gumbel-max pick follows it exactly)."""
        return torch.softmax(self.sub_policy_logits, dim=0)

    def set_step(self, step: int) -> None:
        """Set the temperatures to the schedule's values after ``step`` search steps."""
        self.tau_sub_policy, self.tau_bernoulli = self.temperatures.at(step)

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

    # -- sampling ----------------------------------------------------------------------------------
    def sample_noise(self, batch: int, generator: torch.Generator | None = None) -> PolicyNoise:
        """Fresh random draws for a batch (from ``generator`` or the policy's own)."""
        generator = generator if generator is not None else self.generator
        k, n, o = self.op_logits.shape
        return PolicyNoise(
            sub_policy=_open_uniform((batch, k), generator),
            bernoulli=_open_uniform((batch, n, o), generator),
            cutout=torch.rand((batch, n, 2), generator=generator),
        )

    def choose_sub_policies(self, noise: PolicyNoise) -> tuple[Tensor, Tensor]:
        """Gumbel-softmax pick: ``(index (B,), weight (B,))``; the weight is 1 in value and
        carries the gradient of the soft sample at the picked index."""
        uniform = noise.sub_policy.to(self.sub_policy_logits.device)
        gumbel = -torch.log(-torch.log(uniform))
        soft = torch.softmax((self.sub_policy_logits + gumbel) / self.tau_sub_policy, dim=-1)
        index = soft.argmax(dim=-1)
        picked = soft.gather(1, index[:, None]).squeeze(1)
        return index, 1.0 + picked - picked.detach()

    def forward(
        self, images: Tensor, keypoints: Tensor, visibility: Tensor, noise: PolicyNoise | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Augment a batch, differentiably in every parameter.

        Args:
            images: ``B×3×H×W`` float 0…1 (uint8 is converted).
            keypoints: ``B×K×2`` pixels; visibility: ``B×K``.
            noise: the draws to use (see :meth:`sample_noise`); fresh ones if ``None``.
                Passing the same noise again reproduces the same augmentation.

        Returns:
            ``images, keypoints, visibility``; keypoints depend on the magnitudes
            (callers that build targets from them usually detach them).
        """
        images = as_float_images(images)
        _check_batch(images, keypoints, visibility)
        batch = images.shape[0]
        if noise is None:
            noise = self.sample_noise(batch)
        noise = noise.to(images.device)
        index, weight = self.choose_sub_policies(noise)
        op_weights = self.op_weights()[index]  # B×N×O
        logit_p = self.probability_logits[index]
        uniform = noise.bernoulli
        # Relaxed Bernoulli (binary Concrete): sigmoid((logit p + logistic noise) / τ2).
        gates = torch.sigmoid((logit_p + torch.log(uniform) - torch.log1p(-uniform)) / self.tau_bernoulli)
        values = self._low + (self._high - self._low) * self.magnitude_tensor()[index] / MAX_MAGNITUDE
        for n in range(self.space.N):
            strengths = weight[:, None] * op_weights[:, n] * gates[:, n]
            # Skip by mixing weight (not by strength): a gate near zero still has a p gradient.
            strengths = torch.where(
                op_weights[:, n] > self.min_weight, strengths, torch.zeros_like(strengths)
            )
            images, keypoints, visibility = apply_step(
                images,
                keypoints,
                visibility,
                self.space.specs,
                strengths,
                values[:, n],
                cutout_uniform=noise.cutout[:, n],
                min_strength=0.0,
            )
        return images, keypoints, visibility

    # -- export ------------------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, seed: int | None = None) -> Policy:
        """The discrete policy: per step the most likely op, with its ``p`` and ``m``.

        The policy file format has no sub-policy weights, so the discrete policy
        draws its sub-policies uniformly; :meth:`sub_policy_probabilities` keeps the
        learned ones for tracking."""
        best = self.op_logits.argmax(dim=-1)  # K×N
        p, m = self.probabilities(), self.magnitude_tensor()
        subs = []
        for k in range(self.space.K):
            steps = []
            for n in range(self.space.N):
                o = int(best[k, n])
                steps.append(PolicyStep(self.space.op_names[o], float(p[k, n, o]), float(m[k, n, o])))
            subs.append(steps)
        return Policy(subs, self.space, seed=seed)

    def extra_repr(self) -> str:
        return (
            f"space={self.space.name}, K={self.space.K}, N={self.space.N}, ops={len(self.space.ops)}, "
            f"tau=({self.tau_sub_policy:.3g}, {self.tau_bernoulli:.3g})"
        )


def _logit(probability: float) -> float:
    return math.log(probability / (1.0 - probability))
