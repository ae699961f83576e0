"""Search spaces: the paper's YAML, code-built spaces, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from autopose.augment import PAPER_OP_NAMES, OpRange, SearchSpace, load_search_space, p2net_space
from autopose.errors import AutoposeError

P2NET_YAML = Path(__file__).parents[2] / "search_spaces" / "p2net.yaml"


def test_p2net_yaml_is_the_papers_space_and_matches_the_code():
    space = load_search_space(P2NET_YAML)
    assert space == p2net_space()
    assert (space.name, space.K, space.N) == ("p2net", 3, 2)
    assert space.op_names == PAPER_OP_NAMES and len(PAPER_OP_NAMES) == 10 and "FlipLR" not in PAPER_OP_NAMES
    assert space.value("Rotate", 0) == -45.0 and space.value("Rotate", 10) == 45.0
    assert space.value("Scale", 0) == 0.7 and space.value("Scale", 10) == 1.35


def test_values_map_every_op_at_once():
    space = p2net_space()
    m = torch.full((2, len(space.ops)), 10.0)
    values = space.values(m)
    assert values[0, space.index("Rotate")] == 45.0
    assert values[0, space.index("Solarize")] == 0.0  # the threshold runs 1 → 0


def test_round_trip_and_subset():
    space = p2net_space().subset(["Rotate", "Equalize"], name="tiny")
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert space.to_dict()["ops"] == {"Rotate": [-45.0, 45.0], "Equalize": None}
    built = SearchSpace("code", 2, 1, (OpRange("Rotate", -10.0, 10.0),))
    assert built.value("Rotate", 5.0) == 0.0


def test_null_range_takes_the_default():
    data = {"name": "s", "num_sub_policies": 1, "ops_per_sub_policy": 1, "ops": {"Scale": None}}
    assert SearchSpace.from_dict(data).ops == (OpRange("Scale", 0.7, 1.35),)


GOOD = {"name": "s", "num_sub_policies": 2, "ops_per_sub_policy": 1, "ops": {"Rotate": [-30, 30]}}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ops": {"Twirl": [0, 1]}}, "ops.Twirl"),
        ({"colour": "red"}, "colour"),
        ({"ops": {"Rotate": [0, 400]}}, "ops.Rotate"),
        ({"ops": {"Rotate": [0]}}, "ops.Rotate"),
        ({"ops": {"Rotate": "wide"}}, "ops.Rotate"),
        ({"ops": {"Equalize": [0, 1]}}, "ops.Equalize"),
        ({"ops": {}}, "ops"),
        ({"num_sub_policies": 0}, "num_sub_policies"),
        ({"ops_per_sub_policy": 1.5}, "ops_per_sub_policy"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_fields_are_named(change, field, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(AutoposeError) as error:
        load_search_space(path)
    assert error.value.field == field and error.value.path == str(path)
    assert str(path) in str(error.value) and field in str(error.value)


def test_missing_key_is_named(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in GOOD.items() if k != "ops"}))
    with pytest.raises(AutoposeError, match="missing") as error:
        load_search_space(path)
    assert error.value.field == "ops"


def test_embedded_section_gets_a_prefixed_field():
    with pytest.raises(AutoposeError) as error:
        SearchSpace.from_dict(
            {**GOOD, "ops": {"Twirl": None}}, path="smoke.yaml", field_prefix="search_space"
        )
    assert error.value.field == "search_space.ops.Twirl" and error.value.path == "smoke.yaml"


def test_unreadable_files(tmp_path):
    with pytest.raises(AutoposeError, match="file not found"):
        load_search_space(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(AutoposeError, match="not valid YAML") as error:
        load_search_space(broken)
    assert error.value.path == str(broken)


def test_magnitude_is_the_inverse_of_value():
    space = SearchSpace.from_dict(
        {
            "name": "t",
            "num_sub_policies": 1,
            "ops_per_sub_policy": 1,
            "ops": {"Rotate": [-45.0, 45.0], "Equalize": None},
        }
    )
    for m in (0.0, 2.5, 5.0, 10.0):
        assert space.magnitude("Rotate", space.value("Rotate", m)) == pytest.approx(m, abs=1e-12)
    with pytest.raises(ValueError, match="no magnitude"):
        space.magnitude("Equalize", 0.0)


# The demo's space (search_spaces/demo_space.yaml), written out: the oracle for which ops are signed.
DEMO_OPS = {
    "TranslateX": [-0.25, 0.25],
    "Rotate": [-45.0, 45.0],
    "Scale": [0.7, 1.35],
    "Brightness": [0.1, 1.9],
    "Sharpness": [0.1, 1.9],
    "Cutout": [0.0, 0.5],
}


def test_an_op_is_signed_when_its_identity_lies_strictly_inside_its_range():
    demo = SearchSpace.from_dict(
        {"name": "demo", "num_sub_policies": 4, "ops_per_sub_policy": 1, "ops": DEMO_OPS}
    )
    assert dict(zip(demo.op_names, demo.signed, strict=True)) == {
        "TranslateX": True,
        "Rotate": True,
        "Scale": True,  # identity 1 inside [0.7, 1.35]
        "Brightness": True,
        "Sharpness": True,
        "Cutout": False,  # identity 0 is an end of [0, 0.5]: Cutout only grows
    }
    p2net = dict(zip(PAPER_OP_NAMES, p2net_space().signed, strict=True))
    assert not p2net["Equalize"] and not p2net["Solarize"]  # no magnitude / no identity
    assert not p2net["SolarizeAdd"]  # [0, 0.43] starts at its identity
    one_sided = SearchSpace("one-sided", 1, 1, (OpRange("Rotate", 0.0, 30.0), OpRange("Scale", 1.35, 0.7)))
    assert one_sided.signed == (False, True)  # a range running downwards is judged the same
    identity, signed = demo.identity_tensors()
    assert identity.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0] and signed.tolist() == list(demo.signed)


def test_mirror_reflects_about_the_identity_and_clamps_to_the_range():
    demo = SearchSpace.from_dict(
        {"name": "demo", "num_sub_policies": 4, "ops_per_sub_policy": 1, "ops": DEMO_OPS}
    )
    values = torch.tensor([[0.1, 30.0, 1.3, 1.5, 0.4, 0.3], [-0.25, -45.0, 1.35, 0.1, 1.9, 0.5]])
    expected = torch.tensor([[-0.1, -30.0, 0.7, 0.5, 1.6, 0.3], [0.25, 45.0, 0.7, 1.9, 0.1, 0.5]])
    # Scale 1.35 mirrors to 0.65, clamped to 0.7; Cutout (unsigned) keeps its value.
    torch.testing.assert_close(demo.mirror(values), expected)
    # Where no clamp bites, mirroring twice gives the value back.
    torch.testing.assert_close(demo.mirror(demo.mirror(values))[:, [0, 1, 3, 4]], values[:, [0, 1, 3, 4]])
