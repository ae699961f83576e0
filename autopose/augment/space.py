"""The augmentation search space: which ops, their real ranges, K and N.

A space is a typed :class:`SearchSpace`, loaded from YAML with
:func:`load_search_space` or built in code. The YAML layout
(``search_spaces/p2net.yaml``)::

    name: p2net
    num_sub_policies: 3        # K
    ops_per_sub_policy: 2      # N
    ops:                       # op: [value at m = 0, value at m = 10]
      Rotate: [-45.0, 45.0]
      Equalize: null           # null: the op's default range (Equalize has no magnitude)
      ...

Every problem (unknown key or op, a range outside what the op accepts, a
wrong type) raises :class:`AutoposeError` naming the file and the field.
Experiment configs embed the same mapping; they reuse the checks through
:meth:`SearchSpace.from_dict` with a ``field_prefix``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autopose.augment.ops import MAX_MAGNITUDE, OP_NAMES, OPS, PAPER_OP_NAMES, OpSpec
from autopose.errors import AutoposeError
from autopose.files import is_finite_number, read_yaml

Tensor = torch.Tensor

_KEYS = ("name", "num_sub_policies", "ops_per_sub_policy", "ops")


@dataclass(frozen=True)
class OpRange:
    """One op of a space and the real values that ``m = 0`` and ``m = 10`` map to.

    ``low``/``high`` are both 0 for an op without magnitude (Equalize).
    """

    op: str
    low: float
    high: float

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    @property
    def signed(self) -> bool:
        """The op's identity lies strictly inside the range, so the op moves both ways from it
        (Rotate in [-45, 45] turns either way; Cutout in [0, 0.5] only grows)."""
        identity = self.spec.identity
        return identity is not None and min(self.low, self.high) < identity < max(self.low, self.high)


@dataclass(frozen=True)
class SearchSpace:
    """Ops with ranges, ``K`` sub-policies of ``N`` steps each.

    Attributes:
        name: the name policies record in their ``space`` field.
        num_sub_policies: ``K``.
        ops_per_sub_policy: ``N``.
        ops: the candidate ops, in the order of every per-op tensor (``O`` of them).
        flip_pairs: the ``(left, right)`` keypoint pairs FlipLR swaps, once the space is bound
            to a dataset (:meth:`with_flip_pairs`; not part of the space's file).
    """

    name: str
    num_sub_policies: int
    ops_per_sub_policy: int
    ops: tuple[OpRange, ...]
    flip_pairs: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        names = [r.op for r in self.ops]
        if not names:
            raise ValueError("a search space needs at least one op")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate ops in search space {self.name!r}: {names}")
        for r in self.ops:
            if r.op not in OPS:
                raise ValueError(f"unknown op {r.op!r}; known: {', '.join(OP_NAMES)}")
        if self.num_sub_policies < 1 or self.ops_per_sub_policy < 1:
            raise ValueError("num_sub_policies and ops_per_sub_policy must be at least 1")

    # -- shorthands -----------------------------------------------------------------------------
    @property
    def K(self) -> int:  # noqa: N802 (the paper's letter)
        return self.num_sub_policies

    @property
    def N(self) -> int:  # noqa: N802
        return self.ops_per_sub_policy

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(r.op for r in self.ops)

    @property
    def specs(self) -> tuple[OpSpec, ...]:
        return tuple(r.spec for r in self.ops)

    def index(self, op: str) -> int:
        """Position of ``op`` in :attr:`ops` (``KeyError`` if absent)."""
        for i, r in enumerate(self.ops):
            if r.op == op:
                return i
        raise KeyError(op)

    def range_tensors(self, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """``(low (O,), high (O,))`` for vectorised magnitude mapping."""
        low = torch.tensor([r.low for r in self.ops], device=device, dtype=dtype)
        high = torch.tensor([r.high for r in self.ops], device=device, dtype=dtype)
        return low, high

    @property
    def signed(self) -> tuple[bool, ...]:
        """Per op: whether it is signed (:attr:`OpRange.signed`), in :attr:`ops` order."""
        return tuple(r.signed for r in self.ops)

    def identity_tensors(self, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """``(identity (O,), signed (O,) bool)``: each op's identity value (0 where it has none;
        only signed ops use it) and whether it is signed."""
        identity = torch.tensor(
            [r.spec.identity if r.signed else 0.0 for r in self.ops], device=device, dtype=dtype
        )
        return identity, torch.tensor(self.signed, device=device, dtype=torch.bool)

    def mirror(self, values: Tensor) -> Tensor:
        """``…×O`` real values mirrored about each op's identity, ``2·identity − value``, clamped
        to the op's range; unsigned ops keep their value.

        The clamp matters for ranges that are not symmetric about the identity: Scale in
        [0.7, 1.35] mirrors 1.35 to 0.65, which becomes 0.7.
        """
        low, high = self.range_tensors(values.device, values.dtype)
        identity, signed = self.identity_tensors(values.device, values.dtype)
        mirrored = torch.minimum(torch.maximum(2.0 * identity - values, low.minimum(high)), low.maximum(high))
        return torch.where(signed, mirrored, values)

    def values(self, magnitudes: Tensor) -> Tensor:
        """``…×O`` normalized magnitudes (0–10) → real values, op by op (differentiable)."""
        low, high = self.range_tensors(magnitudes.device, magnitudes.dtype)
        return low + (high - low) * magnitudes / MAX_MAGNITUDE

    def value(self, op: str, magnitude: float) -> float:
        """One op's real value at the normalized ``magnitude``."""
        r = self.ops[self.index(op)]
        return r.low + (r.high - r.low) * float(magnitude) / MAX_MAGNITUDE

    def magnitude(self, op: str, value: float) -> float:
        """The normalized magnitude (0–10) at which ``op`` takes the real ``value``: the inverse
        of :meth:`value` (``ValueError`` for an op without magnitude)."""
        r = self.ops[self.index(op)]
        if r.high == r.low:
            raise ValueError(f"{op} has no magnitude")
        return (float(value) - r.low) / (r.high - r.low) * MAX_MAGNITUDE

    def subset(self, ops: Sequence[str], name: str | None = None) -> SearchSpace:
        """The same space restricted to ``ops`` (tests and demos use small spaces)."""
        keep = tuple(self.ops[self.index(op)] for op in ops)
        return dataclasses.replace(self, name=name or self.name, ops=keep)

    def with_flip_pairs(self, flip_pairs: Sequence[Sequence[int]]) -> SearchSpace:
        """The space bound to a dataset's ``(left, right)`` keypoint pairs, which FlipLR swaps."""
        return dataclasses.replace(self, flip_pairs=tuple((int(a), int(b)) for a, b in flip_pairs))

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_sub_policies": self.num_sub_policies,
            "ops_per_sub_policy": self.ops_per_sub_policy,
            "ops": {r.op: ([r.low, r.high] if r.spec.has_magnitude else None) for r in self.ops},
        }

    @classmethod
    def from_dict(cls, data: Any, path: str | Path | None = None, field_prefix: str = "") -> SearchSpace:
        """Validate a parsed mapping (YAML / JSON) into a space.

        Args:
            data: the mapping with keys ``name``, ``num_sub_policies``,
                ``ops_per_sub_policy``, ``ops``.
            path: the file it came from, for error messages.
            field_prefix: where the mapping sits inside that file (``"search_space"``
                for a section of an experiment config); prefixed to field names.

        Raises:
            AutoposeError: naming ``path`` and the field at fault.
        """

        def where(key: str) -> str:
            return f"{field_prefix}.{key}" if field_prefix else key

        def fail(message: str, key: str | None = None) -> AutoposeError:
            return AutoposeError(message, path=path, field=where(key) if key else field_prefix or None)

        if not isinstance(data, Mapping):
            raise fail(f"expected a mapping with keys {', '.join(_KEYS)}, got {type(data).__name__}")
        for key in data:
            if key not in _KEYS:
                raise fail(f"unknown key {key!r}; expected {', '.join(_KEYS)}", str(key))
        for key in _KEYS:
            if key not in data:
                raise fail("missing", key)
        name = data["name"]
        if not isinstance(name, str) or not name:
            raise fail("must be a non-empty string", "name")
        counts = {}
        for key in ("num_sub_policies", "ops_per_sub_policy"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(f"must be a whole number ≥ 1, got {value!r}", key)
            counts[key] = value
        ops = data["ops"]
        if not isinstance(ops, Mapping) or not ops:
            raise fail("must be a non-empty mapping op → [low, high] or null", "ops")
        ranges = []
        for op, value_range in ops.items():
            ranges.append(_parse_range(op, value_range, fail))
        return cls(name, counts["num_sub_policies"], counts["ops_per_sub_policy"], tuple(ranges))


def _parse_range(op: Any, value_range: Any, fail) -> OpRange:
    key = f"ops.{op}"
    if op not in OPS:
        raise fail(f"unknown op {op!r}; known: {', '.join(OP_NAMES)}", key)
    spec = OPS[op]
    if not spec.has_magnitude:
        if value_range is not None:
            raise fail(f"{op} has no magnitude; write `{op}: null`", key)
        return OpRange(op, 0.0, 0.0)
    if value_range is None:
        low, high = spec.default_range
        return OpRange(op, float(low), float(high))
    if (
        not isinstance(value_range, Sequence)
        or isinstance(value_range, str)
        or len(value_range) != 2
        or not all(is_finite_number(v) for v in value_range)
    ):
        raise fail(f"expected [low, high] (two numbers) or null, got {value_range!r}", key)
    low, high = (float(v) for v in value_range)
    lo_ok, hi_ok = spec.domain
    for v in (low, high):
        if not lo_ok <= v <= hi_ok:
            raise fail(f"{v} is outside what {op} accepts ([{lo_ok}, {hi_ok}])", key)
    return OpRange(op, low, high)


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file.

    Raises:
        AutoposeError: missing or unparsable file, or a bad field (named).
    """
    path = Path(path)
    data = read_yaml(path)
    return SearchSpace.from_dict(data, path=path)


def p2net_space() -> SearchSpace:
    """The paper's space in code (K = 3, N = 2, ten ops at their default ranges);
    ``search_spaces/p2net.yaml`` holds the same (a test checks they agree)."""
    ranges = tuple(
        OpRange(name, *(OPS[name].default_range if OPS[name].has_magnitude else (0.0, 0.0)))
        for name in PAPER_OP_NAMES
    )
    return SearchSpace("p2net", 3, 2, ranges)


# Spaces a policy file may name without passing the space along.
BUILTIN_SPACES = {"p2net": p2net_space}


def space_of_document(
    name: Any, space: SearchSpace | None, *, document: str, path: str | Path | None = None
) -> SearchSpace:
    """The search space a policy or schedule file (``document``: which, for the message) names in
    its ``space`` field: ``space`` when given (the names must agree), else the built-in space of
    that name.

    Raises:
        AutoposeError: naming ``path`` and the field ``space``.
    """
    if not isinstance(name, str):
        raise AutoposeError("must be the search space's name (a string)", path=path, field="space")
    if space is None:
        if name not in BUILTIN_SPACES:
            raise AutoposeError(
                f"unknown search space {name!r}: pass the space it was searched in "
                f"(built in: {', '.join(BUILTIN_SPACES)})",
                path=path,
                field="space",
            )
        return BUILTIN_SPACES[name]()
    if name != space.name:
        raise AutoposeError(
            f"{document} was searched in space {name!r}, not {space.name!r}", path=path, field="space"
        )
    return space
