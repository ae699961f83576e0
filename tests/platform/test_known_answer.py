"""The known-answer yardstick: matched policies, the found-the-shift check, the paired summary."""

from __future__ import annotations

import pytest

from autopose.augment import Policy, load_search_space
from autopose.data.synth import KNOWN_SHIFTS, MATCHED_OPS
from autopose.platform.demo import DEMO_SPACE_FILE
from autopose.platform.known_answer import (
    KINDS,
    answering_share,
    exported_steps,
    markdown_table,
    matched_policy,
    paired_difference,
    right_direction,
    search_found_shift,
    search_targets,
    summarize,
)


@pytest.mark.parametrize("shift", list(KNOWN_SHIFTS))
def test_every_matched_policy_is_a_policy_of_the_demo_space_using_the_shifts_ops(shift):
    space = load_search_space(DEMO_SPACE_FILE)
    document = Policy.from_dict(matched_policy(shift), space=space).to_dict()
    used = {step["op"] for sub in document["sub_policies"] for step in sub}
    assert used and used <= set(MATCHED_OPS[shift])


def test_matched_magnitudes_land_on_the_intended_values():
    space = load_search_space(DEMO_SPACE_FILE)
    values = [space.value(s["op"], s["m"]) for sub in matched_policy("combined")["sub_policies"] for s in sub]
    assert values == pytest.approx([-30.0, 30.0, 0.6, 0.6], abs=1e-9)


def test_right_direction_per_op():
    assert right_direction("Rotate", [-30.0, 25.0]) and not right_direction("Rotate", [30.0, 25.0])
    assert right_direction("Brightness", [0.6, 0.7]) and not right_direction("Brightness", [0.6, 1.3])
    assert right_direction("TranslateX", [-0.1, 0.1]) and not right_direction("TranslateX", [0.1])
    assert not right_direction("Scale", [])
    # by how often each value is applied: a rare left turn is not turning both ways
    assert not right_direction("Rotate", [-30.0, 25.0], [0.1, 0.9])
    assert right_direction("Brightness", [0.6, 1.3], [0.7, 0.3])


def test_exported_steps_weigh_each_value_and_its_mirror_as_the_policy_draws_them():
    space = load_search_space(DEMO_SPACE_FILE)
    m = space.magnitude
    document = {
        "format": "autopose.policy/2",
        "space": "demo",
        "sub_policy_weights": [0.75, 0.25],
        "sub_policies": [
            [{"op": "Rotate", "p": 0.8, "m": m("Rotate", 30.0), "sign": 0.9}],
            [
                {"op": "Brightness", "p": 0.5, "m": m("Brightness", 1.5), "sign": 0.0},
                {"op": "Cutout", "p": 1.0, "m": 2},
            ],
        ],
    }
    rows = exported_steps(document, space)
    expected = [
        ["Rotate", 0.8, 30.0, 0.75 * 0.8 * 0.9],
        ["Rotate", 0.8, -30.0, 0.75 * 0.8 * 0.1],
        ["Brightness", 0.5, 0.5, 0.25 * 0.5],  # sign 0: always the mirror of 1.5 about 1
        ["Cutout", 1.0, 0.1, 0.25],
    ]
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert row[0] == want[0] and row[1:] == pytest.approx(want[1:], abs=1e-9)
    # a policy/1 document: uniform sub-policies, every step at its value
    plain = matched_policy("darkness")
    assert [v for r in exported_steps(plain, space) for v in r[2:]] == pytest.approx([0.5, 0.25 * 0.9] * 4)
    # Rotate turned one way 90 % of the time: not both ways; Brightness darkens
    assert not search_found_shift({"Rotate": 0.6}, rows, ("Rotate",))
    assert search_found_shift({"Brightness": 0.6}, rows, ("Brightness",))


def test_the_search_found_the_shift_only_with_the_top_weight_moved_the_right_way():
    exported = [["Rotate", 0.8, -30.0], ["Rotate", 0.7, 28.0], ["Brightness", 0.5, 1.2]]
    assert search_found_shift({"Rotate": 0.5, "Cutout": 0.2}, exported, ("Rotate", "Brightness"))
    assert not search_found_shift({"Rotate": 0.1, "Cutout": 0.6}, exported, ("Rotate", "Brightness"))
    assert not search_found_shift({"Brightness": 0.6}, exported, ("Rotate", "Brightness"))  # brighter


def test_answering_share_counts_the_samples_moved_the_way_the_shift_needs():
    space = load_search_space(DEMO_SPACE_FILE)
    for shift, ops in (("darkness", ("Brightness",)), ("rotation", ("Rotate",)), ("zoom_out", ("Scale",))):
        rows = exported_steps(matched_policy(shift), space)
        assert answering_share(rows, ops) == pytest.approx(0.9)  # p = 0.9 on every sub-policy
        assert answering_share(rows, ("Cutout",)) == 0.0
    rows = [
        ["Brightness", 0.6, 0.5, 0.30],  # darker: counts
        ["Brightness", 0.6, 1.5, 0.20],  # brighter: does not
        ["Brightness", 0.6, 0.97, 0.05],  # within 0.05 of the identity: does not
        ["Rotate", 0.5, -12.0, 0.10],  # Rotate counts either way past 10°
        ["Rotate", 0.5, 8.0, 0.15],
        ["Cutout", 0.5, 0.2, 0.20],
        ["Brightness", 0.6, 0.4],  # no share (cached before policy/2): counts nothing
    ]
    assert answering_share(rows, ("Brightness",)) == pytest.approx(0.30)
    assert answering_share(rows, ("Rotate", "Brightness")) == pytest.approx(0.40)
    cells = [
        {"shift": "darkness", "seed": s, "ap": {"none": 0.1, "exported": 0.3}, "answering_share": v}
        for s, v in ((0, 0.30), (1, 0.10))
    ]
    summary = summarize([*cells, {"shift": "blur", "seed": 0, "ap": {"none": 0.4, "exported": 0.4}}])
    assert summary["darkness"]["answering_share"] == pytest.approx(0.2)
    assert summary["blur"]["answering_share"] is None
    assert summary["overall"]["answering_share"] == pytest.approx(0.2)  # of the cells that have one
    assert "| exported share answering | 0.20 | – | 0.20 |" in markdown_table(summary)
    blur_only = summarize([{"shift": "blur", "seed": 0, "ap": {"none": 0.4, "exported": 0.4}}])
    assert "share answering" not in markdown_table(blur_only)  # no cell carries it: no row


def test_summary_pairs_every_kind_with_none_by_seed():
    cells = [
        {
            "shift": "rotation",
            "seed": 0,
            "ap": {"none": 0.30, "matched": 0.40, "exported": 0.31},
            "found": True,
        },
        {
            "shift": "rotation",
            "seed": 1,
            "ap": {"none": 0.20, "matched": 0.32, "exported": 0.25},
            "found": False,
        },
        {"shift": "blur", "seed": 0, "ap": {"none": 0.50, "matched": 0.49, "exported": 0.55}, "found": False},
    ]
    summary = summarize(cells)
    assert set(summary) == {"rotation", "blur", "overall"}
    matched = summary["rotation"]["kinds"]["matched"]
    assert matched["mean"] == pytest.approx(0.36) and matched["gain"] == pytest.approx(0.11)
    assert matched["gain_sd"] == pytest.approx(0.0141, abs=1e-4) and matched["ahead"] == 2
    assert summary["rotation"]["exported_rank"] == pytest.approx(2.0)  # behind matched both times
    assert summary["blur"]["exported_rank"] == 1 and summary["rotation"]["found"] == 1
    assert summary["overall"]["kinds"]["none"]["n"] == 3 and summary["overall"]["seeds"] == 3
    table = markdown_table(summary)
    assert table.splitlines()[0].startswith("| kind | rotation (n=2)")
    assert "| matched | 0.360 (+0.110 ± 0.014, 2/2)" in table
    assert [line.split(" |")[0] for line in table.splitlines()[2:5]] == ["| none", "| matched", "| exported"]
    assert set(KINDS) >= {"none", "adabn", "random", "matched", "search", "exported"}


def _cell(shift, seed, found=True, cost=1.2, **ap):
    base = {"none": 0.20, "adabn": 0.30, "random": 0.25, "matched": 0.40, "exported": 0.32}
    return {"shift": shift, "seed": seed, "ap": {**base, **ap}, "found": found, "search_cost": cost}


def test_search_targets_judge_every_target_of_step_two():
    cells = [
        _cell("darkness", 0, exported=0.35),
        _cell("darkness", 1, exported=0.33),
        _cell("blur", 0, exported=0.24, found=False),  # above none, below the best random
        _cell("blur", 1, exported=0.26, cost=1.6),
        _cell("offset", 0, exported=0.19),  # below none on the shift's mean
        _cell("offset", 1, exported=0.20),
    ]
    judged = search_targets(cells)
    checks = judged["checks"]
    assert checks["beats_none"] == {"met": False, "short_of": ["offset"]}
    assert checks["beats_random"] == {"met": False, "short_of": ["blur", "offset"]}
    assert checks["beats_adabn_on_darkness"] == {"met": True, "value": 0.34, "adabn": 0.30}
    assert checks["found"] == {"met": True, "value": 5, "of": 6, "target": 0.8}  # 5 ≥ 4.8
    # gain (0.15 + 0.13 + 0.04 + 0.06 − 0.01 + 0.00) / 6 over the matched 0.20
    assert checks["matched_gain_share"]["value"] == pytest.approx(0.37 / 6 / 0.20, abs=1e-3)
    assert not checks["matched_gain_share"]["met"]
    assert checks["search_cost"] == {
        "met": False,
        "max": 1.6,
        "mean": 1.27,
        "cells_within": 5,
        "target": 1.5,
    }
    assert (judged["met"], judged["of"]) == (2, 6)
    # four of six found is below 80 %; without a darkness shift there is no AdaBN target
    fewer = search_targets([{**c, "found": i < 4} for i, c in enumerate(cells) if c["shift"] != "darkness"])
    assert not fewer["checks"]["found"]["met"] and "beats_adabn_on_darkness" not in fewer["checks"]


def test_paired_difference_pairs_cells_by_shift_and_seed_and_refuses_other_bases():
    ours = [
        _cell("blur", 0, exported=0.30),
        _cell("blur", 1, exported=0.28),
        _cell("rotation", 0, exported=0.5),
    ]
    theirs = [_cell("blur", 1, exported=0.30), _cell("blur", 0, exported=0.25), _cell("offset", 0)]
    paired = paired_difference(ours, theirs)
    assert paired["overall"] == {"mean": 0.015, "sd": 0.0495, "ahead": 1, "n": 2}  # +0.05, −0.02
    assert set(paired["shifts"]) == {"blur"}
    with pytest.raises(ValueError, match="not the same bases"):
        paired_difference(ours, [_cell("blur", 0, none=0.21)])
    with pytest.raises(ValueError, match="share no"):
        paired_difference(ours, [_cell("zoom_out", 0)])
