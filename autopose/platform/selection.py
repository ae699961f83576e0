"""The selection stage's arithmetic: which candidate policy a search promotes.

After a search's trials, every search trial's exported policy, ``none`` and the hand-crafted
recipe (the *candidates*) fine-tune from the warm start under the trials' budget, once per
selection seed, and are scored on the holdout split (``holdout_ap``). The candidate with the
best mean holdout AP is selected; val AP only reports. ``none`` is always a candidate, so on
held-out data the selected policy is never below training without augmentation.

Pure functions over the candidates' scores: :mod:`autopose.platform.tune` runs the stage and
reads the scores back from MLflow, ``autopose search`` and the demo print :meth:`Selection.summary`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

NONE = "none"
# The candidates besides every search trial's export; "none" is the reference of every gain.
SELECTION_BASELINES = (NONE, "handcrafted")
# A gain counts as above the noise when it exceeds this many standard errors of the paired
# differences (about a one-sided 97.5 % interval for a normal spread of seeds).
NOISE_STANDARD_ERRORS = 2.0


def format_gain(gain: float, gain_sd: float, seeds: int) -> str:
    """``+0.0953``, with ``± sd`` when there are two or more seeds (one has no spread)."""
    return f"{gain:+.4f}" + (f" ± {gain_sd:.4f}" if seeds > 1 else "")


def text_table(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    """Columns padded to their widest cell, a rule under the header (the console's tables)."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def render(cells) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([render(header), render(["-" * w for w in widths]), *(render(line) for line in lines)])


@dataclass(frozen=True)
class CandidateScore:
    """One candidate trained with one seed: what its run scored."""

    candidate: str  # "search-0", "none", "handcrafted" …
    seed: int
    holdout_ap: float
    val_ap: float | None
    run_id: str


@dataclass(frozen=True)
class RankedCandidate:
    """A candidate over its seeds, against ``none`` trained with the same seeds."""

    candidate: str
    seeds: tuple[int, ...]
    holdout_ap: float  # mean over seeds
    val_ap: float | None  # mean over seeds (reported, never used to choose)
    gain: float  # mean over seeds of (holdout AP − none's holdout AP with the same seed)
    gain_sd: float  # sample sd of those paired differences (0.0 with one seed)
    run_id: str  # the run to promote: the one of its lowest seed

    @property
    def noise_floor(self) -> float | None:
        """``NOISE_STANDARD_ERRORS`` standard errors of the paired gain; None with one seed
        (a single seed has no spread to measure)."""
        if len(self.seeds) < 2:
            return None
        return NOISE_STANDARD_ERRORS * self.gain_sd / math.sqrt(len(self.seeds))


@dataclass(frozen=True)
class Selection:
    """The candidates ranked by mean holdout AP, best first (``none`` first on a tie)."""

    ranked: tuple[RankedCandidate, ...]

    @property
    def winner(self) -> RankedCandidate:
        return self.ranked[0]

    @property
    def within_noise(self) -> bool | None:
        """Whether the winner's gain over ``none`` is within the noise floor (None: one seed)."""
        floor = self.winner.noise_floor
        if self.winner.candidate == NONE:
            return True
        return None if floor is None else self.winner.gain <= floor

    def summary(self) -> str:
        """One paragraph for the console: the winner, its gain over none ± sd, the noise."""
        best = self.winner
        seeds = len(best.seeds)
        if best.candidate == NONE:
            return (
                f"selected: none (holdout AP {best.holdout_ap:.4f}, {seeds} seed(s)): no candidate beat "
                "training without augmentation on the holdout split; promoting it trains without augmentation"
            )
        gain = format_gain(best.gain, best.gain_sd, seeds)
        text = (
            f"selected: {best.candidate} (holdout AP {best.holdout_ap:.4f}, "
            f"{gain} over none, {seeds} seed(s))"
        )
        if self.within_noise is None:
            return text + "; one seed has no spread, so whether the gain is more than noise is unknown"
        if self.within_noise:
            return text + f"; within the noise floor ({best.noise_floor:.4f}): it may be no better than none"
        return text + f"; above the noise floor ({best.noise_floor:.4f})"


def candidate_scores(rows: Iterable[Any], seeds: list[int] | None = None) -> list[CandidateScore]:
    """The selection's scores from :func:`autopose.platform.compare.collect`'s rows (with
    ``kind``, ``seed``, ``candidate``, ``status``, ``holdout_ap``, ``val_ap``, ``run_id``): the
    selection stage's runs, and the search's own finished baseline trials it reused.

    ``seeds``: the selection's seeds (None: every seed the selection stage trained with, and
    the search's own trials' when it trained none)."""
    rows = list(rows)
    if seeds is None:
        seeds = sorted({r.seed for r in rows if r.candidate is not None}) or sorted({r.seed for r in rows})
    scores = []
    for row in rows:
        candidate = row.candidate
        if candidate is None and row.kind in SELECTION_BASELINES:
            candidate = row.kind  # a trial of the search reused as its candidate
        if candidate is None or row.seed not in seeds or row.status != "FINISHED" or row.holdout_ap is None:
            continue
        scores.append(CandidateScore(candidate, row.seed, row.holdout_ap, row.val_ap, row.run_id))
    return scores


def select(scores: Iterable[CandidateScore]) -> Selection | None:
    """Rank the candidates by mean holdout AP over the seeds they share with ``none``.

    Only seeds that ``none`` was scored with count (a gain is paired by seed); a candidate
    without any such seed is left out. Returns None when ``none`` has no score (the
    stage failed to train it: nothing can be promised about the others).
    """
    by_candidate: dict[str, dict[int, CandidateScore]] = {}
    for score in scores:
        by_candidate.setdefault(score.candidate, {})[score.seed] = score
    reference = by_candidate.get(NONE)
    if not reference:
        return None
    ranked = []
    for candidate, by_seed in by_candidate.items():
        seeds = tuple(sorted(set(by_seed) & set(reference)))
        if not seeds:
            continue
        holdout = [by_seed[s].holdout_ap for s in seeds]
        gains = [by_seed[s].holdout_ap - reference[s].holdout_ap for s in seeds]
        val = [by_seed[s].val_ap for s in seeds if by_seed[s].val_ap is not None]
        ranked.append(
            RankedCandidate(
                candidate=candidate,
                seeds=seeds,
                holdout_ap=statistics.fmean(holdout),
                val_ap=statistics.fmean(val) if val else None,
                gain=statistics.fmean(gains),
                gain_sd=statistics.stdev(gains) if len(gains) > 1 else 0.0,
                run_id=by_seed[seeds[0]].run_id,
            )
        )
    ranked.sort(key=lambda r: (-r.holdout_ap, r.candidate != NONE, r.candidate))
    return Selection(tuple(ranked))


def format_selection(selection: Selection) -> str:
    """The ranked candidates as a plain-text table, then the summary."""
    header = ("candidate", "seeds", "holdout AP", "gain over none", "val AP", "run id")
    lines = [
        (
            r.candidate + (" *" if i == 0 else ""),
            str(len(r.seeds)),
            f"{r.holdout_ap:.4f}",
            format_gain(r.gain, r.gain_sd, len(r.seeds)),
            "-" if r.val_ap is None else f"{r.val_ap:.4f}",
            r.run_id,
        )
        for i, r in enumerate(selection.ranked)
    ]
    return (
        "selection on the holdout split (* selected; val AP only reports):\n"
        + text_table(header, lines)
        + "\n"
        + selection.summary()
    )
