"""Top-down inference: flip test, scoring, OKS-NMS, results json, proxy val AP, `autopose evaluate`."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from autopose.cli import main
from autopose.data import (
    COCO_FLIP_PAIRS,
    COCO_KEYPOINTS,
    MPII_FLIP_PAIRS,
    MPII_KEYPOINTS,
    HeatmapCodec,
    crop_matrix,
    load_coco,
    load_coco_detections,
    transform_points,
    warp_image,
)
from autopose.data.proxy import CocoCropDataset
from autopose.engine.checkpoint import save_checkpoint
from autopose.engine.evaluation import COCO_METRICS, coco_keypoint_ap, oks_sigmas
from autopose.engine.inference import flip_back, predict, predict_heatmaps, write_results
from autopose.engine.nms import oks_iou, oks_nms, person_score
from autopose.engine.proxy_scoring import evaluate_proxy, proxy_ground_truth, proxy_results
from autopose.models import build_model

SMALL = (64, 48)
# A narrow P2Net-R18 (a third of the default's compute): random weights, tests only need it to run.
NARROW = {"pyramid_channels": 32, "parallel_channels": (16, 16, 16, 16), "refine_channels": 16}


@pytest.fixture(scope="module")
def small_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("p2net_r18", num_joints=17, input_size=SMALL, **NARROW)


# -- flip test ------------------------------------------------------------------------------
def test_flip_back_undoes_a_mirrored_input_on_an_asymmetric_pattern():
    generator = torch.Generator().manual_seed(0)
    heatmaps = torch.rand(2, 17, 16, 12, generator=generator)  # no symmetry anywhere
    # What a perfectly equivariant model gives for the mirrored input: mirrored maps, sides swapped.
    mirrored = heatmaps.flip(-1).clone()
    for left, right in COCO_FLIP_PAIRS:
        mirrored[:, [left, right]] = mirrored[:, [right, left]]
    torch.testing.assert_close(flip_back(mirrored, COCO_FLIP_PAIRS), heatmaps, rtol=0, atol=0)
    torch.testing.assert_close(flip_back(flip_back(heatmaps, COCO_FLIP_PAIRS), COCO_FLIP_PAIRS), heatmaps)

    # One peak on the left eye at column 2 of the mirrored map comes back on the right eye at w-1-2.
    single = torch.zeros(1, 17, 16, 12)
    single[0, COCO_KEYPOINTS.index("left_eye"), 5, 2] = 1.0
    back = flip_back(single, COCO_FLIP_PAIRS)
    assert back[0, COCO_KEYPOINTS.index("right_eye"), 5, 12 - 1 - 2] == 1.0
    assert back.sum() == 1.0


@pytest.mark.parametrize(
    ("names", "pairs"), [(COCO_KEYPOINTS, COCO_FLIP_PAIRS), (MPII_KEYPOINTS, MPII_FLIP_PAIRS)]
)
def test_flip_pairs_join_left_and_right_of_the_same_joint(names, pairs):
    paired = set()
    for left, right in pairs:
        assert names[left].startswith("left_") and names[right] == "right_" + names[left][len("left_") :]
        paired |= {left, right}
    unpaired = [name for i, name in enumerate(names) if i not in paired]
    assert not any(name.startswith(("left_", "right_")) for name in unpaired)


def test_predict_heatmaps_averages_the_flipped_back_pass_and_restores_the_mode(small_model):
    images = torch.rand(2, 3, *SMALL, generator=torch.Generator().manual_seed(2))
    small_model.train()
    with torch.no_grad():
        small_model.eval()
        plain = small_model(images)
        mirrored = small_model(images.flip(-1))
    small_model.train()
    flipped = predict_heatmaps(small_model, images, flip_pairs=COCO_FLIP_PAIRS, flip=True)
    assert small_model.training  # put back as it was
    expected = 0.5 * (plain + flip_back(mirrored, COCO_FLIP_PAIRS))
    torch.testing.assert_close(flipped, expected)
    torch.testing.assert_close(predict_heatmaps(small_model, images, flip=False), plain)
    wrapped = nn.DataParallel(small_model)  # wrappers are looked through
    torch.testing.assert_close(predict_heatmaps(wrapped, images, flip=False), plain)


# -- person score and OKS-NMS -----------------------------------------------------------------
def test_person_score_uses_keypoints_above_0_2_else_all():
    assert person_score(0.5, np.array([0.9, 0.7, 0.1, 0.0])) == pytest.approx(0.5 * 0.8)
    assert person_score(1.0, np.array([0.1, 0.15, -0.3])) == pytest.approx((0.1 + 0.15 + 0.0) / 3)
    assert person_score(1.0, np.array([0.19, 0.19])) < person_score(1.0, np.array([0.21, 0.0]))


def _pose(offset_x: float, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.uniform(100, 200, 17) + offset_x, rng.uniform(50, 300, 17)], axis=1)


def test_oks_iou_is_cocos_oks_when_both_areas_are_the_gts():
    rng = np.random.default_rng(1)
    truth = _pose(0.0, rng)
    guesses = np.stack([truth + rng.normal(0, s, truth.shape) for s in (1.0, 5.0, 20.0)])
    area = 9000.0
    ours = oks_iou(truth, guesses, area, np.full(3, area), oks_sigmas(17))

    gt = {
        "images": [{"id": 1, "width": 640, "height": 480}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "keypoints": np.concatenate([truth, np.full((17, 1), 2.0)], 1).ravel().tolist(),
                "num_keypoints": 17,
                "area": area,
                "bbox": [100, 50, 100, 250],
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 1, "name": "person", "keypoints": list(COCO_KEYPOINTS)}],
    }
    results = [
        {
            "image_id": 1,
            "category_id": 1,
            "score": 1.0 - i / 10,
            "keypoints": np.c_[g, np.ones(17)].ravel().tolist(),
        }
        for i, g in enumerate(guesses)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), "keypoints")
        evaluator.params.imgIds = [1]
        evaluator._prepare()
        cocos = evaluator.computeOks(1, 1)[:, 0]
    np.testing.assert_allclose(ours, cocos, rtol=1e-12)
    assert ours[0] > 0.9 > ours[2]


def test_oks_nms_keeps_the_best_of_each_person():
    rng = np.random.default_rng(0)
    a = _pose(0.0, rng)
    far = _pose(400.0, rng)
    poses = np.stack([a + 1.0, a, far, far + 30.0])  # 0,1: one person; 2,3: one person, 30 px apart
    scores = np.array([0.6, 0.9, 0.8, 0.85])
    areas = np.full(4, 20000.0)
    sigmas = oks_sigmas(17)
    assert oks_iou(poses[1], poses[[0]], 20000.0, areas[:1], sigmas)[0] > 0.99
    far_pair = oks_iou(poses[3], poses[[2]], 20000.0, areas[:1], sigmas)[0]
    assert 0.05 < far_pair < 0.9
    assert oks_nms(poses, scores, areas, threshold=0.9, sigmas=sigmas) == [1, 3, 2]  # 0 duplicates 1
    # Just under their OKS, 2 counts as a duplicate of the better-scored 3.
    assert oks_nms(poses, scores, areas, threshold=far_pair - 1e-3, sigmas=sigmas) == [1, 3]
    assert oks_nms(poses, scores, areas, threshold=1.0, sigmas=sigmas) == [1, 3, 2, 0]  # nothing above 1


# -- top-down inference end to end -----------------------------------------------------------
def test_inference_on_detections_writes_a_results_json_pycocotools_scores(
    small_model, coco_ann, coco_images, coco_dets, tmp_path
):
    codec = HeatmapCodec(SMALL)
    instances = load_coco_detections(coco_dets, coco_ann, coco_images, aspect_ratio=SMALL[1] / SMALL[0])
    small_model.train()
    results = predict(small_model, instances, codec, flip_pairs=COCO_FLIP_PAIRS, flip=True, batch_size=64)
    assert small_model.training

    image_ids = {inst.image_id for inst in instances}
    assert 0 < len(results) <= len(instances)
    for result in results:
        assert set(result) == {"image_id", "category_id", "keypoints", "score"}
        assert result["image_id"] in image_ids and result["category_id"] == 1
        assert len(result["keypoints"]) == 3 * 17 and all(math.isfinite(v) for v in result["keypoints"])
    path = write_results(results, tmp_path / "out" / "results.json")
    assert json.loads(path.read_text()) == results
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
    metrics = coco_keypoint_ap(coco_ann, path)
    assert set(metrics) == set(COCO_METRICS) and all(0.0 <= metrics[k] <= 1.0 for k in ("AP", "AR"))


class _OracleModel(nn.Module):
    """Answers each crop with the target heatmaps of its ground truth (looked up by pixel content).

    It stands in for a perfect network, so what is tested is everything around the network:
    crops, decoding and the mapping back to image pixels.
    """

    def __init__(self, table: dict[str, torch.Tensor]):
        super().__init__()
        self.table = table
        self.anchor = nn.Parameter(torch.zeros(()))

    @staticmethod
    def key(crop_uint8: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(crop_uint8).tobytes()).hexdigest()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        crops = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return torch.stack([self.table[self.key(crop)] for crop in crops])


def test_perfect_heatmaps_on_ground_truth_boxes_score_near_one(coco_ann, coco_images):
    input_size = (256, 192)
    codec = HeatmapCodec(input_size)
    instances = load_coco(coco_ann, coco_images, labelled_only=False, aspect_ratio=0.75)
    table = {}
    for inst in instances:
        matrix = crop_matrix(inst.center, inst.scale, input_size)
        crop = warp_image(Image.open(inst.image_path).convert("RGB"), matrix, input_size)
        heatmaps, _ = codec.encode(transform_points(inst.keypoints[:, :2], matrix), inst.keypoints[:, 2])
        table[_OracleModel.key(crop)] = heatmaps
    results = predict(_OracleModel(table), instances, codec, flip_pairs=COCO_FLIP_PAIRS, flip=False)
    metrics = coco_keypoint_ap(coco_ann, results)
    assert metrics["AP"] > 0.95 and metrics["AR"] > 0.95


# -- the Parquet proxy: already-cropped val split ------------------------------------------
def _proxy_rows(coco_ann, coco_images, input_size=SMALL):
    instances = load_coco(
        coco_ann, coco_images, labelled_only=True, aspect_ratio=input_size[1] / input_size[0]
    )
    dataset = CocoCropDataset(instances, input_size)
    return [dataset[i] for i in range(len(dataset))], instances


def test_a_flip_consistent_oracle_gets_its_keypoints_back_exactly_with_the_flip_test(coco_ann, coco_images):
    """A model that answers every crop with its true heatmaps, the mirrored crop with the mirrored
    keypoints' (labels swapped), loses nothing to the flip test: same heatmaps, same AP."""
    rows, _ = _proxy_rows(coco_ann, coco_images)
    codec = HeatmapCodec(SMALL)
    width = SMALL[1]
    swap = list(range(17))
    for left, right in COCO_FLIP_PAIRS:
        swap[left], swap[right] = right, left
    table = {}
    for row in rows:
        crop = row["image"].permute(1, 2, 0).numpy()  # H×W×3 uint8
        keypoints, visibility = row["keypoints"].float(), row["visibility"].float()
        table[_OracleModel.key(crop)] = codec.encode(keypoints, visibility)[0]
        mirrored = keypoints.clone()
        mirrored[:, 0] = width - 1 - keypoints[:, 0]  # pixel centres: column x ↦ W − 1 − x
        table[_OracleModel.key(crop[:, ::-1])] = codec.encode(mirrored[swap], visibility[swap])[0]
    oracle = _OracleModel(table)
    images = torch.stack([row["image"] for row in rows]).float() / 255
    flipped = predict_heatmaps(oracle, images, flip_pairs=COCO_FLIP_PAIRS, flip=True)
    plain = predict_heatmaps(oracle, images, flip=False)
    torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-5)
    on = evaluate_proxy(
        oracle, rows, codec, flip_pairs=COCO_FLIP_PAIRS, flip=True, keypoint_names=COCO_KEYPOINTS
    )
    off = evaluate_proxy(
        oracle, rows, codec, flip_pairs=COCO_FLIP_PAIRS, flip=False, keypoint_names=COCO_KEYPOINTS
    )
    # 0.86, not 1: at 64×48 the codec's own rounding of the decoded ground truth caps AP there.
    assert on["AP"] == off["AP"] > 0.8


def test_proxy_ground_truth_in_crop_scores_one(coco_ann, coco_images):
    rows, _ = _proxy_rows(coco_ann, coco_images)
    gt = proxy_ground_truth(rows, input_size=SMALL, keypoint_names=COCO_KEYPOINTS)
    keypoints = np.stack([row["keypoints"].numpy() for row in rows])
    metrics = coco_keypoint_ap(gt, proxy_results(keypoints, np.ones(keypoints.shape[:2])))
    assert metrics["AP"] == 1.0 and metrics["AR"] == 1.0


def test_proxy_ap_equals_image_ap_for_the_same_predictions(coco_ann, coco_images):
    """Boxes and areas mapped into the crop leave OKS unchanged: crop AP = image AP."""
    rows, instances = _proxy_rows(coco_ann, coco_images)
    rng = np.random.default_rng(7)
    image_results, crop_keypoints, scores = [], [], []
    for inst in instances:
        noisy = inst.keypoints[:, :2] + rng.normal(0.0, 0.04 * math.sqrt(inst.area), (17, 2))
        score = rng.uniform(0.3, 1.0, 17)
        image_results.append(
            {
                "image_id": inst.image_id,
                "category_id": 1,
                "keypoints": np.c_[noisy, score].ravel().tolist(),
                "score": person_score(1.0, score),
            }
        )
        crop_keypoints.append(transform_points(noisy, crop_matrix(inst.center, inst.scale, SMALL)))
        scores.append(score)
    image_metrics = coco_keypoint_ap(coco_ann, image_results)
    gt = proxy_ground_truth(rows, input_size=SMALL)
    crop_metrics = coco_keypoint_ap(gt, proxy_results(np.stack(crop_keypoints), np.stack(scores)))
    assert 0.0 < image_metrics["AP"] < 1.0
    for name in ("AP", "AP50", "AP75", "AR", "AR50", "AR75"):
        assert crop_metrics[name] == pytest.approx(image_metrics[name], abs=1e-9), name


def test_evaluate_proxy_on_batches_gives_finite_ap_and_restores_the_mode(small_model, coco_ann, coco_images):
    rows, _ = _proxy_rows(coco_ann, coco_images)
    batches = list(torch.utils.data.DataLoader(rows, batch_size=5))  # collated, like a training loop's
    small_model.train()
    metrics = evaluate_proxy(
        small_model, batches, HeatmapCodec(SMALL), flip_pairs=COCO_FLIP_PAIRS, batch_size=4
    )
    assert small_model.training
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("AP", "AR"))


# -- `autopose evaluate` ------------------------------------------------------------------------
def _best_per_image(detections: list[dict], count: int) -> list[dict]:
    kept = []
    for image_id in sorted({d["image_id"] for d in detections}):
        mine = sorted((d for d in detections if d["image_id"] == image_id), key=lambda d: -d["score"])
        kept += mine[:count]
    return kept


def test_evaluate_cli_runs_a_checkpoint_on_detections_and_on_mpii(
    small_model, coco_ann, coco_images, coco_dets, mpii_ann, mpii_images, tmp_path, capsys
):
    checkpoint = save_checkpoint(
        tmp_path / "coco.pth",
        small_model,
        arch="p2net_r18",
        num_joints=17,
        input_size=SMALL,
        flip_pairs=COCO_FLIP_PAIRS,
        model_kwargs=NARROW,
    )
    out = tmp_path / "results.json"
    dets = tmp_path / "dets.json"  # a few detections per image keep the test quick
    all_dets = json.loads(coco_dets.read_text())
    dets.write_text(json.dumps(_best_per_image(all_dets, 4)))
    argv = ["evaluate", "--checkpoint", str(checkpoint), "--ann", str(coco_ann), "--images", str(coco_images)]
    assert main([*argv, "--dets", str(dets), "--out", str(out), "--batch-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "COCO keypoint AP" in printed and "detections" in printed
    ap_line = next(line for line in printed.splitlines() if line.split()[:1] == ["AP"])
    assert float(ap_line.split()[1]) == pytest.approx(coco_keypoint_ap(coco_ann, out)["AP"], abs=5e-4)
    # On ground-truth boxes, as HRNet counts: one result per labelled non-crowd person, none for
    # the crowd or for persons without keypoints.
    assert main([*argv, "--out", str(out), "--batch-size", "64"]) == 0
    assert "ground-truth boxes" in capsys.readouterr().out
    annotations = json.loads(coco_ann.read_text())["annotations"]
    scorable = [a for a in annotations if not a.get("iscrowd") and a["num_keypoints"] > 0]
    assert 0 < len(scorable) < len(annotations)
    assert len(json.loads(out.read_text())) == len(scorable)

    # An MPII json with a 17-joint model is refused; a 16-joint one gives the PCKh table.
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(checkpoint),
                "--ann",
                str(mpii_ann),
                "--images",
                str(mpii_images),
            ]
        )
        == 2
    )
    assert "16" in capsys.readouterr().err
    torch.manual_seed(0)
    mpii_model = build_model("p2net_r18", num_joints=16, input_size=SMALL, **NARROW)
    mpii_checkpoint = save_checkpoint(
        tmp_path / "mpii.pth",
        mpii_model,
        arch="p2net_r18",
        num_joints=16,
        input_size=SMALL,
        model_kwargs=NARROW,
    )
    argv = [
        "evaluate",
        "--checkpoint",
        str(mpii_checkpoint),
        "--ann",
        str(mpii_ann),
        "--images",
        str(mpii_images),
    ]
    assert main([*argv, "--no-flip"]) == 0
    printed = capsys.readouterr().out
    assert "PCKh@0.5" in printed and "0.6·√2·L" in printed
    assert any(line.split()[:1] == ["Mean"] for line in printed.splitlines())
