"""The known-answer suite: does a policy, searched or not, answer a shift whose answer is known?

For every shift of :data:`autopose.data.synth.KNOWN_SHIFTS` (the demo's combined one, and
rotation, darkness, zoom-out, blur, offset alone) and every seed, every policy kind of
:mod:`autopose.platform.known_answer` fine-tunes the seed's warm start under the demo's trial
budget, and is scored on the val split (pycocotools OKS AP, flip test on):

* the base model: one per seed (``warm_start.seed`` = the seed, so that the spread over seeds
  holds the base's own), trained without augmentation on the train split (the same for every
  shift: only val and holdout are shifted), by the platform's own warm start
  (:func:`autopose.platform.warm_start.prepare_warm_start`, cached by content, an MLflow run
  in ``WORKDIR/mlflow.db``);
* none, AdaBN on none, the best of ``--randoms`` random policies (chosen on holdout),
  hand-crafted, RandAugment, TrivialAugment, the shift-matched policy, the search trial and
  its exported policy retrained; trained in this machine's processes (``--jobs`` at once, one
  thread each) by the engine's Trainer, the same loop a Tune trial runs. The kinds that never
  look at held-out data (none, random, hand-crafted, RandAugment, TrivialAugment) train the
  same weights for every shift, so each is trained once per seed and scored on every shift.

Prints one JSON line per (shift, seed), one per shift with the summary, one ``overall``,
then the Markdown table on stderr. Every training's result is cached in
``WORKDIR/results/<setting>`` (an interrupted run continues; ``<setting>`` hashes the base model's
key and the trials' model and budget, :func:`settings_key`, so that a changed default never
reads another setting's results). ``--shifts`` and ``--seeds`` pick a part.

    .venv/bin/python benchmarks/search_quality.py [--shifts combined rotation] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from autopose.data.synth import KNOWN_SHIFTS, MATCHED_OPS
from autopose.engine.config import load_yaml, to_plain
from autopose.errors import AutoposeError
from autopose.files import read_text
from autopose.platform.demo import BUDGETS, known_answer_configs
from autopose.platform.known_answer import (
    answering_share,
    exported_steps,
    markdown_table,
    matched_policy,
    paired_difference,
    search_found_shift,
    search_targets,
    summarize,
)
from autopose.platform.selection import CandidateScore, select

RANDOMS = 3  # a search trial costs about 3–4 baseline trials (measured: ``search_cost`` below)
TPE_TRIALS = 4  # the tpe method's candidates per cell (each a baseline trial's cost)
TPE_STARTUP = 2  # of which random before TPE models the results
PBA_POPULATION = 4  # the pba method's members per cell (each a baseline trial's cost)
# PBA as the platform runs it (autopose.platform.config.PbaConfig's defaults).
PBA_INTERVAL, PBA_QUANTILE, PBA_RESAMPLE = 1, 0.25, 0.2
# The selection stage's candidates (autopose.platform.selection): none is always one of them.
SELECTION = ("none", "handcrafted", "exported", "tpe", "pba")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- one training, in a worker process ------------------------------------------------------------------
def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one policy from the warm start and score it on every shift of ``job["shifts"]``
    (``{shift: (val proxy, holdout proxy)}``): val and holdout AP, for ``none`` also the AdaBN
    val AP, for ``search`` the learned op weights and the exported policy. ``train_cpu_s``
    counts the training alone (its own per-epoch val included), ``cpu_s`` the scoring too."""
    import torch

    from autopose.augment import SearchSpace
    from autopose.data import ProxyDataset
    from autopose.engine.adaptation import adapt_batchnorm
    from autopose.engine.proxy_scoring import evaluate_proxy
    from autopose.engine.train import Trainer

    torch.set_num_threads(1)
    started = time.process_time()
    trainer = Trainer(job["data"], job["model"], job["train"], job["spec"], job["space"], device="cpu")
    trainer.run()
    train_cpu = time.process_time() - started
    scores: dict[str, dict[str, float]] = {}
    for shift, (val_path, holdout_path) in job["shifts"].items():
        val, holdout = ProxyDataset(Path(val_path)), ProxyDataset(Path(holdout_path))
        scores[shift] = {
            "val_ap": round(trainer.proxy_scores(val)["AP"], 4),
            "holdout_ap": round(trainer.proxy_scores(holdout)["AP"], 4),
        }
        if job["adabn"]:
            adapted = adapt_batchnorm(trainer.net, holdout)
            adapted_scores = evaluate_proxy(
                adapted,
                val,
                trainer.codec,
                flip_pairs=trainer.flip_pairs,
                keypoint_names=trainer.keypoint_names,
            )
            scores[shift]["adabn_val_ap"] = round(adapted_scores["AP"], 4)
    result: dict[str, Any] = {"scores": scores}
    if job["spec"].kind == "search":
        space = SearchSpace.from_dict(job["space"])
        document = trainer.policy_document()
        result["policy"] = document
        result["op_prob"] = {k: round(v, 4) for k, v in trainer.augment.op_probabilities().items()}
        result["exported"] = [
            [op, round(p, 3), round(value, 3), round(share, 4)]
            for op, p, value, share in exported_steps(document, space)
        ]
    result["train_cpu_s"] = round(train_cpu, 1)
    result["cpu_s"] = round(time.process_time() - started, 1)
    return result


def train_pba(job: dict[str, Any]) -> dict[str, Any]:
    """The pba method on one cell, in this process: ``job["population"]`` random discrete policies
    (drawn from the platform's space, :func:`autopose.platform.tune.policy_param_space`) fine-tune
    epoch by epoch, scored on holdout after each; every ``PBA_INTERVAL`` epochs the bottom quarter
    takes a top member's training state and a perturbed copy of its policy
    (:func:`autopose.platform.tune.perturb_sampled`), as Tune's synchronous PBT does for the
    platform's pba trials. The result is the best member on holdout, with the schedule of policies
    it trained with; ``train_cpu_s`` counts the whole population."""
    import math
    import random
    import tempfile

    import torch

    from autopose.augment import SearchSpace
    from autopose.data import ProxyDataset
    from autopose.engine.train import Trainer
    from autopose.platform.tune import perturb_sampled, sampled_policy

    torch.set_num_threads(1)
    started = time.process_time()
    space = SearchSpace.from_dict(job["space"])
    rng = random.Random(job["spec"].seed)
    train = dataclasses.replace(job["train"], holdout_every_epoch=True)

    def member(point: dict[str, Any], state: Path | None = None) -> Any:
        spec = dataclasses.replace(job["spec"], kind="policy", policy=sampled_policy(point, space))
        trainer = Trainer(job["data"], job["model"], train, spec, job["space"], device="cpu")
        if state is not None:
            trainer.load(state)
        return trainer

    points = [
        {
            f"s{k}": {
                f"t{n}": {
                    "op": rng.choice(space.op_names),
                    "p": rng.randint(0, 10) / 10,
                    "m": rng.randint(0, 10),
                }
                for n in range(space.N)
            }
            for k in range(space.K)
        }
        for _ in range(job["population"])
    ]
    members = [member(point) for point in points]
    count = min(math.ceil(len(members) * PBA_QUANTILE), len(members) // 2)
    exploits = 0
    for epoch in range(train.epochs):
        holdout = []
        for trainer in members:
            trainer.run(epochs=1)
            holdout.append(trainer.history[-1]["holdout_ap"])
        if epoch + 1 < train.epochs and (epoch + 1) % PBA_INTERVAL == 0:
            ranked = sorted(range(len(members)), key=holdout.__getitem__)
            for loser in ranked[:count]:
                donor = rng.choice(ranked[-count:])
                points[loser] = perturb_sampled(points[donor], space.op_names, rng, PBA_RESAMPLE)
                with tempfile.TemporaryDirectory(prefix="autopose-pba-") as folder:
                    state = members[donor].save(Path(folder) / "donor.pt")
                    members[loser] = member(points[loser], state)
                exploits += 1
    best = max(members, key=lambda trainer: trainer.history[-1]["holdout_ap"])
    train_cpu = time.process_time() - started
    ((shift, (val_path, holdout_path)),) = job["shifts"].items()
    scores = {
        shift: {
            "val_ap": round(best.proxy_scores(ProxyDataset(Path(val_path)))["AP"], 4),
            "holdout_ap": round(best.proxy_scores(ProxyDataset(Path(holdout_path)))["AP"], 4),
        }
    }
    return {
        "scores": scores,
        "policy": best.policy_document(),
        "exploits": exploits,
        "train_cpu_s": round(train_cpu, 1),
        "cpu_s": round(time.process_time() - started, 1),
    }


# -- the suite ------------------------------------------------------------------------------------------
# Every shift shares the train split (only val and holdout are shifted), so a policy that does not
# look at held-out data trains the same weights for every shift: it is trained once per seed and
# scored on every shift's splits. The search (its upper level reads the holdout split), the matched
# policy and the exported one depend on the shift.
EVERY_SHIFT = "every-shift"
SHIFT_FREE = ("none", "handcrafted", "randaugment", "trivialaugment")


def _splits(config) -> tuple[str, str]:
    return (str(config.data.val), str(config.data.search_val))


def search_settings(overrides: list[str], base: dict[str, Any]) -> tuple[Any, str]:
    """The search's :class:`~autopose.engine.config.BilevelConfig`: ``base`` (the demo's ``search``
    section) with ``KEY=VALUE`` overrides (values read as YAML), and the
    label suffix its results are cached under: a hash of every setting, so that no two settings
    (a variant, or the demo's own after a change) ever read each other's results."""
    import yaml

    from autopose.engine.config import BilevelConfig, build_dataclass

    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AutoposeError(f"expected KEY=VALUE, got {item!r}", field="--search")
        changes[key] = yaml.safe_load(value)
    bilevel = build_dataclass(BilevelConfig, {**base, **changes}, field="--search").resolved()
    settings = json.dumps(to_plain(bilevel), sort_keys=True)
    return bilevel, "[" + hashlib.sha256(settings.encode()).hexdigest()[:12] + "]"


def settings_key(config: Any) -> str:
    """The cache folder's name for one setting of the suite: a hash of the base model's key (its
    data, model and budget) and of the trials' model and budget, so that a change of either
    (another default, a pinned value) trains afresh instead of reading results of another
    setting. Seeds and search settings are keyed per training (``_jobs``)."""
    from autopose.engine.config import to_plain
    from autopose.platform.warm_start import base_key

    train = {k: v for k, v in to_plain(config.train).items() if k not in ("seed", "init_from")}
    identity = {"base": base_key(config), "model": to_plain(config.model), "train": train}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def tpe_study(seed: int) -> Any:
    """The tpe method's Optuna study of one cell (TPE, seeded: a resumed suite proposes the same
    policies again from the cached results)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP)
    )


def tpe_ask(study: Any, space_dict: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The next policy TPE proposes: the same space as the platform's tpe method
    (:func:`autopose.platform.tune.policy_param_space`: each step's op, p in steps of 0.1, m 0–10)."""
    from autopose.augment import SearchSpace
    from autopose.platform.tune import sampled_policy

    space = SearchSpace.from_dict(space_dict)
    sampled: dict[str, Any] = {}
    trial = study.ask()
    for k in range(space.K):
        for n in range(space.N):
            key = f"s{k}/t{n}"
            sampled.setdefault(f"s{k}", {})[f"t{n}"] = {
                "op": trial.suggest_categorical(f"{key}/op", list(space.op_names)),
                "p": trial.suggest_float(f"{key}/p", 0.0, 1.0, step=0.1),
                "m": trial.suggest_int(f"{key}/m", 0, 10),
            }
    return trial, sampled_policy(sampled, space)


def _jobs(
    configs: dict[str, Any], seed: int, randoms: int, bilevel: Any, variant: str
) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Every training of one seed but the exported policies' (they need their search's), keyed
    ``(shift or EVERY_SHIFT, seed, label)``; the search's label is ``search`` + ``variant``."""
    from autopose.engine.config import AugmentSpec

    first = next(iter(configs.values()))
    train = dataclasses.replace(first.train, seed=seed, threads_per_worker=1)

    def job(config, spec: AugmentSpec, shifts: dict[str, tuple[str, str]]) -> dict[str, Any]:
        common = {"data": config.data, "model": config.model, "train": train, "space": config.space_dict}
        return {**common, "spec": spec, "shifts": shifts, "adabn": spec.kind == "none"}

    every = {shift: _splits(config) for shift, config in configs.items()}
    shared = {
        **{label: AugmentSpec(kind=label, seed=seed) for label in SHIFT_FREE},
        **{f"random-{i}": AugmentSpec(kind="random", seed=100 * seed + i) for i in range(randoms)},
    }
    jobs = {(EVERY_SHIFT, seed, label): job(first, spec, every) for label, spec in shared.items()}
    for shift, config in configs.items():
        own = {shift: _splits(config)}
        matched = AugmentSpec(kind="policy", seed=seed, policy=matched_policy(shift))
        search = AugmentSpec(kind="search", seed=seed, bilevel=bilevel)
        jobs[(shift, seed, "matched")] = job(config, matched, own)
        jobs[(shift, seed, f"search{variant}")] = job(config, search, own)
    return jobs


def _pba_jobs(pending: dict[tuple[str, int, str], dict[str, Any]], population: int) -> dict:
    """One pba job per cell (its population trains in one process), from the cell's matched job."""
    return {
        (shift, seed, f"pba{population}"): {**job, "population": population, "adabn": False}
        for (shift, seed, label), job in pending.items()
        if label == "matched"
    }


def _cell(shift: str, seed: int, results: dict[str, dict[str, Any]], variant: str) -> dict[str, Any]:
    """One (shift, seed) row from its trainings' results (``label -> result``)."""
    results = {label.removesuffix(variant): result for label, result in results.items()}
    scores = {label: result["scores"][shift] for label, result in results.items()}
    randoms = [k for k in results if k.startswith("random-")]
    best_random = max(randoms, key=lambda k: scores[k]["holdout_ap"])  # chosen on holdout
    search = results["search"]
    ap = {
        "none": scores["none"]["val_ap"],
        "adabn": scores["none"]["adabn_val_ap"],
        "random": scores[best_random]["val_ap"],
        **{k: scores[k]["val_ap"] for k in ("handcrafted", "randaugment", "trivialaugment", "matched")},
        "search": scores["search"]["val_ap"],
        "exported": scores["exported"]["val_ap"],
    }
    if "pba" in results:  # the pba method: its best member on holdout, reported on val
        ap["pba"] = scores["pba"]["val_ap"]
    proposals = [k for k in results if k.startswith("tpe-")]
    if proposals:  # the tpe method: its best proposal on holdout, reported on val
        best_tpe = max(proposals, key=lambda k: scores[k]["holdout_ap"])
        scores["tpe"] = scores[best_tpe]
        ap["tpe"] = scores[best_tpe]["val_ap"]
    # The selection stage: the candidate with the best holdout AP, reported on val. One seed per
    # cell, so each candidate's training is the one above (the platform would train it again).
    selection = select(
        CandidateScore(k, seed, scores[k]["holdout_ap"], scores[k]["val_ap"], run_id=k)
        for k in SELECTION
        if k in scores
    )
    selected = selection.winner.candidate
    ap["selected"] = scores[selected]["val_ap"]
    baseline_cpu = [results[k]["train_cpu_s"] for k in ("none", *randoms)]
    return {
        "shift": shift,
        "seed": seed,
        "search_settings": variant,
        "ap": ap,
        "holdout_ap": {k: v["holdout_ap"] for k, v in scores.items()},
        "random_chosen": best_random,
        "random_val_ap": {k: scores[k]["val_ap"] for k in randoms},
        "op_prob": search["op_prob"],
        "exported": search["exported"],
        "found": search_found_shift(search["op_prob"], search["exported"], MATCHED_OPS[shift]),
        "answering_share": round(answering_share(search["exported"], MATCHED_OPS[shift]), 4),
        "search_cost": round(search["train_cpu_s"] / (sum(baseline_cpu) / len(baseline_cpu)), 2),
        "selected": selected,
        "tpe_chosen": best_tpe if proposals else None,
        "pba_schedule": len(results["pba"]["policy"].get("schedule", [0])) if "pba" in results else None,
        "train_cpu_s": {k: v["train_cpu_s"] for k, v in results.items()},
    }


def run_suite(
    workdir: Path,
    shifts: list[str],
    seeds: list[int],
    randoms: int,
    jobs: int,
    search: list[str] = (),
    tpe: int = 0,
    pba: int = 0,
) -> list[dict[str, Any]]:
    """Every cell of ``shifts`` × ``seeds`` (see the module docstring); ``search``: ``KEY=VALUE``
    overrides of the search's settings (see :func:`search_settings`); ``tpe``: policies the tpe
    method proposes per cell, one after the other (each proposal reads the results before it);
    ``pba``: the pba method's population per cell (0: off)."""

    # Each seed starts from its own base model (warm_start.seed = the seed): two bases of the same
    # recipe differ by as much as the search's variants did (measured), so a suite on one base
    # would rank variants by that base's luck.
    configs_of = {seed: known_answer_configs(workdir, shifts, say=_say, base_seed=seed) for seed in seeds}
    configs = configs_of[seeds[0]]
    caches = {seed: workdir / "results" / settings_key(configs_of[seed][shifts[0]]) for seed in seeds}
    bilevel, variant = search_settings(list(search), to_plain(configs[shifts[0]].search))
    pending: dict[tuple[str, int, str], dict[str, Any]] = {}
    for seed in seeds:
        pending.update(_jobs(configs_of[seed], seed, randoms, bilevel, variant))
    if pba:
        pending.update(_pba_jobs(pending, pba))
    done: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}  # (group, seed) -> label -> result
    studies: dict[tuple[str, int], tuple[Any, list[Any]]] = {}  # cell -> (study, its asked trials)

    def ask_tpe(shift: str, seed: int) -> tuple[str, int, str]:
        """Queue the cell's next tpe proposal (as a policy training scored on its own shift)."""
        study, asked = studies.setdefault((shift, seed), (tpe_study(seed), []))
        trial, policy = tpe_ask(study, configs[shift].space_dict)
        asked.append(trial)
        key = (shift, seed, f"tpe-{len(asked) - 1}")
        template = pending[(shift, seed, "matched")]
        spec = dataclasses.replace(template["spec"], policy=policy)
        pending[key] = {**template, "spec": spec}
        return key

    planned = {seed: len([k for k in pending if k[1] == seed]) + len(shifts) * (1 + tpe) for seed in seeds}

    def cached(key: tuple[str, int, str]) -> dict[str, Any] | None:
        path = caches[key[1]] / key[0] / f"seed{key[1]}" / f"{key[2]}.json"
        if not path.is_file():
            return None
        result = json.loads(path.read_text())
        # a shared training scored on fewer shifts than this run asks for is trained again
        return result if set(pending[key]["shifts"]) <= set(result.get("scores", {})) else None

    def store(key: tuple[str, int, str], result: dict[str, Any]) -> None:
        path = caches[key[1]] / key[0] / f"seed{key[1]}" / f"{key[2]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))

    cells = []
    # Seed by seed, so that an interrupted suite leaves whole seeds; the searches first (the
    # longest), each exported policy as soon as its search is done.
    order = {shift: index for index, shift in enumerate(shifts)}
    searches = f"search{variant}"
    queue = sorted(pending, key=lambda k: (k[1], k[2] != searches, order.get(k[0], -1), k[2]))
    if tpe:
        queue += [ask_tpe(shift, seed) for seed in seeds for shift in shifts]

    def finish(key: tuple[str, int, str], result: dict[str, Any]) -> None:
        group, seed, label = key
        done.setdefault((group, seed), {})[label] = result
        if label == searches:  # now its exported policy can be retrained
            exported = dataclasses.replace(
                pending[key]["spec"], kind="policy", policy=result["policy"], bilevel=None
            )
            pending[(group, seed, f"exported{variant}")] = {**pending[key], "spec": exported, "adabn": False}
            queue.insert(0, (group, seed, f"exported{variant}"))
        if label.startswith("tpe-"):  # TPE reads the result, then proposes the cell's next policy
            study, asked = studies[(group, seed)]
            study.tell(asked[int(label.removeprefix("tpe-"))], result["scores"][group]["holdout_ap"])
            if len(asked) < tpe:
                queue.insert(0, ask_tpe(group, seed))
        if sum(len(done.get((g, seed), {})) for g in (EVERY_SHIFT, *shifts)) == planned[seed]:
            for shift in shifts:
                results = {**done[(EVERY_SHIFT, seed)], **done[(shift, seed)]}
                if pba:
                    results["pba"] = results.pop(f"pba{pba}")
                cell = _cell(shift, seed, results, variant)
                cells.append(cell)
                print(json.dumps(cell), flush=True)

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running: dict[concurrent.futures.Future, tuple[str, int, str]] = {}
        while queue or running:
            while queue and len(running) < jobs:
                key = queue.pop(0)
                result = cached(key)
                if result is not None:
                    finish(key, result)
                else:
                    work = train_pba if "population" in pending[key] else train_one
                    running[pool.submit(work, pending[key])] = key
            if not running:
                continue
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                key = running.pop(future)
                result = future.result()
                store(key, result)
                val = ", ".join(f"{s} {v['val_ap']}" for s, v in result["scores"].items())
                _say(f"seed {key[1]} {key[2]} ({key[0]}): val AP {val} ({result['cpu_s']} CPU-s)")
                finish(key, result)
    return cells


def read_cells(path: Path) -> list[dict[str, Any]]:
    """The per-cell lines of a suite's output (JSON lines; the summary lines are skipped); a
    file that is missing, not JSON lines, or without a cell is one :class:`AutoposeError`."""
    cells = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise AutoposeError(f"line {number} is not JSON ({error.msg})", path=path) from None
        if isinstance(record, dict) and {"shift", "seed", "ap"} <= set(record):
            cells.append(record)
    if not cells:
        raise AutoposeError("holds no cell of the known-answer suite", path=path)
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shifts", nargs="+", default=list(KNOWN_SHIFTS), choices=list(KNOWN_SHIFTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--randoms", type=int, default=RANDOMS, help="random policies per cell (equal compute)"
    )
    parser.add_argument(
        "--search",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override the search's settings (a variant: cached apart from the others)",
    )
    parser.add_argument(
        "--tpe", type=int, default=TPE_TRIALS, help="policies the tpe method proposes per cell (0: off)"
    )
    parser.add_argument(
        "--pba", type=int, default=PBA_POPULATION, help="the pba method's population per cell (0: off)"
    )
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/autopose-known-answer"))
    parser.add_argument(
        "--against",
        type=Path,
        metavar="JSONL",
        help="another variant's output on the same bases: print the exported policy's paired difference",
    )
    args = parser.parse_args()
    try:
        # a bad override is one line, before anything runs (checked against the demo's settings)
        search_settings(args.search, load_yaml(BUDGETS["full"].experiment)["search"])
        against = read_cells(args.against) if args.against else None
    except AutoposeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    workdir = args.workdir.absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells = run_suite(
        workdir, args.shifts, args.seeds, args.randoms, args.jobs, args.search, args.tpe, args.pba
    )
    summary = summarize(cells)
    for shift, row in summary.items():
        print(json.dumps({"summary": shift, **row}), flush=True)
    print(json.dumps({"targets": "search quality, step 2", **search_targets(cells)}), flush=True)
    if against is not None:
        try:
            paired = paired_difference(cells, against)
        except ValueError as error:
            print(f"error: --against {args.against}: {error}", file=sys.stderr)
            return 2
        print(json.dumps({"paired_against": str(args.against), **paired}), flush=True)
    print(
        json.dumps(
            {
                "suite": True,
                "shifts": args.shifts,
                "seeds": args.seeds,
                "randoms": args.randoms,
                "search": args.search,
                "tpe": args.tpe,
                "pba": args.pba,
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
