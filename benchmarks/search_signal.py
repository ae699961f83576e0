"""How much signal each path of the search's hypergradient carries, per shift of the suite.

At the known-answer suite's warm start (the base model every trial fine-tunes), for each shift of
:data:`autopose.data.synth.KNOWN_SHIFTS`: ``--batches`` training batches (the search trial's own,
seed 0) each with its validation batch from the holdout split, and for each the two terms the
search can step the policy with, at the same random draws:

* ``eq8``: the paper's Eq. 8, the one-step unrolled hypergradient
  (:meth:`autopose.engine.search.BilevelSearch.hypergradient` with ``batchnorm_path = 0``);
* ``bn``: the BatchNorm-statistics term alone
  (:meth:`~autopose.engine.search.BilevelSearch.batchnorm_path_gradient`);
* ``pose``: the pose-geometry term alone
  (:meth:`~autopose.engine.search.BilevelSearch.pose_path_gradient`);
* ``score``: the score-function estimate on the hard draws
  (:meth:`~autopose.engine.search.BilevelSearch.influence_gradient`; hard sampling only): each
  sample's alignment with the val gradient credits the op, gate and direction it was drawn with.

Per op (summed over sub-policies and steps) it prints the t statistic of the descent direction
over the batches, ``−mean / (sd / √batches)``, for the op's weight (``op_logits``: positive, the
op gains weight), its direction (``sign_logits``) and its magnitude; and each term's mean
absolute size on the op weights. An op whose t stays within ±2 has no signal there: a search
step follows noise on it. The weights do not move (no step is taken).

Prints one JSON object per shift; the Markdown table on stderr. The warm start and the proxies
come from ``--workdir`` (the suite's, built on first use as the suite builds them)::

    .venv/bin/python benchmarks/search_signal.py [--workdir DIR] [--batches 24] [--search sampling=relaxed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import yaml

from autopose.data.synth import KNOWN_SHIFTS, MATCHED_OPS
from autopose.engine.config import AugmentSpec, BilevelConfig, build_dataclass, to_plain
from autopose.engine.train import Trainer
from autopose.platform.demo import known_answer_configs

PARAMETERS = ("op_logits", "sign_logits", "magnitude_logits")


def t_statistics(samples: list[torch.Tensor]) -> list[float]:
    """``−mean / (sd / √n)`` per entry of ``n`` equally shaped samples (the descent direction)."""
    stacked = torch.stack(samples).double()
    spread = stacked.std(dim=0) / len(samples) ** 0.5
    return [round(float(v), 2) for v in -stacked.mean(dim=0) / spread.clamp_min(1e-30)]


def probe(config, bilevel: BilevelConfig, batches: int) -> dict:
    """The two terms' t statistics per op on ``batches`` of the shift's search trial (seed 0)."""
    train = dataclasses.replace(config.train, seed=0)
    trainer = Trainer(
        config.data,
        config.model,
        train,
        AugmentSpec(kind="search", seed=0, bilevel=bilevel),
        config.space_dict,
    )
    search, policy = trainer.search, trainer.augment
    names = [name for name, _ in policy.named_parameters()]
    terms: dict[str, list[dict[str, torch.Tensor]]] = {"eq8": [], "bn": [], "pose": []}
    if policy.hard:
        terms["score"], terms["score_cv"] = [], []
    weight = search.batchnorm_path
    batch_iterator = iter(trainer._epoch_batches())
    for index in range(batches):
        batch = trainer._batch(next(batch_iterator))
        trainer.step = index * trainer.policy_every  # the validation batch of this search step
        val = trainer._search_val_batch()
        noise = policy.sample_noise(batch[0].shape[0])
        search.batchnorm_path = 0.0
        eq8 = dict(zip(names, search.hypergradient(batch, val, noise), strict=True))
        search.batchnorm_path = weight
        bn = dict(zip(names, search.batchnorm_path_gradient(batch, val, noise), strict=True))
        pose = dict(zip(names, search.pose_path_gradient(batch, val, noise), strict=True))
        found = {"eq8": eq8, "bn": bn, "pose": pose}
        if policy.hard:
            found["score"] = dict(zip(names, search.influence_gradient(batch, val, noise), strict=True))
            controlled = search.influence_gradient(batch, val, noise, plain_control=True)
            found["score_cv"] = dict(zip(names, controlled, strict=True))
        for key, grads in found.items():
            terms[key].append({name: grads[name].sum(dim=(0, 1)) for name in PARAMETERS})
    result = {"ops": list(policy.space.op_names), "batches": batches}
    for key, samples in terms.items():
        for name in PARAMETERS:
            result[f"{key}/{name}"] = t_statistics([s[name] for s in samples])
        size = torch.stack([s["op_logits"] for s in samples]).abs().mean()
        result[f"{key}/op_weight_size"] = float(f"{float(size):.3g}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/autopose-known-answer"),  # the suite's default
        help="the suite's folder (data, base model)",
    )
    parser.add_argument("--shifts", nargs="+", default=list(KNOWN_SHIFTS), choices=list(KNOWN_SHIFTS))
    parser.add_argument("--batches", type=int, default=24, help="batches per shift")
    parser.add_argument("--search", nargs="*", default=[], metavar="KEY=VALUE", help="search settings")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = known_answer_configs(args.workdir, args.shifts)
    changes = {}
    for item in args.search:
        key, _, value = item.partition("=")
        changes[key] = yaml.safe_load(value)
    base = to_plain(next(iter(configs.values())).search)
    bilevel = build_dataclass(BilevelConfig, {**base, **changes}, field="--search").resolved()
    rows = []
    for shift, config in configs.items():
        row = {"shift": shift, "matched": list(MATCHED_OPS[shift]), **probe(config, bilevel, args.batches)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    ops = rows[0]["ops"]
    print("| shift | term | " + " | ".join(ops) + " |", file=sys.stderr)
    print("| --- | --- | " + " | ".join("---" for _ in ops) + " |", file=sys.stderr)
    for row in rows:
        for key in ("eq8", "bn", "pose", "score", "score_cv"):
            if f"{key}/op_logits" not in row:
                continue
            cells = " | ".join(f"{v:+.1f}" for v in row[f"{key}/op_logits"])
            print(f"| {row['shift']} | {key} weight | {cells} |", file=sys.stderr)


if __name__ == "__main__":
    main()
