"""The procedural dataset: determinism, COCO validity, occlusion labels, the val shift."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from autopose.data import COCO_KEYPOINTS, load_coco
from autopose.data.synth import SynthShift, generate_synth, parse_shift
from autopose.errors import AutoposeError

SIZE = (96, 128)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    generate_synth(
        out,
        images=12,
        val_images=6,
        seed=7,
        shift="rotate=45,brightness=0.6",
        image_size=SIZE,
        progress=False,
    )
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(synth, tmp_path):
    again = tmp_path / "again"
    generate_synth(
        again,
        images=12,
        val_images=6,
        seed=7,
        shift="rotate=45,brightness=0.6",
        image_size=SIZE,
        progress=False,
    )
    first, second = _files(synth), _files(again)
    assert len(first) == 12 + 6 + 2
    assert first == second
    other = tmp_path / "other"
    generate_synth(other, images=12, val_images=6, seed=8, image_size=SIZE, progress=False)
    assert _files(other)["train/images/000000000001.jpg"] != first["train/images/000000000001.jpg"]


def test_layout_and_json_load_in_pycocotools(synth):
    for split, count in (("train", 12), ("val", 6)):
        ann_path = synth / split / "annotations.json"
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_path))
        assert len(coco.getImgIds()) == count
        assert coco.loadCats(1)[0]["keypoints"] == list(COCO_KEYPOINTS)
        for image in coco.loadImgs(coco.getImgIds()):
            path = synth / split / "images" / image["file_name"]
            assert Image.open(path).size == (SIZE[1], SIZE[0])
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) >= count
        for ann in anns:
            keypoints = np.asarray(ann["keypoints"]).reshape(17, 3)
            x, y, w, h = ann["bbox"]
            assert 0 < ann["area"] <= w * h
            assert ann["num_keypoints"] == int((keypoints[:, 2] > 0).sum()) > 0
            shown = keypoints[keypoints[:, 2] > 0]
            # labelled keypoints sit on the figure, so inside its box and the image
            assert np.all((shown[:, 0] >= x - 1) & (shown[:, 0] <= x + w) & (shown[:, 1] >= y - 1))
            assert np.all((shown[:, 1] <= y + h) & (shown[:, 0] < SIZE[1]) & (shown[:, 1] < SIZE[0]))
            assert np.all(keypoints[keypoints[:, 2] == 0, :2] == 0)
        # the annotation loader takes it as COCO
        assert len(load_coco(ann_path, synth / split / "images")) == len(anns)


def test_occluded_keypoints_are_marked(tmp_path):
    out = tmp_path / "occluded"
    generate_synth(out, images=20, val_images=0, seed=1, image_size=SIZE, progress=False)
    anns = json.loads((out / "train" / "annotations.json").read_text())["annotations"]
    visibility = np.concatenate([np.asarray(a["keypoints"]).reshape(17, 3)[:, 2] for a in anns])
    assert (visibility == 2).mean() > 0.6
    assert (visibility == 1).sum() > 0


def _person_pixels(split_dir: Path) -> tuple[float, float]:
    """Mean brightness of the images and the mean |torso tilt| (degrees) of the persons."""
    data = json.loads((split_dir / "annotations.json").read_text())
    brightness = np.mean(
        [np.asarray(Image.open(split_dir / "images" / i["file_name"])).mean() for i in data["images"]]
    )
    tilts = []
    for ann in data["annotations"]:
        kp = np.asarray(ann["keypoints"]).reshape(17, 3)
        if kp[[5, 6, 11, 12], 2].all():
            shoulders, hips = kp[[5, 6], :2].mean(0), kp[[11, 12], :2].mean(0)
            up = shoulders - hips
            tilts.append(abs(np.degrees(np.arctan2(up[0], -up[1]))))
    return float(brightness), float(np.mean(tilts))


def test_val_shift_turns_and_darkens(tmp_path):
    out = tmp_path / "shifted"
    generate_synth(
        out,
        images=24,
        val_images=24,
        seed=3,
        shift="rotate=45,brightness=0.6",
        image_size=SIZE,
        progress=False,
    )
    train_brightness, train_tilt = _person_pixels(out / "train")
    val_brightness, val_tilt = _person_pixels(out / "val")
    assert val_brightness < 0.75 * train_brightness
    assert train_tilt < 15 < val_tilt


def test_parse_shift():
    assert parse_shift("none") == SynthShift()
    shift = parse_shift("rotate=30, scale=0.7:1.2,brightness=0.5,contrast=0.8,occlusion=0.3")
    assert shift == SynthShift(rotation=30, scale=(0.7, 1.2), brightness=0.5, contrast=0.8, occlusion=0.3)
    assert parse_shift(shift.to_text()) == shift
    with pytest.raises(AutoposeError) as caught:
        parse_shift("rotate=10,blur=3")
    assert caught.value.field == "shift" and "blur" in str(caught.value)
    with pytest.raises(AutoposeError) as caught:
        parse_shift("brightness=dark")
    assert caught.value.field == "shift.brightness"


def test_holdout_split_is_drawn_like_val_from_other_seeds(tmp_path):
    out = tmp_path / "holdout"
    report = generate_synth(
        out,
        images=6,
        val_images=12,
        holdout_images=12,
        seed=3,
        shift="rotate=45,brightness=0.6",
        image_size=SIZE,
        progress=False,
    )
    assert report.holdout_images == 12 and report.holdout_persons > 0
    assert "holdout 12 images" in report.summary()
    val, holdout = (json.loads((out / s / "annotations.json").read_text()) for s in ("val", "holdout"))
    assert not {i["id"] for i in val["images"]} & {i["id"] for i in holdout["images"]}
    assert _files(out / "val" / "images").keys() != _files(out / "holdout" / "images").keys()
    train_brightness, _ = _person_pixels(out / "train")
    holdout_brightness, holdout_tilt = _person_pixels(out / "holdout")
    assert holdout_brightness < 0.75 * train_brightness and holdout_tilt > 15


def test_plain_images_have_no_occluders_and_smooth_backgrounds(tmp_path):
    busy, plain = tmp_path / "busy", tmp_path / "plain"
    for out, clutter in ((busy, True), (plain, False)):
        generate_synth(out, images=20, val_images=0, seed=1, image_size=SIZE, clutter=clutter, progress=False)

    def roughness(folder: Path) -> float:  # mean absolute difference of neighbouring pixels
        pixels = [np.asarray(Image.open(p), dtype=np.float64) for p in sorted(folder.glob("*.jpg"))]
        return float(np.mean([np.abs(np.diff(p, axis=1)).mean() for p in pixels]))

    anns = json.loads((plain / "train" / "annotations.json").read_text())["annotations"]
    visibility = np.concatenate([np.asarray(a["keypoints"]).reshape(17, 3)[:, 2] for a in anns])
    # without occluders only figures hide each other's keypoints: far fewer marked occluded
    busy_anns = json.loads((busy / "train" / "annotations.json").read_text())["annotations"]
    busy_visibility = np.concatenate([np.asarray(a["keypoints"]).reshape(17, 3)[:, 2] for a in busy_anns])
    assert (visibility == 1).mean() < (busy_visibility == 1).mean()
    assert roughness(plain / "train" / "images") < 0.6 * roughness(busy / "train" / "images")


def test_synth_proxies_one_per_split_reused_when_built(synth, tmp_path):
    from autopose.data import ProxyDataset, build_synth_proxies

    outputs = {split: tmp_path / f"{split}.parquet" for split in ("train", "val")}
    first = build_synth_proxies(synth, outputs, input_size=(64, 48))
    assert set(first) == {"train", "val"} and not any(r.reused for r in first.values())
    for split, path in outputs.items():
        persons = len(json.loads((synth / split / "annotations.json").read_text())["annotations"])
        assert len(ProxyDataset(path)) == persons
    assert all(r.reused for r in build_synth_proxies(synth, outputs, input_size=(64, 48)).values())
