"""A procedural COCO-format keypoint dataset for demos and tests.

Figures stand on a 2-D kinematic skeleton (torso lean, head tilt, shoulder and
hip abduction, elbow and knee bends, a whole-body rotation) and are drawn as
thick strokes over textured backgrounds (smooth noise, stripes or blobs),
several per image.

Left and right are told apart only by which way a figure faces, as on COCO:
nothing is coloured by side (a figure's trim, a saturated colour on its limb
seams, cuffs and shoes that makes limbs easy to find, is the same on both
sides). Each figure faces the camera or turns its back to it, with probability
1/2 each, in every split. Facing the camera its left side is on the image's
right; the head shows a face (skin, eyes, nose, a hair cap on top), the shirt a
front (a collar and a button placket), and the arms are drawn over the torso.
Turned away its left side is on the image's left; the head is hair all over,
the shirt plain, the arms behind the torso, and the eyes and nose are
unlabelled ``(0, 0, 0)`` as COCO annotators leave the face points of a person
seen from behind (the ears stay labelled). Each figure's two legs and two arms
are drawn in a random order, and every random draw of a pose is
mirror-symmetric, so a mirrored figure with its left/right labels swapped is
again a figure this world contains: a horizontal flip is as valid an
augmentation as on COCO.

Objects drawn over parts of figures, and figures over each other, occlude
keypoints: a keypoint whose pixel shows something other than its own figure
gets ``v = 1``, and so do the elbows and wrists that a figure's own torso hides
(turned away); a keypoint outside the image is ``(0, 0, 0)`` like an unlabelled
COCO keypoint.

``area`` is the figure's own silhouette in pixels (occluders ignored), the
quantity COCO's segmentation area measures and OKS divides by; ``bbox`` is the
silhouette's extent within the image, unless the shift changes it (below).

The val split can carry a :class:`SynthShift` against train (rotation, scale,
brightness, contrast, occlusion, blur, box scale, box offset): train figures
stand nearly upright in full light, sharp, with tight boxes, so a shifted val
split is what a good augmentation policy prepares for. :data:`KNOWN_SHIFTS` are
shifts with a known answer in the demo's search space (:data:`MATCHED_OPS`).

Every image is drawn from its own generator seeded by ``(seed, split, index)``
and saved with fixed JPEG settings, so the same seed gives the same bytes.
:data:`SYNTH_GENERATOR` numbers the world's rules (written to each split's
``info.autopose_synth.generator``): data of another number are another world.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from autopose.data.coco import COCO_KEYPOINTS, COCO_SKELETON
from autopose.data.proxy import ProxyReport, build_proxy
from autopose.errors import AutoposeError
from autopose.files import atomic_write

SYNTH_GENERATOR = 2  # 1: every figure faced the camera, limbs coloured by side
SYNTH_IMAGE_SIZE = (240, 320)  # (height, width)
JPEG_QUALITY = 92
BASE_ROTATION = 5.0  # degrees: train figures stand nearly upright
BASE_OCCLUSION = 0.25  # chance that an object covers part of a figure
OCCLUDER_LABEL = 255
VAL_ID_OFFSET = 1_000_000  # val image ids differ from train ids
HOLDOUT_ID_OFFSET = 2_000_000  # and holdout ids from both
SPLIT_CODES = {"train": 0, "val": 1, "holdout": 2}  # part of every image's generator seed

FACE_POINTS = ("nose", "left_eye", "right_eye")  # unlabelled on a figure seen from behind
EYE_COLOUR = np.array([20.0, 20.0, 30.0])
# Saturated trims that stand out from the mid-toned backgrounds: one per figure, the same on
# both sides (limb seams, cuffs, shoes), so limbs are easy to find and tell nothing of side.
TRIM_COLOURS = np.array(
    [[225.0, 70.0, 40.0], [40.0, 110.0, 230.0], [40.0, 190.0, 70.0], [230.0, 200.0, 40.0]]
)

K = {name: i for i, name in enumerate(COCO_KEYPOINTS)}


# -- the shift ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthShift:
    """How the val split differs from train.

    Attributes:
        rotation: val figures turn uniformly within ±``rotation`` degrees (train: ±5°).
        scale: ``(low, high)`` factor on figure height in the image. The top-down crop is
            made from the person box, so it normalises this away: in the crops only the
            resolution changes. ``box_scale`` is the shift that zooms the crops.
        brightness: factor on pixel values (0.6 = darker).
        contrast: factor on the deviation from the image mean.
        occlusion: added to the per-figure chance of an occluding object (train 0.25).
        blur: Gaussian blur radius in image pixels over the whole picture (0: none).
        box_scale: each person's recorded box is enlarged by this factor about its centre
            (≥ 1), so the figure fills less of its crop. Figures are drawn ``1/box_scale``
            as tall, and moved where needed, so that the enlarged box stays inside the
            image (loaders clip boxes to the image, which would undo part of the zoom).
        box_offset: each person's recorded box moves sideways by this fraction of its
            width, to the left or right at random per person (an imprecise detector), so
            the figure sits off-centre in its crop; the figure is moved where needed so
            that the moved box stays inside the image.
    """

    rotation: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    brightness: float = 1.0
    contrast: float = 1.0
    occlusion: float = 0.0
    blur: float = 0.0
    box_scale: float = 1.0
    box_offset: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self == SynthShift()

    @property
    def moves_boxes(self) -> bool:
        """Recorded boxes differ from the silhouettes' extents."""
        return self.box_scale != 1.0 or self.box_offset != 0.0

    def to_text(self) -> str:
        """The CLI text form; :func:`parse_shift` reads it back.

        The five original keys are always written (texts of older shifts stay the
        same); ``blur``, ``box_scale`` and ``box_offset`` only when set.
        """
        if self.is_identity:
            return "none"
        text = (
            f"rotate={self.rotation:g},scale={self.scale[0]:g}:{self.scale[1]:g},"
            f"brightness={self.brightness:g},contrast={self.contrast:g},occlusion={self.occlusion:g}"
        )
        for key, value, default in (
            ("blur", self.blur, 0.0),
            ("box_scale", self.box_scale, 1.0),
            ("box_offset", self.box_offset, 0.0),
        ):
            if value != default:
                text += f",{key}={value:g}"
        return text


# A shift the default pipeline's augmentations can answer: turned and darker val figures.
DEMO_SHIFT = SynthShift(rotation=45.0, brightness=0.6)

# The known-answer suite: each shift and the ops of the demo's search space (DEMO_SPACE in
# autopose/platform/demo.py) that undo it, with the value that matches it in a comment.
KNOWN_SHIFTS: dict[str, SynthShift] = {
    "combined": DEMO_SHIFT,  # Rotate ±45 and Brightness 0.6
    "rotation": SynthShift(rotation=45.0),  # Rotate ±45 (the range's ends)
    "darkness": SynthShift(brightness=0.5),  # Brightness 0.5
    # Scale 1/1.4 ≈ 0.71 (the range's low end is 0.7): the crop shows the figure 1/1.4 as tall
    "zoom_out": SynthShift(box_scale=1.4),
    # Sharpness near its low end (0.1 ≈ a 0.65 px Gaussian in the crop). A 64×48 crop shows
    # 0.23–0.48 crop px per image px of these figures (median 0.33), so radius 2.5 leaves
    # 0.6–1.2 px of blur in the crop (0.8 px for the median figure)
    "blur": SynthShift(blur=2.5),
    # TranslateX ±0.11…0.16: the crop is 1.25 × the box's width or more, so a box moved by
    # 0.2 of its width moves the figure by 0.16 of the crop's width or less (measured)
    "offset": SynthShift(box_offset=0.2),
}
MATCHED_OPS: dict[str, tuple[str, ...]] = {
    "combined": ("Rotate", "Brightness"),
    "rotation": ("Rotate",),
    "darkness": ("Brightness",),
    "zoom_out": ("Scale",),
    "blur": ("Sharpness",),
    "offset": ("TranslateX",),
}

_SHIFT_KEYS = {"rotate": "rotation", "rotation": "rotation", "scale": "scale", "brightness": "brightness"}
_SHIFT_KEYS |= {"contrast": "contrast", "occlusion": "occlusion", "blur": "blur"}
_SHIFT_KEYS |= {"box_scale": "box_scale", "box_offset": "box_offset"}
_SHIFT_BOUNDS = {
    "rotation": (0.0, 180.0),
    "occlusion": (0.0, 1.0),
    "blur": (0.0, 50.0),
    "box_scale": (1.0, 4.0),
    "box_offset": (0.0, 1.0),
}


def parse_shift(text: str | SynthShift | None) -> SynthShift:
    """``"rotate=45,brightness=0.6"`` → :class:`SynthShift`; ``"none"`` or ``""`` → no shift.

    Keys: ``rotate`` (or ``rotation``, degrees 0–180), ``scale`` (``0.7:1.2`` or one
    factor), ``brightness`` (> 0), ``contrast`` (> 0), ``occlusion`` (0–1), ``blur``
    (radius in image pixels, 0–50), ``box_scale`` (1–4), ``box_offset`` (fraction of the
    box width, 0–1).

    Raises:
        AutoposeError: unknown key or bad value (field ``shift.KEY``).
    """
    if isinstance(text, SynthShift):
        return text
    if text is None or text.strip().lower() in ("", "none"):
        return SynthShift()
    values: dict[str, object] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if key not in _SHIFT_KEYS or not sep:
            raise AutoposeError(
                f"unknown shift entry {part.strip()!r}; known keys: "
                "rotate, scale, brightness, contrast, occlusion, blur, box_scale, box_offset",
                field="shift",
            )
        name = _SHIFT_KEYS[key]
        try:
            if name == "scale":
                low, _, high = value.partition(":")
                pair = (float(low), float(high or low))
                if not 0 < pair[0] <= pair[1]:
                    raise ValueError
                values[name] = pair
            else:
                number = float(value)
                bounds = _SHIFT_BOUNDS.get(name, (1e-6, 100.0))
                if not bounds[0] <= number <= bounds[1]:  # NaN fails here too
                    raise ValueError
                values[name] = number
        except ValueError:
            raise AutoposeError(f"bad value {value!r}", field=f"shift.{key}") from None
    return SynthShift(**values)


# -- geometry of one figure -------------------------------------------------------------------
@dataclass
class _Figure:
    """A posed figure: keypoints in image pixels and what to draw."""

    keypoints: np.ndarray  # 17×2
    height: float
    up: np.ndarray  # unit vector from pelvis toward the head
    head_center: np.ndarray
    head_radius: float
    head_up: np.ndarray
    facing: float  # +1 toward the camera (left side on the image's right), -1 away
    leg_order: tuple[str, str]  # the side drawn first is overlapped by the other
    arm_order: tuple[str, str]
    skin: np.ndarray
    shirt: np.ndarray
    pants: np.ndarray
    hair: np.ndarray
    trim: np.ndarray

    @property
    def faces_camera(self) -> bool:
        return self.facing > 0

    def moved(self, offset: np.ndarray) -> None:
        """Translate the whole figure by ``offset`` image pixels."""
        self.keypoints = self.keypoints + offset
        self.head_center = self.head_center + offset

    def torso(self) -> np.ndarray:
        """The torso's quadrilateral (shoulders and hips, grown a little)."""
        kp = self.keypoints
        corners = kp[[K["left_shoulder"], K["right_shoulder"], K["right_hip"], K["left_hip"]]]
        middle = corners.mean(0)
        return middle + (corners - middle) * 1.12

    def extent(self) -> tuple[float, float, float, float]:
        """About the box ``(x0, y0, x1, y1)`` its silhouette will cover (pixel edges).

        Every shape is a stroke between keypoints (at most ``0.065·height`` wide), the
        torso, or the head disc; a pixel of rounding either way.
        """
        pad = 0.0325 * self.height + 1.0
        head = np.array([[-1.0, -1.0], [1.0, 1.0]]) * (self.head_radius + 1.0) + self.head_center
        points = np.concatenate([self.keypoints - pad, self.keypoints + pad, head, self.torso()])
        (x0, y0), (x1, y1) = points.min(0), points.max(0)
        return float(x0 + 0.5), float(y0 + 0.5), float(x1 + 0.5), float(y1 + 0.5)


def _rotate(vector: np.ndarray, degrees: float) -> np.ndarray:
    """Turn a 2-D vector by ``degrees``, clockwise on screen (y points down)."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    return np.array([c * vector[0] - s * vector[1], s * vector[0] + c * vector[1]])


def _colour(rng: np.random.Generator, base: np.ndarray | None = None, jitter: float = 25.0) -> np.ndarray:
    if base is None:
        return rng.integers(30, 226, size=3).astype(np.float64)
    return np.clip(base + rng.uniform(-jitter, jitter, size=3), 0, 255)


def _pose_figure(rng: np.random.Generator, pelvis: np.ndarray, height: float, rotation: float) -> _Figure:
    """Keypoints of a random plausible pose, facing the camera or away from it.

    Every draw is symmetric under a mirror (leans, tilts and the whole-body rotation are
    uniform about 0; both sides draw their angles alike), and ``lateral`` only decides on
    which side of the image the figure's left lies.
    """
    facing = 1.0 if rng.random() < 0.5 else -1.0
    up = _rotate(np.array([0.0, -1.0]), rotation)
    torso_up = _rotate(up, rng.uniform(-12, 12))
    # image right when upright: the figure's left when it faces the camera, its right when not
    torso_right = -_rotate(torso_up, -90.0)
    neck = pelvis + 0.30 * height * torso_up
    head_up = _rotate(torso_up, rng.uniform(-20, 20))
    head_right = -_rotate(head_up, -90.0)
    head_radius = 0.065 * height
    head_center = neck + 0.10 * height * head_up

    kp = np.zeros((17, 2))
    kp[K["nose"]] = head_center - 0.012 * height * head_up
    for side, sign in (("left", 1.0), ("right", -1.0)):
        lateral = sign * facing  # +1: toward the image's right when upright
        kp[K[f"{side}_eye"]] = head_center + 0.018 * height * head_up + lateral * 0.025 * height * head_right
        kp[K[f"{side}_ear"]] = head_center + lateral * 0.052 * height * head_right

    down = -torso_up
    for side, sign in (("left", 1.0), ("right", -1.0)):
        lateral = sign * facing
        shoulder = neck + lateral * 0.11 * height * torso_right - 0.01 * height * torso_up
        hip = pelvis + lateral * 0.07 * height * torso_right
        # angles from straight down, positive away from the body's midline
        abduction = rng.uniform(-15, 160)
        upper_arm = _rotate(down, -lateral * abduction)
        elbow = shoulder + 0.17 * height * upper_arm
        forearm = _rotate(upper_arm, rng.choice([-1.0, 1.0]) * rng.uniform(0, 140))
        wrist = elbow + 0.15 * height * forearm
        thigh = _rotate(down, -lateral * rng.uniform(-12, 40))
        knee = hip + 0.23 * height * thigh
        shin = _rotate(thigh, rng.choice([-1.0, 1.0]) * rng.uniform(0, 90))
        ankle = knee + 0.22 * height * shin
        for joint, point in (
            ("shoulder", shoulder),
            ("elbow", elbow),
            ("wrist", wrist),
            ("hip", hip),
            ("knee", knee),
            ("ankle", ankle),
        ):
            kp[K[f"{side}_{joint}"]] = point

    # overlap order carries no side cue: which leg and which arm come first is a coin toss
    leg_order = ("left", "right") if rng.random() < 0.5 else ("right", "left")
    arm_order = ("left", "right") if rng.random() < 0.5 else ("right", "left")
    skin = _colour(rng, np.array([200.0, 160.0, 130.0]), 50)
    return _Figure(
        keypoints=kp,
        height=height,
        up=up,
        head_center=head_center,
        head_radius=head_radius,
        head_up=head_up,
        facing=facing,
        leg_order=leg_order,
        arm_order=arm_order,
        skin=skin,
        shirt=_colour(rng),
        pants=_colour(rng),
        hair=_colour(rng, np.array([60.0, 45.0, 35.0]), 35),
        trim=_colour(rng, TRIM_COLOURS[rng.integers(len(TRIM_COLOURS))], 20),
    )


# -- drawing --------------------------------------------------------------------------------
class _Painter:
    """Draws each shape on the picture, on the label map (who is on top at each pixel)
    and on the current figure's own silhouette."""

    def __init__(self, picture: Image.Image):
        self.picture = ImageDraw.Draw(picture)
        self.labels_image = Image.new("L", picture.size, 0)
        self.labels = ImageDraw.Draw(self.labels_image)
        self.silhouette: ImageDraw.ImageDraw | None = None
        self.label = 0

    def _targets(self, colour: np.ndarray):
        yield self.picture, tuple(int(c) for c in colour)
        yield self.labels, self.label
        if self.silhouette is not None:
            yield self.silhouette, 255

    def disc(self, center: np.ndarray, radius: float, colour: np.ndarray) -> None:
        x, y = center
        box = [x - radius, y - radius, x + radius, y + radius]
        for draw, fill in self._targets(colour):
            draw.ellipse(box, fill=fill)

    def stroke(self, start: np.ndarray, end: np.ndarray, width: float, colour: np.ndarray) -> None:
        """A thick segment with round caps."""
        for draw, fill in self._targets(colour):
            draw.line([tuple(start), tuple(end)], fill=fill, width=max(1, round(width)))
        self.disc(start, width / 2, colour)
        self.disc(end, width / 2, colour)

    def polygon(self, points: np.ndarray, colour: np.ndarray) -> None:
        for draw, fill in self._targets(colour):
            draw.polygon([tuple(p) for p in points], fill=fill)

    def detail_line(self, start: np.ndarray, end: np.ndarray, width: float, colour: np.ndarray) -> None:
        """Picture only (inside a shape already drawn): stripes, plackets."""
        self.picture.line(
            [tuple(start), tuple(end)], fill=tuple(int(c) for c in colour), width=max(1, round(width))
        )

    def detail_disc(self, center: np.ndarray, radius: float, colour: np.ndarray) -> None:
        x, y = center
        fill = tuple(int(c) for c in colour)
        self.picture.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)

    def detail_polygon(self, points: np.ndarray, colour: np.ndarray) -> None:
        self.picture.polygon([tuple(p) for p in points], fill=tuple(int(c) for c in colour))

    def detail_cap(
        self, center: np.ndarray, radius: float, up: np.ndarray, half_angle: float, colour: np.ndarray
    ) -> None:
        """The part of a disc beyond the chord ``half_angle`` degrees either side of ``up``."""
        x, y = center
        # PIL measures angles clockwise from +x on screen, which is atan2 with y down
        middle = math.degrees(math.atan2(up[1], up[0]))
        self.picture.chord(
            [x - radius, y - radius, x + radius, y + radius],
            middle - half_angle,
            middle + half_angle,
            fill=tuple(int(c) for c in colour),
        )


def _contrast_colour(colour: np.ndarray) -> np.ndarray:
    """Near white on a dark shirt, near black on a light one: the front's marks stand out."""
    luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return np.full(3, 25.0) if luma > 128 else np.full(3, 235.0)


def _draw_arms(painter: _Painter, figure: _Figure) -> None:
    kp, arm_width = figure.keypoints, 0.05 * figure.height
    mark = max(1.0, 0.018 * figure.height)
    for side in figure.arm_order:
        shoulder, elbow, wrist = kp[K[f"{side}_shoulder"]], kp[K[f"{side}_elbow"]], kp[K[f"{side}_wrist"]]
        painter.stroke(shoulder, elbow, arm_width, figure.shirt)
        painter.stroke(elbow, wrist, arm_width * 0.85, figure.skin)
        painter.detail_line(shoulder, elbow, mark, figure.trim)
        painter.detail_disc(wrist, arm_width * 0.45, figure.trim)  # a cuff


def _draw_figure(painter: _Painter, figure: _Figure) -> None:
    """Legs, then (turned away) arms, torso, neck, (facing) arms and head.

    The front and the back differ where a small crop still shows it: a skin face under a
    hair cap against hair all over the head, and a contrasting collar and button placket
    on the shirt's front only.
    """
    kp, h = figure.keypoints, figure.height
    leg_width, mark = 0.065 * h, max(1.0, 0.018 * h)
    for side in figure.leg_order:
        hip, knee, ankle = kp[K[f"{side}_hip"]], kp[K[f"{side}_knee"]], kp[K[f"{side}_ankle"]]
        painter.stroke(hip, knee, leg_width, figure.pants)
        painter.stroke(knee, ankle, leg_width * 0.9, figure.pants)
        painter.detail_line(hip, knee, mark, figure.trim)
        painter.detail_line(knee, ankle, mark, figure.trim)
        painter.detail_disc(ankle, leg_width * 0.45, figure.trim * 0.6)  # a shoe
    if not figure.faces_camera:
        _draw_arms(painter, figure)  # behind the torso
    painter.polygon(figure.torso(), figure.shirt)
    neck = (kp[K["left_shoulder"]] + kp[K["right_shoulder"]]) / 2
    pelvis = (kp[K["left_hip"]] + kp[K["right_hip"]]) / 2
    torso_up = (neck - pelvis) / max(float(np.linalg.norm(neck - pelvis)), 1e-6)
    if figure.faces_camera:
        mark = _contrast_colour(figure.shirt)
        across = np.array([-torso_up[1], torso_up[0]])
        collar = np.array([neck + 0.06 * h * across, neck - 0.06 * h * across, neck - 0.09 * h * torso_up])
        painter.detail_polygon(collar, mark)
        painter.detail_line(
            neck - 0.05 * h * torso_up, pelvis + 0.02 * h * torso_up, max(1.0, 0.025 * h), mark
        )
    painter.stroke(neck, figure.head_center, 0.05 * h, figure.skin)
    if figure.faces_camera:
        _draw_arms(painter, figure)
    painter.disc(figure.head_center, figure.head_radius, figure.skin if figure.faces_camera else figure.hair)
    ear_colour = figure.skin * 0.85
    for ear in ("left_ear", "right_ear"):
        painter.detail_disc(kp[K[ear]], 0.016 * h, ear_colour)
    if figure.faces_camera:
        painter.detail_cap(figure.head_center, figure.head_radius, figure.head_up, 60.0, figure.hair)
        for eye in ("left_eye", "right_eye"):
            painter.detail_disc(kp[K[eye]], max(0.8, 0.009 * h), EYE_COLOUR)
        painter.detail_disc(kp[K["nose"]], max(0.8, 0.008 * h), figure.skin * 0.7)


def _plain_background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth, mid-toned colour field: nothing in it looks like a limb."""
    height, width = size
    coarse = rng.uniform(60, 200, size=(3, 3, 3))
    return Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)


def _background(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth noise, stripes, or blobs."""
    height, width = size
    kind = rng.integers(3)
    if kind == 0:
        coarse = rng.uniform(0, 255, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3))
        image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 8, size=(height, width, 3))
        return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))
    if kind == 1:
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(8, 40)
        ys, xs = np.mgrid[0:height, 0:width]
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
        a, b = _colour(rng), _colour(rng)
        pixels = a * wave[..., None] + b * (1 - wave[..., None])
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image = Image.new("RGB", (width, height), tuple(int(c) for c in _colour(rng)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 25))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(5, width / 5), rng.uniform(5, height / 5)
        shape = draw.ellipse if rng.random() < 0.6 else draw.rectangle
        shape([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(c) for c in _colour(rng)))
    return image


def _draw_occluder(painter: _Painter, rng: np.random.Generator, figure: _Figure) -> None:
    """An object over a random part of the figure (a box or an ellipse, maybe striped)."""
    target = figure.keypoints[rng.integers(17)] + rng.normal(0, 0.05 * figure.height, size=2)
    rx, ry = rng.uniform(0.08, 0.18, size=2) * figure.height
    box = [target[0] - rx, target[1] - ry, target[0] + rx, target[1] + ry]
    colour = _colour(rng)
    painter.label = OCCLUDER_LABEL
    shape = "ellipse" if rng.random() < 0.5 else "rectangle"
    for draw, fill in painter._targets(colour):
        getattr(draw, shape)(box, fill=fill)
    if rng.random() < 0.5:
        stripe = _colour(rng)
        for offset in np.arange(-rx, rx, max(3.0, rx / 3)):
            painter.detail_line(
                np.array([target[0] + offset, target[1] - ry]),
                np.array([target[0] + offset, target[1] + ry]),
                max(1.0, rx / 8),
                stripe,
            )


# -- one image --------------------------------------------------------------------------------
_HIDDEN_BEHIND_TORSO = tuple(
    K[f"{side}_{joint}"] for side in ("left", "right") for joint in ("elbow", "wrist")
)


def _fit(low: float, high: float, size: float, margin: float = 1.0) -> float:
    """The shift that brings ``[low, high]`` inside ``[margin, size - margin]`` (centred
    when it is too long to fit)."""
    if high - low > size - 2 * margin:
        return size / 2 - (low + high) / 2
    if low < margin:
        return margin - low
    if high > size - margin:
        return size - margin - high
    return 0.0


def _recorded_box(
    x0: float, y0: float, x1: float, y1: float, shift: SynthShift, side: float
) -> tuple[float, float, float, float]:
    """The box the annotation records for a silhouette box (pixel edges): enlarged by
    ``box_scale`` about its centre, then moved ``side × box_offset`` of its width."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w, half_h = (x1 - x0) / 2 * shift.box_scale, (y1 - y0) / 2 * shift.box_scale
    cx += side * shift.box_offset * 2 * half_w
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


def _render_image(
    rng: np.random.Generator, size: tuple[int, int], shift: SynthShift, max_persons: int, clutter: bool = True
) -> tuple[Image.Image, list[dict]]:
    """One picture and its persons (keypoints 17×3, bbox, area)."""
    height, width = size
    picture = _background(rng, size) if clutter else _plain_background(rng, size)
    painter = _Painter(picture)
    persons = int(rng.integers(1, max_persons + 1))
    rotation_range = shift.rotation if shift.rotation > 0 else BASE_ROTATION
    figures, silhouettes, torsos, sides = [], [], [], []
    for index in range(persons):
        # drawn 1/box_scale as tall: the enlarged box then fits where the figure would
        figure_height = rng.uniform(0.45, 0.9) * height * rng.uniform(*shift.scale) / shift.box_scale
        # keep head (about 0.5 figure heights above the pelvis) and feet (0.45 below) in view
        low, high = 0.5 * figure_height, height - 0.45 * figure_height
        pelvis_y = rng.uniform(low, high) if low < high else height / 2
        pelvis = np.array([rng.uniform(0.15, 0.85) * width, pelvis_y])
        figure = _pose_figure(rng, pelvis, figure_height, rng.uniform(-rotation_range, rotation_range))
        # the box offset's side, drawn whatever the shift: a shift leaves every other draw as it was
        side = 1.0 if rng.random() < 0.5 else -1.0
        if shift.moves_boxes:
            # loaders clip boxes to the image: move the figure so that its recorded box fits
            bx0, by0, bx1, by1 = _recorded_box(*figure.extent(), shift, side)
            figure.moved(np.array([_fit(bx0, bx1, width), _fit(by0, by1, height)]))
        silhouette_image = Image.new("L", (width, height), 0)
        painter.silhouette = ImageDraw.Draw(silhouette_image)
        painter.label = index + 1
        _draw_figure(painter, figure)
        torso = None  # where the figure's own torso covers its arms
        if not figure.faces_camera:
            torso_image = Image.new("L", (width, height), 0)
            ImageDraw.Draw(torso_image).polygon([tuple(p) for p in figure.torso()], fill=255)
            torso = np.asarray(torso_image) > 0
        figures.append(figure)
        silhouettes.append(np.asarray(silhouette_image) > 0)
        torsos.append(torso)
        sides.append(side)
    painter.silhouette = None
    occlusion = min(1.0, (BASE_OCCLUSION if clutter else 0.0) + shift.occlusion)
    for figure in figures:
        if rng.random() < occlusion:
            _draw_occluder(painter, rng, figure)

    labels = np.asarray(painter.labels_image)
    people = []
    for index, (figure, silhouette, torso, side) in enumerate(
        zip(figures, silhouettes, torsos, sides, strict=True)
    ):
        rows, cols = np.nonzero(silhouette)
        if rows.size < 20:
            continue  # (almost) entirely outside the picture
        keypoints = np.zeros((17, 3))
        for k, (x, y) in enumerate(figure.keypoints):
            if not figure.faces_camera and COCO_KEYPOINTS[k] in FACE_POINTS:
                continue  # seen from behind: no face to annotate
            col, row = round(x), round(y)
            if 0 <= col < width and 0 <= row < height:
                # an arm behind the figure's own torso is hidden by it, though its pixel is the figure's
                behind = torso is not None and k in _HIDDEN_BEHIND_TORSO and torso[row, col]
                seen = labels[row, col] == index + 1 and not behind
                keypoints[k] = (x, y, 2.0 if seen else 1.0)
        if not keypoints[:, 2].any():
            continue
        x0, y0, x1, y1 = _recorded_box(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1, shift, side)
        # a valid box within the image (what a loader would clip it to anyway)
        x0, x1 = max(0.0, x0), min(float(width), x1)
        y0, y1 = max(0.0, y0), min(float(height), y1)
        people.append(
            {
                "keypoints": keypoints,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(rows.size),
            }
        )
    if shift.blur > 0:
        picture = picture.filter(ImageFilter.GaussianBlur(shift.blur))
    if shift.brightness != 1.0 or shift.contrast != 1.0:
        pixels = np.asarray(picture).astype(np.float64)
        mean = pixels.mean()
        pixels = ((pixels - mean) * shift.contrast + mean) * shift.brightness
        picture = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return picture, people


# -- the dataset ----------------------------------------------------------------------------
@dataclass
class SynthReport:
    """What :func:`generate_synth` wrote."""

    out: Path
    train_images: int
    val_images: int
    train_persons: int
    val_persons: int
    shift: SynthShift = field(default_factory=SynthShift)
    holdout_images: int = 0
    holdout_persons: int = 0

    def summary(self) -> str:
        holdout = (
            f", holdout {self.holdout_images} images / {self.holdout_persons} persons"
            if self.holdout_images
            else ""
        )
        return (
            f"synth written: {self.out} (train {self.train_images} images / {self.train_persons} persons, "
            f"val {self.val_images} images / {self.val_persons} persons{holdout}, "
            f"shift {self.shift.to_text()})"
        )


def _category() -> dict:
    return {
        "supercategory": "person",
        "id": 1,
        "name": "person",
        "keypoints": list(COCO_KEYPOINTS),
        "skeleton": [[a + 1, b + 1] for a, b in COCO_SKELETON],
    }


def _write_split(
    folder: Path,
    split: str,
    count: int,
    seed: int,
    shift: SynthShift,
    size: tuple[int, int],
    max_persons: int,
    progress: bool,
    clutter: bool = True,
) -> int:
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("[0-9]" * 12 + ".jpg"):  # from an earlier, larger run
        stale.unlink()
    split_code = SPLIT_CODES[split]
    id_offset = {"train": 0, "val": VAL_ID_OFFSET, "holdout": HOLDOUT_ID_OFFSET}[split]
    images, annotations = [], []
    for index in tqdm(range(count), desc=f"synth {split}", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, split_code, index])
        picture, people = _render_image(rng, size, shift, max_persons, clutter)
        image_id = id_offset + index + 1
        file_name = f"{image_id:012d}.jpg"
        with atomic_write(images_dir / file_name, "wb") as stream:
            # fixed encoder settings: the same pixels give the same bytes
            picture.save(stream, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
        images.append({"id": image_id, "file_name": file_name, "width": size[1], "height": size[0]})
        for person in people:
            keypoints = person["keypoints"]
            x, y, w, h = person["bbox"]
            annotations.append(
                {
                    "id": len(annotations) + 1 + id_offset,
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [round(v, 2) for v in person["bbox"]],
                    "area": person["area"],
                    "num_keypoints": int((keypoints[:, 2] > 0).sum()),
                    "keypoints": [round(float(v), 2) for v in keypoints.ravel()],
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
    dataset = {
        "info": {
            "description": "autopose synthetic keypoint dataset",
            "version": "1",
            "autopose_synth": {
                "generator": SYNTH_GENERATOR,
                "seed": seed,
                "split": split,
                "shift": shift.to_text(),
                "image_size": list(size),
                "clutter": clutter,
            },
        },
        "licenses": [],
        "categories": [_category()],
        "images": images,
        "annotations": annotations,
    }
    with atomic_write(folder / "annotations.json") as stream:
        stream.write(json.dumps(dataset))
    return len(annotations)


def generate_synth(
    out: Path,
    *,
    images: int,
    val_images: int | None = None,
    seed: int = 0,
    shift: SynthShift | str | None = None,
    image_size: tuple[int, int] = SYNTH_IMAGE_SIZE,
    max_persons: int = 3,
    holdout_images: int = 0,
    clutter: bool = True,
    progress: bool = True,
) -> SynthReport:
    """Write ``OUT/{train,val}/images/*.jpg`` and ``OUT/{train,val}/annotations.json``.

    Args:
        out: output folder (created, with its parents).
        images: train images.
        val_images: val images (default ``max(1, images // 4)``; 0 writes an empty val split).
        seed: same seed → same files, byte for byte.
        shift: val shift (:class:`SynthShift` or its text form, see :func:`parse_shift`).
        image_size: ``(height, width)`` of every image.
        max_persons: figures per image are drawn from 1…``max_persons``.
        holdout_images: images of a third split, ``OUT/holdout``, drawn like val (same shift)
            but from other seeds: what a policy search may tune on without seeing val.
        clutter: textured backgrounds and occluding objects (``False``: smooth backgrounds,
            no occluders, a task a small model learns in a few hundred steps).
        progress: tqdm bars on stderr.

    Raises:
        AutoposeError: bad counts, size or shift text.
    """
    out = Path(out)
    shift = parse_shift(shift)
    if images <= 0:
        raise AutoposeError(f"must be positive, got {images}", field="images")
    val_images = max(1, images // 4) if val_images is None else val_images
    if val_images < 0:
        raise AutoposeError(f"must not be negative, got {val_images}", field="val_images")
    if holdout_images < 0:
        raise AutoposeError(f"must not be negative, got {holdout_images}", field="holdout_images")
    if min(image_size) < 32:
        raise AutoposeError(f"image size too small: {image_size}", field="image_size")
    if max_persons < 1:
        raise AutoposeError(f"must be at least 1, got {max_persons}", field="max_persons")
    if out.exists() and not out.is_dir():
        raise AutoposeError("exists and is not a folder", path=out, field="out")
    out.mkdir(parents=True, exist_ok=True)
    size = (int(image_size[0]), int(image_size[1]))

    def write(split: str, count: int, split_shift: SynthShift) -> int:
        return _write_split(
            out / split, split, count, seed, split_shift, size, max_persons, progress, clutter
        )

    train_persons = write("train", images, SynthShift())
    val_persons = write("val", val_images, shift)
    holdout_persons = write("holdout", holdout_images, shift) if holdout_images else 0
    return SynthReport(
        out, images, val_images, train_persons, val_persons, shift, holdout_images, holdout_persons
    )


def build_synth_proxies(
    synth: Path,
    outputs: dict[str, Path],
    *,
    input_size: tuple[int, int],
    progress: bool = False,
    train_margin: float = 1.0,
) -> dict[str, ProxyReport]:
    """Parquet proxies of splits that :func:`generate_synth` wrote.

    Args:
        synth: the folder given to :func:`generate_synth` (``synth/<split>/{annotations.json,images}``).
        outputs: split name (``train``, ``val``, ``holdout``) → the ``.parquet`` file to write.
        input_size: crop ``(height, width)``.
        progress: tqdm bars on stderr.
        train_margin: the ``train`` split's canvas around each crop (``build_proxy``'s
            ``margin``); the other splits are scored as they are and store the crop alone.

    Returns:
        Each split's :class:`~autopose.data.proxy.ProxyReport` (``reused`` when a finished
        proxy of the same inputs was there).
    """
    return {
        split: build_proxy(
            synth / split / "annotations.json",
            synth / split / "images",
            out,
            input_size=input_size,
            progress=progress,
            margin=train_margin if split == "train" else 1.0,
        )
        for split, out in outputs.items()
    }
