"""Does the search find the shift? The demo's data and budget, searched with several seeds.

The demo's val split differs from train by a known shift (figures turned up to ±45°
and darker: ``DEMO_SHIFT``). For each seed this runs the demo's search (one
differentiable-search trial beside random ×2, hand-crafted and none, every trial
seeded from the seed) on local Ray and prints one JSON line:

* ``ap``: val AP of every trial; ``rank``: the search trial's place among them
  (1 = best); ``beats_none`` / ``beats_random`` (both random policies);
* ``op_prob`` / ``op_m`` / ``op_value``: the searched policy's op probabilities,
  normalized magnitudes and magnitudes in the op's units at the end of the search;
  ``shift_weight``: the probability on the ops that match the shift (Rotate,
  Brightness) against ``uniform_shift_weight``, what a policy that learned nothing has;
* ``brightness_darkens``: Brightness' factor went below 1 (the val split is darker);
* ``exported``: the final discrete policy, ``[op, p, value in the op's units]`` per
  sub-policy step; ``rotates_both_ways``: sub-policies rotate by 10° or more each way
  (the val split is turned both ways);
* the cost: CPU-seconds held by the search trial and by the baselines (wall × CPUs held,
  MLflow's ``cost_cpu_s``), and the search's wall seconds (first trial start to last end);
* retrained policies, each trained in this process from scratch with the trials' budget and
  seed (``--no-retrain`` skips them): ``exported_ap``, the searched policy as it is exported
  (what ``promote`` trains: the search-then-retrain protocol of AutoAugment-style searches),
  with ``exported_rank`` among the trials' and ``exported_beats_none`` / ``exported_beats_random``;
  ``matched_ap``, a hand-written policy that matches the shift (:data:`SHIFT_MATCHED`: rotate
  ±30°, darken to 0.6), which tells how much a policy can gain at this budget at all.

A final ``summary`` line aggregates the seeds. Finished searches are reused (the
MLflow store in ``--workdir`` keeps them), so an interrupted run continues.

    .venv/bin/python benchmarks/search_quality.py [--seeds 0 1 2] [--workdir /tmp/autopose-search-quality]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from autopose.platform.demo import (
    BUDGETS,
    SHIFT_OPS,
    demo_config,
    local_ray,
    prepare_proxies,
    prepare_synth,
    quiet_libraries,
    run_demo_search,
)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# Rotate's range is −45…45° and Brightness' 0.1…1.9 in the demo's space (m 0–10 maps linearly).
SHIFT_MATCHED = {
    "format": "autopose.policy/1",
    "space": "demo",
    "sub_policies": [
        [{"op": "Rotate", "p": 0.9, "m": 1.667}],  # −30°
        [{"op": "Rotate", "p": 0.9, "m": 8.333}],  # +30°
        [{"op": "Brightness", "p": 0.9, "m": 2.778}],  # × 0.6
        [{"op": "Brightness", "p": 0.9, "m": 2.778}],
    ],
}


def retrained_ap(workdir: Path, config, seed: int, policy: dict, name: str) -> float:
    """Val AP of ``policy`` trained under the search's budget (cached in ``workdir``)."""
    import dataclasses

    from autopose.engine.config import AugmentSpec
    from autopose.engine.train import Trainer

    cache = workdir / f"{name}-seed{seed}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("policy") == policy:
            return saved["val_ap"]
    train = dataclasses.replace(config.train, threads_per_worker=1)
    spec = AugmentSpec(kind="policy", seed=seed, policy=policy)
    result = Trainer(config.data, config.model, train, spec, config.space_dict, device="cpu").run()
    val_ap = round(result.history[-1]["val_ap"], 4)
    cache.write_text(json.dumps({"val_ap": val_ap, "policy": policy}))
    return val_ap


def measure_seed(workdir: Path, data, seed: int, retrain: bool = True) -> dict:
    from autopose.augment import SearchSpace
    from autopose.platform.compare import collect
    from autopose.platform.tracking import POLICY_ARTIFACT, client, download_artifact

    budget = BUDGETS["full"]
    config = demo_config(
        workdir,
        budget,
        data,
        name=f"search-quality-seed{seed}",
        seed=seed,
        random_seeds=(2 * seed, 2 * seed + 1),
    )
    how, _ = run_demo_search(config, _say)
    _, rows = collect(config.tracking_uri, config.experiment, search=config.experiment)
    # The search's wall time from its runs (first start to last end): also right for a reused search.
    infos = [client(config.tracking_uri).get_run(r.run_id).info for r in rows]
    wall = (max(i.end_time or i.start_time for i in infos) - min(i.start_time for i in infos)) / 1000
    search = next(r for r in rows if r.kind == "search")
    metrics = client(config.tracking_uri).get_run(search.run_id).data.metrics
    space = SearchSpace.from_dict(config.space_dict)
    op_prob = {
        k.split("/", 1)[1]: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("op_prob/")
    }
    op_m = {k.split("/", 1)[1]: round(v, 3) for k, v in sorted(metrics.items()) if k.startswith("op_m/")}
    op_value = {op: round(space.value(op, m), 3) for op, m in op_m.items() if op in space.op_names}
    with tempfile.TemporaryDirectory() as folder:
        document = json.loads(
            download_artifact(config.tracking_uri, search.run_id, POLICY_ARTIFACT, folder).read_text()
        )
    # The exported policy, sub-policy by sub-policy: op_m above averages the sub-policies, so two
    # that rotate in opposite directions cancel there.
    exported = [
        [step["op"], round(step["p"], 3), round(space.value(step["op"], step["m"]), 3)]
        for steps in document["sub_policies"]
        for step in steps
    ]
    rotations = [value for op, _, value in exported if op == "Rotate"]
    ranked = sorted(rows, key=lambda r: -(r.val_ap or 0.0))
    randoms = [r.val_ap or 0.0 for r in rows if r.kind == "random"]
    none = next(r.val_ap or 0.0 for r in rows if r.kind == "none")
    search_ap = search.val_ap or 0.0
    result = {
        "seed": seed,
        "search": config.experiment,
        "ap": {f"{r.kind}-{r.seed}": round(r.val_ap or 0.0, 4) for r in rows},
        "rank": 1 + sum(1 for r in ranked if (r.val_ap or 0.0) > search_ap),
        "trials": len(rows),
        "beats_none": search_ap > none,
        "beats_random": all(search_ap > ap for ap in randoms),
        "op_prob": op_prob,
        "op_m": op_m,
        "op_value": op_value,
        "shift_weight": round(sum(op_prob.get(op, 0.0) for op in SHIFT_OPS), 4),
        "uniform_shift_weight": round(
            len([op for op in SHIFT_OPS if op in op_prob]) / max(len(op_prob), 1), 4
        ),
        "brightness_darkens": op_value.get("Brightness", 1.0) < 1.0,
        "exported": exported,
        "rotate_sub_policies_deg": rotations,
        "rotates_both_ways": any(v <= -10 for v in rotations) and any(v >= 10 for v in rotations),
        "search_cpu_s": round(search.cost_cpu_s or 0.0, 1),
        "baselines_cpu_s": round(sum(r.cost_cpu_s or 0.0 for r in rows if r.kind != "search"), 1),
        "wall_s": round(wall, 1),
        "reused": how == "reused",
    }
    if retrain:
        exported_ap = retrained_ap(workdir, config, seed, document, "exported")
        result.update(
            exported_ap=exported_ap,
            exported_rank=1 + sum(1 for r in rows if (r.val_ap or 0.0) > exported_ap),
            exported_beats_none=exported_ap > none,
            exported_beats_random=all(exported_ap > ap for ap in randoms),
            matched_ap=retrained_ap(workdir, config, seed, SHIFT_MATCHED, "matched"),
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/autopose-search-quality"))
    parser.add_argument(
        "--no-retrain", dest="retrain", action="store_false", help="skip the retrained policies"
    )
    args = parser.parse_args()
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    budget = BUDGETS["full"]
    synth, _ = prepare_synth(workdir, budget)
    data, _ = prepare_proxies(workdir, budget, synth)
    results = []
    with quiet_libraries(), local_ray():  # stdout stays JSON lines; progress goes to stderr
        for seed in args.seeds:
            result = measure_seed(workdir, data, seed, args.retrain)
            results.append(result)
            print(json.dumps(result), flush=True)
    kinds = sorted({key.rsplit("-", 1)[0] for r in results for key in r["ap"]})
    summary = {
        "summary": True,
        "seeds": [r["seed"] for r in results],
        "mean_ap": {
            kind: round(
                statistics.mean(
                    v for r in results for k, v in r["ap"].items() if k.rsplit("-", 1)[0] == kind
                ),
                4,
            )
            for kind in kinds
        },
        **(
            {
                "mean_exported_ap": round(statistics.mean(r["exported_ap"] for r in results), 4),
                "exported_beats_none": sum(r["exported_beats_none"] for r in results),
                "exported_beats_random": sum(r["exported_beats_random"] for r in results),
                "mean_exported_rank": round(statistics.mean(r["exported_rank"] for r in results), 2),
                "mean_matched_ap": round(statistics.mean(r["matched_ap"] for r in results), 4),
            }
            if args.retrain and results
            else {}
        ),
        "search_beats_none": sum(r["beats_none"] for r in results),
        "search_beats_random": sum(r["beats_random"] for r in results),
        "mean_rank": round(statistics.mean(r["rank"] for r in results), 2),
        "mean_shift_weight": round(statistics.mean(r["shift_weight"] for r in results), 4),
        "uniform_shift_weight": results[0]["uniform_shift_weight"] if results else None,
        "brightness_darkens": sum(r["brightness_darkens"] for r in results),
        "rotates_both_ways": sum(r["rotates_both_ways"] for r in results),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.machine()}",
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
