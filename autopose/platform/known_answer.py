"""The known-answer suite's yardstick: shifts whose matching policy is known, and the table.

Each synthetic shift of :data:`autopose.data.synth.KNOWN_SHIFTS` moves the val (and holdout)
split away from train in one way that an op of the demo's space answers
(:data:`autopose.data.synth.MATCHED_OPS`). For every shift and seed, every policy kind is
trained from the same warm start under the same budget and scored on val; the table says,
per shift and overall, how each kind does against no augmentation, paired by seed.

Kinds (the table's rows):

* ``none``: no augmentation; ``adabn``: the same weights with BatchNorm statistics
  re-estimated on the unlabelled holdout split (free: what the search must beat to matter);
* ``random``: the best of as many random policies as a search trial costs in baseline
  trials, chosen on the holdout split and reported on val (equal compute);
* ``handcrafted``, ``randaugment``, ``trivialaugment``: the usual recipes;
* ``matched``: a hand-written policy that matches the shift (:func:`matched_policy`): the
  ceiling a policy can reach at this budget;
* ``search``: the differentiable search trial itself; ``exported``: its exported policy
  retrained from the same warm start (what ``promote`` trains).

Pure functions over plain dicts: the benchmark and the demo's report both print
:func:`markdown_table` of :func:`summarize`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

KINDS = (
    "none",
    "adabn",
    "random",
    "handcrafted",
    "randaugment",
    "trivialaugment",
    "matched",
    "search",
    "exported",
)


def _policy(steps: Sequence[tuple[str, float]], p: float = 0.9) -> dict[str, Any]:
    """A policy of the demo's space, one sub-policy per ``(op, value in the op's units)``."""
    from autopose.augment import SearchSpace
    from autopose.platform.demo import DEMO_SPACE

    space = SearchSpace.from_dict(DEMO_SPACE)
    return {
        "format": "autopose.policy/1",
        "space": space.name,
        "sub_policies": [[{"op": op, "p": p, "m": space.magnitude(op, value)}] for op, value in steps],
    }


# One sub-policy per entry, in the op's units; each answers its shift as the synthetic
# generator draws it (autopose.data.synth.KNOWN_SHIFTS).
_MATCHED = {
    "combined": [("Rotate", -30.0), ("Rotate", 30.0), ("Brightness", 0.6), ("Brightness", 0.6)],
    "rotation": [("Rotate", -40.0), ("Rotate", 40.0), ("Rotate", -20.0), ("Rotate", 20.0)],
    "darkness": [("Brightness", 0.5)] * 4,
    "zoom_out": [("Scale", 0.7)] * 4,
    "blur": [("Sharpness", 0.1)] * 4,
    "offset": [("TranslateX", -0.15), ("TranslateX", 0.15), ("TranslateX", -0.08), ("TranslateX", 0.08)],
}


def matched_policy(shift: str) -> dict[str, Any]:
    """The hand-written policy (JSON mapping, demo space) that matches ``shift``."""
    return _policy(_MATCHED[shift])


# Which way each op must move from the identity to answer its shift.
def right_direction(op: str, values: Sequence[float]) -> bool:
    """Whether the exported values of ``op`` go the way its shift needs: Rotate and
    TranslateX both ways (the shifts are symmetric), Brightness, Scale and Sharpness below 1."""
    if not values:
        return False
    if op == "Rotate":
        return any(v <= -10 for v in values) and any(v >= 10 for v in values)
    if op == "TranslateX":
        return any(v <= -0.05 for v in values) and any(v >= 0.05 for v in values)
    return all(v < 0.95 for v in values)


def exported_steps(document: Mapping[str, Any], space: Any) -> list[list[Any]]:
    """``[op, p, value in the op's units]`` per step of a policy document, sub-policy by
    sub-policy (``space``: its :class:`~autopose.augment.SearchSpace`)."""
    return [
        [step["op"], step["p"], space.value(step["op"], step["m"])]
        for steps in document.get("sub_policies", [])
        for step in steps
    ]


def search_found_shift(
    op_prob: Mapping[str, float], exported: Sequence[Sequence[Any]], matched_ops: Sequence[str]
) -> bool:
    """The matching op got the top weight, and the exported policy moves it the right way.

    Args:
        op_prob: the search's final op probabilities.
        exported: ``[op, p, value in the op's units]`` per exported sub-policy step.
        matched_ops: the ops that answer the shift.
    """
    if not op_prob:
        return False
    top = max(op_prob, key=op_prob.get)
    if top not in matched_ops:
        return False
    return right_direction(top, [float(value) for op, _, value in exported if op == top])


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return round(mean, 4), round(sd, 4)


def summarize(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per shift and overall: each kind's val AP (mean, sd), its paired difference to ``none``
    (mean, sd, seeds where it is ahead), the exported policy's mean rank, and in how many
    seeds the search found the shift.

    Args:
        cells: one per (shift, seed): ``{"shift", "seed", "ap": {kind: val AP},
            "found": bool}`` (``found``: see :func:`search_found_shift`; absent without a search).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for cell in cells:
        groups.setdefault(cell["shift"], []).append(cell)
    if len(groups) > 1:
        groups["overall"] = list(cells)
    summary: dict[str, Any] = {}
    for shift, members in groups.items():
        rows = {}
        for kind in KINDS:
            paired = [c for c in members if kind in c["ap"] and "none" in c["ap"]]
            if not paired:
                continue
            mean, sd = _mean_sd([c["ap"][kind] for c in paired])
            gain, gain_sd = _mean_sd([c["ap"][kind] - c["ap"]["none"] for c in paired])
            ahead = sum(c["ap"][kind] > c["ap"]["none"] for c in paired)
            rows[kind] = {
                "mean": mean,
                "sd": sd,
                "gain": gain,
                "gain_sd": gain_sd,
                "ahead": ahead,
                "n": len(paired),
            }
        ranks = [_rank(c["ap"], "exported") for c in members if "exported" in c["ap"]]
        found = [bool(c["found"]) for c in members if "found" in c]
        summary[shift] = {
            "seeds": len(members),
            "kinds": rows,
            "exported_rank": round(statistics.fmean(ranks), 2) if ranks else None,
            "ranked": len(members[0]["ap"]) if members else 0,
            "found": sum(found),
        }
    return summary


def _rank(ap: Mapping[str, float], kind: str) -> int:
    """1 + the kinds ahead of ``kind`` (the matched ceiling counted too)."""
    return 1 + sum(1 for other, value in ap.items() if other != kind and value > ap[kind])


def table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The summary as a header and rows: a row per kind, a column per shift, each cell
    ``mean AP (gain over none ± sd, seeds ahead of none)``; then the exported policy's mean
    rank and the seeds in which the search found the shift."""
    shifts = list(summary)
    kinds = [k for k in KINDS if any(k in summary[s]["kinds"] for s in shifts)]
    header = ["kind", *(f"{s} (n={summary[s]['seeds']})" for s in shifts)]
    rows = []
    for kind in kinds:
        cells = [kind]
        for shift in shifts:
            row = summary[shift]["kinds"].get(kind)
            if row is None:
                cells.append("–")
            elif kind == "none":
                cells.append(f"{row['mean']:.3f} ± {row['sd']:.3f}")
            else:
                gain = f"{row['gain']:+.3f} ± {row['gain_sd']:.3f}"
                cells.append(f"{row['mean']:.3f} ({gain}, {row['ahead']}/{row['n']})")
        rows.append(cells)
    ranks = [
        f"{summary[s]['exported_rank']:.2f} of {summary[s]['ranked']}" if summary[s]["exported_rank"] else "–"
        for s in shifts
    ]
    rows.append(["exported rank", *ranks])
    rows.append(["search found the shift", *(f"{summary[s]['found']}/{summary[s]['seeds']}" for s in shifts)])
    return header, rows


def markdown_table(summary: Mapping[str, Any]) -> str:
    """:func:`table` as Markdown."""
    header, rows = table(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
