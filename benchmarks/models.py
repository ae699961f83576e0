"""Train-step cost of P2Net-R50 against SimpleBaseline-R50, side by side in one run.

CPU (default): 2 threads, batch 8, 256×192. One train step = forward, PoseLoss
(L2 on the intermediate outputs + OHKM on the final one), backward, Adam step.
The two models alternate step by step so that a change in machine load hits both
alike; the medians over the timed steps are compared. Target: P2Net-R50's step over
SimpleBaseline-R50's no more than their multiply-add ratio (1.45× at 256×192, computed here):
P2Net as cheap per multiply-add as SimpleBaseline. (An earlier target of 1.3× could not hold
together with the paper's cost.)

GPU: ``--device cuda --amp --channels-last`` measures training images/s of
P2Net-R50 (and SimpleBaseline-R50 beside it) on synthetic batches already on the
device: the model's throughput, without data loading. Target: ≥ 1000 img/s on
one H100.

``--profile`` adds, per model, where one step's CPU time goes: the aten operators' self time by
family (convolution, batch norm, upsampling, elementwise sums, copies …) and the top operators.

Every figure is printed as one JSON object per line::

    .venv/bin/python benchmarks/models.py
    .venv/bin/python benchmarks/models.py --device cuda --amp --channels-last --batch 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from autopose.data.transforms import parse_size
from autopose.models import build_model
from autopose.models.complexity import count_flops, count_parameters
from autopose.models.losses import PoseLoss

MODELS = ("p2net_r50", "simplebaseline_r50")


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages (other work on the machine skews CPU timings)."""
    return [round(value, 2) for value in os.getloadavg()]


class TrainStep:
    """One model, its optimizer and a fixed synthetic batch; ``run()`` times one step."""

    def __init__(self, name: str, args: argparse.Namespace, input_size: tuple[int, int]):
        self.name = name
        self.device = torch.device(args.device)
        self.amp = args.amp
        self.model = build_model(name, input_size=input_size).to(self.device).train()
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=memory_format)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.loss = PoseLoss(ohkm_topk=8)
        generator = torch.Generator().manual_seed(0)
        height, width = input_size
        self.images = torch.rand(args.batch, 3, height, width, generator=generator).to(
            self.device, memory_format=memory_format
        )
        self.target = torch.rand(args.batch, 17, height // 4, width // 4, generator=generator).to(self.device)
        self.weight = torch.ones(args.batch, 17, device=self.device)

    def run(self) -> tuple[float, float]:
        """One train step; returns (wall seconds, process CPU seconds)."""
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            outputs = self.model(self.images)
        loss = self.loss(outputs, self.target, self.weight)  # the loss casts to float32
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start


# Operator families of a profile: each aten operator's self time is counted in the first family
# whose word its name holds (the backward's operators included), the rest as "other".
FAMILIES = (
    ("convolution", ("conv",)),
    ("batch norm", ("batch_norm",)),
    ("upsample", ("upsample", "interpolate")),
    ("add, mul, sum", ("add", "mul", "sum")),
    ("activation", ("relu", "threshold", "sigmoid")),
    ("cat, copy, layout", ("cat", "copy", "contiguous", "clone", "to_", "empty", "zero", "fill", "narrow")),
    ("pooling", ("pool",)),
    ("optimizer", ("addcdiv", "sqrt", "lerp", "_foreach")),
)


def profile_step(runner: TrainStep) -> dict:
    """Where one train step's CPU time goes: self time by operator family, and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        runner.run()
    events = [e for e in profiler.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    families: dict[str, float] = {}
    for event in events:
        family = next((f for f, words in FAMILIES if any(w in event.key for w in words)), "other")
        families[family] = families.get(family, 0.0) + event.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {
        "profile": runner.name,
        "aten_self_cpu_ms": round(total / 1000, 1),
        "operators_called": sum(e.count for e in events),
        "share_by_family": {f: round(t / total, 3) for f, t in sorted(families.items(), key=lambda x: -x[1])},
        "top": [[e.key, round(e.self_cpu_time_total / 1000, 1), e.count] for e in top],
    }


def describe(name: str, input_size: tuple[int, int]) -> dict:
    model = build_model(name, input_size=input_size)
    macs = count_flops(model, input_size)
    return {
        "model": name,
        "input": f"{input_size[0]}x{input_size[1]}",
        "params": count_parameters(model),
        "gflops_hrnet": round(macs / 2**30, 3),
        "gflops_1e9": round(macs / 1e9, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on the CPU, 128 on a GPU")
    parser.add_argument("--input", default="256x192", help="HxW")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per model (default 2 CPU, 10 GPU)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per model (default 4 CPU, 50 GPU)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print where one step's CPU time goes, by operator"
    )
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (128 if gpu else 8)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    steps = args.steps if args.steps is not None else (50 if gpu else 4)
    torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    input_size = parse_size(args.input)

    for name in MODELS:
        print(json.dumps(describe(name, input_size)), flush=True)

    setting = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "threads": args.threads,
        "batch": args.batch,
        "input": args.input,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "torch": torch.__version__,
    }
    load_before = load_average()
    runners = [TrainStep(name, args, input_size) for name in MODELS]
    times: dict[str, list[float]] = {name: [] for name in MODELS}
    cpu_times: dict[str, list[float]] = {name: [] for name in MODELS}
    for step in range(warmup + steps):
        for runner in runners:  # alternate, so that load changes hit both models alike
            elapsed, cpu = runner.run()
            if step >= warmup:
                times[runner.name].append(elapsed)
                cpu_times[runner.name].append(cpu)
    load_after = load_average()

    medians = {}
    for name in MODELS:
        medians[name] = statistics.median(times[name])
        record = {
            "model": name,
            **setting,
            "train_step_s_median": round(medians[name], 4),
            "train_step_s_all": [round(t, 4) for t in times[name]],
            "images_per_s": round(args.batch / medians[name], 2),
            # CPU seconds of this process per step: with other work on the machine, wall time
            # grows while this changes less (it still counts threads waiting for each other).
            "cpu_s_median": round(statistics.median(cpu_times[name]), 4),
        }
        print(json.dumps(record), flush=True)
    ratio = medians["p2net_r50"] / medians["simplebaseline_r50"]
    mac_ratio = count_flops(runners[0].model, input_size) / count_flops(runners[1].model, input_size)
    summary = {
        "comparison": "p2net_r50 / simplebaseline_r50 train-step time",
        **setting,
        "ratio": round(ratio, 3),
        "target_ratio_max": round(mac_ratio, 3),  # their multiply-add ratio
        "ratio_met": ratio <= mac_ratio,
        "load_before": load_before,
        "load_after": load_after,
        "cpu_count": os.cpu_count(),
    }
    if gpu:
        p2net_rate = args.batch / medians["p2net_r50"]
        summary.update(
            {
                "p2net_r50_images_per_s": round(p2net_rate, 1),
                "target_images_per_s": 1000,
                "rate_met": p2net_rate >= 1000,
            }
        )
    print(json.dumps(summary), flush=True)
    if args.profile:
        for runner in runners:
            print(json.dumps(profile_step(runner)), flush=True)


if __name__ == "__main__":
    main()
