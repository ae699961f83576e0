"""Checkpoints: round trip, atomic writes, and one clear error for every kind of bad file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from autopose.cli import main
from autopose.data import COCO_FLIP_PAIRS, COCO_KEYPOINTS
from autopose.engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from autopose.errors import AutoposeError
from autopose.models import build_model

INPUT_SIZE = (64, 48)
# A narrow P2Net-R18 without APM: quick, and its parameter names differ from the default's, so a
# round trip that dropped model_kwargs would fail to load.
MODEL_KWARGS = {
    "use_apm": False,
    "pyramid_channels": 32,
    "parallel_channels": (16, 16, 16, 16),
    "refine_channels": 16,
}


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("p2net_r18", num_joints=17, input_size=INPUT_SIZE, **MODEL_KWARGS).eval()


@pytest.fixture(scope="module")
def saved(small_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    # Training state in `extra`: an Adam step on the last layers (set gradients, no backward: fast).
    trained = list(small_model.parameters())[-4:]
    optimizer = torch.optim.Adam(trained, lr=1e-3)
    for parameter in trained:
        parameter.grad = torch.full_like(parameter, 0.01)
    optimizer.step()
    optimizer.zero_grad()
    save_checkpoint(
        path,
        small_model,
        arch="p2net_r18",
        num_joints=17,
        input_size=INPUT_SIZE,
        keypoint_names=COCO_KEYPOINTS,
        flip_pairs=COCO_FLIP_PAIRS,
        dataset="coco",
        model_kwargs=MODEL_KWARGS,
        extra={"epoch": 3, "optimizer": optimizer.state_dict(), "best_ap": 0.25},
    )
    return path, optimizer


def test_round_trip_rebuilds_the_same_model(small_model, saved):
    path, optimizer = saved
    model, meta = load_model(path)
    assert meta["arch"] == "p2net_r18" and meta["num_joints"] == 17 and meta["input_size"] == INPUT_SIZE
    assert meta["keypoint_names"] == list(COCO_KEYPOINTS)
    assert meta["flip_pairs"] == [list(p) for p in COCO_FLIP_PAIRS]
    assert meta["dataset"] == "coco" and meta["model_kwargs"] == MODEL_KWARGS
    assert not model.training
    images = torch.rand(2, 3, *INPUT_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(images), small_model(images), rtol=0, atol=0)

    extra = meta["extra"]
    assert extra["epoch"] == 3 and extra["best_ap"] == 0.25
    restored = torch.optim.Adam(list(model.parameters())[-4:], lr=1e-3)
    restored.load_state_dict(extra["optimizer"])  # training state resumes from the same file
    original = optimizer.state_dict()["state"]
    for index, state in restored.state_dict()["state"].items():
        torch.testing.assert_close(state["exp_avg"], original[index]["exp_avg"])


def test_save_is_atomic_and_refuses_what_could_not_be_read_back(small_model, saved, tmp_path):
    path = tmp_path / "sub" / "model.pth"
    save_checkpoint(path, small_model, arch="p2net_r18", num_joints=17, input_size=INPUT_SIZE)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="ndarray"):
        save_checkpoint(
            path,
            small_model,
            arch="p2net_r18",
            num_joints=17,
            input_size=INPUT_SIZE,
            extra={"a": np.zeros(2)},
        )
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pth"]  # no temporary left behind


class _Payload:
    """An object whose unpickling would create ``marker``: proof that nothing was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_files(tmp_path, good_path):
    good = good_path.read_bytes()
    marker = tmp_path / "unpickled.txt"
    files = {
        "missing": tmp_path / "absent.pth",
        "folder": tmp_path,
        "truncated": tmp_path / "truncated.pth",
        "junk": tmp_path / "junk.pth",
        "json": tmp_path / "model.json",
        "object": tmp_path / "object.pth",
        "plain pickle": tmp_path / "object.pkl",
        "pickle protocol 5": tmp_path / "object5.pkl",
        "bare state_dict": tmp_path / "bare.pth",
        "no arch": tmp_path / "noarch.pth",
    }
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["junk"].write_bytes(b"\x00\x01not a checkpoint")
    files["json"].write_text('{"arch": "p2net_r18"}')
    torch.save(
        {"format": "autopose.checkpoint/1", "state_dict": {}, "meta": _Payload(marker)}, files["object"]
    )
    files["plain pickle"].write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    files["pickle protocol 5"].write_bytes(pickle.dumps(_Payload(marker), protocol=5))
    torch.save({"weight": torch.zeros(2)}, files["bare state_dict"])
    torch.save(
        {
            "format": "autopose.checkpoint/1",
            "state_dict": {},
            "meta": {"num_joints": 17, "input_size": [64, 48]},
        },
        files["no arch"],
    )
    return files, marker


@pytest.mark.parametrize(
    ("case", "words", "field"),
    [
        ("missing", "not found", None),
        ("folder", "not a file", None),
        ("truncated", "truncated or corrupt", None),
        ("junk", "truncated, corrupt or another kind of file", None),
        ("json", "truncated, corrupt or another kind of file", None),
        ("object", "never unpickled", None),
        ("plain pickle", "never unpickled", None),
        ("pickle protocol 5", "another kind of file", None),
        ("bare state_dict", "not an autopose checkpoint", "format"),
        ("no arch", "missing or not a string", "meta.arch"),
    ],
)
def test_bad_checkpoints_raise_one_clear_error(saved, tmp_path, case, words, field):
    files, marker = _bad_files(tmp_path, saved[0])
    with pytest.raises(AutoposeError) as caught:
        load_checkpoint(files[case])
    assert caught.value.path == str(files[case])
    assert words in caught.value.message
    assert caught.value.field == field
    assert not marker.exists()


def test_weights_of_another_architecture_list_the_mismatched_keys(saved, tmp_path):
    state_dict, _ = load_checkpoint(saved[0])
    other = tmp_path / "other.pth"
    torch.save(
        {
            "format": "autopose.checkpoint/1",
            "state_dict": state_dict,
            "meta": {"arch": "p2net_r18", "num_joints": 17, "input_size": [64, 48]},  # model_kwargs dropped
            "extra": {},
        },
        other,
    )
    with pytest.raises(AutoposeError, match="missing") as caught:
        load_model(other)
    assert caught.value.path == str(other) and caught.value.field == "state_dict"
    # The default model has weights the saved (narrower, switched) one lacks: the error counts them
    # and names the first ones.
    expected = set(build_model("p2net_r18", num_joints=17, input_size=INPUT_SIZE).state_dict())
    missing = sorted(expected - set(state_dict))
    assert missing, "the saved model must differ from the default one for this test"
    assert f"{len(missing)} missing ({missing[0]}" in caught.value.message

    # Same names, other shapes: the heads of a 17-joint model in a checkpoint that says 16.
    torch.save(
        {
            "format": "autopose.checkpoint/1",
            "state_dict": state_dict,
            "meta": {
                "arch": "p2net_r18",
                "num_joints": 16,
                "input_size": [64, 48],
                "model_kwargs": MODEL_KWARGS,
            },
        },
        other,
    )
    with pytest.raises(AutoposeError, match="size mismatch") as caught:
        load_model(other)
    assert caught.value.path == str(other) and caught.value.field == "state_dict"


def test_bad_checkpoint_through_the_cli_exits_2(saved, tmp_path, coco_ann, coco_images, capsys):
    files, _ = _bad_files(tmp_path, saved[0])
    for case in ("truncated", "object", "missing"):
        argv = [
            "evaluate",
            "--checkpoint",
            str(files[case]),
            "--ann",
            str(coco_ann),
            "--images",
            str(coco_images),
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("autopose: error: ") and str(files[case]) in err and "\n" not in err
