"""The Parquet proxy on the real COCO/MPII samples: content, geometry, reuse, bad input."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from autopose.data import (
    COCO_FLIP_PAIRS,
    COCO_KEYPOINTS,
    MPII_KEYPOINTS,
    CocoCropDataset,
    ProxyDataset,
    build_proxy,
    crop_matrix,
    decode_batch,
    invert_affine,
    load_coco,
    load_mpii,
    read_proxy_metadata,
    transform_points,
    verify_proxy,
)
from autopose.errors import AutoposeError

INPUT = (128, 96)


@pytest.fixture(scope="module")
def coco_proxy(tmp_path_factory, coco_ann, coco_images) -> Path:
    out = tmp_path_factory.mktemp("proxy") / "coco.parquet"
    build_proxy(coco_ann, coco_images, out, input_size=INPUT, progress=False)
    return out


def test_proxy_holds_the_12_persons_with_keypoints(coco_proxy, coco_ann, coco_images):
    expected = {inst.instance_id: inst for inst in load_coco(coco_ann, coco_images, aspect_ratio=0.75)}
    dataset = ProxyDataset(coco_proxy)
    assert len(dataset) == 12
    assert {dataset[i]["instance_id"] for i in range(len(dataset))} == set(expected)
    meta = dataset.metadata
    assert meta.dataset == "coco"
    assert meta.keypoint_names == COCO_KEYPOINTS
    assert meta.flip_pairs == COCO_FLIP_PAIRS
    assert meta.input_size == INPUT
    assert meta.images_used == 4 and meta.skipped == ()


def test_every_crop_keypoint_maps_back_within_half_a_pixel(coco_proxy, coco_ann, coco_images):
    expected = {inst.instance_id: inst for inst in load_coco(coco_ann, coco_images)}
    dataset = ProxyDataset(coco_proxy)
    checked = 0
    for i in range(len(dataset)):
        item = dataset[i]
        inst = expected[item["instance_id"]]
        labelled = item["visibility"].numpy() > 0
        np.testing.assert_array_equal(item["visibility"].numpy(), inst.keypoints[:, 2])
        to_image = invert_affine(crop_matrix(item["center"].numpy(), item["scale"].numpy(), INPUT))
        back = transform_points(item["keypoints"].numpy()[labelled], to_image)
        assert np.abs(back - inst.keypoints[labelled, :2]).max() <= 0.5
        checked += int(labelled.sum())
    assert checked == 181  # all labelled keypoints of the file (SOURCES.md)


def test_items_match_the_on_the_fly_path(coco_proxy, coco_ann, coco_images):
    dataset = ProxyDataset(coco_proxy)
    on_the_fly = CocoCropDataset(load_coco(coco_ann, coco_images), INPUT)
    assert len(on_the_fly) == len(dataset)
    for i in (0, 5, 11):
        cached, fresh = dataset[i], on_the_fly[i]
        assert cached.keys() == fresh.keys()
        assert cached["image"].shape == fresh["image"].shape == (3, *INPUT)
        assert cached["image"].dtype == torch.uint8
        assert cached["instance_id"] == fresh["instance_id"]
        torch.testing.assert_close(cached["keypoints"], fresh["keypoints"])
        # the crop is the same picture up to JPEG loss
        assert (cached["image"].float() - fresh["image"].float()).abs().mean() < 4.0


def test_dataset_pickles_into_dataloader_workers(coco_proxy):
    dataset = ProxyDataset(coco_proxy)
    dataset[0]  # loaded in this process ...
    assert len(pickle.dumps(dataset)) < 10_000  # ... but the columns do not travel
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [5, 5, 2]
    assert batches[0]["keypoints"].shape == (5, 17, 2)
    streamed = list(dataset.iter_batches(batch_size=5))
    torch.testing.assert_close(
        torch.cat([b["keypoints"] for b in streamed]), torch.cat([b["keypoints"] for b in batches])
    )
    torch.testing.assert_close(
        torch.cat([b["image"] for b in streamed]), torch.cat([b["image"] for b in batches])
    )
    table = next(dataset.iter_record_batches(batch_size=12))
    as_numpy = decode_batch(table, as_numpy=True)
    assert isinstance(as_numpy["image"], np.ndarray) and as_numpy["image"].shape == (12, 3, *INPUT)
    np.testing.assert_array_equal(as_numpy["keypoints"], torch.cat([b["keypoints"] for b in batches]).numpy())


def test_rerun_reuses_and_changed_inputs_rebuild(coco_proxy, coco_ann, coco_images):
    before = coco_proxy.stat().st_mtime_ns
    report = build_proxy(coco_ann, coco_images, coco_proxy, input_size=INPUT, progress=False)
    assert report.reused and report.rows == 12
    assert coco_proxy.stat().st_mtime_ns == before
    smaller = coco_proxy.with_name("two.parquet")
    report = build_proxy(
        coco_ann, coco_images, smaller, input_size=INPUT, max_images=2, seed=3, progress=False
    )
    assert not report.reused and report.images_used == 2
    again = build_proxy(
        coco_ann, coco_images, smaller, input_size=INPUT, max_images=2, seed=3, progress=False
    )
    assert again.reused and again.content_hash == report.content_hash
    other = build_proxy(
        coco_ann, coco_images, smaller, input_size=INPUT, max_images=2, seed=4, progress=False
    )
    assert not other.reused and read_proxy_metadata(smaller).seed == 4


def test_content_hash_mismatch_is_refused(coco_proxy, tmp_path):
    table = pq.read_table(coco_proxy)
    key_values = pq.read_metadata(coco_proxy).metadata
    area = table.column("area").to_numpy().copy()
    area[3] += 1.0
    tampered = table.set_column(table.schema.get_field_index("area"), "area", [area])
    path = tmp_path / "tampered.parquet"
    pq.write_table(tampered.replace_schema_metadata(None), path)
    # carry the original metadata (with its content hash) over to the changed rows
    with pq.ParquetWriter(path, tampered.schema) as writer:
        writer.write_table(tampered)
        writer.add_key_value_metadata({b"autopose": key_values[b"autopose"]})
    with pytest.raises(AutoposeError) as caught:
        verify_proxy(path)
    assert caught.value.field == "content_hash" and caught.value.path == str(path)
    with pytest.raises(AutoposeError, match="content hash"):
        ProxyDataset(path)


def test_missing_and_corrupt_images_are_skipped_and_recorded(tmp_path, coco_ann, coco_images):
    images = tmp_path / "images"
    shutil.copytree(coco_images, images)
    (images / "000000000785.jpg").unlink()  # 1 person
    corrupt = images / "000000040083.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:20_000])  # truncated JPEG
    out = tmp_path / "proxy.parquet"
    report = build_proxy(coco_ann, images, out, input_size=INPUT, progress=False)
    persons = load_coco(coco_ann, images)
    expected_rows = sum(1 for p in persons if p.image_id not in (785, 40083))
    assert report.rows == expected_rows == len(ProxyDataset(out))
    assert report.images_used == 2
    reasons = {entry.file: entry.reason for entry in report.skipped}
    assert reasons.keys() == {"000000000785.jpg", "000000040083.jpg"}
    assert reasons["000000000785.jpg"] == "missing file"
    assert reasons["000000040083.jpg"].startswith("cannot decode")
    assert set(read_proxy_metadata(out).skipped) == set(report.skipped)


def test_missing_output_folder_writes_nothing(tmp_path, coco_ann, coco_images):
    out = tmp_path / "absent" / "proxy.parquet"
    with pytest.raises(AutoposeError) as caught:
        build_proxy(coco_ann, coco_images, out, progress=False)
    assert caught.value.field == "out"
    assert not out.parent.exists()
    assert list(tmp_path.iterdir()) == []


def test_mpii_json_builds_a_proxy(tmp_path, mpii_ann, mpii_images):
    out = tmp_path / "mpii.parquet"
    report = build_proxy(mpii_ann, mpii_images, out, input_size=INPUT, progress=False)
    dataset = ProxyDataset(out)
    assert report.rows == len(dataset) == 5
    assert dataset.metadata.dataset == "mpii"
    assert dataset.metadata.keypoint_names == MPII_KEYPOINTS
    expected = load_mpii(mpii_ann, mpii_images)
    for i in range(len(dataset)):
        item = dataset[i]
        inst = expected[item["instance_id"]]
        labelled = inst.keypoints[:, 2] > 0
        to_image = invert_affine(crop_matrix(inst.center, inst.scale, INPUT))
        back = transform_points(item["keypoints"].numpy()[labelled], to_image)
        assert np.abs(back - inst.keypoints[labelled, :2]).max() <= 0.5


# -- a canvas around each crop (build_proxy's margin) ---------------------------------------------
@pytest.fixture(scope="module")
def canvas_proxy(tmp_path_factory, coco_ann, coco_images) -> Path:
    out = tmp_path_factory.mktemp("canvas") / "coco-canvas.parquet"
    build_proxy(coco_ann, coco_images, out, input_size=INPUT, progress=False, margin=1.5)
    return out


def test_a_canvas_proxy_reads_as_the_crop_and_holds_the_image_around_it(coco_proxy, canvas_proxy):
    plain, framed = ProxyDataset(coco_proxy), ProxyDataset(canvas_proxy)
    canvas = ProxyDataset(canvas_proxy, canvas=True)
    rows, cols = framed.metadata.canvas_pad
    assert (rows, cols) == (32, 24) and framed.metadata.input_size == INPUT
    assert framed.metadata.stored_size == (INPUT[0] + 64, INPUT[1] + 48)
    assert plain.metadata.canvas_pad == (0, 0) and framed.canvas_pad == (0, 0)
    assert canvas.canvas_pad == (32, 24)
    for i in range(len(plain)):
        crop, window, whole = plain[i], framed[i], canvas[i]
        assert window["image"].shape == crop["image"].shape == (3, *INPUT)
        assert whole["image"].shape == (3, INPUT[0] + 64, INPUT[1] + 48)
        # The same affine sampling, JPEG-coded at another size: the pixels agree to the codec's noise.
        difference = (window["image"].float() - crop["image"].float()).abs().mean()
        assert difference < 3.0
        assert torch.equal(whole["image"][:, rows:-rows, cols:-cols], window["image"])
        assert torch.allclose(window["keypoints"], crop["keypoints"], atol=1e-3)
        labelled = crop["visibility"] > 0  # absent keypoints stay at (0, 0) in every layout
        moved = crop["keypoints"] + torch.tensor([24.0, 32.0])
        assert torch.allclose(whole["keypoints"][labelled], moved[labelled], atol=1e-3)
        assert not whole["keypoints"][~labelled].any()
        assert torch.equal(window["scale"], crop["scale"]) and torch.equal(window["center"], crop["center"])
    streamed = next(framed.iter_batches(batch_size=4))
    assert streamed["image"].shape[-2:] == INPUT
    assert torch.allclose(streamed["keypoints"], torch.stack([framed[i]["keypoints"] for i in range(4)]))


def test_labels_are_every_items_keypoints_and_visibility_in_each_layout(coco_proxy, canvas_proxy):
    for dataset in (
        ProxyDataset(coco_proxy),
        ProxyDataset(canvas_proxy),
        ProxyDataset(canvas_proxy, canvas=True),
    ):
        keypoints, visibility = dataset.labels()
        assert keypoints.shape[:2] == visibility.shape and len(keypoints) == len(dataset)
        for i in range(len(dataset)):
            item = dataset[i]
            assert torch.equal(keypoints[i], item["keypoints"]) and torch.equal(
                visibility[i], item["visibility"]
            )


def test_the_margin_is_part_of_the_fingerprint_and_an_old_proxy_has_none(coco_proxy, canvas_proxy):
    assert read_proxy_metadata(coco_proxy).fingerprint != read_proxy_metadata(canvas_proxy).fingerprint
    # A proxy written before canvases existed has no canvas_pad in its metadata: it stores crops.
    import json

    raw = json.loads(read_proxy_metadata(coco_proxy).to_json())
    del raw["canvas_pad"]
    from autopose.data.proxy import ProxyMetadata

    assert ProxyMetadata.from_json(json.dumps(raw), coco_proxy).canvas_pad == (0, 0)


@pytest.mark.parametrize("margin", [0.5, 3.5, float("nan")])
def test_an_absurd_margin_is_refused_naming_the_field_before_anything_is_written(
    tmp_path, coco_ann, coco_images, margin
):
    out = tmp_path / "p.parquet"
    with pytest.raises(AutoposeError) as raised:
        build_proxy(coco_ann, coco_images, out, input_size=INPUT, progress=False, margin=margin)
    assert raised.value.field == "margin" and "margin" in str(raised.value)
    assert list(tmp_path.iterdir()) == []
