"""Augmentation and search-step costs, measured side by side in one run.

1. Discrete policy throughput, batch 32 × 256×192: the batched tensor
   :class:`~autopose.augment.Policy` against a per-image PIL loop doing the same
   ops with the same draws (keypoints moved in both). The PIL loop gets PIL
   images in and out (no tensor conversion counted), the policy float tensors.
   A report line, no target: it set a float32 warp on the CPU against PIL's uint8 path,
   while what matters is the policy's share of a train step on the device that trains.
2. :class:`~autopose.augment.RelaxedPolicy` (the paper's space, K = 3, N = 2, ten
   ops): forward + backward against forward alone (target ≤ 2.5×), and the
   forward with uniform op weights against one where three ops per step
   dominate (the others below ``min_weight`` are skipped).
3. The bi-level search step (finite difference, central and one-sided, and the
   exact torch.func product) against a plain training step, with a P2Net model;
   target ≤ 3×. Also how far the finite difference is from the exact product on
   P2Net (cosine, relative error).

Every figure is the median of ``--repeats`` timed runs after one warm-up; the
compared functions take turns, so that the load of a shared machine hits them alike.
Prints one JSON object per line. Run: ``.venv/bin/python benchmarks/augment.py``
(``--device cuda`` on a GPU; ``--arch``/``--input``/``--search-batch`` for part 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from autopose.augment import Policy, PolicyStep, RelaxedPolicy, p2net_space
from autopose.augment.ops import OPS, SOLARIZE_ADD_THRESHOLD
from autopose.data.codec import HeatmapCodec
from autopose.data.transforms import warp_image
from autopose.engine.search import BilevelSearch
from autopose.models import build_model
from autopose.models.losses import PoseLoss

SPACE = p2net_space()
JOINTS = 17
# Every op once, always applied (p = 1), at m = 7, so both paths do two ops per image.
SUB_POLICIES = [
    [PolicyStep("Rotate", 1.0, 7.0), PolicyStep("Equalize", 1.0, 7.0)],
    [PolicyStep("TranslateX", 1.0, 7.0), PolicyStep("Sharpness", 1.0, 7.0)],
    [PolicyStep("Scale", 1.0, 7.0), PolicyStep("Solarize", 1.0, 7.0)],
    [PolicyStep("TranslateY", 1.0, 7.0), PolicyStep("SolarizeAdd", 1.0, 7.0)],
    [PolicyStep("Brightness", 1.0, 7.0), PolicyStep("Cutout", 1.0, 7.0)],
]


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def timed(functions: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function: one warm-up each, then ``repeats``
    rounds that call every function in turn, so that a shared machine's load drifts
    hit all of them alike."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for function in functions.values():
        function()
        sync()
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def sample_batch(batch: int, size: tuple[int, int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    images = torch.rand(batch, 3, height, width, generator=generator)
    keypoints = torch.rand(batch, JOINTS, 2, generator=generator) * torch.tensor([width - 1.0, height - 1.0])
    return images, keypoints, torch.full((batch, JOINTS), 2.0)


# -- 1. the per-image PIL loop ---------------------------------------------------------------------


def pil_apply(image: Image.Image, keypoints: np.ndarray, visibility: np.ndarray, op: str, value: float, rng):
    """One op on one PIL image, keypoints moved in numpy (the per-image baseline)."""
    width, height = image.size
    spec = OPS[op]
    if spec.geometric:
        matrix = spec.matrix(torch.tensor([value], dtype=torch.float64), height, width)[0].numpy()
        image = Image.fromarray(warp_image(image, matrix, (height, width)))
        keypoints = keypoints @ matrix[:, :2].T + matrix[:, 2]
        inside = (
            (keypoints >= -0.5).all(1) & (keypoints[:, 0] <= width - 0.5) & (keypoints[:, 1] <= height - 0.5)
        )
        return image, keypoints, np.where(inside, visibility, 0)
    if op == "Equalize":
        image = ImageOps.equalize(image)
    elif op == "Solarize":
        image = ImageOps.solarize(image, round(value * 255))
    elif op == "SolarizeAdd":
        add, threshold = round(value * 255), int(SOLARIZE_ADD_THRESHOLD * 255)
        image = image.point([min(v + add, 255) if v < threshold else v for v in range(256)] * 3)
    elif op == "Brightness":
        image = ImageEnhance.Brightness(image).enhance(value)
    elif op == "Sharpness":
        image = ImageEnhance.Sharpness(image).enhance(value)
    elif op == "Cutout":
        cx, cy = rng.uniform(0, width) - 0.5, rng.uniform(0, height) - 0.5
        half_w, half_h = value * width / 2, value * height / 2
        image = image.copy()
        ImageDraw.Draw(image).rectangle([cx - half_w, cy - half_h, cx + half_w, cy + half_h], fill=(128,) * 3)
    return image, keypoints, visibility


def bench_discrete(batch: int, size: tuple[int, int], repeats: int, device: torch.device) -> None:
    images, keypoints, visibility = sample_batch(batch, size)
    policy = Policy(SUB_POLICIES, SPACE, seed=0)
    on_device = images.to(device), keypoints.to(device), visibility.to(device)

    pil_images = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for im in images]
    pil_keypoints, pil_visibility = keypoints.double().numpy(), visibility.numpy()
    rng = np.random.default_rng(0)

    def pil_loop() -> None:
        for i, image in enumerate(pil_images):
            kpts, vis = pil_keypoints[i], pil_visibility[i]
            for step in SUB_POLICIES[rng.integers(len(SUB_POLICIES))]:
                if rng.random() < step.p:
                    value = SPACE.value(step.op, step.m)
                    image, kpts, vis = pil_apply(image, kpts, vis, step.op, value, rng)

    times = timed({"tensor": lambda: policy(*on_device), "pil": pil_loop}, repeats, device)
    tensor_s, pil_s = times["tensor"], times["pil"]
    emit(
        bench="discrete_policy",
        device=str(device),
        threads=torch.get_num_threads(),
        batch=batch,
        input=f"{size[0]}x{size[1]}",
        tensor_images_per_s=round(batch / tensor_s, 1),
        pil_images_per_s=round(batch / pil_s, 1),
        ratio=round(pil_s / tensor_s, 2),
    )


# -- 2. the relaxed policy -------------------------------------------------------------------------


def bench_relaxed(batch: int, size: tuple[int, int], repeats: int, device: torch.device) -> None:
    images, keypoints, visibility = (t.to(device) for t in sample_batch(batch, size))
    policy = RelaxedPolicy(SPACE, init_magnitude=7.0, seed=0).to(device)
    noise = policy.sample_noise(batch)
    upstream = torch.rand(images.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def forward():
        return policy(images, keypoints, visibility, noise)[0]

    def forward_backward() -> None:
        policy.zero_grad(set_to_none=True)
        (forward() * upstream).sum().backward()

    peaked = RelaxedPolicy(SPACE, init_magnitude=7.0, seed=0).to(device)
    with torch.no_grad():
        peaked.op_logits[..., :3] += 10.0  # three ops per step dominate; seven weigh ~1e-5
    times = timed(
        {
            "forward": forward,
            "forward_backward": forward_backward,
            "peaked": lambda: peaked(images, keypoints, visibility, noise),
        },
        repeats,
        device,
    )
    forward_s, both_s, peaked_s = times["forward"], times["forward_backward"], times["peaked"]
    emit(
        bench="relaxed_policy",
        device=str(device),
        batch=batch,
        input=f"{size[0]}x{size[1]}",
        forward_s=round(forward_s, 4),
        forward_backward_s=round(both_s, 4),
        ratio=round(both_s / forward_s, 2),
        target_ratio="<= 2.5",
        forward_three_dominant_ops_s=round(peaked_s, 4),
        skip_speedup=round(forward_s / peaked_s, 2),
    )


# -- 3. the search step ----------------------------------------------------------------------------


def bench_search(arch: str, batch: int, size: tuple[int, int], repeats: int, device: torch.device) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_joints=JOINTS, input_size=size).to(device).train()
    policy = RelaxedPolicy(SPACE, init_magnitude=7.0, seed=0).to(device)
    loss_fn = PoseLoss(8)
    codec = HeatmapCodec(size)
    weight_optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3, betas=(0.5, 0.999))
    train = tuple(t.to(device) for t in sample_batch(batch, size, seed=0))
    val = tuple(t.to(device) for t in sample_batch(batch, size, seed=1))

    exported = policy.export(seed=0)  # a baseline trial's step augments with a discrete policy

    def plain_step() -> None:
        images, keypoints, visibility = exported(*train)
        heatmaps, weight = codec.encode(keypoints, visibility)
        weight_optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), heatmaps, weight).backward()
        weight_optimizer.step()

    def search(**options) -> BilevelSearch:
        return BilevelSearch(
            model, policy, loss_fn, codec, weight_optimizer, policy_optimizer, unroll_lr=1e-3, **options
        )

    variants = {
        "finite_difference": search(),
        "finite_difference_one_sided": search(central=False),
        "exact": search(hessian="exact"),
    }
    functions = {
        "plain": plain_step,
        **{name: (lambda s=s: s.step(train, val)) for name, s in variants.items()},
    }
    times = timed(functions, repeats, device)
    plain_s = times.pop("plain")
    emit(
        bench="search_step",
        device=str(device),
        arch=arch,
        batch=batch,
        input=f"{size[0]}x{size[1]}",
        plain_step_s=round(plain_s, 3),
        **{f"{name}_s": round(t, 3) for name, t in times.items()},
        **{f"{name}_ratio": round(t / plain_s, 2) for name, t in times.items()},
        target_ratio="<= 3 (finite_difference)",
    )

    # How far the finite difference is from the exact product on this (ReLU, max-pool) model.
    noise = policy.sample_noise(batch)
    fd = torch.cat([g.flatten() for g in variants["finite_difference"].hypergradient(train, val, noise)])
    exact = torch.cat([g.flatten() for g in variants["exact"].hypergradient(train, val, noise)])
    emit(
        bench="finite_difference_vs_exact",
        device=str(device),
        arch=arch,
        cosine=round(float(torch.nn.functional.cosine_similarity(fd, exact, dim=0)), 4),
        relative_error=round(float((fd - exact).norm() / exact.norm()), 4),
        fd_radius=variants["finite_difference"].fd_radius,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input", default="256x192", help="HxW for parts 1 and 2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arch", default="p2net_r18")
    parser.add_argument("--search-input", default="128x96", help="HxW for part 3 (256x192 is slow on a CPU)")
    parser.add_argument("--search-batch", type=int, default=16)
    parser.add_argument("--parts", default="1,2,3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = tuple(int(v) for v in args.input.lower().split("x"))
    search_size = tuple(int(v) for v in args.search_input.lower().split("x"))
    parts = set(args.parts.split(","))
    if "1" in parts:
        bench_discrete(args.batch, size, args.repeats, device)
    if "2" in parts:
        bench_relaxed(args.batch, size, args.repeats, device)
    if "3" in parts:
        bench_search(args.arch, args.search_batch, search_size, args.repeats, device)


if __name__ == "__main__":
    main()
