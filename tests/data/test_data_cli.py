"""`autopose data synth` and `autopose data build-proxy` through autopose.cli.main, bad input included."""

from __future__ import annotations

import json

from autopose.cli import main
from autopose.data import ProxyDataset, read_proxy_metadata


def test_synth_then_build_proxy_then_reuse(tmp_path, capsys):
    out = tmp_path / "synth"
    argv = ["data", "synth", "--out", str(out), "--images", "6", "--val-images", "2", "--seed", "5"]
    assert main([*argv, "--size", "96x128", "--shift", "rotate=30,brightness=0.7"]) == 0
    assert "train 6 images" in capsys.readouterr().out
    ann = out / "train" / "annotations.json"
    persons = len(json.loads(ann.read_text())["annotations"])
    proxy = tmp_path / "proxy.parquet"
    argv = ["data", "build-proxy", "--ann", str(ann), "--images", str(out / "train" / "images")]
    argv += ["--out", str(proxy), "--input", "64x48", "--seed", "1"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("proxy written") and f"{persons} rows" in line and "0 skipped" in line
    meta = read_proxy_metadata(proxy)
    assert meta.dataset == "synth" and meta.input_size == (64, 48) and meta.seed == 1
    assert len(ProxyDataset(proxy)) == persons
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("proxy reused")


def test_non_coco_json_exits_2_naming_file_and_field(tmp_path, capsys, coco_ann, coco_images):
    data = json.loads(coco_ann.read_text())
    data["annotations"][4]["keypoints"] = data["annotations"][4]["keypoints"][:-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "proxy.parquet"
    code = main(["data", "build-proxy", "--ann", str(bad), "--images", str(coco_images), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert str(bad) in err and "annotations[4].keypoints" in err and "multiple of 3" in err
    assert list(tmp_path.iterdir()) == [bad]

    bad.write_text(json.dumps({"images": [], "categories": []}))
    assert (
        main(["data", "build-proxy", "--ann", str(bad), "--images", str(coco_images), "--out", str(out)]) == 2
    )
    assert "annotations" in capsys.readouterr().err


def test_missing_output_folder_exits_2_and_writes_nothing(tmp_path, capsys, coco_ann, coco_images):
    out = tmp_path / "missing" / "proxy.parquet"
    code = main(
        ["data", "build-proxy", "--ann", str(coco_ann), "--images", str(coco_images), "--out", str(out)]
    )
    assert code == 2
    assert "output folder does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_existing_proxy(tmp_path, capsys, coco_ann, coco_images):
    out = tmp_path / "proxy.parquet"
    argv = ["data", "build-proxy", "--ann", str(coco_ann), "--images", str(coco_images), "--out", str(out)]
    assert main([*argv, "--input", "64x48"]) == 0
    before = out.read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    # a different input makes it rebuild; no image can be read there, so it fails ...
    argv[5] = str(empty)
    assert main([*argv, "--input", "64x48"]) == 2
    assert "could be read" in capsys.readouterr().err
    # ... and the proxy already there is untouched, with no temporary file left behind
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "proxy.parquet"]


def test_bad_arguments_exit_2(tmp_path, capsys, coco_ann, coco_images):
    out = tmp_path / "p.parquet"
    argv = ["data", "build-proxy", "--ann", str(coco_ann), "--images", str(coco_images), "--out", str(out)]
    assert main([*argv, "--input", "100x75"]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--images", "2", "--shift", "fog=3"]) == 2
    assert "fog" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
