"""`autopose data synth` and `autopose data build-proxy` through autopose.cli.main, bad input included."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

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


def test_an_output_that_is_a_folder_exits_2_before_any_crop_is_built(tmp_path, capsys, coco_ann, coco_images):
    out = tmp_path / "outdir"
    out.mkdir()
    code = main(
        ["data", "build-proxy", "--ann", str(coco_ann), "--images", str(coco_images), "--out", str(out)]
    )
    assert code == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []  # nothing written


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
    # an absurd crop size is one line before any crop is built, not gigabytes later
    assert main([*argv, "--input", "100000x100000"]) == 2
    error = capsys.readouterr().err
    assert "--input" in error and "larger than 1024" in error and len(error.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--images", "2", "--shift", "fog=3"]) == 2
    assert "fog" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_build_proxy_exclude_draws_a_held_out_split_among_the_other_images(tmp_path, capsys):
    out = tmp_path / "synth"
    assert (
        main(["data", "synth", "--out", str(out), "--images", "10", "--val-images", "2", "--size", "96x128"])
        == 0
    )
    ann, images = out / "train" / "annotations.json", out / "train" / "images"
    common = ["data", "build-proxy", "--ann", str(ann), "--images", str(images), "--input", "64x48"]
    train = tmp_path / "train.parquet"
    assert main([*common, "--out", str(train), "--max-images", "6"]) == 0
    holdout = tmp_path / "holdout.parquet"
    assert main([*common, "--out", str(holdout), "--max-images", "10", "--exclude", str(train)]) == 0
    capsys.readouterr()

    def images_of(proxy):
        return set(pq.read_table(proxy, columns=["source"]).column("source").to_pylist())

    assert images_of(train).isdisjoint(images_of(holdout))
    # the 4 images the train proxy left, all of them (fewer than --max-images remain)
    every = {f"{image['file_name']}" for image in json.loads(ann.read_text())["images"]}
    assert images_of(train) | images_of(holdout) == every
    assert read_proxy_metadata(holdout).images_used == 4
    # the same command again reuses it; another excluded proxy is another proxy
    assert main([*common, "--out", str(holdout), "--max-images", "10", "--exclude", str(train)]) == 0
    assert capsys.readouterr().out.startswith("proxy reused")
    assert main([*common, "--out", str(holdout), "--max-images", "10"]) == 0
    assert capsys.readouterr().out.startswith("proxy written")
    assert images_of(holdout) == every


def test_build_proxy_exclude_that_is_not_a_proxy_exits_2_before_writing(tmp_path, capsys):
    out = tmp_path / "synth"
    assert (
        main(["data", "synth", "--out", str(out), "--images", "2", "--val-images", "1", "--size", "96x128"])
        == 0
    )
    not_a_proxy = tmp_path / "notes.parquet"
    not_a_proxy.write_text("hello")
    proxy = tmp_path / "proxy.parquet"
    argv = ["data", "build-proxy", "--ann", str(out / "train" / "annotations.json")]
    argv += ["--images", str(out / "train" / "images"), "--out", str(proxy), "--input", "64x48"]
    for exclude in (not_a_proxy, tmp_path / "missing.parquet"):
        capsys.readouterr()
        assert main([*argv, "--exclude", str(exclude)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(exclude) in err
        assert not proxy.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["notes.parquet", "synth"]
