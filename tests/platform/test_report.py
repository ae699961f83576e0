"""The report's policy tables and example pictures read policy documents of both formats."""

from __future__ import annotations

import html
from html.parser import HTMLParser

import pytest
import torch

from autopose.augment import Policy, SearchSpace
from autopose.errors import AutoposeError
from autopose.platform.report import _policy_table, example_augment

SPACE = SearchSpace.from_dict(
    {
        "name": "smoke",
        "num_sub_policies": 2,
        "ops_per_sub_policy": 1,
        "ops": {
            "Rotate": [-45.0, 45.0],
            "Scale": [0.7, 1.35],
            "Brightness": [0.1, 1.9],
            "Cutout": [0.0, 0.5],
        },
    }
)


class _Cells(HTMLParser):
    """The text of every table cell, row by row, and of every ``<p>``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.notes: list[str] = []
        self._cell: list[str] | None = None
        self._note: list[str] | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "p":
            self._note = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "p" and self._note is not None:
            self.notes.append("".join(self._note))
            self._note = None

    def handle_data(self, data: str) -> None:
        for part in (self._cell, self._note):
            if part is not None:
                part.append(data)


def parsed(page: str) -> _Cells:
    cells = _Cells()
    cells.feed(page)
    return cells


def test_a_policy_1_table_lists_every_sub_policy_at_its_uniform_weight():
    document = {
        "format": "autopose.policy/1",
        "space": "smoke",
        "sub_policies": [
            [{"op": "Rotate", "p": 0.6, "m": 7.5}, {"op": "Cutout", "p": 0.3, "m": 4.0}],
            [{"op": "Brightness", "p": 0.5, "m": 2.5}],
        ],
    }
    cells = parsed(_policy_table(document, SPACE))
    header, *rows = cells.rows
    assert header == ["sub-policy", "weight", "step", "op", "p", "m (0–10)", "value"]
    # value(m) = low + (high − low)·m/10: Rotate 22.5°, Cutout 0.2, Brightness 0.55
    assert rows == [
        ["0", "0.500", "0", "Rotate", "0.600", "7.50", "22.500"],
        ["", "", "1", "Cutout", "0.300", "4.00", "0.200"],
        ["1", "0.500", "0", "Brightness", "0.500", "2.50", "0.550"],
    ]
    assert cells.notes[0].startswith("All 2 sub-policies")


def _heavy_document(count: int = 20) -> dict:
    """``count`` one-step sub-policies weighted (k + 1)/Σ: even ones a Rotate turning +22.5° with
    chance 0.8 (else −22.5°), odd ones a Cutout of 0.2."""
    total = count * (count + 1) / 2
    subs = [
        [{"op": "Rotate", "p": 0.5, "m": 7.5, "sign": 0.8}]
        if k % 2 == 0
        else [{"op": "Cutout", "p": 0.25, "m": 4.0}]
        for k in range(count)
    ]
    return {
        "format": "autopose.policy/2",
        "space": "smoke",
        "sub_policy_weights": [(k + 1) / total for k in range(count)],
        "sub_policies": subs,
    }


def test_a_policy_2_table_shows_the_heaviest_sub_policies_with_weights_and_both_directions():
    cells = parsed(_policy_table(_heavy_document(), SPACE, limit=12, exported_share=0.973))
    _, *rows = cells.rows
    assert [row[0] for row in rows] == [str(k) for k in range(19, 7, -1)]  # heaviest first
    assert rows[0] == ["19", "0.095", "0", "Cutout", "0.250", "4.00", "0.200"]  # 20/210
    assert rows[1] == ["18", "0.090", "0", "Rotate", "0.500", "7.50", "22.500 (80%) or -22.500 (20%)"]
    note = cells.notes[0]
    # the 12 heaviest: weights 9…20 of 210 = 174/210
    assert "The 12 heaviest of 20 sub-policies, 82.9% of the weight." in note
    assert "keeps 97.3%" in note


def test_a_step_that_always_runs_one_way_shows_one_value():
    document = _heavy_document(2)
    document["sub_policies"][0][0]["sign"] = 1.0
    _, *rows = parsed(_policy_table(document, SPACE)).rows
    assert rows[1][-1] == "22.500"


def test_a_baseline_document_is_shown_as_its_json_and_a_bad_policy_names_its_field():
    baseline = {"format": "autopose.baseline/1", "kind": "none", "seed": 0, "description": "<none>"}
    page = _policy_table(baseline, SPACE)
    assert "<table>" not in page and html.escape('"kind": "none"') in page and "<none>" not in page
    # a description as written, not \u-escaped (the hand-crafted recipe's "±")
    page = _policy_table({**baseline, "kind": "handcrafted", "description": "rotate ±30°"}, SPACE)
    assert "rotate ±30°" in page and "\\u00b1" not in page
    bad = _heavy_document(2)
    bad["sub_policies"][1][0]["sign"] = 0.5  # Cutout is not signed
    with pytest.raises(AutoposeError) as error:
        _policy_table(bad, SPACE)
    assert error.value.field == "sub_policies[1][0].sign"


def test_the_examples_picture_applies_a_policy_2_document_as_the_policy_it_is():
    document = _heavy_document(4)
    augment = example_augment(document, "search", 3, SPACE, [(1, 2)])
    assert augment == Policy.from_dict(document, space=SPACE)
    assert augment.sub_policy_weights == pytest.approx([0.1, 0.2, 0.3, 0.4])
    images, keypoints = torch.rand(2, 3, 16, 12), torch.rand(2, 17, 2) * 10
    visibility = torch.ones(2, 17)
    again = example_augment(document, "search", 3, SPACE, [(1, 2)])
    drawn, redrawn = augment(images, keypoints, visibility), again(images, keypoints, visibility)
    for first, second in zip(drawn, redrawn, strict=True):
        torch.testing.assert_close(first, second, rtol=0, atol=0)  # seeded by the run's seed
    baseline = {"format": "autopose.baseline/1", "kind": "none", "seed": 0, "description": "none"}
    untouched = example_augment(baseline, "none", 0, SPACE, [])(images, keypoints, visibility)
    torch.testing.assert_close(untouched[0], images, rtol=0, atol=0)


def test_a_schedule_shows_each_policy_under_its_start_and_pictures_its_last():
    first = {
        "format": "autopose.policy/1",
        "space": "smoke",
        "sub_policies": [[{"op": "Rotate", "p": 0.6, "m": 7.5}]],
    }
    last = {
        "format": "autopose.policy/1",
        "space": "smoke",
        "sub_policies": [[{"op": "Cutout", "p": 0.3, "m": 4.0}]],
    }
    document = {
        "format": "autopose.schedule/1",
        "space": "smoke",
        "steps": 120,
        "schedule": [{"start_step": 0, "policy": first}, {"start_step": 60, "policy": last}],
    }
    page = _policy_table(document, SPACE)
    assert "A schedule of 2 policies over 120 steps." in parsed(page).notes
    assert (
        page.index("From step 0") < page.index("Rotate") < page.index("From step 60") < page.index("Cutout")
    )
    assert example_augment(document, "pba", 0, SPACE, []) == Policy.from_dict(last, space=SPACE)
    document["schedule"][1]["start_step"] = 0
    with pytest.raises(AutoposeError) as error:
        _policy_table(document, SPACE)
    assert error.value.field == "schedule[1].start_step"


def test_every_trial_kind_has_its_own_colour():
    from autopose.platform.report import KIND_COLOURS
    from autopose.platform.tracking import SEARCH_KINDS

    assert set(KIND_COLOURS) == set(SEARCH_KINDS) and len(set(KIND_COLOURS.values())) == len(KIND_COLOURS)


def test_a_large_search_draws_the_best_curves_of_each_kind_and_the_cost_by_kind(tmp_path):
    """40 trials in a real SQLite MLflow: the curves read the history of the best 5 of each kind
    only (the picture a thousand-trial search gets in seconds), the cost is one bar per kind."""
    from mlflow import MlflowClient
    from PIL import Image

    from autopose.platform.compare import trial_rows
    from autopose.platform.report import (
        CURVES_PER_KIND,
        _best_of_each_kind,
        plot_cost,
        plot_val_curves,
    )
    from autopose.platform.tracking import TAG_KIND, TAG_SEED, TrackedRun, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "large")
    for index in range(40):
        kind = ("random", "none", "search")[index % 3]
        run = TrackedRun.open(
            uri,
            experiment_id,
            run_name=f"{kind}-{index}",
            tags={"autopose.trial": f"large/{index}", TAG_KIND: kind, TAG_SEED: str(index)},
        )
        run.log_steps({epoch: {"epoch": epoch, "val_ap": index / 100 + epoch / 10} for epoch in range(3)})
        run.log_metrics({"cost_cpu_s": 1.0}, step=3)
        run.finish()
    runs = MlflowClient(uri).search_runs([experiment_id])
    kept = _best_of_each_kind(runs, CURVES_PER_KIND)
    assert len(kept) == 3 * CURVES_PER_KIND
    for kind in ("random", "none", "search"):
        seeds = sorted(int(r.data.tags[TAG_SEED]) for r in kept if r.data.tags[TAG_KIND] == kind)
        best = sorted(int(r.data.tags[TAG_SEED]) for r in runs if r.data.tags[TAG_KIND] == kind)[-5:]
        assert seeds == best  # val AP grows with the index: the highest indices are the best

    curves = plot_val_curves(runs, uri, tmp_path / "curves.png")
    rows = trial_rows(uri, "large")
    cost = plot_cost(rows, {r.run_id: 1.0 for r in rows}, tmp_path / "cost.png")
    for picture in (curves, cost):
        with Image.open(picture) as image:
            assert image.width <= 1200  # not one bar per trial: 40 would be about 4,500 pixels wide
