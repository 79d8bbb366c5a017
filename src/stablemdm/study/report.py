"""The study report: the paper's Table 1 layout per task (one column per seed, then mean,
std, min, max), paired differences to Standard with a 95% t interval, the worst-run-above-
best-baseline check, cost and estimator noise per method, accuracy at every evaluation point;
written as report.md, report.json and PNG figures, and printed."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .plots import plot_task
from .stats import paired_difference, summary, worst_above_best

REFERENCE = "standard"
BASELINES = ("standard", "clipped")


def _accuracy_at(results: Sequence[Mapping], step: int) -> dict[str, dict[int, float]]:
    """method -> seed -> accuracy at `step`."""
    out: dict[str, dict[int, float]] = {}
    for r in results:
        acc = next(e["accuracy"] for e in r["evaluations"] if e["step"] == step)
        out.setdefault(r["method"], {})[r["seed"]] = acc
    return out


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def task_report(results: Sequence[Mapping], steps: Sequence[int]) -> dict[str, Any]:
    """Everything the report says about one task's runs."""
    final = _accuracy_at(results, steps[-1])
    table = {m: {"per_seed": per_seed, **summary(per_seed)} for m, per_seed in final.items()}
    paired, claims = {}, {}
    for method, per_seed in final.items():
        if REFERENCE in final and method != REFERENCE:
            paired[method] = paired_difference(per_seed, final[REFERENCE])
        claims[method] = {
            f"worst_above_best_{b}": worst_above_best(per_seed, final[b])
            for b in BASELINES
            if b in final and b != method
        }
    cost = {}
    for method in final:
        runs = [r for r in results if r["method"] == method]
        cost[method] = {
            "forward_tokens_per_step": runs[0]["forward_tokens_per_step"],
            "train_seconds": _mean([r["train_seconds"] for r in runs]),
            "estimator_variance": _mean([r["estimator_variance"] for r in runs]),
        }
    speed = {
        str(step): {m: summary(v)["mean"] for m, v in _accuracy_at(results, step).items()}
        for step in steps
    }
    return {
        "steps": list(steps),
        "table": table,
        "paired_to_standard": paired,
        "claims": claims,
        "cost": cost,
        "accuracy_by_step": speed,
    }


def build_report(name: str, results: Sequence[Mapping], steps: Sequence[int]) -> dict[str, Any]:
    """The report of a study from its runs' results."""
    tasks = sorted({r["task"] for r in results})
    return {
        "study": name,
        "tasks": {t: task_report([r for r in results if r["task"] == t], steps) for t in tasks},
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _accuracy_table(task: Mapping[str, Any]) -> str:
    seeds = sorted({s for row in task["table"].values() for s in row["per_seed"]})
    header = ["method", *map(str, seeds), "mean", "std", "min", "max"]
    rows = []
    for method, row in task["table"].items():
        per_seed = [_pct(row["per_seed"].get(s)) for s in seeds]
        stats = [_pct(row[k]) for k in ("mean", "std", "min", "max")]
        rows.append([method, *per_seed, *stats])
    return _table(header, rows)


def _claims_table(task: Mapping[str, Any]) -> str:
    header = [
        "method",
        "vs Standard (95% CI)",
        "worst > best Standard",
        "worst > best Clipped",
        "forward tokens/step",
        "train s",
        "estimator variance",
    ]
    rows = []
    for method in task["table"]:
        d = task["paired_to_standard"].get(method)
        diff = "-" if d is None else f"{100 * d['mean']:+.1f} [{_pct(d['low'])}, {_pct(d['high'])}]"
        claims = task["claims"][method]
        cost = task["cost"][method]
        var = cost["estimator_variance"]
        rows.append(
            [
                method,
                diff,
                _yes(claims.get("worst_above_best_standard")),
                _yes(claims.get("worst_above_best_clipped")),
                f"{cost['forward_tokens_per_step']:,}",
                f"{cost['train_seconds']:.0f}",
                "-" if var is None else f"{var:.4g}",
            ]
        )
    return _table(header, rows)


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _speed_table(task: Mapping[str, Any]) -> str:
    steps = list(task["accuracy_by_step"])
    methods = list(task["table"])
    rows = [[m, *(_pct(task["accuracy_by_step"][s].get(m)) for s in steps)] for m in methods]
    return _table(["method", *(f"step {s}" for s in steps)], rows)


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown (accuracies in %)."""
    parts = [f"# Study {report['study']}"]
    for name, task in report["tasks"].items():
        parts += [
            f"## {name}: test accuracy (%) at step {task['steps'][-1]}",
            _accuracy_table(task),
            "Paired differences to Standard (same seed), the paper's third claim, and cost:",
            _claims_table(task),
            "Mean accuracy (%) at each evaluation point (learning speed):",
            _speed_table(task),
            f"![accuracy per seed]({name}-seeds.png) ![accuracy vs tokens]({name}-tokens.png) "
            f"![training loss]({name}-loss.png)",
        ]
    return "\n\n".join(parts) + "\n"


def write_report(
    report: Mapping[str, Any], results: Sequence[Mapping], folder: str | Path
) -> list[Path]:
    """report.md, report.json and the figures of each task into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    (folder / "report.md").write_text(markdown(report))
    written = [folder / "report.md", folder / "report.json"]
    for task in report["tasks"]:
        written += plot_task([r for r in results if r["task"] == task], task, folder)
    return written
