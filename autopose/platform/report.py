"""The demo's report: one HTML page with PNGs beside it, all read back from MLflow.

What it shows:

* val AP by policy kind, every seed a dot (``ap_by_kind.png``), and val AP per
  epoch of every trial (``val_ap_curves.png``);
* the learned op probabilities and magnitudes of each search trial, epoch by
  epoch (``search_ops.png``, from the ``op_prob/*`` and ``op_m/*`` metrics);
* each searched policy (and the promoted one) applied to real COCO crops
  (``policy_<kind>-<seed>.png``);
* the search's cost: CPU-seconds and wall time per trial, the stages' wall times;
* the promoted run's full training and its evaluation.

Every PNG is written atomically (temporary file, then rename); the page last.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autopose.files import atomic_write, save_figure
from autopose.platform.compare import collect, method_rows, plot, read_selection
from autopose.platform.config import ExperimentConfig
from autopose.platform.pictures import render_policy_examples
from autopose.platform.selection import Selection, format_gain
from autopose.platform.tracking import (
    POLICY_ARTIFACT,
    SEARCH_KINDS,
    TAG_CANDIDATE,
    TAG_KIND,
    TAG_PARENT,
    TAG_PROMOTED,
    TAG_SEED,
    client,
    download_artifact,
    mlflow_ui_command,
)


# -- data read back from MLflow ---------------------------------------------------------------------------
def metric_series(tracking_uri: str, run_id: str, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """``name → [(step, value), …]`` of every metric of ``run_id`` whose key starts with
    ``prefix`` (``op_prob/``: one series per op), sorted by step."""
    mlflow_client = client(tracking_uri)
    keys = sorted(k for k in mlflow_client.get_run(run_id).data.metrics if k.startswith(prefix))
    return {key[len(prefix) :]: _by_step(mlflow_client.get_metric_history(run_id, key)) for key in keys}


def _by_step(history: Sequence[Any]) -> list[tuple[int, float]]:
    """``[(step, value), …]`` of a metric's history, by step; a retried epoch logs its step
    again: the latest value is kept."""
    latest: dict[int, tuple[int, float]] = {}
    for point in history:
        if point.step not in latest or point.timestamp >= latest[point.step][0]:
            latest[point.step] = (point.timestamp, point.value)
    return [(step, latest[step][1]) for step in sorted(latest)]


def _save(figure, out: Path) -> Path:
    return save_figure(figure, out, dpi=120)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _epoch_axis(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch (from 0, as MLflow's steps)")


# -- pictures ----------------------------------------------------------------------------------------------
# One colour per trial kind (a kind missing here is drawn black).
KIND_COLOURS = {
    "search": "#d62728",
    "tpe": "#ff7f0e",
    "pba": "#bcbd22",
    "random": "#7f7f7f",
    "handcrafted": "#2ca02c",
    "none": "#1f77b4",
    "randaugment": "#9467bd",
    "trivialaugment": "#8c564b",
    "policy": "#e377c2",
}


# More trials than this (a large search): the curves of the best CURVES_PER_KIND trials of each
# kind, one legend entry per kind; the cost per kind instead of per trial.
MANY_TRIALS, CURVES_PER_KIND = 16, 5


def _best_of_each_kind(runs: Sequence[Any], count: int) -> list[Any]:
    """The ``count`` runs of highest val AP of each kind, in the order given."""
    by_kind: dict[str, list[Any]] = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get(TAG_KIND), []).append(run)
    kept = {
        id(run)
        for group in by_kind.values()
        for run in sorted(group, key=lambda r: -r.data.metrics.get("val_ap", -math.inf))[:count]
    }
    return [run for run in runs if id(run) in kept]


def plot_val_curves(runs: Sequence[Any], tracking_uri: str, out: Path) -> Path:
    """val AP per epoch, one line per trial (colour by kind, line style by seed); past
    :data:`MANY_TRIALS` trials, the best :data:`CURVES_PER_KIND` of each kind (one history read
    per curve: a thousand would take minutes through a tracking server, and hide each other)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    styles = ("-", "--", ":", "-.")
    many = len(runs) > MANY_TRIALS
    title = "val AP per epoch, every trial"
    if many:
        title = f"val AP per epoch, the best {CURVES_PER_KIND} trials of each kind ({len(runs)} in all)"
        runs = _best_of_each_kind(runs, CURVES_PER_KIND)
    mlflow_client = client(tracking_uri)
    labelled: set[str] = set()
    for run in runs:
        kind, seed = run.data.tags.get(TAG_KIND), run.data.tags.get(TAG_SEED, "0")
        points = _by_step(mlflow_client.get_metric_history(run.info.run_id, "val_ap"))
        if points:
            label = f"{kind}-{seed}" if not many else (kind if kind not in labelled else None)
            labelled.add(kind)
            axis.plot(
                [s for s, _ in points],
                [v for _, v in points],
                marker=None if many else "o",
                markersize=3,
                linewidth=0.6 if many else 1.5,
                alpha=0.5 if many else 1.0,
                color=KIND_COLOURS.get(kind, "black"),
                linestyle="-" if many else styles[int(seed) % len(styles)],
                label=label,
            )
    _epoch_axis(axis)
    axis.set_ylabel("val OKS AP")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return _save(figure, out)


def plot_search_ops(
    search_runs: Sequence[Any],
    tracking_uri: str,
    out: Path,
    value_of: dict[str, Any],
    shift_ops: Sequence[str],
) -> Path:
    """Per search trial: the op probabilities (top) and normalized magnitudes (bottom) after
    every epoch; the legend gives each op's last magnitude in its own units. Ops that match
    the val shift are drawn with solid lines."""
    plt = _pyplot()
    count = max(len(search_runs), 1)
    figure, axes = plt.subplots(2, count, figsize=(5.6 * count, 6.6), squeeze=False)
    for column, run in enumerate(search_runs):
        seed = run.data.tags.get(TAG_SEED, "0")
        probabilities = metric_series(tracking_uri, run.info.run_id, "op_prob/")
        magnitudes = metric_series(tracking_uri, run.info.run_id, "op_m/")
        top, bottom = axes[0][column], axes[1][column]
        for op, points in probabilities.items():
            style = "-" if op in shift_ops else ":"
            top.plot(
                [s for s, _ in points], [v for _, v in points], style, marker="o", markersize=3, label=op
            )
        for op, points in magnitudes.items():
            convert = value_of.get(op)
            if convert is None or not points:
                continue
            style = "-" if op in shift_ops else ":"
            label = f"{op} (last: {convert(points[-1][1]):.3g})"
            bottom.plot(
                [s for s, _ in points],
                [v for _, v in points],
                style,
                marker="o",
                markersize=3,
                label=label,
            )
        top.set_title(f"search-{seed}: op probability (sums to 1)", fontsize=9)
        top.set_ylabel("probability")
        bottom.set_title(
            f"search-{seed}: magnitude m (0–10), mean over sub-policies; legend: in the op's units",
            fontsize=8,
        )
        bottom.set_ylabel("m")
        bottom.axhline(5.0, color="black", linewidth=0.6, alpha=0.5)
        for axis in (top, bottom):
            _epoch_axis(axis)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7, ncol=2)
    figure.suptitle("learned policy over the search (solid: ops that match the val shift)", fontsize=10)
    figure.tight_layout()
    return _save(figure, out)


def plot_cost(rows: Sequence[Any], walls: dict[str, float], out: Path) -> Path:
    """CPU-seconds held by every trial, and its wall seconds where they differ (a trial holding
    one CPU costs its wall time: one bar says it); past :data:`MANY_TRIALS` trials, by kind."""
    plt = _pyplot()
    labels = [r.label for r in rows]
    cpu = [r.cost_cpu_s or 0.0 for r in rows]
    wall = [walls.get(r.run_id, 0.0) for r in rows]
    title = "cost per trial"
    if len(rows) > MANY_TRIALS:  # one bar per kind: the sums, and how many trials each holds
        kinds = list(dict.fromkeys(r.kind for r in rows))
        labels = [f"{kind} ({sum(r.kind == kind for r in rows)})" for kind in kinds]
        cpu = [sum(c for r, c in zip(rows, cpu, strict=True) if r.kind == kind) for kind in kinds]
        wall = [sum(w for r, w in zip(rows, wall, strict=True) if r.kind == kind) for kind in kinds]
        title = f"cost per kind ({len(rows)} trials)"
    figure, axis = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 2), 3.4))
    positions = range(len(labels))
    if all(abs(c - w) <= 0.01 * max(w, 1.0) for c, w in zip(cpu, wall, strict=True)):
        axis.bar(
            list(positions), cpu, width=0.6, label="CPU-seconds held (= wall seconds: 1 CPU)", color="#6baed6"
        )
    else:
        axis.bar([p - 0.2 for p in positions], cpu, width=0.4, label="CPU-seconds held", color="#6baed6")
        axis.bar([p + 0.2 for p in positions], wall, width=0.4, label="wall seconds", color="#fd8d3c")
    axis.set_xticks(list(positions), labels, rotation=30, fontsize=8)
    axis.set_ylabel("seconds")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _save(figure, out)


def example_augment(
    document: dict[str, Any], kind: str | None, seed: int, space: Any, flip_pairs: Sequence[Sequence[int]]
) -> Any:
    """What a run's examples picture applies: its policy document as a :class:`Policy` when it is
    one (``autopose.policy/1`` or ``/2``, seeded with the run's seed), else the baseline its kind
    names (``space``: the :class:`~autopose.augment.SearchSpace`); a schedule's last policy."""
    from autopose.augment import Handcrafted, no_policy, random_policy
    from autopose.augment.schedule import DOCUMENT_FORMATS, PolicySchedule, policy_from_document

    if document.get("format") in DOCUMENT_FORMATS:
        policy = policy_from_document(document, space=space, seed=seed)
        return policy.final_policy if isinstance(policy, PolicySchedule) else policy
    if kind == "handcrafted":
        return Handcrafted(flip_pairs=tuple(tuple(pair) for pair in flip_pairs), seed=seed)
    if kind == "random":
        return random_policy(space, seed)
    return no_policy()


def policy_pictures(
    runs: Sequence[Any], tracking_uri: str, space: dict[str, Any], coco_proxy: Path, folder: Path, count: int
) -> list[tuple[str, Path, dict[str, Any]]]:
    """Each run's policy applied to real COCO crops: ``[(label, png, policy document)]``."""
    import torch

    from autopose.augment import SearchSpace
    from autopose.data import ProxyDataset

    crops = ProxyDataset(coco_proxy)
    labelled = [i for i in range(len(crops)) if float(crops[i]["visibility"].sum()) > 0]
    rows = [crops[i] for i in labelled[:count]]
    search_space = SearchSpace.from_dict(space)
    pictures = []
    with tempfile.TemporaryDirectory(prefix="autopose-report-") as scratch:
        for run in runs:
            kind, seed = run.data.tags.get(TAG_KIND), int(run.data.tags.get(TAG_SEED, 0))
            label = f"{kind}-{seed}"
            document = json.loads(
                download_artifact(tracking_uri, run.info.run_id, POLICY_ARTIFACT, scratch).read_text()
            )
            augment = example_augment(document, kind, seed, search_space, crops.metadata.flip_pairs)
            with torch.no_grad():
                png = render_policy_examples(
                    augment,
                    rows,
                    folder / f"policy_{label}.png",
                    title=f"{label} on real COCO crops (row 1: as they are; rows 2–3: two draws)",
                    skeleton=crops.metadata.skeleton,
                    seed=seed,
                )
            pictures.append((label, png, document))
    return pictures


def known_answer_cell(
    trial_runs: Sequence[Any], documents: dict[str, dict[str, Any]], space: Any, shift: str, seed: int
) -> dict[str, Any] | None:
    """The search's trials as one cell of the known-answer table (see
    :mod:`autopose.platform.known_answer`): each kind's val AP, the random policies represented
    by the one best on the holdout split, and whether the search found ``shift``.

    Args:
        trial_runs: the search's MLflow runs.
        documents: ``kind-seed`` → the run's policy document (the search's export).
        space: the :class:`~autopose.augment.SearchSpace` (op values of the export).
        shift: a name of :data:`~autopose.data.synth.KNOWN_SHIFTS`.
        seed: the search's seed.

    Returns:
        None without a ``none`` trial (nothing to pair with).
    """
    from autopose.data.synth import MATCHED_OPS
    from autopose.platform.known_answer import exported_steps, search_found_shift

    by_kind: dict[str, list[Any]] = {}
    retrained: dict[str, float] = {}  # selection candidate → val AP of its run with ``seed``
    for run in sorted(trial_runs, key=lambda r: int(r.data.tags.get(TAG_SEED, 0))):
        if run.data.metrics.get("val_ap") is None:
            continue
        candidate = run.data.tags.get(TAG_CANDIDATE)
        if candidate is None:
            by_kind.setdefault(run.data.tags.get(TAG_KIND), []).append(run)
        elif int(run.data.tags.get(TAG_SEED, 0)) == seed:
            retrained[candidate] = run.data.metrics["val_ap"]
    if "none" not in by_kind:
        return None
    ap = {kind: runs[0].data.metrics["val_ap"] for kind, runs in by_kind.items() if kind != "random"}
    if "random" in by_kind:  # chosen on holdout, reported on val (val AP where no holdout was scored)
        metrics = [r.data.metrics for r in by_kind["random"]]
        ap["random"] = max(metrics, key=lambda m: m.get("holdout_ap", m["val_ap"]))["val_ap"]
    cell: dict[str, Any] = {"shift": shift, "seed": seed, "ap": ap}
    if "search" in by_kind:
        search = by_kind["search"][0]
        op_prob = {k.split("/", 1)[1]: v for k, v in search.data.metrics.items() if k.startswith("op_prob/")}
        label = f"search-{search.data.tags.get(TAG_SEED, 0)}"
        if label in retrained:  # the selection stage retrained its export: the suite's "exported"
            ap["exported"] = retrained[label]
        document = documents.get(label, {})
        cell["found"] = search_found_shift(op_prob, exported_steps(document, space), MATCHED_OPS[shift])
    return cell


# -- the page ----------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


SHOWN_SUB_POLICIES = 12  # a policy table's sub-policies: an export may hold 64


def _mirrored(space: Any, op: str, value: float) -> float:
    import torch

    index = space.index(op)
    values = torch.zeros(len(space.ops), dtype=torch.float64)
    values[index] = value
    return float(space.mirror(values)[index])


def _policy_table(
    document: dict[str, Any],
    space: Any,
    *,
    limit: int = SHOWN_SUB_POLICIES,
    exported_share: float | None = None,
) -> str:
    """A policy document (``autopose.policy/1`` or ``/2``) as HTML: its ``limit`` heaviest
    sub-policies, heaviest first (ties in file order), with their weights and each step's op, p,
    m and value in the op's units; a signed step that may run mirrored shows both values with
    their chances. A note says how many are shown of how many and their share of the weight.
    A schedule (``autopose.schedule/1``) is each of its policies so, under the step it starts at.
    Anything else (a baseline's description) is shown as its JSON.

    Args:
        document: the policy document (the run's ``policy/policy.json``).
        space: the :class:`~autopose.augment.SearchSpace` it was searched in.
        limit: the most sub-policies shown.
        exported_share: the search run's ``exported_share`` metric (the share of the searched
            policy's distribution its export keeps), noted when given.

    Raises:
        AutoposeError: a policy document that does not load (naming the bad field).
    """
    from autopose.augment import Policy
    from autopose.augment.policy import POLICY_FORMATS
    from autopose.augment.schedule import SCHEDULE_FORMAT, PolicySchedule

    if document.get("format") == SCHEDULE_FORMAT:
        schedule = PolicySchedule.from_dict(document, space=space)  # checked
        count, steps = len(schedule.entries), schedule.steps
        parts = [f"<p class='note'>A schedule of {count} policies over {steps} steps.</p>"]
        for start, policy in schedule.entries:
            parts.append(f"<h4>From step {start}</h4>")
            parts.append(_policy_table(policy.to_dict(), space, limit=limit))
        return "".join(parts)
    if document.get("format") not in POLICY_FORMATS:
        return f"<p><code>{html.escape(json.dumps(document, ensure_ascii=False))}</code></p>"
    policy = Policy.from_dict(document, space=space)  # checked, with its defaults filled in
    weights = policy.sub_policy_weights
    order = sorted(range(len(weights)), key=lambda k: -weights[k])[:limit]
    signed = dict(zip(space.op_names, space.signed, strict=True))
    rows = []
    for k in order:
        for n, step in enumerate(policy.sub_policies[k]):
            value = "–"
            if space.ops[space.index(step.op)].spec.has_magnitude:
                real = space.value(step.op, step.m)
                value = _fmt(real, 3)
                if signed[step.op] and step.sign < 1.0:
                    mirror = _fmt(_mirrored(space, step.op, real), 3)
                    value = f"{value} ({step.sign:.0%}) or {mirror} ({1.0 - step.sign:.0%})"
            head = [str(k), _fmt(weights[k], 3)] if n == 0 else ["", ""]
            rows.append([*head, str(n), html.escape(step.op), _fmt(step.p, 3), _fmt(step.m, 2), value])
    table = _table(["sub-policy", "weight", "step", "op", "p", "m (0–10)", "value"], rows)
    count = len(weights)
    if len(order) < count:
        share = math.fsum(weights[k] for k in order)
        note = f"The {len(order)} heaviest of {count} sub-policies, {share:.1%} of the weight."
    else:
        note = f"All {count} sub-policies, heaviest first."
    note += " Each sample draws one sub-policy by its weight."
    if exported_share is not None and math.isfinite(exported_share):
        note += (
            f" The export keeps {exported_share:.1%} of the searched policy's distribution "
            "(combinations of ops under 1%, or beyond the 64 heaviest, are dropped, the rest reweighted)."
        )
    return f"<p class='note'>{html.escape(note)}</p>{table}"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0 1em; }
code { background: #f6f6f6; padding: 1px 4px; }
.note { color: #555; font-size: 0.9em; }
.summary { font-size: 1.1em; font-weight: 600; }
"""


def _summary(selection: Selection | None) -> str:
    """The report's first line: what won and by how much, or why nothing was chosen."""
    if selection is None:
        return (
            "No selection stage (no holdout split, data.search_val): the trials below are ranked by "
            "val AP only, and the best of them may be noise."
        )
    return selection.summary()


def _overview_section(
    config: ExperimentConfig, selection: Selection | None, runs: dict[str, Any], shift_ops: Sequence[str]
) -> list[str]:
    """The title, the summary, the machine and budget, the MLflow UI command and the warm start."""
    uri, name = config.tracking_uri, config.experiment
    height, width = config.model.input_size
    train = config.train
    parts = [f"<h1>autopose demo: {html.escape(name)}</h1>"]
    parts.append(f"<p class='summary'>{html.escape(_summary(selection))}</p>")
    parts.append(
        f"<p class='note'>Written {datetime.datetime.now().isoformat(timespec='seconds')} on "
        f"{html.escape(platform.node())} ({os.cpu_count()} CPUs, {html.escape(platform.machine())}). "
        f"Model {html.escape(config.model.arch)} at {height}×{width}, {train.epochs} epochs × "
        f"{train.steps_per_epoch} steps of {train.batch_size} crops per trial. Val split: figures "
        f"turned up to ±45° and darker than train; the ops that match that shift: "
        f"{', '.join(shift_ops) or '–'}.</p>"
    )
    parts.append("<p>MLflow UI: <code>" + html.escape(mlflow_ui_command(uri)) + "</code></p>")

    base_train = config.warm_start_config()
    for base in (r for r in runs.values() if r.data.tags.get(TAG_KIND) == "base"):
        parts.append(
            f"<p>Warm start: every trial fine-tuned the base model of run <code>{base.info.run_id}</code> "
            f"({base_train.epochs} epochs × {base_train.steps_per_epoch} "
            f"steps without augmentation, trained once and cached; val AP "
            f"{_fmt(base.data.metrics.get('val_ap'))}).</p>"
        )
    return parts


def _policies_section(rows: Sequence[Any], walls: dict[str, float]) -> list[str]:
    """Every trial by val AP."""
    parts: list[str] = []
    parts.append("<h2>Policies by val AP</h2>")
    parts.append(
        _table(
            ["kind", "seed", "val AP", "holdout AP", "CPU-s held", "wall s", "status", "promoted", "run id"],
            [
                [
                    html.escape(r.label),
                    str(r.seed),
                    _fmt(r.val_ap),
                    _fmt(r.holdout_ap),
                    _fmt(r.cost_cpu_s, 1),
                    _fmt(walls.get(r.run_id), 1),
                    html.escape(r.status),
                    "yes" if r.promoted else "",
                    f"<code>{r.run_id}</code>",
                ]
                for r in rows
            ],
        )
    )
    return parts


def _selection_section(rows: Sequence[Any], selection: Selection | None) -> list[str]:
    """The selection stage's candidates and the methods (nothing without a selection)."""
    parts: list[str] = []
    if selection is None:
        return parts
        parts.append("<h2>Selection on the holdout split</h2>")
        parts.append(
            "<p>After the trials, each method's candidate (every search trial's exported policy, and "
            "tpe's and pba's best where they ran) was fine-tuned from the same start under the same "
            "budget, beside none and the hand-crafted recipe (the search's own trials where they are the "
            "same training), and scored on the holdout split; the best mean holdout AP is the policy "
            "promoted. Val AP only reports. Gains are paired by seed.</p>"
        )
        parts.append(
            _table(
                ["candidate", "seeds", "holdout AP", "gain over none", "val AP", "run id"],
                [
                    [
                        html.escape(r.candidate) + (" (selected)" if r is selection.winner else ""),
                        str(len(r.seeds)),
                        _fmt(r.holdout_ap),
                        format_gain(r.gain, r.gain_sd, len(r.seeds)),
                        _fmt(r.val_ap),
                        f"<code>{r.run_id}</code>",
                    ]
                    for r in selection.ranked
                ],
            )
        )
        parts.append(f"<p>{html.escape(selection.summary())}</p>")
        parts.append(
            _table(
                ["method", "trials", "CPU-s", "GPU-s", "best candidate", "holdout AP", "gain over none"],
                [
                    [
                        html.escape(m.method),
                        str(m.trials),
                        _fmt(m.cost_cpu_s, 0),
                        _fmt(m.cost_gpu_s, 0),
                        html.escape(m.candidate or "–"),
                        _fmt(m.holdout_ap),
                        "–" if m.gain is None else format_gain(m.gain, m.gain_sd, m.seeds),
                    ]
                    for m in method_rows(rows, selection)
                ],
            )
        )
    return parts


def _against_none_section(
    trial_runs: Sequence[Any],
    examples_png: Sequence[tuple[str, Path, dict[str, Any]]],
    space: Any,
    shift: str,
    seed: int,
) -> list[str]:
    """The known-answer table for what this search ran (nothing without a none trial)."""
    parts: list[str] = []
    cell = known_answer_cell(trial_runs, {label: doc for label, _, doc in examples_png}, space, shift, seed)
    if cell is not None:
        from autopose.platform.known_answer import summarize, table

        parts.append("<h2>Against no augmentation</h2>")
        parts.append(
            "<p>The known-answer table of <code>benchmarks/search_quality.py</code> for what this search "
            "ran (one seed): val AP, in brackets the difference to none. Random policies are represented "
            "by the one best on the holdout split. The benchmark adds AdaBN, RandAugment, "
            "TrivialAugment, the shift-matched policy and the exported policy retrained, over seeds and "
            "single-factor shifts.</p>"
        )
        header, lines = table(summarize([cell]))
        parts.append(_table(header, [[html.escape(c) for c in line] for line in lines]))
    return parts


def _learned_policy_section(
    pictures: dict[str, Path],
    search_runs: Sequence[Any],
    examples_png: Sequence[tuple[str, Path, dict[str, Any]]],
    space: Any,
) -> list[str]:
    """The op probabilities over the search, and each shown policy as a table and on real crops."""
    parts: list[str] = []
    parts.append("<h2>The learned policy over the search</h2>")
    parts.append(
        "<p class='note'>Op probability: the chance that a step of a randomly drawn sub-policy is that op. "
        "The magnitude curves average the sub-policies, so two sub-policies that rotate in opposite "
        "directions cancel there: the tables below give the exported policy at the end of the search, "
        "each sub-policy with its weight (the chance a sample draws it), each step's op, probability p "
        "and magnitude (in the op's units: degrees, factors, fractions); an op that moves either way "
        "from its identity shows its value and the mirrored one, each with its chance.</p>"
    )
    parts.append(f"<img src='{pictures['ops'].name}' alt='op probabilities per epoch'>")
    shares = {
        f"search-{r.data.tags.get(TAG_SEED, 0)}": r.data.metrics.get("exported_share") for r in search_runs
    }
    for label, png, document in examples_png:
        parts.append(f"<h3>{html.escape(label)}</h3>")
        parts.append(_policy_table(document, space, exported_share=shares.get(label)))
        parts.append(f"<img src='{png.name}' alt='{html.escape(label)} on real crops'>")
    return parts


def _cost_section(rows: Sequence[Any], pictures: dict[str, Path], timings: dict[str, Any]) -> list[str]:
    """CPU-seconds by kind, the cost picture and the demo's stage timings."""
    parts: list[str] = []
    parts.append("<h2>Cost of the search</h2>")
    total_cpu = sum(r.cost_cpu_s or 0.0 for r in rows)
    by_kind = {kind: sum(r.cost_cpu_s or 0.0 for r in rows if r.kind == kind) for kind in SEARCH_KINDS}
    split = ", ".join(f"{kind} {seconds:.0f}" for kind, seconds in by_kind.items() if seconds > 0)
    parts.append(
        f"<p>{len(rows)} trials, {total_cpu:.0f} CPU-seconds in all ({split}): each trial's wall time "
        "times the CPUs it held (MLflow's <code>cost_cpu_s</code>; <code>cost_gpu_s</code> likewise).</p>"
    )
    parts.append(f"<img src='{pictures['cost'].name}' alt='cost per trial'>")
    stage_rows = []
    order = ("data", "proxies", "search", "compare", "promote", "evaluate", "report")
    for stage in sorted(timings, key=lambda name: order.index(name) if name in order else len(order)):
        entry = timings[stage]
        first = entry.get("first_wall_s")
        stage_rows.append(
            [
                html.escape(stage),
                _fmt(entry.get("wall_s"), 1),
                "yes" if entry.get("reused") else "",
                _fmt(first, 1),
            ]
        )
    parts.append(_table(["stage", "wall s (this run)", "reused", "wall s (when it ran)"], stage_rows))
    return parts


def _full_training_section(
    full_run: str | None, runs: dict[str, Any], evaluation: dict[str, Any] | None
) -> list[str]:
    """The promoted policy's full training and the final evaluation."""
    parts: list[str] = []
    parts.append("<h2>Full training of the promoted policy</h2>")
    if full_run is not None and full_run in runs:
        run = runs[full_run]
        metrics = run.data.metrics
        parent = html.escape(run.data.tags.get(TAG_PARENT, "–"))
        workers = html.escape(run.data.params.get("train.num_workers", "?"))
        parts.append(
            f"<p>Run <code>{full_run}</code>, child of <code>{parent}</code>, {workers} Ray Train workers, "
            f"{_fmt(metrics.get('trial_wall_s'), 1)} s wall. "
            f"Val proxy AP {_fmt(metrics.get('final_val_ap'))}.</p>"
        )
    if evaluation:
        labels = {
            "val_split": "val split (synthetic, shifted): ground-truth boxes",
            "coco_samples": "4 real COCO val2017 images: detector boxes",
        }
        keys = list(dict.fromkeys(k for part in evaluation.values() for k in part["metrics"]))
        ordered = [name for name in labels if name in evaluation] + [n for n in evaluation if n not in labels]
        parts.append(
            _table(
                ["data", *keys],
                [
                    [
                        html.escape(labels.get(name, name)),
                        *(_fmt(evaluation[name]["metrics"].get(k)) for k in keys),
                    ]
                    for name in ordered
                ],
            )
        )
        titles = "; ".join(html.escape(evaluation[name]["title"]) for name in ordered)
        parts.append(f"<p class='note'>{titles}.</p>")
        parts.append(
            "<p class='note'>The model trained on synthetic figures only: the four real COCO images show "
            "that the pipeline runs end to end on real photos and detector boxes, not accuracy on them.</p>"
        )
    return parts


def write_report(
    folder: str | Path,
    config: ExperimentConfig,
    *,
    data_coco_proxy: Path,
    full_run: str | None,
    evaluation: dict[str, Any] | None,
    timings: dict[str, Any],
    budget: dict[str, Any],
    shift_ops: Sequence[str] = (),
    examples: int = 6,
    shift: str = "combined",
) -> Path:
    """Write ``folder/index.html`` and its PNGs; returns the HTML file (``shift``: the val
    split's shift, a name of :data:`~autopose.data.synth.KNOWN_SHIFTS`)."""
    from autopose.augment import SearchSpace

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uri, name = config.tracking_uri, config.experiment
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    _, rows = collect(uri, name, search=name)
    selection = read_selection(config, name)
    runs = {
        run.info.run_id: run
        for run in mlflow_client.search_runs([experiment.experiment_id], max_results=5000)
    }
    trial_runs = [runs[r.run_id] for r in rows if r.run_id in runs]
    search_runs = sorted(
        (r for r in trial_runs if r.data.tags.get(TAG_KIND) == "search"),
        key=lambda r: int(r.data.tags.get(TAG_SEED, 0)),
    )
    space = SearchSpace.from_dict(config.space_dict)
    value_of = {r.op: (lambda m, op=r.op: space.value(op, m)) for r in space.ops if r.spec.has_magnitude}
    walls = {r.run_id: runs[r.run_id].data.metrics.get("trial_wall_s", 0.0) for r in rows if r.run_id in runs}

    pictures = {
        "ap": plot(name, rows, folder / "ap_by_kind.png"),
        "curves": plot_val_curves(trial_runs, uri, folder / "val_ap_curves.png"),
        "ops": plot_search_ops(search_runs, uri, folder / "search_ops.png", value_of, shift_ops),
        "cost": plot_cost(rows, walls, folder / "cost.png"),
    }
    promoted = [r for r in trial_runs if r.data.tags.get(TAG_PROMOTED) == "true"]
    shown = search_runs + [r for r in promoted if r not in search_runs]
    shown += [r for r in trial_runs if r.data.tags.get(TAG_KIND) == "handcrafted" and r not in shown][:1]
    examples_png = policy_pictures(shown, uri, config.space_dict, data_coco_proxy, folder, examples)

    parts = _overview_section(config, selection, runs, shift_ops)
    parts += _policies_section(rows, walls)
    parts += _selection_section(rows, selection)
    parts += _against_none_section(trial_runs, examples_png, space, shift, config.train.seed)
    parts.append(f"<img src='{pictures['ap'].name}' alt='val AP by policy kind'>")
    parts.append(f"<img src='{pictures['curves'].name}' alt='val AP per epoch'>")
    parts += _learned_policy_section(pictures, search_runs, examples_png, space)
    parts += _cost_section(rows, pictures, timings)
    parts += _full_training_section(full_run, runs, evaluation)
    parts.append("<h2>Budget</h2>")
    parts.append(f"<pre>{html.escape(json.dumps(budget, indent=2))}</pre>")

    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>autopose demo</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    out = folder / "index.html"
    with atomic_write(out) as stream:
        stream.write(page)
    return out
