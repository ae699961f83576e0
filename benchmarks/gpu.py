"""The GPU check (``make bench-gpu``): what one accelerator does with autopose, as JSON lines.

On a CUDA machine, in about 8 minutes:

1. ``train_step``: P2Net-R50 and SimpleBaseline-R50 training at 256×192, batch 128, bfloat16
   autocast and channels-last, eager and (``--compile``, on by default) ``torch.compile``d:
   images/s and the share of the device's bf16 peak (``3 × 2 × MACs`` FLOPs per image, forward
   and backward, × images/s ÷ peak). Target for one H100/H200: P2Net-R50 ≥ 3,000 images/s.
2. ``policy``: the relaxed policy's forward and backward and the discrete policy on a batch of
   128 on the device, each as a share of one P2Net-R50 train step (target ≤ 5 %); and, from one
   profiled call of each, the operators it launches, its host synchronisations (``nonzero``,
   ``.item()``/``bool()`` of a device tensor) and the share of the call the device was busy: a
   low share with many operators means the policy is launch-bound, not compute-bound.
3. ``search_step``: the bi-level search step over a plain train step on the device (P2Net-R50,
   batch 32).
4. ``platform``: one search trial of the tiny demo experiment on a local Ray with a GPU per
   trial (its ``gpu_memory_peak_mb`` says the model, images and policy were on the device: a
   policy elsewhere fails the step), then one full training on Ray Train with NCCL on one GPU.

``--device cpu --quick`` runs every part at toy sizes on the CPU: the script's own check
(``tests/test_benchmarks.py``), not a measurement. Never a test's dependency on a GPU.

    .venv/bin/python benchmarks/gpu.py [--workdir DIR] [--no-compile] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from autopose.augment import RelaxedPolicy, p2net_space
from autopose.augment.baselines import random_policy
from autopose.data.codec import HeatmapCodec
from autopose.engine.search import BilevelSearch, NormalizedGradientDescent
from autopose.models import build_model
from autopose.models.complexity import count_flops
from autopose.models.losses import PoseLoss

MODELS = ("p2net_r50", "simplebaseline_r50")
# Dense bfloat16 tensor-core peaks (the vendors' data sheets, without sparsity), in TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
TARGET_P2NET_IMAGES_PER_S = 3000.0
TARGET_POLICY_SHARE = 0.05


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """The device's dense bf16 peak: ``given``, or looked up by the device's name."""
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def batch_on(device: torch.device, batch: int, size: tuple[int, int], channels_last: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    images = torch.rand(batch, 3, height, width, generator=generator)
    keypoints = torch.rand(batch, 17, 2, generator=generator) * torch.tensor([width - 1.0, height - 1.0])
    visibility = torch.full((batch, 17), 2.0)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, memory_format=memory), keypoints.to(device), visibility.to(device)


def train_step_fn(model: torch.nn.Module, batch, codec: HeatmapCodec, amp: bool) -> Callable[[], None]:
    """One optimizer step of ``model`` on ``batch`` (bf16 autocast when ``amp``), as a closure."""
    images, keypoints, visibility = batch
    heatmaps, weight = codec.encode(keypoints, visibility)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    loss_fn = PoseLoss()

    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(images)
        loss = loss_fn(outputs, heatmaps, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_train_steps(args, device: torch.device) -> float:
    """Part 1; returns P2Net-R50's eager train-step seconds (the yardstick of parts 2 and 3)."""
    peak = peak_tflops(device, args.peak_tflops)
    codec = HeatmapCodec(args.size)
    batch = batch_on(device, args.batch, args.size, args.channels_last)
    p2net_eager_s = None
    for name in MODELS:
        flops_per_image = 3 * 2 * count_flops(build_model(name, input_size=args.size), args.size)
        modes = ["eager", "compiled"] if args.compile else ["eager"]
        for mode in modes:
            torch.manual_seed(0)
            model = build_model(name, input_size=args.size).to(device).train()
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
            if mode == "compiled":
                model = torch.compile(model)
            seconds = median_seconds(
                train_step_fn(model, batch, codec, args.amp), device, args.warmup, args.steps
            )
            rate = args.batch / seconds
            if name == "p2net_r50" and mode == "eager":
                p2net_eager_s = seconds
            share = None if peak is None else flops_per_image * rate / (peak * 1e12)
            record = {
                "bench": "train_step",
                "model": name,
                "mode": mode,
                "device": device_name(device),
                "batch": args.batch,
                "input": f"{args.size[0]}x{args.size[1]}",
                "bf16": args.amp,
                "channels_last": args.channels_last,
                "step_s": round(seconds, 4),
                "images_per_s": round(rate, 1),
                "gflop_per_image_fwd_bwd": round(flops_per_image / 1e9, 1),
                "share_of_bf16_peak": None if share is None else round(share, 4),
            }
            if name == "p2net_r50":
                record.update(
                    target_images_per_s=TARGET_P2NET_IMAGES_PER_S, met=rate >= TARGET_P2NET_IMAGES_PER_S
                )
            emit(**record)
    return p2net_eager_s


def bench_policy(args, device: torch.device, train_step_s: float) -> None:
    """Part 2: the policies on a batch on the device, as shares of a P2Net-R50 train step."""
    space = p2net_space()
    images, keypoints, visibility = batch_on(device, args.batch, args.size, False, seed=1)
    relaxed = RelaxedPolicy(space, seed=0, hard=True).to(device)
    discrete = random_policy(space, seed=0)

    def relaxed_forward_backward() -> None:
        out, moved, _ = relaxed(images, keypoints, visibility)
        (out.mean() + moved.mean()).backward()

    def discrete_forward() -> None:
        with torch.no_grad():
            discrete(images, keypoints, visibility)

    for name, function in (
        ("relaxed_forward_backward", relaxed_forward_backward),
        ("discrete", discrete_forward),
    ):
        seconds = median_seconds(function, device, args.warmup, args.steps)
        share = seconds / train_step_s
        emit(
            bench="policy",
            policy=name,
            device=device_name(device),
            batch=args.batch,
            policy_s=round(seconds, 4),
            share_of_p2net_r50_train_step=round(share, 4),
            target_share_max=TARGET_POLICY_SHARE,
            met=share <= TARGET_POLICY_SHARE,
            **launch_profile(function, device),
        )


def launch_profile(function: Callable[[], object], device: torch.device) -> dict[str, object]:
    """One profiled call: operators launched, host synchronisations, and (on CUDA) the share of
    the call's wall time the device spent in kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as profiled:
        started = time.perf_counter()
        function()
        synchronize(device)
        wall = time.perf_counter() - started
    averages = profiled.key_averages()
    counts = {event.key: event.count for event in averages}
    operators = sum(count for key, count in counts.items() if key.startswith("aten::"))
    syncs = counts.get("aten::nonzero", 0) + counts.get("aten::_local_scalar_dense", 0)
    record: dict[str, object] = {"aten_operators": operators, "host_syncs": syncs}
    if device.type == "cuda":
        busy_us = sum(event.self_device_time_total for event in averages)
        record["device_busy_share"] = round(busy_us / 1e6 / wall, 3)
    return record


def bench_search_step(args, device: torch.device) -> None:
    """Part 3: the bi-level search step over a plain train step, P2Net-R50 on the device."""
    torch.manual_seed(0)
    batch_size = max(2, args.batch // 4)
    model = build_model("p2net_r50", input_size=args.size).to(device).train()
    policy = RelaxedPolicy(p2net_space(), seed=0, hard=True).to(device)
    codec, loss_fn = HeatmapCodec(args.size), PoseLoss()
    weights = torch.optim.Adam(model.parameters(), lr=5e-4)
    search = BilevelSearch(
        model,
        policy,
        loss_fn,
        codec,
        weights,
        NormalizedGradientDescent(policy.parameters(), lr=0.3),
        unroll_lr=0.1,
    )
    train = batch_on(device, batch_size, args.size, False, seed=2)
    val = batch_on(device, batch_size, args.size, False, seed=3)
    plain = train_step_fn(model, train, codec, amp=False)
    plain_s = median_seconds(plain, device, args.warmup, args.steps)
    search_s = median_seconds(lambda: search.step(train, val), device, args.warmup, args.steps)
    emit(
        bench="search_step",
        device=device_name(device),
        arch="p2net_r50",
        batch=batch_size,
        plain_step_s=round(plain_s, 4),
        search_step_s=round(search_s, 4),
        ratio=round(search_s / plain_s, 2),
    )


def bench_platform(args, device: torch.device) -> None:
    """Part 4: a search trial with a GPU on a local Ray, then a full training on Ray Train (NCCL)."""
    from mlflow import MlflowClient

    from autopose.platform.demo import (
        BUDGETS,
        demo_config,
        local_ray,
        prepare_proxies,
        prepare_synth,
        quiet_libraries,
    )
    from autopose.platform.train import run_training
    from autopose.platform.tune import run_search

    gpu = device.type == "cuda"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="autopose-gpu-"))
    budget = BUDGETS["tiny"]
    synth, _ = prepare_synth(workdir, budget)
    data, _ = prepare_proxies(workdir, budget, synth)
    config = demo_config(workdir, budget, data, name="gpu-check")
    gpus = 1.0 if gpu else 0.0
    train = dataclasses.replace(config.train, gpus_per_worker=gpus, cpus_per_worker=1.0)
    baselines = dataclasses.replace(config.baselines, random_seeds=[], handcrafted=False, none=False)
    full = dataclasses.replace(
        config.full_train, num_workers=1, gpus_per_worker=gpus, backend="nccl" if gpu else "gloo"
    )
    search = dataclasses.replace(config.search, trials=1)
    selection = dataclasses.replace(config.selection, enabled=False)
    config = config.replace(
        train=train, baselines=baselines, full_train=full, search=search, selection=selection, warm_start=None
    )
    import ray

    if not ray.is_initialized():
        # Without the dashboard: GPU images often lack its extras (aiohttp_cors, …), and one
        # trial and one training leak nothing that matters (local_ray keeps it on for long runs).
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    with quiet_libraries(), local_ray():
        started = time.perf_counter()
        (outcome,) = run_search(config, verbose=0)
        trial_s = time.perf_counter() - started
        metrics = MlflowClient(config.tracking_uri).get_run(outcome.run_id).data.metrics
        emit(
            bench="platform_search_trial",
            device=device_name(device),
            status=outcome.status,
            gpu_memory_peak_mb=metrics.get("gpu_memory_peak_mb"),
            on_device=(metrics.get("gpu_memory_peak_mb") or 0.0) > 0 if gpu else None,
            wall_s=round(trial_s, 1),
        )
        started = time.perf_counter()
        training = run_training(config, "none")
        emit(
            bench="platform_full_training",
            device=device_name(device),
            backend=full.backend,
            workers=1,
            final_val_ap=round(training.metrics.get("final_val_ap", float("nan")), 4),
            wall_s=round(time.perf_counter() - started, 1),
        )


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--quick", action="store_true", help="toy sizes: a check of the script, not a measurement"
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="data and runs of part 4 (a temporary folder)"
    )
    parser.add_argument("--skip-platform", action="store_true", help="parts 1–3 only")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or --device cpu --quick to check the script")
    args.size = (64, 48) if args.quick else (256, 192)
    args.batch = 4 if args.quick else 128
    args.warmup, args.steps = (1, 2) if args.quick else (5, 20)
    args.amp = device.type == "cuda"
    args.channels_last = device.type == "cuda"
    if args.quick:
        args.compile = False
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    emit(bench="setting", device=device_name(device), torch=torch.__version__, quick=args.quick)
    train_step_s = bench_train_steps(args, device)
    bench_policy(args, device, train_step_s)
    bench_search_step(args, device)
    if not args.skip_platform:
        bench_platform(args, device)


if __name__ == "__main__":
    main()
