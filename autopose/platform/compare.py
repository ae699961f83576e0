"""``autopose compare``: the searched policies beside the baselines, read back from MLflow."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from autopose.errors import AutoposeError
from autopose.files import save_figure
from autopose.platform.config import ExperimentConfig
from autopose.platform.selection import Selection, candidate_scores, format_gain, select, text_table
from autopose.platform.tracking import (
    SEARCH_KINDS,
    TAG_CANDIDATE,
    TAG_KIND,
    TAG_PROMOTED,
    TAG_SEARCH,
    TAG_SEED,
    TAG_SELECTED,
    check_tracking,
    client,
    epochs_logged,
    require_store,
)


@dataclass
class PolicyRow:
    """One trial of a search (or of its selection stage), as ``compare`` shows it."""

    kind: str
    seed: int
    val_ap: float | None
    cost_cpu_s: float | None
    cost_gpu_s: float | None
    run_id: str
    status: str
    search: str
    promoted: bool
    holdout_ap: float | None = None
    candidate: str | None = None  # the selection candidate a selection-stage run scores
    selected: bool = False
    epochs_done: int = 0  # epochs logged so far (a running trial's progress)
    started_s: float | None = None  # when the run started (Unix seconds)

    @property
    def label(self) -> str:
        return self.kind if self.candidate is None else f"{self.candidate} (selection)"


def _latest_experiment(tracking_uri: str) -> str:
    """The experiment whose autopose trial ran last (what ``compare`` shows by default)."""
    mlflow_client = client(tracking_uri)
    experiments = {e.experiment_id: e.name for e in mlflow_client.search_experiments()}
    if not experiments:
        raise AutoposeError(f"no MLflow experiments in {tracking_uri}", field="--experiment")
    runs = mlflow_client.search_runs(
        list(experiments),
        filter_string=f"tags.`{TAG_KIND}` != ''",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise AutoposeError(
            f"no autopose runs in {tracking_uri}: run `autopose search` first", field="--experiment"
        )
    return experiments[runs[0].info.experiment_id]


def collect(
    tracking_uri: str, experiment: str | None = None, *, search: str | None = None
) -> tuple[str, list[PolicyRow]]:
    """The trials of an MLflow experiment (default: the latest one with autopose runs).

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment: the experiment name.
        search: keep only the trials of this Tune search (default: all in the experiment).

    Returns:
        ``(experiment name, rows)``, rows best ``val_ap`` first.

    Raises:
        AutoposeError: no store, unreachable tracking store, unknown experiment, no trials.
    """
    require_store(tracking_uri)
    check_tracking(tracking_uri)
    name = experiment or _latest_experiment(tracking_uri)
    if client(tracking_uri).get_experiment_by_name(name) is None:
        raise AutoposeError(f"no MLflow experiment named {name!r} in {tracking_uri}", field="--experiment")
    rows = trial_rows(tracking_uri, name, search=search)
    if not rows:
        raise AutoposeError(f"experiment {name!r} holds no search or baseline runs", field="--experiment")
    rows.sort(key=lambda r: (-(r.val_ap if r.val_ap is not None else -math.inf), r.kind, r.seed))
    return name, rows


def trial_rows(tracking_uri: str, experiment: str, *, search: str | None = None) -> list[PolicyRow]:
    """The trial runs of ``experiment`` (of one search with ``search``) as rows, in MLflow's
    order, running ones too; none when the experiment does not exist (yet). No checks: for
    callers that watch a store they know (the demo's progress), :func:`collect` for the rest."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    rows = []
    for run in mlflow_client.search_runs([found.experiment_id], max_results=5000):
        tags, metrics = run.data.tags, run.data.metrics
        kind = tags.get(TAG_KIND)
        if kind not in SEARCH_KINDS or (search is not None and tags.get(TAG_SEARCH) != search):
            continue
        rows.append(
            PolicyRow(
                kind=kind,
                seed=int(tags.get(TAG_SEED, 0)),
                val_ap=metrics.get("val_ap"),
                cost_cpu_s=metrics.get("cost_cpu_s"),
                cost_gpu_s=metrics.get("cost_gpu_s"),
                run_id=run.info.run_id,
                status=run.info.status,
                search=tags.get(TAG_SEARCH, ""),
                promoted=tags.get(TAG_PROMOTED) == "true",
                holdout_ap=metrics.get("holdout_ap"),
                candidate=tags.get(TAG_CANDIDATE),
                selected=tags.get(TAG_SELECTED) == "true",
                epochs_done=epochs_logged(metrics),
                started_s=run.info.start_time / 1000 if run.info.start_time else None,
            )
        )
    return rows


# The search methods and baselines a row of ``method_rows`` can stand for, in the order shown.
METHODS = ("search", "tpe", "pba", "random", "handcrafted", "none", "randaugment", "trivialaugment")


@dataclass
class MethodRow:
    """One search method (or baseline) of a search: what it cost, and how its policy fared in
    the selection (``candidate``: its best candidate; None when it had none)."""

    method: str
    trials: int
    cost_cpu_s: float
    cost_gpu_s: float
    candidate: str | None
    holdout_ap: float | None
    gain: float | None
    gain_sd: float | None
    seeds: int


def method_rows(rows: list[PolicyRow], selection: Selection | None) -> list[MethodRow]:
    """One row per method that ran: its trials and their cost (the selection's retraining is
    not counted: it is the same for every method), and its best candidate in the selection."""
    ranked = selection.ranked if selection is not None else ()
    out = []
    for method in METHODS:
        own = [r for r in rows if r.kind == method and r.candidate is None]
        if not own:
            continue
        prefix = "search-" if method == "search" else None
        best = next(
            (c for c in ranked if (c.candidate.startswith(prefix) if prefix else c.candidate == method)), None
        )
        out.append(
            MethodRow(
                method=method,
                trials=len(own),
                cost_cpu_s=sum(r.cost_cpu_s or 0.0 for r in own),
                cost_gpu_s=sum(r.cost_gpu_s or 0.0 for r in own),
                candidate=best.candidate if best else None,
                holdout_ap=best.holdout_ap if best else None,
                gain=best.gain if best else None,
                gain_sd=best.gain_sd if best else None,
                seeds=len(best.seeds) if best else 0,
            )
        )
    return out


def format_methods(methods: list[MethodRow]) -> str:
    """The methods as a plain-text table: cost, and the gain of their best candidate over none."""
    header = ("method", "trials", "CPU-s", "GPU-s", "candidate", "holdout AP", "gain over none")
    lines = [
        (
            m.method,
            str(m.trials),
            _number(m.cost_cpu_s, 0),
            _number(m.cost_gpu_s, 0),
            m.candidate or "-",
            _number(m.holdout_ap, 4),
            "-" if m.gain is None else format_gain(m.gain, m.gain_sd, m.seeds),
        )
        for m in methods
    ]
    return "methods (cost of their own trials; gain: their best candidate on holdout):\n" + text_table(
        header, lines
    )


def selection_of(rows: list[PolicyRow]) -> Selection | None:
    """The selection recorded in a search's rows (None: it had no selection stage)."""
    if not any(r.candidate is not None for r in rows):
        return None
    return select(candidate_scores(rows))


def read_selection(experiment: ExperimentConfig, search_name: str) -> Selection | None:
    """The selection of a finished search, read back from MLflow (None: the search has no
    selection stage, or ``none`` was never scored on holdout)."""
    if not experiment.runs_selection():
        return None
    _, rows = collect(experiment.tracking_uri, search_name, search=search_name)
    return select(candidate_scores(rows, experiment.selection_seeds()))


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_table(name: str, rows: list[PolicyRow]) -> str:
    """A plain-text table: kind, seed, val AP, holdout AP, cost, status, run id."""
    header = ("kind", "seed", "val AP", "holdout AP", "CPU-s", "GPU-s", "status", "run id")
    lines = [
        (
            r.label + (" *" if r.promoted else "") + (" [selected]" if r.selected else ""),
            str(r.seed),
            _number(r.val_ap, 4),
            _number(r.holdout_ap, 4),
            _number(r.cost_cpu_s, 1),
            _number(r.cost_gpu_s, 1),
            r.status,
            r.run_id,
        )
        for r in rows
    ]
    note = "  (* promoted)" if any(r.promoted for r in rows) else ""
    return f"experiment {name}: {len(rows)} runs, best val AP first{note}\n" + text_table(header, lines)


def plot(name: str, rows: list[PolicyRow], out: str | Path) -> Path:
    """A PNG of val AP by policy kind: every seed a dot (labelled), the mean a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [kind for kind in SEARCH_KINDS if any(r.kind == kind for r in rows)]
    figure, axis = plt.subplots(figsize=(1.3 * len(kinds) + 2.5, 3.6))
    for x, kind in enumerate(kinds):
        scores = [(r.seed, r.val_ap) for r in rows if r.kind == kind and r.val_ap is not None]
        if not scores:
            continue
        values = [v for _, v in scores]
        axis.bar(x, sum(values) / len(values), width=0.6, color="#c6dbef", edgecolor="#6baed6", zorder=1)
        spread = 0.25
        for i, (seed, value) in enumerate(sorted(scores)):
            offset = 0.0 if len(scores) == 1 else -spread + 2 * spread * i / (len(scores) - 1)
            axis.scatter(x + offset, value, color="#08519c", s=18, zorder=2)
            axis.annotate(
                f"s{seed}", (x + offset, value), fontsize=6, xytext=(2, 2), textcoords="offset points"
            )
    scored = [r.val_ap for r in rows if r.val_ap is not None]
    axis.set_ylim(0.0, max([0.05, *scored]) * 1.15)  # AP lies in [0, 1]
    axis.set_xticks(range(len(kinds)), kinds)
    axis.set_ylabel("val OKS AP")
    axis.set_title(f"{name}: val AP by policy kind (dots: seeds, bars: mean)", fontsize=9)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    out = check_plot_path(out)
    return save_figure(figure, out, dpi=150)


def check_plot_path(out: str | Path) -> Path:
    """``out`` if a PNG can be written there: a ``.png`` name (the plot is a PNG, so another
    extension would name the wrong format) in an existing folder."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise AutoposeError(
            f"the plot is a PNG: name it *.png, not *{out.suffix or ' (no extension)'}",
            path=out,
            field="--plot",
        )
    if not out.parent.is_dir():
        raise AutoposeError("folder does not exist", path=out.parent, field="--plot")
    return out
