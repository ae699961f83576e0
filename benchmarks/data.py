"""Proxy read+decode vs the on-the-fly crop, over the same persons, in one run.

A synthetic COCO-format dataset of 640×480 images (about 200 persons) is written
to a temporary folder and cached as a Parquet proxy of 256×192 crops. Then every
person is read both ways, several passes each, alternating:

* proxy: open the Parquet file, decode each stored JPEG crop (ProxyDataset);
* on the fly: read and decode the full JPEG, affine-crop it (CocoCropDataset).

The same comparison then runs on the bundled real COCO val2017 samples (12 persons,
photographs, heavier JPEGs) as a check that the synthetic figures do not flatter
the proxy.

Prints one JSON object per line: each path's samples/s, and their ratio (target ≥ 3).

Then the feed of a GPU node (``feed`` lines): what one loader process delivers on one thread —
read + decode + collate of a batch of 32 from a proxy of crops and from a train proxy of canvases
(``--margin 1.5``, what the trials read) — and how many loader processes keep a GPU training
P2Net-R50 at 3,000 images/s fed (the policy runs on the device, beside the model, so it is not
the loaders' work).

Run: .venv/bin/python benchmarks/data.py
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

from autopose.data import CocoCropDataset, ProxyDataset, build_proxy, generate_synth, load_coco

IMAGE_SIZE = (480, 640)
INPUT_SIZE = (256, 192)
PASSES = 3
GPU_IMAGES_PER_S = 3000  # issue 17's target for P2Net-R50 on one H100/H200
FEED_BATCH = 32
COCO_SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "data" / "coco_samples"


def _rate(make_dataset) -> tuple[int, float]:
    """Samples and seconds for one full pass over a freshly made dataset."""
    start = time.perf_counter()
    dataset = make_dataset()
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape == (3, *INPUT_SIZE)
    return len(dataset), time.perf_counter() - start


def compare(dataset_name: str, ann: Path, images: Path, workdir: Path, passes: int) -> None:
    """Build the proxy of ``ann`` and print both paths' rates and their ratio."""
    proxy = workdir / f"{dataset_name}.parquet"
    report = build_proxy(ann, images, proxy, input_size=INPUT_SIZE, progress=False)
    instances = load_coco(ann, images, aspect_ratio=INPUT_SIZE[1] / INPUT_SIZE[0])
    assert report.rows == len(instances), "both paths must cover the same persons"
    paths = {
        "proxy": lambda: ProxyDataset(proxy, verify=False),
        "on_the_fly": lambda: CocoCropDataset(instances, INPUT_SIZE),
    }
    totals = {name: [0, 0.0] for name in paths}
    _rate(paths["proxy"]), _rate(paths["on_the_fly"])  # warm the page cache and decoders
    for _ in range(passes):
        for name, make in paths.items():  # alternate, so that load drifts hit both alike
            samples, seconds = _rate(make)
            totals[name][0] += samples
            totals[name][1] += seconds
    rates = {}
    for name, (samples, seconds) in totals.items():
        rates[name] = samples / seconds
        line = {
            "bench": "data",
            "dataset": dataset_name,
            "path": name,
            "samples": samples,
            "seconds": round(seconds, 3),
            "samples_per_s": round(rates[name], 1),
            "input_size": list(INPUT_SIZE),
            "torch_threads": torch.get_num_threads(),
        }
        print(json.dumps(line), flush=True)
    ratio = rates["proxy"] / rates["on_the_fly"]
    summary = {
        "bench": "data",
        "dataset": dataset_name,
        "ratio_proxy_over_on_the_fly": round(ratio, 2),
        "target": 3.0,
        "met": ratio >= 3.0,
        "persons": report.rows,
        "images": report.images_used,
        "proxy_mb": round(proxy.stat().st_size / 1e6, 2),
    }
    print(json.dumps(summary), flush=True)


def feed(ann: Path, images: Path, workdir: Path, passes: int) -> None:
    """One loader process's samples/s (one thread) for crops and canvases, and the loaders a GPU
    node needs at :data:`GPU_IMAGES_PER_S`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for margin in (1.0, 1.5):
            proxy = workdir / f"feed-{margin}.parquet"
            build_proxy(ann, images, proxy, input_size=INPUT_SIZE, progress=False, margin=margin)
            dataset = ProxyDataset(proxy, verify=False, canvas=True)
            order = list(range(len(dataset)))
            batches = [order[i : i + FEED_BATCH] for i in range(0, len(order) - FEED_BATCH + 1, FEED_BATCH)]
            default_collate([dataset[i] for i in batches[0]])  # load the columns, warm the decoder
            start, samples = time.perf_counter(), 0
            for _ in range(passes):
                for batch in batches:
                    default_collate([dataset[i] for i in batch])
                    samples += len(batch)
            rate = samples / (time.perf_counter() - start)
            line = {
                "bench": "feed",
                "margin": margin,
                "stored_size": list(dataset.metadata.stored_size),
                "samples_per_s_per_loader": round(rate, 1),
                "gpu_images_per_s": GPU_IMAGES_PER_S,
                "loaders_needed": math.ceil(GPU_IMAGES_PER_S / rate),
            }
            print(json.dumps(line), flush=True)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        generate_synth(
            root / "synth",
            images=80,
            val_images=0,
            seed=0,
            image_size=IMAGE_SIZE,
            max_persons=4,
            progress=False,
        )
        train = root / "synth" / "train"
        compare("synth_640x480", train / "annotations.json", train / "images", root, PASSES)
        feed(train / "annotations.json", train / "images", root, PASSES)
        if COCO_SAMPLES.is_dir():
            compare("coco_val2017_samples", COCO_SAMPLES / "test_coco.json", COCO_SAMPLES, root, 10 * PASSES)


if __name__ == "__main__":
    main()
