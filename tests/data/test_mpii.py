"""MPII samples (HRNet json layout) load into the same instance type as COCO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autopose.data import MPII_FLIP_PAIRS, MPII_KEYPOINTS, PersonInstance, load_mpii
from autopose.data.transforms import crop_matrix, transform_points
from autopose.errors import AutoposeError


def test_samples_load_into_person_instances(mpii_ann, mpii_images):
    raw = json.loads(mpii_ann.read_text())
    instances = load_mpii(mpii_ann, mpii_images)
    assert len(instances) == len(raw) == 5
    for inst, entry in zip(instances, raw, strict=True):
        assert isinstance(inst, PersonInstance)
        assert inst.dataset == "mpii"
        assert Path(inst.image_path).is_file()
        assert inst.keypoints.shape == (16, 3)
        assert inst.image_id == int(Path(entry["image"]).stem)
        labelled = np.asarray(entry["joints_vis"]) > 0
        # 1-based MATLAB coordinates become 0-based
        np.testing.assert_allclose(inst.keypoints[labelled, :2], np.asarray(entry["joints"])[labelled] - 1)
        assert np.all(inst.keypoints[labelled, 2] == 2)


def test_hrnet_center_and_scale_mapping(mpii_ann, mpii_images):
    raw = json.loads(mpii_ann.read_text())
    for inst, entry in zip(load_mpii(mpii_ann, mpii_images), raw, strict=True):
        s = entry["scale"]
        # HRNet: center moves down 15·s px, scale ×1.25, then 1-based → 0-based
        expected_center = [entry["center"][0] - 1, entry["center"][1] + 15 * s - 1]
        np.testing.assert_allclose(inst.center, expected_center)
        assert inst.scale[0] == pytest.approx(200 * s * 1.25)
        assert inst.scale[0] / inst.scale[1] == pytest.approx(0.75)
        # the labelled joints land inside a 256×192 crop
        crop = transform_points(inst.keypoints[:, :2], crop_matrix(inst.center, inst.scale, (256, 192)))
        labelled = inst.keypoints[:, 2] > 0
        assert np.all((crop[labelled] >= -0.5) & (crop[labelled] <= [191.5, 255.5]))


def test_flip_pairs_join_left_and_right():
    assert len(MPII_KEYPOINTS) == 16
    for left, right in MPII_FLIP_PAIRS:
        assert MPII_KEYPOINTS[left].startswith("left_")
        assert MPII_KEYPOINTS[right] == MPII_KEYPOINTS[left].replace("left_", "right_")


def test_bad_entry_names_the_field(tmp_path, mpii_ann, mpii_images):
    raw = json.loads(mpii_ann.read_text())
    raw[3]["joints"] = raw[3]["joints"][:10]
    path = tmp_path / "mpii.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(AutoposeError) as caught:
        load_mpii(path, mpii_images)
    assert caught.value.field == "[3].joints"
