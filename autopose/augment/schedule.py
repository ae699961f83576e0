"""Policy schedules: discrete policies in turn, each from the optimizer step it starts at.

Population Based Augmentation (Ho et al. 2019) does not end with one policy: a population
fine-tunes, and at intervals its worse members copy a better one's weights and policy and
perturb the policy, so that the best member trained under a sequence of policies. That
sequence is its result, and training with it means switching policies at the same points.

Schedule file (``autopose.schedule/1``)::

    {"format": "autopose.schedule/1", "space": "p2net", "steps": 120,
     "schedule": [{"start_step": 0,  "policy": {"format": "autopose.policy/1", ...}},
                  {"start_step": 60, "policy": {"format": "autopose.policy/1", ...}}]}

* ``steps``: the length (optimizer steps) of the training the schedule was found in.
* ``schedule``: one entry or more, the first at step 0, starts strictly increasing; each
  ``policy`` is a policy document (``autopose.policy/1`` or ``/2``) of the same space.

A training of another length applies the schedule stretched to it (each start scaled by
its steps over ``steps``), so that each policy covers the same share of training: the
way PBA applied the schedule found on a small proxy to the full training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from autopose.augment.policy import POLICY_FORMATS, Policy
from autopose.augment.space import SearchSpace, space_of_document
from autopose.errors import AutoposeError

Tensor = torch.Tensor
SCHEDULE_FORMAT = "autopose.schedule/1"
_TOP_KEYS = ("format", "space", "steps", "schedule")
_ENTRY_KEYS = ("start_step", "policy")


class PolicySchedule:
    """Discrete policies applied in turn by optimizer step.

    Args:
        entries: ``(start_step, policy)`` pairs, the first at 0, starts strictly increasing;
            every policy of the same search space.
        steps: the length of the training the starts are counted in (≥ 1).
        seed: seeds the schedule's one random generator, which every policy draws from
            (the trainer saves and restores it as it does a policy's).

    Calling it applies the policy of the current step (:meth:`set_step`; 0 at first), with
    the same arguments and returns as :class:`~autopose.augment.policy.Policy`.
    """

    def __init__(self, entries: Sequence[tuple[int, Policy]], steps: int, seed: int | None = None):
        starts = [int(start) for start, _ in entries]
        if not entries or starts[0] != 0:
            raise ValueError("a schedule needs at least one entry, the first at step 0")
        if any(later <= earlier for earlier, later in pairwise(starts)):
            raise ValueError(f"schedule starts must increase strictly, got {starts}")
        if steps < 1:
            raise ValueError(f"a schedule's steps must be ≥ 1, got {steps}")
        spaces = {policy.space.name for _, policy in entries}
        if len(spaces) != 1:
            raise ValueError(f"a schedule's policies share one search space, got {sorted(spaces)}")
        self.entries: tuple[tuple[int, Policy], ...] = tuple((int(s), p) for s, p in entries)
        self.steps = int(steps)
        self.space = entries[0][1].space
        self.seed = seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.step = 0

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def policy_at(self, step: int) -> Policy:
        """The policy that applies at optimizer step ``step``."""
        current = self.entries[0][1]
        for start, policy in self.entries:
            if start > step:
                break
            current = policy
        return current

    @property
    def final_policy(self) -> Policy:
        return self.entries[-1][1]

    def __call__(
        self,
        images: Tensor,
        keypoints: Tensor,
        visibility: Tensor,
        generator: torch.Generator | None = None,
        pad: tuple[int, int] = (0, 0),
    ) -> tuple[Tensor, Tensor, Tensor]:
        generator = generator if generator is not None else self.generator
        return self.policy_at(self.step)(images, keypoints, visibility, generator=generator, pad=pad)

    def stretched(self, steps: int) -> PolicySchedule:
        """The schedule for a training of ``steps`` optimizer steps: every start scaled by
        ``steps / self.steps`` (rounded down). Of entries that land on the same step the later
        wins, and an entry equal to the one before it merges into it."""
        entries: list[tuple[int, Policy]] = []
        for start, policy in self.entries:
            scaled = start * steps // self.steps
            if entries and scaled == entries[-1][0]:
                entries.pop()
            if not entries or entries[-1][1] != policy:
                entries.append((scaled, policy))
        return PolicySchedule(entries, steps, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCHEDULE_FORMAT,
            "space": self.space.name,
            "steps": self.steps,
            "schedule": [{"start_step": start, "policy": policy.to_dict()} for start, policy in self.entries],
        }

    @classmethod
    def from_dict(
        cls,
        data: Any,
        space: SearchSpace | None = None,
        path: str | Path | None = None,
        seed: int | None = None,
    ) -> PolicySchedule:
        """Validate a parsed schedule (see the module docstring).

        Raises:
            AutoposeError: naming ``path`` and the bad field (``schedule[1].start_step``,
                ``schedule[0].policy.sub_policies[1][0].op``).
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
        if data["format"] != SCHEDULE_FORMAT:
            raise fail(f"expected {SCHEDULE_FORMAT!r}, got {data['format']!r}", "format")
        space = space_of_document(data["space"], space, document="schedule", path=path)
        steps = data["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise fail(f"must be an integer ≥ 1, got {steps!r}", "steps")
        listed = data["schedule"]
        if not isinstance(listed, list) or not listed:
            raise fail("must be a non-empty list of {start_step, policy}", "schedule")
        entries: list[tuple[int, Policy]] = []
        for i, entry in enumerate(listed):
            where = f"schedule[{i}]"
            if not isinstance(entry, Mapping) or set(entry) != set(_ENTRY_KEYS):
                raise fail(f"expected an object with keys {', '.join(_ENTRY_KEYS)}", where)
            start = entry["start_step"]
            low, high = (entries[-1][0] + 1, steps - 1) if entries else (0, 0)
            if isinstance(start, bool) or not isinstance(start, int) or not low <= start <= high:
                expected = "0 (the first entry)" if not entries else f"an integer in [{low}, {high}]"
                raise fail(f"must be {expected}, got {start!r}", f"{where}.start_step")
            entries.append((start, _entry_policy(entry["policy"], space, path, f"{where}.policy")))
        return cls(entries, steps, seed=seed)

    def __repr__(self) -> str:
        return (
            f"PolicySchedule[{self.space.name}, {self.steps} steps]("
            + "; ".join(f"from {start}: {policy!r}" for start, policy in self.entries)
            + ")"
        )


def _entry_policy(data: Any, space: SearchSpace, path: str | Path | None, where: str) -> Policy:
    """One entry's policy, its errors naming the field from the schedule's top."""
    try:
        return Policy.from_dict(data, space=space, path=path)
    except AutoposeError as error:
        field = f"{where}.{error.field}" if error.field else where
        raise AutoposeError(error.message, path=path, field=field) from None


def policy_from_document(
    data: Any, space: SearchSpace | None = None, path: str | Path | None = None, seed: int | None = None
) -> Policy | PolicySchedule:
    """A policy file's contents as what trains with it: a :class:`Policy` (``autopose.policy/1``
    or ``/2``) or a :class:`PolicySchedule` (``autopose.schedule/1``).

    Raises:
        AutoposeError: naming ``path`` and the bad field.
    """
    if isinstance(data, Mapping) and data.get("format") == SCHEDULE_FORMAT:
        return PolicySchedule.from_dict(data, space=space, path=path, seed=seed)
    return Policy.from_dict(data, space=space, path=path, seed=seed)


DOCUMENT_FORMATS = (*POLICY_FORMATS, SCHEDULE_FORMAT)  # what a policy file may hold


def schedule_document(trained: Sequence[tuple[int, Mapping[str, Any]]], steps: int) -> dict[str, Any]:
    """What a run that trained with the policy documents ``trained`` (``(start_step, document)``,
    in order) exports: the one policy's document, or a schedule of them once it changed."""
    if len(trained) == 1:
        return dict(trained[0][1])
    first = trained[0][1]
    return {
        "format": SCHEDULE_FORMAT,
        "space": first["space"],
        "steps": int(steps),
        "schedule": [{"start_step": int(start), "policy": dict(doc)} for start, doc in trained],
    }
