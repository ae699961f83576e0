"""COCO loading on the bundled val2017 samples: counts, geometry, constants, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.cocoeval import Params

from autopose.data import (
    COCO_FLIP_PAIRS,
    COCO_KEYPOINTS,
    COCO_SIGMAS,
    COCO_SKELETON,
    PersonInstance,
    box_to_center_scale,
    load_coco,
    load_coco_detections,
)
from autopose.errors import AutoposeError


def test_training_keeps_the_12_persons_with_keypoints(coco_ann, coco_images):
    instances = load_coco(coco_ann, coco_images)
    raw = json.loads(coco_ann.read_text())["annotations"]
    expected = {a["id"] for a in raw if a["num_keypoints"] > 0 and not a["iscrowd"]}
    assert len(instances) == 12
    assert {inst.instance_id for inst in instances} == expected
    for inst in instances:
        assert isinstance(inst, PersonInstance)
        assert Path(inst.image_path).is_file()
        assert inst.keypoints.shape == (17, 3)
        assert inst.num_visible > 0


def test_evaluation_keeps_every_person(coco_ann, coco_images):
    instances = load_coco(coco_ann, coco_images, labelled_only=False)
    assert len(instances) == 14
    assert {inst.image_id for inst in instances} == {785, 40083, 196141, 197388}


def test_center_scale_follow_the_box(coco_ann, coco_images):
    raw = {a["id"]: a for a in json.loads(coco_ann.read_text())["annotations"]}
    for aspect in (0.75, 1.0):
        for inst in load_coco(coco_ann, coco_images, aspect_ratio=aspect):
            ann = raw[inst.instance_id]
            np.testing.assert_allclose(inst.keypoints.ravel(), ann["keypoints"])
            center, scale = box_to_center_scale(inst.bbox, aspect)
            np.testing.assert_allclose(inst.center, center)
            np.testing.assert_allclose(inst.scale, scale)
            assert scale[0] / scale[1] == pytest.approx(aspect)
            # every labelled keypoint lies inside the padded crop
            labelled = inst.keypoints[:, 2] > 0
            offset = np.abs(inst.keypoints[labelled, :2] - inst.center)
            assert np.all(offset <= inst.scale / 2 + 0.5)


def test_constants_agree_with_the_json_and_pycocotools(coco_ann):
    category = json.loads(coco_ann.read_text())["categories"][0]
    assert tuple(category["keypoints"]) == COCO_KEYPOINTS
    assert {tuple(sorted((a - 1, b - 1))) for a, b in category["skeleton"]} == {
        tuple(sorted(pair)) for pair in COCO_SKELETON
    }
    np.testing.assert_allclose(COCO_SIGMAS, Params(iouType="keypoints").kpt_oks_sigmas)
    for left, right in COCO_FLIP_PAIRS:
        assert COCO_KEYPOINTS[left].startswith("left_")
        assert COCO_KEYPOINTS[right] == COCO_KEYPOINTS[left].replace("left_", "right_")
    flipped = {i for pair in COCO_FLIP_PAIRS for i in pair}
    assert flipped == set(range(1, 17))  # all but the nose


def test_detections_load_as_instances(coco_dets, coco_ann, coco_images):
    raw = json.loads(coco_dets.read_text())
    instances = load_coco_detections(coco_dets, coco_ann, coco_images, aspect_ratio=0.75)
    assert len(instances) == len(raw) == 118
    for inst in instances:
        assert inst.score == pytest.approx(raw[inst.instance_id]["score"])
        assert np.all(inst.keypoints == 0)
        assert Path(inst.image_path).is_file()
    kept = load_coco_detections(coco_dets, {785: "000000000785.jpg"}, coco_images, score_thr=0.5)
    assert kept and all(inst.score >= 0.5 and inst.image_id == 785 for inst in kept)


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("spoil", "field"),
    [
        (lambda d: d.pop("annotations"), "annotations"),
        (lambda d: d.pop("images"), "images"),
        (lambda d: d.pop("categories"), "categories"),
        (lambda d: d["categories"][0].pop("keypoints"), "categories"),
        (lambda d: d["annotations"][2]["keypoints"].pop(), "annotations[2].keypoints"),
        (lambda d: d["annotations"][1].__setitem__("bbox", "wide"), "annotations[1].bbox"),
        (lambda d: d["images"][0].pop("file_name"), "images[0].file_name"),
    ],
)
def test_a_json_that_is_not_coco_keypoints_names_file_and_field(
    tmp_path, coco_ann, coco_images, spoil, field
):
    data = json.loads(coco_ann.read_text())
    spoil(data)
    path = _write(tmp_path, data)
    with pytest.raises(AutoposeError) as caught:
        load_coco(path, coco_images)
    assert caught.value.path == str(path)
    assert caught.value.field == field
    assert str(path) in str(caught.value) and field in str(caught.value)


def test_not_json_at_all(tmp_path, coco_images):
    path = tmp_path / "broken.json"
    path.write_text("{ not json")
    with pytest.raises(AutoposeError, match="not valid JSON"):
        load_coco(path, coco_images)
    with pytest.raises(AutoposeError, match="file not found"):
        load_coco(tmp_path / "absent.json", coco_images)


def test_detections_against_the_wrong_annotation_file(tmp_path, coco_dets, coco_images):
    with pytest.raises(AutoposeError) as caught:
        load_coco_detections(coco_dets, {1: "elsewhere.jpg"}, coco_images)
    assert caught.value.field == "image_id"
