"""The procedural dataset: determinism, COCO validity, occlusion labels, facing, the val shift."""

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
from autopose.data.synth import (
    DEMO_SHIFT,
    KNOWN_SHIFTS,
    MATCHED_OPS,
    SYNTH_GENERATOR,
    SynthShift,
    generate_synth,
    parse_shift,
)
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
        parse_shift("rotate=10,fog=3")
    assert caught.value.field == "shift" and "fog" in str(caught.value)
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


# -- facing, and nothing coloured by side ------------------------------------------------------
def _annotations(split_dir: Path) -> list[np.ndarray]:
    anns = json.loads((split_dir / "annotations.json").read_text())["annotations"]
    return [np.asarray(a["keypoints"]).reshape(17, 3) for a in anns]


FACE = [COCO_KEYPOINTS.index(n) for n in ("nose", "left_eye", "right_eye")]
ARMS_HIDDEN = [COCO_KEYPOINTS.index(f"{s}_{j}") for s in ("left", "right") for j in ("elbow", "wrist")]
L_SHOULDER, R_SHOULDER = COCO_KEYPOINTS.index("left_shoulder"), COCO_KEYPOINTS.index("right_shoulder")


def _faces_away(kp: np.ndarray) -> bool:
    """From the skeleton alone: the figure's left shoulder is on its own screen-left."""
    hips = kp[[11, 12], :2].mean(0)
    up = kp[[L_SHOULDER, R_SHOULDER], :2].mean(0) - hips
    across = kp[L_SHOULDER, :2] - kp[R_SHOULDER, :2]
    return bool(up[0] * across[1] - up[1] * across[0] < 0)  # toward the camera: > 0 (y down)


def test_half_the_figures_face_away_in_every_split_without_a_face_to_label(tmp_path):
    out = tmp_path / "facing"
    generate_synth(
        out,
        images=60,
        val_images=60,
        holdout_images=60,
        seed=5,
        shift=DEMO_SHIFT,
        image_size=SIZE,
        progress=False,
    )
    for split in ("train", "val", "holdout"):
        people = [kp for kp in _annotations(out / split) if kp[[L_SHOULDER, R_SHOULDER, 11, 12], 2].all()]
        away = np.array([_faces_away(kp) for kp in people])
        assert len(people) > 60 and 0.35 < away.mean() < 0.65, (split, len(people), away.mean())
        for kp, turned in zip(people, away, strict=True):
            if turned:  # as COCO leaves the face points of a person seen from behind
                assert np.all(kp[FACE] == 0)
            ears = kp[[COCO_KEYPOINTS.index("left_ear"), COCO_KEYPOINTS.index("right_ear")], 2]
            assert ears.any() or not kp[FACE, 2].any()  # ears stay labelled either way
        facing = [kp for kp, turned in zip(people, away, strict=True) if not turned]
        assert np.mean([kp[FACE, 2].all() for kp in facing]) > 0.9
    # nearly upright train figures: turned away, the left shoulder is on the image's left
    for kp in _annotations(out / "train"):
        if kp[[L_SHOULDER, R_SHOULDER], 2].all():
            turned = not kp[FACE, 2].any()
            assert (kp[L_SHOULDER, 0] < kp[R_SHOULDER, 0]) == turned


def test_arms_behind_a_turned_figure_are_hidden_by_its_torso(tmp_path):
    out = tmp_path / "behind"
    # full-size images: at SIZE a thin wrist's stroke can miss the keypoint's own pixel
    generate_synth(out, images=60, val_images=0, seed=2, max_persons=1, clutter=False, progress=False)
    hidden = {True: 0, False: 0}
    for kp in _annotations(out / "train"):
        if kp[[L_SHOULDER, R_SHOULDER, 11, 12], 2].all():
            hidden[_faces_away(kp)] += int((kp[ARMS_HIDDEN, 2] == 1).sum())
    # one figure and no occluders: only a turned figure's own torso hides anything
    assert hidden[True] > 0 and hidden[False] == 0


def _limb_colours(split_dir: Path, side: str) -> np.ndarray:
    """RGB at the middle of every fully visible upper arm, forearm, thigh and shin of ``side``."""
    data = json.loads((split_dir / "annotations.json").read_text())
    files = {i["id"]: i["file_name"] for i in data["images"]}
    colours = []
    for ann in data["annotations"]:
        kp = np.asarray(ann["keypoints"]).reshape(17, 3)
        pixels = np.asarray(Image.open(split_dir / "images" / files[ann["image_id"]]).convert("RGB"))
        for a, b in (("shoulder", "elbow"), ("elbow", "wrist"), ("hip", "knee"), ("knee", "ankle")):
            i, j = COCO_KEYPOINTS.index(f"{side}_{a}"), COCO_KEYPOINTS.index(f"{side}_{b}")
            if kp[i, 2] == 2 and kp[j, 2] == 2:
                x, y = np.round((kp[i, :2] + kp[j, :2]) / 2).astype(int)
                colours.append(pixels[y, x])
    return np.asarray(colours, dtype=np.float64)


def test_no_side_is_coloured(tmp_path):
    """Left and right limbs look alike: their mean colours differ by no more than noise."""
    out = tmp_path / "colours"
    generate_synth(
        out, images=80, val_images=0, seed=4, image_size=SIZE, max_persons=1, clutter=False, progress=False
    )
    left, right = _limb_colours(out / "train", "left"), _limb_colours(out / "train", "right")
    assert len(left) > 150 and len(right) > 150
    gap = np.abs(left.mean(0) - right.mean(0))
    noise = np.sqrt(left.var(0) / len(left) + right.var(0) / len(right))
    # the old world's side marks (warm left, cool right) gave gaps of about 70 in red and blue
    assert np.all(gap < np.maximum(3 * noise, 8.0)), (gap, noise)


# -- the shift keys: blur, box_scale, box_offset ---------------------------------------------------
def test_new_shift_keys_parse_round_trip_and_reject_bad_values():
    shift = parse_shift("blur=2.5, box_scale=1.4,box_offset=0.2")
    assert shift == SynthShift(blur=2.5, box_scale=1.4, box_offset=0.2) and shift.moves_boxes
    assert parse_shift(shift.to_text()) == shift
    # the text of the older keys' shifts is what it was (cache keys hold it)
    assert DEMO_SHIFT.to_text() == "rotate=45,scale=1:1,brightness=0.6,contrast=1,occlusion=0"
    for name, known in KNOWN_SHIFTS.items():
        assert parse_shift(known.to_text()) == known and not known.is_identity, name
    for text in ("blur=-1", "box_scale=0.8", "box_scale=nan", "box_offset=1.5", "box_offset=wide"):
        with pytest.raises(AutoposeError) as caught:
            parse_shift(text)
        assert caught.value.field == f"shift.{text.partition('=')[0]}"


def test_known_shifts_name_ops_of_the_demo_space():
    from autopose.augment import load_search_space
    from autopose.platform.demo import DEMO_SPACE_FILE, SHIFT_OPS

    assert set(MATCHED_OPS) == set(KNOWN_SHIFTS)
    assert KNOWN_SHIFTS["combined"] == DEMO_SHIFT and MATCHED_OPS["combined"] == SHIFT_OPS
    for ops in MATCHED_OPS.values():
        assert ops and set(ops) <= set(load_search_space(DEMO_SPACE_FILE).op_names)


def _pair(tmp_path: Path, shift: str, **settings) -> tuple[Path, Path]:
    """The same seed's val split without and with ``shift``."""
    plain, shifted = tmp_path / "plain", tmp_path / "shifted"
    for out, text in ((plain, "none"), (shifted, shift)):
        generate_synth(
            out, images=1, val_images=40, seed=6, shift=text, image_size=SIZE, progress=False, **settings
        )
    return plain / "val", shifted / "val"


def _roughness(folder: Path) -> float:  # mean absolute difference of neighbouring pixels
    pixels = [np.asarray(Image.open(p), dtype=np.float64) for p in sorted(folder.glob("*.jpg"))]
    return float(np.mean([np.abs(np.diff(p, axis=1)).mean() for p in pixels]))


def test_blur_lowers_high_frequency_energy(tmp_path):
    plain, blurred = _pair(tmp_path, "blur=2.5")
    assert _roughness(blurred / "images") < 0.5 * _roughness(plain / "images")
    # blur touches pixels only
    anns = [json.loads((d / "annotations.json").read_text())["annotations"] for d in (plain, blurred)]
    assert anns[0] == anns[1]


def _boxes(split_dir: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    anns = json.loads((split_dir / "annotations.json").read_text())["annotations"]
    boxes = np.array([a["bbox"] for a in anns])
    return (
        boxes,
        np.array([a["area"] for a in anns]),
        [np.asarray(a["keypoints"]).reshape(17, 3) for a in anns],
    )


def _inside(boxes: np.ndarray) -> np.ndarray:
    """Boxes within the image, not touching its edges (the figure is whole)."""
    x, y, w, h = boxes.T
    return (x > 0) & (y > 0) & (x + w < SIZE[1]) & (y + h < SIZE[0])


def test_box_scale_enlarges_the_recorded_box_about_the_figure(tmp_path):
    plain, zoomed = _pair(tmp_path, "box_scale=1.4", max_persons=1, clutter=False)
    plain_boxes, plain_area, _ = _boxes(plain)
    boxes, area, _ = _boxes(zoomed)
    assert len(boxes) == len(plain_boxes) == 40
    x, y, w, h = boxes.T
    assert np.all((x >= 0) & (y >= 0) & (x + w <= SIZE[1]) & (y + h <= SIZE[0]))  # valid, in the image
    # the same figures drawn 1/1.4 as tall in boxes 1.4 times theirs: the boxes keep their size,
    # the silhouettes inside shrink (their area by 1.4²)
    whole = _inside(plain_boxes) & _inside(boxes)
    assert whole.sum() > 20
    fill = (plain_area / plain_boxes[:, 2:].prod(1))[whole] / (area / boxes[:, 2:].prod(1))[whole]
    assert np.median(fill) == pytest.approx(1.4**2, rel=0.06)
    assert np.median(boxes[whole, 3] / plain_boxes[whole, 3]) == pytest.approx(1.0, abs=0.05)


def test_box_offset_moves_the_box_sideways_by_the_fraction_of_its_width(tmp_path):
    plain, moved = _pair(tmp_path, "box_offset=0.2", max_persons=1, clutter=False)
    plain_boxes, plain_area, plain_kp = _boxes(plain)
    boxes, area, kp = _boxes(moved)
    x, y, w, h = boxes.T
    assert np.all((x >= 0) & (y >= 0) & (x + w <= SIZE[1]) & (y + h <= SIZE[0]))
    whole = np.flatnonzero(_inside(plain_boxes) & _inside(boxes))
    assert len(whole) > 20
    shifts = []
    for i in whole:
        both = (plain_kp[i][:, 2] > 0) & (kp[i][:, 2] > 0)
        # the figure itself may have moved (to keep the box in the image): measure from its keypoints
        here = boxes[i, 0] + boxes[i, 2] / 2 - kp[i][both, 0].mean()
        there = plain_boxes[i, 0] + plain_boxes[i, 2] / 2 - plain_kp[i][both, 0].mean()
        assert boxes[i, 2] == pytest.approx(plain_boxes[i, 2], abs=1.0) and area[i] == pytest.approx(
            plain_area[i], rel=0.03
        )
        shifts.append((here - there) / boxes[i, 2])
    shifts = np.asarray(shifts)
    assert np.all(np.abs(np.abs(shifts) - 0.2) < 0.03), shifts
    assert 0.2 < (shifts > 0).mean() < 0.8  # a random side per person


def test_splits_record_the_generator(synth):
    info = json.loads((synth / "val" / "annotations.json").read_text())["info"]["autopose_synth"]
    assert info["generator"] == SYNTH_GENERATOR == 2
