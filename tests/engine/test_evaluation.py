"""COCO keypoint AP through pycocotools, PCKh, and the checks on results files."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from autopose.cli import main
from autopose.data import COCO_SIGMAS, MPII_KEYPOINTS, load_mpii
from autopose.engine.evaluation import (
    COCO_METRICS,
    HEAD_SIZE_RULE,
    coco_keypoint_ap,
    format_table,
    mpii_head_sizes,
    oks_sigmas,
    pckh,
)
from autopose.errors import AutoposeError


def _gt_results(ann_path, noise_px: float = 0.0, seed: int = 0) -> list[dict]:
    """Ground-truth keypoints written as results (labelled persons only), optionally jittered."""
    data = json.loads(ann_path.read_text())
    rng = np.random.default_rng(seed)
    results = []
    for ann in data["annotations"]:
        if ann["num_keypoints"] == 0:
            continue
        triples = np.asarray(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        triples[:, :2] += rng.normal(0.0, noise_px, size=(len(triples), 2))
        triples[:, 2] = 1.0
        score = float(rng.uniform(0.5, 1.0)) if noise_px else 1.0
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": 1,
                "keypoints": triples.ravel().tolist(),
                "score": score,
            }
        )
    return results


def test_ground_truth_as_results_scores_one(coco_ann):
    metrics = coco_keypoint_ap(coco_ann, _gt_results(coco_ann))
    assert list(metrics) == list(COCO_METRICS)
    for name in ("AP", "AP50", "AP75", "AR", "AR50", "AR75"):
        assert metrics[name] == 1.0, name
    assert all(value == 1.0 or math.isnan(value) for value in metrics.values())


def test_noisy_results_score_exactly_what_pycocotools_gives(coco_ann, tmp_path):
    results_path = tmp_path / "noisy.json"
    results_path.write_text(json.dumps(_gt_results(coco_ann, noise_px=6.0, seed=3)))

    ours = coco_keypoint_ap(coco_ann, results_path)

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_ann))
        evaluator = COCOeval(gt, gt.loadRes(str(results_path)), "keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    direct = [float("nan") if v == -1 else float(v) for v in evaluator.stats]
    assert 0.0 < ours["AP"] < 1.0  # the noise matters, so the comparison means something
    for name, value in zip(COCO_METRICS, direct, strict=True):
        assert ours[name] == value or (math.isnan(ours[name]) and math.isnan(value)), name


def test_coco_sigmas_are_pycocotools_own():
    np.testing.assert_allclose(oks_sigmas(17), Params(iouType="keypoints").kpt_oks_sigmas)
    np.testing.assert_allclose(COCO_SIGMAS, oks_sigmas(17))
    assert oks_sigmas(16).shape == (16,)
    with pytest.raises(AutoposeError, match="5 keypoints"):
        oks_sigmas(5)


def test_empty_results_give_zero_with_a_warning(coco_ann, caplog):
    with caplog.at_level(logging.WARNING):
        metrics = coco_keypoint_ap(coco_ann, [])
    assert metrics == dict.fromkeys(COCO_METRICS, 0.0)
    assert "no keypoint results" in caplog.text


def _broken(results: list[dict], case: str):
    first = results[0]
    if case == "not a list":
        return {"annotations": results}
    if case == "missing score":
        del first["score"]
    elif case == "short keypoints":
        first["keypoints"] = first["keypoints"][:-3]
    elif case == "unknown image":
        first["image_id"] = 123456789
    elif case == "score not a number":
        first["score"] = "high"
    elif case == "wrong category":
        first["category_id"] = 2
    elif case == "nan keypoint":
        first["keypoints"][4] = float("nan")
    return results


@pytest.mark.parametrize(
    ("case", "field", "words"),
    [
        ("not a list", None, "expected a list"),
        ("missing score", "[0].score", "missing"),
        ("short keypoints", "[0].keypoints", "expected 51 numbers"),
        ("unknown image", "[0].image_id", "not in the ground truth"),
        ("score not a number", "[0].score", "finite number"),
        ("wrong category", "[0].category_id", "category"),
        ("nan keypoint", "[0].keypoints", "finite"),
    ],
)
def test_bad_results_name_the_file_and_field(coco_ann, tmp_path, case, field, words):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_broken(_gt_results(coco_ann), case)))
    with pytest.raises(AutoposeError) as caught:
        coco_keypoint_ap(coco_ann, path)
    assert caught.value.path == str(path)
    assert caught.value.field == field
    assert words in caught.value.message


def test_bad_results_through_the_cli_exit_2_with_one_line(coco_ann, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_broken(_gt_results(coco_ann), "short keypoints")))
    assert main(["evaluate", "--results", str(path), "--ann", str(coco_ann)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert str(path) in err and "[0].keypoints" in err

    path.write_text("[{not json")
    assert main(["evaluate", "--results", str(path), "--ann", str(coco_ann)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_results_file_through_the_cli_prints_the_table(coco_ann, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_gt_results(coco_ann)))
    assert main(["evaluate", "--results", str(path), "--ann", str(coco_ann)]) == 0
    out = capsys.readouterr().out
    assert "COCO keypoint AP" in out
    assert any(line.split() == ["AP", "1.000"] for line in out.splitlines())


def test_cli_refuses_wrong_flag_combinations(coco_ann, coco_images, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text("[]")
    assert (
        main(["evaluate", "--results", str(path), "--ann", str(coco_ann), "--images", str(coco_images)]) == 2
    )
    assert "leave out --images" in capsys.readouterr().err
    assert main(["evaluate", "--ann", str(coco_ann)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["evaluate", "--ann", str(coco_ann), "--checkpoint", str(tmp_path / "c.pth")]) == 2
    assert "needs --images" in capsys.readouterr().err


def test_mpii_json_is_not_a_coco_ground_truth(mpii_ann, tmp_path):
    path = tmp_path / "results.json"
    path.write_text("[]")
    with pytest.raises(AutoposeError, match="MPII") as caught:
        coco_keypoint_ap(mpii_ann, path)
    assert caught.value.path == str(mpii_ann)


# -- PCKh ---------------------------------------------------------------------------------
def _mpii_truth(mpii_ann, mpii_images):
    instances = load_mpii(mpii_ann, mpii_images)
    joints = np.stack([inst.keypoints[:, :2] for inst in instances])
    visible = np.stack([inst.keypoints[:, 2] for inst in instances])
    return joints, visible


def test_pckh_of_the_ground_truth_is_100(mpii_ann, mpii_images):
    joints, visible = _mpii_truth(mpii_ann, mpii_images)
    metrics = pckh(joints, joints, visible, mpii_head_sizes(joints, visible))
    assert metrics["Mean"] == 100.0
    for name in (*MPII_KEYPOINTS, "Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle"):
        assert metrics[name] == 100.0 or (
            math.isnan(metrics[name]) and visible[:, MPII_KEYPOINTS.index(name)].sum() == 0
        )
    assert metrics["persons"] == len(joints) and metrics["persons_left_out"] == 0


def test_pckh_head_size_rule_and_threshold(mpii_ann, mpii_images):
    joints, visible = _mpii_truth(mpii_ann, mpii_images)
    neck, top = MPII_KEYPOINTS.index("upper_neck"), MPII_KEYPOINTS.index("head_top")
    sizes = mpii_head_sizes(joints, visible)
    side = np.linalg.norm(joints[:, top] - joints[:, neck], axis=-1)
    np.testing.assert_allclose(sizes, 0.6 * math.sqrt(2.0) * side)
    assert "0.6·√2·L" in HEAD_SIZE_RULE

    # Move every left wrist just inside, every right wrist just outside 0.5 × head size.
    pred = joints.copy()
    left, right = MPII_KEYPOINTS.index("left_wrist"), MPII_KEYPOINTS.index("right_wrist")
    pred[:, left, 0] += 0.49 * sizes
    pred[:, right, 1] -= 0.51 * sizes
    metrics = pckh(pred, joints, visible, sizes)
    assert metrics["left_wrist"] == 100.0
    assert metrics["right_wrist"] == 0.0
    assert metrics["Wrist"] == 50.0
    counted = visible[:, [i for i, n in enumerate(MPII_KEYPOINTS) if n not in ("pelvis", "thorax")]] > 0
    missed = (visible[:, right] > 0).sum()
    assert metrics["Mean"] == pytest.approx(100.0 * (counted.sum() - missed) / counted.sum())


def test_pckh_leaves_out_persons_without_head_size_and_pelvis_thorax_from_the_mean(mpii_ann, mpii_images):
    joints, visible = _mpii_truth(mpii_ann, mpii_images)
    visible = visible.copy()
    visible[0, MPII_KEYPOINTS.index("head_top")] = 0
    sizes = mpii_head_sizes(joints, visible)
    assert math.isnan(sizes[0]) and np.isfinite(sizes[1:]).all()

    pred = joints.copy()
    pred[:, MPII_KEYPOINTS.index("pelvis")] += 1000.0  # far off, but pelvis is not in the mean
    pred[0] += 1000.0  # person 0 has no head size: not scored at all
    metrics = pckh(pred, joints, visible, sizes)
    assert metrics["persons"] == len(joints) - 1 and metrics["persons_left_out"] == 1
    assert metrics["pelvis"] == 0.0
    assert metrics["Mean"] == 100.0


def test_format_table_shows_values_notes_and_missing():
    table = format_table({"AP": 0.75, "APM": float("nan"), "persons": 5.0}, title="T", notes=["why"])
    lines = table.splitlines()
    assert lines[0] == "T"
    assert lines[2].split() == ["AP", "0.750"]
    assert lines[3].split() == ["APM", "n/a"]
    assert lines[4].split() == ["persons", "5"]
    assert lines[-1] == "note: why"
