"""The paper's three claims answered twice, and what each method's compute was.

The claims (paper.md): (1) higher accuracy than Standard (the paired difference over seeds,
95% t interval); (2) a run-to-run spread near the ARM's, below the baseline's (the ratio of
the seed standard deviations); (3) the worst run above the best baseline run. Each is
answered against the equal-compute Standard (`standard_matched`, study.matched) first and
against Standard, as the paper compares.

A method's compute is what `training.compute` counted in its runs (every forward and backward
sequence pass but evaluation's, mean over seeds). A method is "at Standard's compute" only
when that is within 5% of Standard's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .matched import MATCHED
from .stats import paired_difference

REFERENCE = "standard"
COMPARED = (MATCHED, REFERENCE)  # the references of the claims, equal compute first
WITHIN = 0.05  # "at Standard's compute": counted compute within 5% of Standard's


def paired_to(accuracy: Mapping[str, Mapping[int, float]], reference: str) -> dict[str, Any]:
    """Each method's paired difference to `reference` (none without it)."""
    if reference not in accuracy:
        return {}
    return {
        m: paired_difference(v, accuracy[reference]) for m, v in accuracy.items() if m != reference
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def compute_report(runs: Sequence[Mapping], standard: Sequence[Mapping]) -> dict[str, Any] | None:
    """A method's counted compute over its seeds (mean passes: total, training, overhead),
    its steps and sequences per step, and its total over Standard's (`x_standard`, None
    without Standard's counts) with `at_standard_compute`. None when a run was not counted."""
    counted = [r["compute"] for r in runs if r.get("compute")]
    if not counted or len(counted) < len(runs):
        return None
    out: dict[str, Any] = {k: _mean([c[k] for c in counted]) for k in ("total", "training")}
    out["overhead"] = _mean([c["overhead"] for c in counted])
    out["steps"] = _mean([r["steps"] for r in runs])
    out["sequences_per_step"] = runs[0]["sequences_per_step"]
    theirs = [r["compute"]["total"] for r in standard if r.get("compute")]
    ratio = out["total"] / _mean(theirs) if theirs and len(theirs) == len(standard) else None
    out["x_standard"] = ratio
    out["at_standard_compute"] = ratio is not None and abs(ratio - 1) <= WITHIN
    return out


def compute_phrase(compute: Mapping[str, Any] | None) -> str:
    """How the report names a method's compute: "at Standard's compute" only within 5%."""
    if compute is None or compute["x_standard"] is None:
        return "compute not counted"
    if compute["at_standard_compute"]:
        return "at Standard's compute"
    return f"at {compute['x_standard']:.2f}x Standard's compute"


def spread_ratio(table: Mapping[str, Any], method: str, reference: str) -> float | None:
    """The method's seed std over the reference's (claim 2), None when either is unknown."""
    if reference not in table or method not in table:
        return None
    ours, theirs = table[method]["std"], table[reference]["std"]
    return ours / theirs if ours is not None and theirs else None
