"""PolicySchedule: policies in turn by step, stretched to another length, the file and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from autopose.augment import Policy, PolicyStep, p2net_space
from autopose.augment.schedule import (
    SCHEDULE_FORMAT,
    PolicySchedule,
    policy_from_document,
    schedule_document,
)
from autopose.errors import AutoposeError

SPACE = p2net_space()
H, W = 32, 24
DARKEN = Policy([[PolicyStep("Brightness", 1.0, 0.0)]], SPACE)  # always at factor 0.1
NOTHING = Policy([[PolicyStep("Rotate", 0.0, 9.0)]], SPACE)  # never applied


def batch(size: int = 4):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(size, 3, H, W, generator=generator) * 0.5 + 0.25
    keypoints = torch.rand(size, 5, 2, generator=generator) * torch.tensor([W - 1.0, H - 1.0])
    return images, keypoints, torch.full((size, 5), 2.0)


def test_the_policy_of_the_current_step_applies():
    schedule = PolicySchedule([(0, NOTHING), (10, DARKEN)], steps=20, seed=0)
    images, keypoints, visibility = batch()
    for step, darkened in ((0, False), (9, False), (10, True), (19, True)):
        schedule.set_step(step)
        out, _, _ = schedule(images, keypoints, visibility)
        assert bool((out < images - 0.05).all()) is darkened, step


def test_stretching_keeps_each_policy_s_share_of_training():
    schedule = PolicySchedule([(0, NOTHING), (30, DARKEN), (45, NOTHING)], steps=60)
    longer = schedule.stretched(240)
    assert [start for start, _ in longer.entries] == [0, 120, 180] and longer.steps == 240
    assert [p for _, p in longer.entries] == [NOTHING, DARKEN, NOTHING]
    assert list(schedule.stretched(3).entries) == [(0, NOTHING), (1, DARKEN), (2, NOTHING)]
    # too short for every change: of two entries on one step the later wins, equal ones merge
    assert list(schedule.stretched(2).entries) == [(0, NOTHING)]
    assert list(PolicySchedule([(0, DARKEN), (1, NOTHING)], steps=4).stretched(2).entries) == [(0, NOTHING)]


def test_the_file_round_trips_and_loads_by_its_format():
    schedule = PolicySchedule([(0, NOTHING), (60, DARKEN)], steps=120)
    document = json.loads(json.dumps(schedule.to_dict()))
    assert document["format"] == SCHEDULE_FORMAT and document["steps"] == 120
    again = policy_from_document(document)
    assert isinstance(again, PolicySchedule) and again.to_dict() == document
    assert policy_from_document(NOTHING.to_dict()) == NOTHING  # a plain policy stays one


def test_a_run_s_policies_are_one_policy_until_they_change():
    one = schedule_document([(0, NOTHING.to_dict())], steps=120)
    assert one == NOTHING.to_dict()
    two = schedule_document([(0, NOTHING.to_dict()), (60, DARKEN.to_dict())], steps=120)
    assert PolicySchedule.from_dict(two).entries == ((0, NOTHING), (60, DARKEN))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(steps=0), "steps"),
        (lambda d: d.update(space=["p2net"]), "space"),  # was a TypeError before the shared check
        (lambda d: d.update(space="elsewhere"), "space"),
        (lambda d: d["schedule"][0].update(start_step=5), "schedule[0].start_step"),
        (lambda d: d["schedule"][1].update(start_step=0), "schedule[1].start_step"),
        (lambda d: d["schedule"][1].update(start_step=120), "schedule[1].start_step"),
        (
            lambda d: d["schedule"][1]["policy"]["sub_policies"][0][0].update(op="Warp"),
            "schedule[1].policy.sub_policies[0][0].op",
        ),
        (lambda d: d["schedule"][1].pop("policy"), "schedule[1]"),
        (lambda d: d.update(schedule=[]), "schedule"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_a_bad_schedule_names_its_field(change, field):
    document = PolicySchedule([(0, NOTHING), (60, DARKEN)], steps=120).to_dict()
    change(document)
    with pytest.raises(AutoposeError) as raised:
        PolicySchedule.from_dict(document, path="s.json")
    assert raised.value.field == field and raised.value.path == "s.json"
