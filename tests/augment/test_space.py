"""Search spaces: the paper's YAML, code-built spaces, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from autopose.augment import OP_NAMES, OpRange, SearchSpace, load_search_space, p2net_space
from autopose.errors import AutoposeError

P2NET_YAML = Path(__file__).parents[2] / "search_spaces" / "p2net.yaml"


def test_p2net_yaml_is_the_papers_space_and_matches_the_code():
    space = load_search_space(P2NET_YAML)
    assert space == p2net_space()
    assert (space.name, space.K, space.N) == ("p2net", 3, 2)
    assert space.op_names == OP_NAMES and len(OP_NAMES) == 10
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
    with pytest.raises(AutoposeError, match="cannot read"):
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
