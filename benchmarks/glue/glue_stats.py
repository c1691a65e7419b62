"""Statistics of the GLUE benchmark over seeds: mean +- std, and paired differences with Student-t intervals.

Pure Python (no torch; scipy only for the t quantile when it is installed). Scores are keyed by seed:
two variants (e.g. PAD and MoE) run with the same seed share the data order, the classification-head
initialisation and the router initialisation (`benchmarks/glue/glue_paired.py`), so their difference per
seed removes that shared noise. The interval of a paired difference is

    mean(d) +- t_{(1+confidence)/2, n-1} * std(d) / sqrt(n),    d_s = score_a(s) - score_b(s),

over the n seeds both variants finished (std with n - 1 in the denominator).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

# Two-sided 95% quantiles t_{0.975, df} (df 1-30), used when scipy is not installed.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip

Scores = Mapping[int, float]
"""`{seed: score}` of one variant on one task (or on the task average)."""


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t quantile t_{(1+confidence)/2, df}: scipy's when installed, else the table
    (95% only)."""
    if df < 1:
        raise ValueError(f"A t interval needs at least 2 seeds (df >= 1), got df={df}.")
    try:
        from scipy.stats import t
    except ImportError:
        if confidence != 0.95 or df > len(T_975):
            raise ValueError(
                f"Without scipy only 95% intervals with df <= {len(T_975)} are tabulated "
                f"(got confidence={confidence}, df={df}); install scipy."
            ) from None
        return T_975[df - 1]
    return float(t.ppf((1.0 + confidence) / 2.0, df))


@dataclass(frozen=True)
class Estimate:
    """Mean of `n` values with their sample std and, for n >= 2, a two-sided t interval of the mean."""

    mean: float
    std: float | None
    n: int
    low: float | None = None
    high: float | None = None
    seeds: tuple[int, ...] = ()

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2.0

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (the difference is resolved at this confidence)."""
        return self.low is not None and (self.low > 0.0 or self.high < 0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "seeds": list(self.seeds), "half_width": self.half_width}


def estimate(values: Sequence[float], confidence: float = 0.95, seeds: Sequence[int] = ()) -> Estimate:
    """Mean, sample std and t interval of `values` (std and interval are None for a single value)."""
    if not values:
        raise ValueError("No values to summarise.")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Estimate(mean, None, 1, seeds=tuple(seeds))
    std = statistics.stdev(values)
    half = t_quantile(len(values) - 1, confidence) * std / math.sqrt(len(values))
    return Estimate(mean, std, len(values), mean - half, mean + half, tuple(seeds))


def seed_estimate(scores: Scores, confidence: float = 0.95) -> Estimate:
    """`estimate` of one variant's `{seed: score}`."""
    seeds = sorted(scores)
    return estimate([scores[s] for s in seeds], confidence, seeds)


def paired_difference(a: Scores, b: Scores, confidence: float = 0.95) -> Estimate | None:
    """Mean and t interval of `a[s] - b[s]` over the seeds both have (None when they share none)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return estimate([a[s] - b[s] for s in seeds], confidence, seeds)


def seed_averages(per_task: Mapping[str, Scores], tasks: Sequence[str]) -> dict[int, float]:
    """`{seed: mean over tasks}` for the seeds that finished every task in `tasks` (a seed missing a task
    would average over other tasks and not compare)."""
    if not tasks or any(task not in per_task for task in tasks):
        return {}
    seeds = set.intersection(*(set(per_task[task]) for task in tasks))
    return {s: statistics.fmean(per_task[task][s] for task in tasks) for s in sorted(seeds)}


def summarise(
    scores: Mapping[str, Mapping[str, Scores]],
    tasks: Sequence[str],
    comparisons: Sequence[tuple[str, str]],
    confidence: float = 0.95,
) -> dict:
    """Per task and on the task average ("avg"): each variant's estimate over seeds and the paired
    differences `a - b` for each `(a, b)` in `comparisons`.

    `scores`: `{variant: {task: {seed: score}}}`. Returns `{"variants": {variant: {task: Estimate dict}},
    "differences": {"a - b": {task: Estimate dict}}}`; a task without data is left out.
    """
    columns = {variant: {**per_task, "avg": seed_averages(per_task, tasks)} for variant, per_task in scores.items()}
    keys = [*tasks, "avg"]
    variants = {
        variant: {key: seed_estimate(col[key], confidence).to_dict() for key in keys if col.get(key)}
        for variant, col in columns.items()
    }
    differences = {}
    for a, b in comparisons:
        if a not in columns or b not in columns:
            continue
        rows = {key: paired_difference(columns[a].get(key, {}), columns[b].get(key, {}), confidence) for key in keys}
        differences[f"{a} - {b}"] = {key: est.to_dict() for key, est in rows.items() if est is not None}
    return {"confidence": confidence, "variants": variants, "differences": differences}


def format_estimate(est: Mapping | None, signed: bool = False) -> str:
    """`"85.3 +- 0.4"` (mean +- std) or, `signed`, `"+0.6 [-1.2, +2.4]"` (mean [95% CI]); "-" when missing."""
    if not est:
        return "-"
    sign = "+" if signed else ""
    if signed:
        if est["low"] is None:
            return f"{est['mean']:{sign}.2f} (n=1)"
        mark = "*" if est["low"] > 0 or est["high"] < 0 else ""
        return f"{est['mean']:+.2f} [{est['low']:+.2f}, {est['high']:+.2f}]{mark}"
    return f"{est['mean']:.2f}" + ("" if est["std"] is None else f" +- {est['std']:.2f}")


def verdict(est: Mapping | None, paper: float | None = None) -> str:
    """What a paired difference `a - b` says about the paper's claim `a > b` (and its size `paper`):
    "holds" when the CI lies above 0, "reversed" below 0, "unresolved" when it spans 0; then whether the
    paper's difference lies inside, above or below the CI. A single seed gives no verdict."""
    if not est:
        return "-"
    if est["low"] is None:
        return "n=1, no CI"
    word = "holds" if est["low"] > 0 else "reversed" if est["high"] < 0 else "unresolved"
    if paper is None:
        return word
    where = "in CI" if est["low"] <= paper <= est["high"] else "above CI" if paper > est["high"] else "below CI"
    return f"{word}; paper {paper:+.1f} {where}"
