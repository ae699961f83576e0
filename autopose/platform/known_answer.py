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

# The kinds the exported policy is ranked among (the matched ceiling too).
RANKED = (
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
# Plus the tpe method's best proposal on holdout, the pba method's best member on holdout, and
# the selection stage's pick among none, hand-crafted, the exported policy, tpe's and pba's (by
# holdout AP): what a user would be handed.
KINDS = (*RANKED, "tpe", "pba", "selected")


def _policy(steps: Sequence[tuple[str, float]], p: float = 0.9) -> dict[str, Any]:
    """A policy of the demo's space, one sub-policy per ``(op, value in the op's units)``."""
    from autopose.augment import load_search_space
    from autopose.platform.demo import DEMO_SPACE_FILE

    space = load_search_space(DEMO_SPACE_FILE)
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


# How far the symmetric shifts' ops must move, either way, to count as answering them (their units).
_REACH = {"Rotate": 10.0, "TranslateX": 0.05}


# Which way each op must move from the identity to answer its shift.
def right_direction(op: str, values: Sequence[float], shares: Sequence[float] | None = None) -> bool:
    """Whether the exported values of ``op`` go the way its shift needs.

    Rotate and TranslateX must turn (move) both ways, the shifts being symmetric: each side
    (±10°, ±0.05) carries at least a quarter of the op's share. Brightness, Scale and Sharpness
    must go below 1: values under 0.95 carry more than those over 1.05. ``shares``: how often
    each value is applied (sub-policy weight × p × the sign's share; equal when ``None``).
    """
    if not values:
        return False
    shares = [1.0] * len(values) if shares is None else list(shares)
    total = sum(shares)
    if total <= 0:
        return False

    def share(predicate) -> float:
        return sum(w for v, w in zip(values, shares, strict=True) if predicate(v)) / total

    if op in _REACH:
        reach = _REACH[op]
        return share(lambda v: v <= -reach) >= 0.25 and share(lambda v: v >= reach) >= 0.25
    return share(lambda v: _answers(op, v)) > share(lambda v: v > 1.05)


def answering_share(exported: Sequence[Sequence[Any]], matched_ops: Sequence[str]) -> float:
    """How often the exported policy moves a sample the way its shift needs: the summed
    share (:func:`exported_steps`) of the rows whose op answers the shift and whose value does
    what :func:`right_direction` asks of it (Rotate and TranslateX at least their reach either
    way, Brightness, Scale and Sharpness below 0.95). The shift-matched policy gives 0.9; the
    demo space's search policy at its start (six ops, ``p`` 0.5, each sign 0.5) about 0.04, or
    0.08 for Rotate and TranslateX, whose both directions count. Rows without a share (cached
    before policy/2) count nothing."""
    return sum(
        float(row[3])
        for row in exported
        if len(row) > 3 and row[0] in matched_ops and _answers(row[0], float(row[2]))
    )


def _answers(op: str, value: float) -> bool:
    return abs(value) >= _REACH[op] if op in _REACH else value < 0.95


def exported_steps(document: Mapping[str, Any], space: Any) -> list[list[Any]]:
    """What a policy document applies, step by step: ``[op, p, value in the op's units, share]``.

    ``share`` is how often a sample gets that value: the sub-policy's weight × ``p`` × the
    sign's share. A signed step with ``0 < sign < 1`` is two rows: its value (share × sign)
    and its mirror about the op's identity (share × (1 − sign)), as the policy draws them.
    ``space``: the document's :class:`~autopose.augment.SearchSpace` (policy/1 and /2).
    """
    import torch

    subs = document.get("sub_policies", [])
    weights = document.get("sub_policy_weights") or [1.0 / max(len(subs), 1)] * len(subs)
    rows = []
    for weight, steps in zip(weights, subs, strict=True):
        for step in steps:
            op, p, sign = step["op"], float(step["p"]), float(step.get("sign", 1.0))
            value = space.value(op, step["m"])
            if sign > 0.0:
                rows.append([op, p, value, weight * p * sign])
            if sign < 1.0:
                index = space.index(op)
                values = torch.zeros(len(space.ops), dtype=torch.float64)
                values[index] = value
                mirrored = float(space.mirror(values)[index])
                rows.append([op, p, mirrored, weight * p * (1.0 - sign)])
    return rows


def search_found_shift(
    op_prob: Mapping[str, float], exported: Sequence[Sequence[Any]], matched_ops: Sequence[str]
) -> bool:
    """The matching op got the top weight, and the exported policy moves it the right way.

    Args:
        op_prob: the search's final op probabilities.
        exported: :func:`exported_steps` of the exported policy (rows without a share, as the
            suite cached them before policy/2, count equally).
        matched_ops: the ops that answer the shift.
    """
    if not op_prob:
        return False
    top = max(op_prob, key=op_prob.get)
    if top not in matched_ops:
        return False
    rows = [row for row in exported if row[0] == top]
    shares = [float(row[3]) if len(row) > 3 else 1.0 for row in rows]
    return right_direction(top, [float(row[2]) for row in rows], shares)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return round(mean, 4), round(sd, 4)


def summarize(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per shift and overall: each kind's val AP (mean, sd), its paired difference to ``none``
    (mean, sd, seeds where it is ahead), the exported policy's mean rank, in how many
    seeds the search found the shift, and the exported policy's mean :func:`answering_share`
    (None where no cell has one).

    Args:
        cells: one per (shift, seed): ``{"shift", "seed", "ap": {kind: val AP},
            "found": bool, "answering_share": float}`` (both absent without a search; see
            :func:`search_found_shift` and :func:`answering_share`).
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
        answering = [float(c["answering_share"]) for c in members if "answering_share" in c]
        summary[shift] = {
            "seeds": len(members),
            "kinds": rows,
            "exported_rank": round(statistics.fmean(ranks), 2) if ranks else None,
            "ranked": len([k for k in members[0]["ap"] if k in RANKED]) if members else 0,
            "found": sum(found),
            "answering_share": round(statistics.fmean(answering), 3) if answering else None,
        }
    return summary


def _rank(ap: Mapping[str, float], kind: str) -> int:
    """1 + the kinds of :data:`RANKED` ahead of ``kind`` (the matched ceiling counted too)."""
    return 1 + sum(1 for other, value in ap.items() if other in RANKED and other != kind and value > ap[kind])


def table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The summary as a header and rows: a row per kind, a column per shift, each cell
    ``mean AP (gain over none ± sd, seeds ahead of none)``; then the exported policy's mean
    rank, the seeds in which the search found the shift and, where the cells carry it, the
    exported policy's mean share answering the shift."""
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
    shares = [summary[s]["answering_share"] for s in shifts]
    if any(v is not None for v in shares):
        rows.append(["exported share answering", *("–" if v is None else f"{v:.2f}" for v in shares)])
    return header, rows


def markdown_table(summary: Mapping[str, Any]) -> str:
    """:func:`table` as Markdown."""
    header, rows = table(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# Step 2's targets (search quality), on the cells of one suite run.
TARGET_FOUND_SHARE = 0.8  # the matching op on top, in the right direction, in this share of cells
TARGET_MATCHED_GAIN_SHARE = 0.5  # of the matched policy's gain over none, on the mean over shifts
TARGET_SEARCH_COST = 1.5  # a search trial's CPU time in baseline trials, in every cell


def _shift_means(cells: Sequence[Mapping[str, Any]], kind: str) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for cell in cells:
        groups.setdefault(cell["shift"], []).append(cell["ap"][kind])
    return {shift: statistics.fmean(values) for shift, values in groups.items()}


def search_targets(cells: Sequence[Mapping[str, Any]], kind: str = "exported") -> dict[str, Any]:
    """Each target of search-quality step 2 for ``kind`` (the exported policy retrained, by
    default), met or not, with the figures it was judged on:

    * ``beats_none``, ``beats_random``: ``kind``'s mean val AP above none's and above the best
      equal-compute random policy's on every shift (``short_of``: the shifts where it is not);
    * ``beats_adabn_on_darkness``: its mean above AdaBN's on the darkness shift (absent when the
      cells hold no darkness shift);
    * ``found``: the search found the shift (:func:`search_found_shift`) in at least
      :data:`TARGET_FOUND_SHARE` of the cells;
    * ``matched_gain_share``: its gain over none, on the mean over every cell, at least
      :data:`TARGET_MATCHED_GAIN_SHARE` of the matched policy's;
    * ``search_cost``: a search trial at most :data:`TARGET_SEARCH_COST` baseline trials (CPU
      time) in every cell.

    ``cells``: the suite's per-cell lines (``ap`` with none, adabn, random, matched and
    ``kind``; ``found``; ``search_cost``)."""
    if not cells:
        raise ValueError("no cells to judge")
    means = {k: _shift_means(cells, k) for k in ("none", "adabn", "random", "matched", kind)}
    ours = means[kind]
    checks: dict[str, dict[str, Any]] = {}
    for name, other in (("beats_none", "none"), ("beats_random", "random")):
        short = sorted(shift for shift, value in ours.items() if not value > means[other][shift])
        checks[name] = {"met": not short, "short_of": short}
    if "darkness" in ours:
        checks["beats_adabn_on_darkness"] = {
            "met": ours["darkness"] > means["adabn"]["darkness"],
            "value": round(ours["darkness"], 4),
            "adabn": round(means["adabn"]["darkness"], 4),
        }
    found = sum(bool(cell.get("found")) for cell in cells)
    checks["found"] = {
        "met": found >= TARGET_FOUND_SHARE * len(cells),
        "value": found,
        "of": len(cells),
        "target": TARGET_FOUND_SHARE,
    }
    gain = statistics.fmean(c["ap"][kind] - c["ap"]["none"] for c in cells)
    matched_gain = statistics.fmean(c["ap"]["matched"] - c["ap"]["none"] for c in cells)
    share = gain / matched_gain if matched_gain > 0 else float("nan")
    checks["matched_gain_share"] = {
        "met": share >= TARGET_MATCHED_GAIN_SHARE,
        "value": round(share, 3),
        "target": TARGET_MATCHED_GAIN_SHARE,
    }
    costs = [float(c["search_cost"]) for c in cells]
    checks["search_cost"] = {
        "met": max(costs) <= TARGET_SEARCH_COST,
        "max": round(max(costs), 2),
        "mean": round(statistics.fmean(costs), 2),
        "cells_within": sum(cost <= TARGET_SEARCH_COST for cost in costs),
        "target": TARGET_SEARCH_COST,
    }
    return {"kind": kind, "met": sum(c["met"] for c in checks.values()), "of": len(checks), "checks": checks}


def paired_difference(
    cells: Sequence[Mapping[str, Any]], against: Sequence[Mapping[str, Any]], kind: str = "exported"
) -> dict[str, Any]:
    """``kind``'s val AP in ``cells`` minus in ``against`` (another variant's run), paired by
    (shift, seed): mean, sd, cells ahead, overall and per shift. Both runs must have trained the
    same bases and baselines (none's AP agrees in every shared cell), or the pairs would hold the
    bases' difference: :class:`ValueError` otherwise, and when no cell is shared."""
    by_cell = {(c["shift"], c["seed"]): c for c in against}
    pairs = [(c, by_cell[(c["shift"], c["seed"])]) for c in cells if (c["shift"], c["seed"]) in by_cell]
    if not pairs:
        raise ValueError("the two runs share no (shift, seed) cell")
    for ours, theirs in pairs:
        if abs(ours["ap"]["none"] - theirs["ap"]["none"]) > 1e-9:
            raise ValueError(
                f"none's val AP differs in cell {ours['shift']}/seed {ours['seed']} "
                f"({ours['ap']['none']} against {theirs['ap']['none']}): not the same bases"
            )

    def row(members: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, Any]:
        differences = [a["ap"][kind] - b["ap"][kind] for a, b in members]
        mean, sd = _mean_sd(differences)
        return {"mean": mean, "sd": sd, "ahead": sum(d > 0 for d in differences), "n": len(differences)}

    shifts = list(dict.fromkeys(a["shift"] for a, _ in pairs))
    return {
        "kind": kind,
        "overall": row(pairs),
        "shifts": {shift: row([p for p in pairs if p[0]["shift"] == shift]) for shift in shifts},
    }
