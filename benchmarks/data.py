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
Run: .venv/bin/python benchmarks/data.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from autopose.data import CocoCropDataset, ProxyDataset, build_proxy, generate_synth, load_coco

IMAGE_SIZE = (480, 640)
INPUT_SIZE = (256, 192)
PASSES = 3
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
        if COCO_SAMPLES.is_dir():
            compare("coco_val2017_samples", COCO_SAMPLES / "test_coco.json", COCO_SAMPLES, root, 10 * PASSES)


if __name__ == "__main__":
    main()
