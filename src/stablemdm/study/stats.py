"""The statistics of a multi-seed study (pure NumPy/SciPy): per-method summaries over seeds,
paired differences to a baseline with a t confidence interval, the paper's third claim
(is the worst run of a method above the best run of a baseline?), and the mean over seeds of
measurements that carry their own SE."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import stats


def summary(values: Mapping[int, float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (ddof 1; None for one seed), min and max over seeds."""
    x = np.asarray(list(values.values()), dtype=float)
    if x.size == 0:
        raise ValueError("summary of no runs")
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else None,
        "min": float(x.min()),
        "max": float(x.max()),
    }


def paired_difference(
    method: Mapping[int, float], baseline: Mapping[int, float], level: float = 0.95
) -> dict[str, float | int | None]:
    """Mean of method - baseline over the seeds both have (same seed = same data order and
    initialisation), with a two-sided t interval at `level` (None below two pairs)."""
    seeds = sorted(set(method) & set(baseline))
    d = np.asarray([method[s] - baseline[s] for s in seeds], dtype=float)
    if d.size == 0:
        raise ValueError("no seed in common: a paired difference needs runs of the same seeds")
    out: dict[str, float | int | None] = {"n": int(d.size), "mean": float(d.mean())}
    if d.size < 2:
        return {**out, "low": None, "high": None}
    half = stats.t.ppf(0.5 + level / 2, df=d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return {**out, "low": float(d.mean() - half), "high": float(d.mean() + half)}


def worst_above_best(method: Mapping[int, float], baseline: Mapping[int, float]) -> bool:
    """The paper's third claim for one method: its worst run beats the baseline's best run."""
    return min(method.values()) > max(baseline.values())


def mean_with_se(values: Mapping[int, tuple[float, float]]) -> tuple[float, float]:
    """The mean over seeds of (estimate, SE) pairs and the SE of that mean, for independent
    measurements: sqrt(sum SE^2) / n."""
    if not values:
        raise ValueError("mean of no runs")
    x = np.asarray(list(values.values()), dtype=float)  # [n, 2]
    return float(x[:, 0].mean()), float(np.sqrt((x[:, 1] ** 2).sum()) / len(x))
