"""The study report: the paper's Table 1 layout per task and evaluation point (one column per
seed, then mean, std, min, max), the paper's three claims against the equal-compute Standard
and against Standard (`claims`: paired differences with a 95% t interval, spreads, the
worst-run-above-best-baseline check), counted compute and estimator noise per method (the
gradient's variance per sequence forward pass and the batch equivalent, `noise`); written as
report.md, report.json and PNG figures, and printed."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..estimators.selection import ratio_with_se
from ..training.outputs import write_text
from .bases import gap_verdict
from .claims import COMPARED, REFERENCE, compute_phrase, compute_report, paired_to, spread_ratio
from .matched import MATCHED
from .noise import NOISE
from .plots import plot_task
from .stats import mean_with_se, summary, worst_above_best

BASELINES = ("standard", "clipped", MATCHED)
SAMPLE_CHARS = 120  # of a base's output shown in the report
PAIRED = {MATCHED: "paired_to_matched", REFERENCE: "paired_to_standard"}  # point_report's keys
# set-level scores some tasks add to each evaluation (image tasks, evaluation.image_scoring)
NOISE_COLUMNS = (  # what the two noise columns of the claims table compare
    "the variance of the minibatch gradient per sequence forward pass (trace, times the "
    "minibatch's forward passes: the same at any batch size) at each run's final model, mean "
    "over seeds ± SE; and the batch equivalent ± SE: Standard's figure over the method's, both "
    "on Standard's final model of each seed (the estimator alone differs): above 1 it beats "
    "scaling Standard's batch, below 1 a bigger batch is cheaper."
)
CLAIMS_TEXT = (
    f"The paper's three claims, against the equal-compute Standard ({MATCHED}, when the "
    "study has one) and against Standard: the method minus the reference on the same seeds "
    "(points, 95% t interval), its seed spread (std) over the reference's, and whether its "
    "worst run beats the reference's best (and Clipped's):"
)
COST_TEXT = (
    "What each method cost, counted (sequence passes through the model, forward plus backward, "
    "evaluation apart; mean over seeds), over Standard's (at Standard's compute: within 5%), "
    "the share of it that was overhead (auto's measurements, P-POTS fits), the steps and "
    "sequences per step it trained, mean training seconds,"
)
EXTRA_METRICS = {
    "mean_prob": "mean probability of the prompted class (%)",
    "fid": "Frechet distance of the judge's features to the real test images (lower is better)",
    "valid": "share of whole image canvases (%)",
}


def _accuracy_at(
    results: Sequence[Mapping], step: int, key: str = "accuracy"
) -> dict[str, dict[int, float]]:
    """method -> seed -> `key` (accuracy) at `step`, methods in the order of `results`."""
    out: dict[str, dict[int, float]] = {}
    for r in results:
        acc = next(e[key] for e in r["evaluations"] if e["step"] == step)
        out.setdefault(r["method"], {})[r["seed"]] = acc
    return out


def extra_metrics(results: Sequence[Mapping], steps: Sequence[int]) -> dict[str, Any]:
    """metric -> step -> method -> per-seed values and their summary, for each EXTRA_METRICS
    key that every evaluation of `results` holds (none for text tasks)."""
    keys = [
        k
        for k in EXTRA_METRICS
        if all(e.get(k) is not None for r in results for e in r["evaluations"])
    ]
    return {
        key: {
            str(step): {
                m: {"per_seed": dict(v), **summary(v)}
                for m, v in _accuracy_at(results, step, key).items()
            }
            for step in steps
        }
        for key in keys
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def point_report(accuracy: Mapping[str, Mapping[int, float]]) -> dict[str, Any]:
    """Table 1, paired differences to Standard and to the equal-compute Standard, and the
    third claim at one evaluation point."""
    table = {m: {"per_seed": dict(v), **summary(v)} for m, v in accuracy.items()}
    claims = {
        m: {
            f"worst_above_best_{b}": worst_above_best(v, accuracy[b])
            for b in BASELINES
            if b in accuracy and b != m
        }
        for m, v in accuracy.items()
    }
    return {
        "table": table,
        "paired_to_standard": paired_to(accuracy, REFERENCE),
        "paired_to_matched": paired_to(accuracy, MATCHED),
        "claims": claims,
    }


def task_report(results: Sequence[Mapping], steps: Sequence[int]) -> dict[str, Any]:
    """Everything the report says about one task's runs (`steps`: the evaluation points)."""
    by_step = {str(step): point_report(_accuracy_at(results, step)) for step in steps}
    cost = {}
    standard = [r for r in results if r["method"] == REFERENCE]
    for method in by_step[str(steps[-1])]["table"]:
        runs = [r for r in results if r["method"] == method]
        cost[method] = {
            "compute": compute_report(runs, standard),
            "train_seconds": _mean([r["train_seconds"] for r in runs]),
            "decode_tokens_per_s": _mean([r["evaluations"][-1].get("tokens_per_s") for r in runs]),
            NOISE: noise_report(runs, [r for r in results if r["method"] == REFERENCE]),
        }
    return {
        "steps": list(steps),
        "final_step": steps[-1],
        "by_step": by_step,
        "cost": cost,
        "metrics": extra_metrics(results, steps),
    }


def _mean_noise(measured: Mapping[int, Mapping[str, Any]], where: str) -> dict[str, Any] | None:
    """Mean over seeds of the per-sequence-pass gradient and loss variances measured `where`
    ("own": each run's final model; "common": Standard's), each with the SE of the mean."""
    kept = {s: m[where] for s, m in measured.items() if m[where] is not None}
    if not kept:
        return None
    out: dict[str, Any] = {"seeds": sorted(kept)}
    for key in ("grad", "loss"):
        out[key], out[f"{key}_se"] = mean_with_se(
            {s: (e[key], e[f"{key}_se"]) for s, e in kept.items()}
        )
    return out


def noise_report(runs: Sequence[Mapping], standard: Sequence[Mapping]) -> dict[str, Any] | None:
    """A method's estimator noise over its seeds (`noise`), on its own final models and on
    Standard's, and its batch equivalent: Standard's gradient variance per sequence forward
    pass over the method's, both on Standard's final models of the seeds both have (with its
    delta-method SE; 1 for Standard itself). None when nothing was measured."""
    measured = {r["seed"]: r[NOISE] for r in runs if r.get(NOISE)}
    if not measured:
        return None
    first = next(iter(measured.values()))
    out = {"batch": first["batch"], "draws": first["draws"], "split": first["split"]}
    out |= {where: _mean_noise(measured, where) for where in ("own", "common")}
    reference = {r["seed"]: r[NOISE] for r in standard if r.get(NOISE)}
    seeds = [s for s, m in measured.items() if m["common"] and s in reference]
    out["batch_equivalent"] = None
    if runs[0]["method"] == REFERENCE:
        out["batch_equivalent"] = {"value": 1.0, "se": 0.0, "seeds": seeds}
    elif seeds:
        ours, theirs = (
            _mean_noise({s: m[s] for s in seeds}, "common") for m in (measured, reference)
        )
        value, se = ratio_with_se(theirs["grad"], theirs["grad_se"], ours["grad"], ours["grad_se"])
        out["batch_equivalent"] = {"value": value, "se": se, "seeds": seeds}
    return out


def headline_method(methods: Sequence[str]) -> str | None:
    """The method a report's first sentences are about: the first MDM method that is not a
    baseline (None when there is none)."""
    return next((m for m in methods if m not in (*BASELINES, "arm")), None)


def findings(task: Mapping[str, Any], method: str | None) -> dict[str, Any] | None:
    """The numbers a report opens with for `method` at the final point: its paired
    differences to the equal-compute Standard (None without one) and to Standard, the
    counted compute and the seed spreads of them all and the ARM, and its batch equivalent
    (`noise_report`). None without the method or Standard."""
    final = task["by_step"][str(task["final_step"])]
    table = final["table"]
    if method not in table or REFERENCE not in table:
        return None
    noise = task["cost"][method][NOISE]
    shown = [m for m in (method, *COMPARED, "arm") if m in table]
    return {
        "method": method,
        "matched": final["paired_to_matched"].get(method),
        "difference": final["paired_to_standard"][method],
        "std": {m: table[m]["std"] for m in shown},
        "mean": {m: table[m]["mean"] for m in shown},
        "compute": {m: task["cost"][m]["compute"] for m in shown},
        "batch_equivalent": noise and noise["batch_equivalent"],
    }


def build_report(
    name: str,
    results: Sequence[Mapping],
    steps: Sequence[int],
    bases: Sequence[Mapping] = (),
) -> dict[str, Any]:
    """The report of a study from its runs' results and its bases' step-0 evaluations."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    headline = headline_method(list(dict.fromkeys(r["method"] for r in results)))
    report: dict[str, Any] = {"study": name, "tasks": {}}
    for t in tasks:
        report["tasks"][t] = task_report([r for r in results if r["task"] == t], steps)
        report["tasks"][t]["findings"] = findings(report["tasks"][t], headline)
        at_zero = {b["objective"]: b for b in bases if b["task"] == t}
        if {"mdm", "arm"} <= set(at_zero):
            report["tasks"][t]["bases"] = base_report(at_zero["mdm"], at_zero["arm"])
    return report


def base_report(mdm: Mapping[str, Any], arm: Mapping[str, Any]) -> dict[str, Any]:
    """The two bases' step-0 accuracies on a target, their gap and budgets."""
    return {
        "mdm": dict(mdm),
        "arm": dict(arm),
        "gap": arm["accuracy"] - mdm["accuracy"],
        "verdict": gap_verdict(mdm["accuracy"], arm["accuracy"]),
        "equal_budget": mdm["base_sequences"] == arm["base_sequences"],
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _decimal(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def _plus_minus(x: Mapping[str, float]) -> str:
    return f"{x['value']:.2f} ± {x['se']:.2f}"


def _versus_batch(equivalent: Mapping[str, float]) -> str:
    """What a batch equivalent says, beyond 2 SE of 1 or not."""
    if equivalent["value"] - 1 > 2 * equivalent["se"]:
        return "it buys more than a bigger Standard batch at the same compute"
    if 1 - equivalent["value"] > 2 * equivalent["se"]:
        return "a bigger Standard batch is cheaper"
    return "level with a bigger Standard batch within 2 SE"


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def accuracy_table(point: Mapping[str, Any], fmt: Callable[[float | None], str] = _pct) -> str:
    """Table 1: a row per method, a column per seed, then mean, std, min and max (in %, or as
    `fmt` writes them)."""
    table = point["table"]
    seeds = sorted({int(s) for row in table.values() for s in row["per_seed"]})
    rows = []
    for method, row in table.items():
        per_seed = {int(s): v for s, v in row["per_seed"].items()}
        cells = [fmt(per_seed.get(s)) for s in seeds]
        rows.append([method, *cells, *(fmt(row[k]) for k in ("mean", "std", "min", "max"))])
    return _table(["method", *map(str, seeds), "mean", "std", "min", "max"], rows)


def _difference(d: Mapping[str, Any] | None) -> str:
    return "-" if d is None else f"{100 * d['mean']:+.1f} [{_pct(d['low'])}, {_pct(d['high'])}]"


def claims_table(point: Mapping[str, Any]) -> str:
    """The paper's three claims per method, each against the equal-compute Standard (when the
    study has one) and against Standard: the paired difference (points, 95% CI), the seed
    spread over the reference's, the worst run above the reference's best (and Clipped's)."""
    table, references = point["table"], [r for r in COMPARED if r in point["table"]]
    label = {MATCHED: MATCHED, REFERENCE: "Standard"}
    header = ["method", *(f"vs {label[r]} (95% CI)" for r in references)]
    header += [f"std / {label[r]}'s" for r in references]
    header += [*(f"worst > best {label[r]}" for r in references), "worst > best Clipped"]
    rows = []
    for method in table:
        claims = point["claims"][method]
        spreads = [None if r == method else spread_ratio(table, method, r) for r in references]
        rows.append(
            [
                method,
                *(_difference(point[PAIRED[r]].get(method)) for r in references),
                *("-" if x is None else f"{x:.2f}" for x in spreads),
                *(_yes(claims.get(f"worst_above_best_{r}")) for r in (*references, "clipped")),
            ]
        )
    return _table(header, rows)


def cost_table(point: Mapping[str, Any], cost: Mapping[str, Any]) -> str:
    """Each method's counted compute (training.compute: sequence passes, forward and backward,
    evaluation apart), over Standard's, its overhead, steps and sequences per step, training
    seconds, the final evaluation's decoding speed and estimator noise."""
    header = [
        "method",
        "compute (passes)",
        "x Standard",
        "at Standard's compute",
        "overhead",
        "steps x sequences",
        "train s",
        "decode tokens/s",
        "gradient variance per sequence-pass, own model",
        "batch equivalent on Standard's model",
    ]
    rows = []
    for method in point["table"]:
        c = cost[method]
        counted, noise = c["compute"], c[NOISE] or {}
        own, equivalent = noise.get("own"), noise.get("batch_equivalent")
        rows.append(
            [
                method,
                *_compute_cells(counted),
                f"{c['train_seconds']:.0f}",
                _rate(c.get("decode_tokens_per_s")),
                "-" if own is None else f"{own['grad']:.3g} ± {own['grad_se']:.2g}",
                "-" if equivalent is None else _plus_minus(equivalent),
            ]
        )
    return _table(header, rows)


def _rate(value: float | None) -> str:
    """Tokens per second as the cost table shows them ("-" where not measured)."""
    return "-" if value is None else f"{value:.0f}"


def _compute_cells(c: Mapping[str, Any] | None) -> list[str]:
    """The compute columns of one method ("-" where it was not counted)."""
    if c is None:
        return ["-"] * 5
    ratio = c["x_standard"]
    return [
        _count(round(c["total"])),
        "-" if ratio is None else f"{ratio:.2f}",
        _yes(c["at_standard_compute"] if ratio is not None else None),
        f"{100 * c['overhead'] / c['total']:.1f}%" if c["total"] else "-",
        f"{c['steps']:.0f} x {c['sequences_per_step']}",
    ]


def _points(d: Mapping[str, Any]) -> str:
    """A paired difference in words: points and its interval."""
    interval = (
        f"95% CI [{_pct(d['low'])}, {_pct(d['high'])}] over {d['n']} seeds"
        if d["low"] is not None
        else "one seed, no interval"
    )
    return f"{100 * d['mean']:+.1f} points ({interval})"


def comparison_text(name: str, final_step: int, f: Mapping[str, Any]) -> str:
    """The opening sentence: the headline method's accuracy and counted compute against the
    equal-compute Standard's first (or that the study has none), then against the other: a
    method at Standard's compute is compared with Standard first, standard_matched after."""
    m, mean, compute = f["method"], f["mean"], f["compute"]
    versus = f"against Standard's {_pct(mean[REFERENCE])}%: {_points(f['difference'])}"
    if f["matched"] is None:
        versus += f"; the study has no equal-compute Standard ({MATCHED})"
    elif (compute[m] or {}).get("at_standard_compute"):
        versus = (
            f"against Standard's {_pct(mean[REFERENCE])}% (the same compute): "
            f"{_points(f['difference'])}; against {MATCHED}'s {_pct(mean[MATCHED])}% "
            f"({compute_phrase(compute[MATCHED])}): {_points(f['matched'])}"
        )
    else:
        versus = (
            f"against the equal-compute Standard's {_pct(mean[MATCHED])}% ({MATCHED}, "
            f"{compute_phrase(compute[MATCHED])}): {_points(f['matched'])}; {versus}"
        )
    return (
        f"On {name} after {final_step} steps, {m} ({compute_phrase(compute[m])}) scored "
        f"{_pct(mean[m])}% {versus}."
    )


def findings_text(name: str, task: Mapping[str, Any]) -> str:
    """Plain sentences: the headline method's difference to the equal-compute Standard and to
    Standard with their intervals and computes, its seed spread against theirs and the ARM's,
    its batch equivalent."""
    f = task.get("findings")
    if f is None:
        return ""
    m, std = f["method"], f["std"]
    first = comparison_text(name, task["final_step"], f)
    label = {MATCHED: f"{MATCHED}'s", REFERENCE: "Standard's", "arm": "the ARM's"}
    spreads = ", ".join(f"{label[x]} {_pct(std[x])}" for x in (*COMPARED, "arm") if x in std)
    second = f"Its seed spread (std) was {_pct(std[m])} points, against {spreads}."
    equivalent = f["batch_equivalent"]
    third = "Its batch equivalent was not measured."
    if equivalent is not None:
        third = (
            f"On Standard's final models one sequence of its gradient estimator was worth "
            f"{_plus_minus(equivalent)} Standard sequences per forward pass (its batch "
            f"equivalent): {_versus_batch(equivalent)}."
        )
    return " ".join((first, second, third))


def bases_text(name: str, bases: Mapping[str, Any]) -> list[str]:
    """The bases' step-0 section of one task: accuracies, budgets and the gap in words."""
    rows = [
        [
            kind.upper(),
            _pct(b["accuracy"]),
            str(b["base_steps"]),
            _count(b["base_sequences"]),
            f"{b['train_seconds']:.0f}",
        ]
        for kind, b in (("mdm", bases["mdm"]), ("arm", bases["arm"]))
    ]
    budgets = (
        "equal pretraining budgets"
        if bases["equal_budget"]
        else "UNEQUAL pretraining budgets, set to match the bases' strength rather than their cost"
    )
    return [
        f"## {name}: the shared bases at step 0",
        _table(["base", "accuracy (%)", "steps", "sequences", "seconds"], rows),
        f"Pretrained on {bases['mdm']['base_task']} ({budgets}). Gap at step 0 (ARM minus MDM): "
        f"{100 * bases['gap']:+.1f} points, {bases['verdict']}.",
        *(line for kind in ("mdm", "arm") for line in _zero_samples(kind, bases[kind])),
    ]


def _zero_samples(kind: str, base: Mapping[str, Any]) -> list[str]:
    """A base that scored nothing: its first outputs beside the gold answers (a 0 may be a
    failure of form, an answer that never ends, rather than of the task)."""
    samples = base.get("samples")
    if not samples:
        return []
    rows = [[_cell(s["prompt"]), _cell(s["output"]), _cell(s["gold"])] for s in samples]
    return [
        f"The {kind.upper()} base scored nothing: look at its outputs before matching the "
        f"bases' budgets (its first {len(rows)}, with the gold answers):",
        _table(["prompt", "output", "gold"], rows),
    ]


def _cell(text: str) -> str:
    """`text` as one Markdown table cell, cut at SAMPLE_CHARS characters."""
    text = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + "..."
    return "`" + text.replace("\n", " ").replace("|", "\\|").replace("`", "'") + "`"


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown (accuracies in %): the findings, the bases at step 0, then the
    final evaluation point first."""
    parts = [f"# Study {report['study']}"]
    parts += [t for n, task in report["tasks"].items() if (t := findings_text(n, task))]
    for name, task in report["tasks"].items():
        final = task["by_step"][str(task["final_step"])]
        if "bases" in task:
            parts += bases_text(name, task["bases"])
        parts += [
            f"## {name}: test accuracy (%) after {task['final_step']} steps",
            accuracy_table(final),
            CLAIMS_TEXT,
            claims_table(final),
            f"{COST_TEXT} and the estimator's noise: {NOISE_COLUMNS}",
            cost_table(final, task["cost"]),
        ]
        for key, by_step in task.get("metrics", {}).items():
            fmt = _decimal if key == "fid" else _pct
            parts += [
                f"### {name}: {EXTRA_METRICS[key]} after {task['final_step']} steps",
                accuracy_table({"table": by_step[str(task["final_step"])]}, fmt),
            ]
        for step in reversed(task["steps"][:-1]):
            parts += [f"### {name}: after {step} steps", accuracy_table(task["by_step"][str(step)])]
        parts.append(
            f"![accuracy per seed]({name}-seeds.png) ![accuracy vs tokens]({name}-tokens.png) "
            f"![training loss]({name}-loss.png)"
        )
    return "\n\n".join(parts) + "\n"


def write_report(
    report: Mapping[str, Any], results: Sequence[Mapping], folder: str | Path
) -> list[Path]:
    """report.md, report.json and the figures of each task into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "report.json", json.dumps(report, indent=1))
    write_text(folder / "report.md", markdown(report))
    written = [folder / "report.md", folder / "report.json"]
    for task in report["tasks"]:
        written += plot_task([r for r in results if r["task"] == task], task, folder)
    return written
