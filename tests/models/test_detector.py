"""Person detector: local weights in, COCO detection json out (randomly initialised weights:
nothing can be downloaded here, so these tests check the plumbing and the format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from autopose.cli import main
from autopose.errors import AutoposeError
from autopose.models.detector import (
    build_person_detector,
    detect_persons,
    image_ids,
    list_images,
    write_detections,
)

# The detector's internal resize and proposal count, small for speed.
SMALL = {"min_size": 224, "max_size": 320, "rpn_post_nms_top_n_test": 200}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Faster R-CNN state dict whose classifier favours "person" (label 1), so that its
    boxes are persons; the raised bias also proves the file's weights are the ones used."""
    torch.manual_seed(0)
    detector = build_person_detector(None, **SMALL)
    with torch.no_grad():
        detector.roi_heads.box_predictor.cls_score.bias[1] += 50.0
    state = {k: v for k, v in detector.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("detector") / "fasterrcnn_random.pth"
    torch.save(state, path)  # like torchvision's published file: no BatchNorm step counters
    return path


def test_detections_are_valid_coco_json(
    weights_file: Path, coco_images: Path, coco_ann: Path, tmp_path: Path
) -> None:
    detector = build_person_detector(weights_file, **SMALL)
    images = list_images(coco_images)
    assert len(images) == 4
    detections = detect_persons(detector, images, score_thr=0.0, progress=False)
    assert detections, "a person-biased detector finds persons"
    expected_ids = {785, 40083, 196141, 197388}
    for det in detections:
        assert set(det) == {"image_id", "category_id", "bbox", "score"}
        assert det["image_id"] in expected_ids and det["category_id"] == 1
        assert len(det["bbox"]) == 4 and det["bbox"][2] >= 0 and det["bbox"][3] >= 0
        assert 0.0 <= det["score"] <= 1.0
    assert len([d for d in detections if d["image_id"] == 785]) <= 100
    out = tmp_path / "sub" / "dets.json"
    write_detections(detections, out)
    assert json.loads(out.read_text()) == detections
    assert [p.name for p in out.parent.iterdir()] == ["dets.json"]  # no temporary left behind
    # pycocotools reads it as box results against the real annotations.
    results = COCO(str(coco_ann)).loadRes(str(out))
    assert len(results.getAnnIds()) == len(detections)
    # A threshold keeps only the boxes scoring at least that.
    high = detect_persons(detector, images[:1], score_thr=0.5, progress=False)
    assert all(d["score"] >= 0.5 for d in high)


def test_mismatched_weights_list_the_missing_keys(weights_file: Path, tmp_path: Path) -> None:
    state = torch.load(weights_file, weights_only=True)
    del state["roi_heads.box_predictor.cls_score.weight"], state["rpn.head.conv.0.0.bias"]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(AutoposeError) as error:
        build_person_detector(broken)
    message = str(error.value)
    assert str(broken) in message and "2 missing keys" in message
    assert "roi_heads.box_predictor.cls_score.weight" in message and "rpn.head.conv.0.0.bias" in message
    with pytest.raises(AutoposeError, match="not found"):
        build_person_detector(tmp_path / "absent.pth")


def test_image_ids_from_stems_else_stable_numbers() -> None:
    assert image_ids(["a/000000000785.jpg", "a/12.png"]) == [785, 12]
    # Names that are not integers are numbered after the largest integer stem, in name order.
    assert image_ids(["x/zeta.jpg", "x/7.jpg", "x/alpha.jpg"]) == [9, 7, 8]
    assert image_ids(["b.jpg", "a.jpg"]) == [1, 0]


def test_detect_cli(
    weights_file: Path, coco_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    # A thin strip of a real image: the CLI's detector scales the short side toward 800 pixels
    # but caps the long side at 1333, so a 24×320 strip stays small and the test fast.
    with Image.open(coco_images / "000000040083.jpg") as image:
        image.crop((0, 100, 320, 124)).save(folder / "000000040083.jpg")
    out = tmp_path / "dets.json"
    assert main(["detect", "--images", str(folder), "--weights", str(weights_file), "--out", str(out)]) == 0
    detections = json.loads(out.read_text())
    assert detections and {d["image_id"] for d in detections} == {40083}
    assert "person boxes" in capsys.readouterr().out

    missing = ["detect", "--images", str(folder), "--weights", str(tmp_path / "none.pth"), "--out", str(out)]
    assert main(missing) == 2
    assert "none.pth" in capsys.readouterr().err
    no_folder = [
        "detect",
        "--images",
        str(tmp_path / "nope"),
        "--weights",
        str(weights_file),
        "--out",
        str(out),
    ]
    assert main(no_folder) == 2
    assert "image folder not found" in capsys.readouterr().err
