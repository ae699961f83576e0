"""The known-answer suite: does a policy, searched or not, answer a shift whose answer is known?

For every shift of :data:`autopose.data.synth.KNOWN_SHIFTS` (the demo's combined one, and
rotation, darkness, zoom-out, blur, offset alone) and every seed, every policy kind of
:mod:`autopose.platform.known_answer` fine-tunes the same warm start under the demo's trial
budget, and is scored on the val split (pycocotools OKS AP, flip test on):

* the base model: trained once without augmentation on the train split (the same for every
  shift: only val and holdout are shifted), by the platform's own warm start
  (:func:`autopose.platform.warm_start.prepare_warm_start`, cached by content, an MLflow run
  in ``WORKDIR/mlflow.db``);
* none, AdaBN on none, the best of ``--randoms`` random policies (chosen on holdout),
  hand-crafted, RandAugment, TrivialAugment, the shift-matched policy, the search trial and
  its exported policy retrained; trained in this machine's processes (``--jobs`` at once, one
  thread each) by the engine's Trainer, the same loop a Tune trial runs.

Prints one JSON line per (shift, seed), one per shift with the summary, one ``overall``,
then the Markdown table on stderr. Every training's result is cached in
``WORKDIR/results`` (an interrupted run continues). ``--shifts`` and ``--seeds`` pick a part.

    .venv/bin/python benchmarks/search_quality.py [--shifts combined rotation] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from autopose.data.synth import KNOWN_SHIFTS, MATCHED_OPS
from autopose.platform.demo import (
    BUDGETS,
    demo_config,
    local_ray,
    prepare_proxies,
    prepare_synth,
    quiet_libraries,
)
from autopose.platform.known_answer import (
    exported_steps,
    markdown_table,
    matched_policy,
    search_found_shift,
    summarize,
)

RANDOMS = 3  # a search trial costs about 3–4 baseline trials (measured: ``search_cost`` below)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- one training, in a worker process ------------------------------------------------------------------
def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one policy from the warm start; val and holdout AP, CPU seconds, and for ``none``
    the AdaBN val AP, for ``search`` the learned op weights and the exported policy."""
    import torch

    from autopose.augment import SearchSpace
    from autopose.data import ProxyDataset
    from autopose.engine.adaptation import adapt_batchnorm
    from autopose.engine.inference import evaluate_proxy
    from autopose.engine.train import Trainer

    torch.set_num_threads(1)
    started = time.process_time()
    trainer = Trainer(job["data"], job["model"], job["train"], job["spec"], job["space"], device="cpu")
    history = trainer.run().history
    result: dict[str, Any] = {
        "val_ap": round(history[-1]["val_ap"], 4),
        "holdout_ap": round(history[-1].get("holdout_ap", 0.0), 4),
        "val_curve": [round(h["val_ap"], 4) for h in history],
    }
    if job["adabn"]:
        adapted = adapt_batchnorm(trainer.net, ProxyDataset(Path(job["data"].search_val)))
        scores = evaluate_proxy(
            adapted,
            trainer.val_set,
            trainer.codec,
            flip_pairs=trainer.flip_pairs,
            keypoint_names=trainer.keypoint_names,
        )
        result["adabn_val_ap"] = round(scores["AP"], 4)
    if job["spec"].kind == "search":
        space = SearchSpace.from_dict(job["space"])
        document = trainer.policy_document()
        result["policy"] = document
        result["op_prob"] = {k: round(v, 4) for k, v in trainer.augment.op_probabilities().items()}
        result["exported"] = [
            [op, round(p, 3), round(value, 3)] for op, p, value in exported_steps(document, space)
        ]
    result["cpu_s"] = round(time.process_time() - started, 1)
    return result


# -- the suite ------------------------------------------------------------------------------------------
def _jobs(config, seed: int, shift: str, randoms: int) -> dict[str, dict[str, Any]]:
    """Every training of one (shift, seed) but the exported policy's (it needs the search's)."""
    from autopose.engine.config import AugmentSpec

    train = dataclasses.replace(config.train, seed=seed, threads_per_worker=1)
    common = {"data": config.data, "model": config.model, "train": train, "space": config.space_dict}
    specs = {
        "none": AugmentSpec(kind="none", seed=seed),
        **{f"random-{i}": AugmentSpec(kind="random", seed=100 * seed + i) for i in range(randoms)},
        "handcrafted": AugmentSpec(kind="handcrafted", seed=seed),
        "randaugment": AugmentSpec(kind="randaugment", seed=seed),
        "trivialaugment": AugmentSpec(kind="trivialaugment", seed=seed),
        "matched": AugmentSpec(kind="policy", seed=seed, policy=matched_policy(shift)),
        "search": AugmentSpec(kind="search", seed=seed, bilevel=config.search.resolved()),
    }
    return {label: {**common, "spec": spec, "adabn": label == "none"} for label, spec in specs.items()}


def _cell(shift: str, seed: int, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    randoms = {k: v for k, v in results.items() if k.startswith("random-")}
    best_random = max(randoms, key=lambda k: randoms[k]["holdout_ap"])  # chosen on holdout
    search = results["search"]
    ap = {
        "none": results["none"]["val_ap"],
        "adabn": results["none"]["adabn_val_ap"],
        "random": randoms[best_random]["val_ap"],
        **{k: results[k]["val_ap"] for k in ("handcrafted", "randaugment", "trivialaugment", "matched")},
        "search": search["val_ap"],
        "exported": results["exported"]["val_ap"],
    }
    baseline_cpu = [results[k]["cpu_s"] for k in ("none", *randoms)]
    return {
        "shift": shift,
        "seed": seed,
        "ap": ap,
        "holdout_ap": {k: v["holdout_ap"] for k, v in results.items()},
        "random_chosen": best_random,
        "random_val_ap": {k: v["val_ap"] for k, v in randoms.items()},
        "op_prob": search["op_prob"],
        "exported": search["exported"],
        "found": search_found_shift(search["op_prob"], search["exported"], MATCHED_OPS[shift]),
        "search_cost": round(search["cpu_s"] / (sum(baseline_cpu) / len(baseline_cpu)), 2),
        "cpu_s": {k: v["cpu_s"] for k, v in results.items()},
    }


def run_suite(
    workdir: Path, shifts: list[str], seeds: list[int], randoms: int, jobs: int
) -> list[dict[str, Any]]:
    from autopose.platform.tracking import ensure_experiment
    from autopose.platform.warm_start import prepare_warm_start

    budget = BUDGETS["full"]
    configs = {}
    for shift in shifts:
        synth, _ = prepare_synth(workdir, budget, shift=shift)
        data, _ = prepare_proxies(workdir, budget, synth)
        configs[shift] = demo_config(workdir, budget, data, name=f"known-answer-{shift}")
    # One base model for every shift and seed: the train split is the same, so is its key.
    with quiet_libraries(), local_ray():
        for shift, config in configs.items():
            experiment_id = ensure_experiment(config.tracking_uri, config.experiment)
            configs[shift] = prepare_warm_start(config, experiment_id, config.experiment, say=_say)
    cache = workdir / "results"
    pending: dict[tuple[str, int, str], dict[str, Any]] = {}
    done: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    planned: dict[tuple[str, int], int] = {}  # trainings per cell, the exported policy's included
    for shift in shifts:
        for seed in seeds:
            done[(shift, seed)] = {}
            jobs_of_cell = _jobs(configs[shift], seed, shift, randoms)
            planned[(shift, seed)] = len(jobs_of_cell) + 1
            for label, job in jobs_of_cell.items():
                pending[(shift, seed, label)] = job

    def cached(key: tuple[str, int, str]) -> Path:
        return cache / key[0] / f"seed{key[1]}" / f"{key[2]}.json"

    cells = []
    # Seed by seed, shift by shift, so that an interrupted suite leaves whole cells; in each cell
    # the search first (the longest), and its exported policy as soon as the search is done.
    order = {shift: index for index, shift in enumerate(shifts)}
    queue = sorted(pending, key=lambda k: (k[1], order[k[0]], k[2] != "search", k[2]))

    def finish(key: tuple[str, int, str], result: dict[str, Any]) -> None:
        shift, seed, label = key
        done[(shift, seed)][label] = result
        if label == "search":  # now its exported policy can be retrained
            exported = dataclasses.replace(
                pending[key]["spec"], kind="policy", policy=result["policy"], bilevel=None
            )
            pending[(shift, seed, "exported")] = {**pending[key], "spec": exported, "adabn": False}
            queue.insert(0, (shift, seed, "exported"))
        if len(done[(shift, seed)]) == planned[(shift, seed)]:
            cell = _cell(shift, seed, done[(shift, seed)])
            cells.append(cell)
            print(json.dumps(cell), flush=True)

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running: dict[concurrent.futures.Future, tuple[str, int, str]] = {}
        while queue or running:
            while queue and len(running) < jobs:
                key = queue.pop(0)
                if cached(key).is_file():
                    finish(key, json.loads(cached(key).read_text()))
                else:
                    running[pool.submit(train_one, pending[key])] = key
            if not running:
                continue
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                result = future.result()
                cached(key).parent.mkdir(parents=True, exist_ok=True)
                cached(key).write_text(json.dumps(result))
                _say(f"{key[0]} seed {key[1]} {key[2]}: val AP {result['val_ap']} ({result['cpu_s']} CPU-s)")
                finish(key, result)
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shifts", nargs="+", default=list(KNOWN_SHIFTS), choices=list(KNOWN_SHIFTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--randoms", type=int, default=RANDOMS, help="random policies per cell (equal compute)"
    )
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/autopose-known-answer"))
    args = parser.parse_args()
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells = run_suite(workdir, args.shifts, args.seeds, args.randoms, args.jobs)
    summary = summarize(cells)
    for shift, row in summary.items():
        print(json.dumps({"summary": shift, **row}), flush=True)
    print(
        json.dumps(
            {
                "suite": True,
                "shifts": args.shifts,
                "seeds": args.seeds,
                "randoms": args.randoms,
                "wall_s": round(time.perf_counter() - started, 1),
                "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}",
            }
        ),
        flush=True,
    )
    _say(markdown_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
