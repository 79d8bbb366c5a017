"""Outputs of the `stablemdm variance` experiment: the terminal tables, `variance.json`,
`variance.md` and the PNG plots (stacked A/B/C bars per method, the per-rate curves, the
efficiency ratios), all rendered from the report dict that `report.run_variance`
returns, so the numbers everywhere are the same ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..training.outputs import atomic_path, write_text

TERMINAL_WIDTH = 120  # rich's width when stdout is not a terminal (a log file)


PLOTS = ("components.png", "curves.png", "efficiency.png")


def _number(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}"


def _pm(x: float | None, se: float | None) -> str:
    if x is None:
        return "-"
    return f"{_number(x)} ± {_number(se, 2)}"


def _decomposition_rows(report: Mapping[str, Any], what: str) -> list[list[str]]:
    """Rows (method, A, B, C, total, semi-analytic total, flag) for the loss or gradient."""
    rows = []
    arm = [("arm", report["arm"])] if report["arm"] is not None else []  # None: skipped
    for name, entry in [*report["decomposition"].items(), *arm]:
        if "same_as" in entry:
            rows.append([name, f"= {entry['same_as']}", "", "", "", "", ""])
            continue
        c = entry[what]
        semi = entry.get("semi_analytic_total") if what == "loss" else None
        flag = "unstable" if c.get("unstable") else ""
        rows.append(
            [
                name,
                *(_pm(c[k], c[f"se_{k}"]) for k in ("A", "B", "C", "total")),
                _number(semi),
                flag,
            ]
        )
    return rows


def _comparison_rows(report: Mapping[str, Any], what: str) -> list[list[str]]:
    """Rows (method, passes, variance, variance x passes, ratio to Standard, gap to floor)."""
    return [
        [
            row["name"],
            str(row["forward_passes"]),
            _pm(row["variance"], row["se"]),
            _number(row["variance_x_passes"]),
            _pm(row["ratio_to_reference"], row["ratio_se"]),
            _number(row.get("gap_to_floor")),
        ]
        for row in report["comparison"][what]
    ]


DECOMPOSITION_HEADER = [
    "method",
    "A (mask)",
    "B (rate)",
    "C (data)",
    "total",
    "semi-analytic",
    "flag",
]


def comparison_header(what: str) -> list[str]:
    """The comparison table's columns; the gradient's ratio is the batch equivalent."""
    ratio = "batch equivalent" if what == "grad" else "ratio to standard"
    return ["method", "passes", "variance", "var x passes", ratio, "/ floor"]


BATCH_EQUIVALENT = (
    "batch equivalent = Standard's gradient variance per sequence forward pass / this "
    "method's (var x passes: the minibatch variance times its forward passes, the same for "
    "any batch size): how many Standard sequences one sequence of this estimator is worth at "
    "equal compute. Above 1 it beats scaling the batch; below 1 a bigger Standard batch is "
    "cheaper."
)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(report: Mapping[str, Any]) -> str:
    """The report as Markdown tables (what variance.md holds)."""
    feature = report["feature"]
    grad_what = (
        f"projection of {feature['coordinates']} coordinates to {feature['projection']} dims"
        if feature["projection"]
        else f"{feature['coordinates']} coordinates"
    )
    options = report["options"]
    curves = report["curves"]
    parts = [
        "# Variance report",
        f"Task `{report['config']['task']}`, model "
        f"{report['checkpoint'] or 'fresh initialisation of ' + report['config']['model_preset']}, "
        f"seed {report['config']['seed']}. Gradient: params `{feature['params']}`, {grad_what}.",
        "## Decomposition of one draw (paper.md section 2)",
        f"Loss: I x J x K = {_design_label(options['loss_design'])}; "
        f"traces of covariance for the gradient: {_design_label(options['grad_design'])}. "
        "Estimates ± jackknife SE; negative values are noise around a small component.",
        "### Loss",
        _markdown_table(DECOMPOSITION_HEADER, _decomposition_rows(report, "loss")),
        "### Gradient",
        _markdown_table(DECOMPOSITION_HEADER, _decomposition_rows(report, "grad")),
        "## Equal-compute comparison",
        f"{options['draws']} independent minibatches of {options['batch']} sequences per method; "
        "ratio > 1 means more variance reduction per forward pass than Standard; "
        "/ floor = variance / (C / n).",
        "### Gradient",
        _markdown_table(comparison_header("grad"), _comparison_rows(report, "grad")),
        BATCH_EQUIVALENT,
        "### Loss",
        _markdown_table(comparison_header("loss"), _comparison_rows(report, "loss")),
        "## Per-rate curves (Standard, unweighted loss)",
        _markdown_table(
            ["t", "g(t)", "v(t)", "S(t)", "P-POTS fit", "a(t)", "b(t)"],
            _curve_rows(curves),
        ),
        "Integrals over the grid (midpoint rule): "
        + ", ".join(f"{k} = {_number(v)}" for k, v in curves["integrals"].items()),
    ]
    warnings = [report["heavy_tail_warning"]] if report["heavy_tail_warning"] else []
    if warnings or report["notes"]:
        parts += ["## Notes", *(f"- **warning**: {w}" for w in warnings)]
        parts += [f"- {note}" for note in report["notes"]]
    line = recommendation_line(report)
    if line is not None:
        parts += ["## Recommendation", line[0].upper() + line[1:] + "."]
    return "\n\n".join(parts) + "\n"


def _curve_rows(curves: Mapping[str, Any]) -> list[list[str]]:
    """One row per grid rate: g, v, S, the P-POTS fit and the integrands a, b (± SE)."""
    return [
        [
            f"{t:.3f}",
            _number(g),
            _number(v),
            _number(S),
            _number(p),
            _pm(a, sa),
            _pm(b, sb),
        ]
        for t, g, v, S, p, a, sa, b, sb in zip(
            curves["t"],
            curves["g"],
            curves["v"],
            curves["S"],
            (curves["ppots_fit"] or {}).get("density", [None] * len(curves["t"])),
            curves["a"],
            curves["se_a"],
            curves["b"],
            curves["se_b"],
            strict=True,
        )
    ]


def recommendation_line(report: Mapping[str, Any]) -> str | None:
    """The report's closing line: which estimator to train with, by `estimator: auto`'s rule
    at its first measurement (`measure.recommend`), or None for a report without one."""
    rec = report["comparison"].get("recommendation")
    if rec is None:
        return None
    matched = " (auto trains MIRROR at equal compute: compute_matched=true)" * (
        "mirror" in rec["name"]
    )
    return (
        f"recommendation: train with {rec['name']}, {rec['reason']}, among the unbiased methods "
        f"{', '.join(rec['candidates'])}; estimator=auto measures it during training and "
        f"switches later only past {rec['margin']:g} SE{matched}"
    )


def _design_label(design: Mapping[str, int]) -> str:
    return f"{design['sequences']} x {design['rates']} x {design['masks']}"


def print_report(report: Mapping[str, Any], console: Any = None) -> None:
    """The decomposition and comparison tables on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()

    def show(title: str, header: Sequence[str], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for column in header:
            left = column == "method"
            table.add_column(column, justify="left" if left else "right", no_wrap=left)
        for row in rows:
            table.add_row(*row)
        console.print(table)

    for what, title in (("loss", "loss"), ("grad", "gradient (trace)")):
        show(
            f"Decomposition of one draw: {title}",
            DECOMPOSITION_HEADER,
            _decomposition_rows(report, what),
        )
    for what, title in (("grad", "gradient"), ("loss", "loss")):
        show(
            f"Equal-compute comparison: minibatch {title}",
            comparison_header(what),
            _comparison_rows(report, what),
        )
    console.print(BATCH_EQUIVALENT, markup=False)
    if report["heavy_tail_warning"]:
        console.print(f"[bold yellow]warning:[/] {report['heavy_tail_warning']}")
    for note in report["notes"]:
        console.print(f"note: {note}")
    line = recommendation_line(report)
    if line is not None:
        console.print(line, style="bold", markup=False)


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_report(report: Mapping[str, Any], output_dir: str | Path) -> list[Path]:
    """Write variance.json, variance.md and the PNG plots into `output_dir`, each atomically
    (a crash leaves whole files); return the paths. The caller checks the folder first
    (`outputs.check_output_folder`)."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--output {folder} cannot be created: {err.strerror}") from err
    json_path = write_text(folder / "variance.json", json.dumps(_jsonable(report), indent=1) + "\n")
    md_path = write_text(folder / "variance.md", markdown_report(report))
    plots = [folder / name for name in PLOTS]
    draw = (
        lambda p: _plot_components(report, p),
        lambda p: _plot_curves(report["curves"], p),
        lambda p: _plot_efficiency(report, p),
    )
    for path, plot in zip(plots, draw, strict=True):
        with atomic_path(path) as tmp:
            plot(tmp)
    return [json_path, md_path, *plots]


def _figure(rows: int, cols: int, size: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def _plot_components(report: Mapping[str, Any], path: Path) -> None:
    """Stacked A/B/C bars per method (negative estimates drawn as 0), SE bars on the total."""
    entries = {
        name: entry for name, entry in report["decomposition"].items() if "same_as" not in entry
    }
    if report["arm"] is not None:
        entries["arm"] = report["arm"]
    names = list(entries)
    figure, axes = _figure(1, 2, (max(8.0, 1.1 * len(names) + 3), 4.5))
    x = np.arange(len(names))
    titles = ("loss", "gradient (trace)")
    for ax, what, title in zip(axes[0], ("loss", "grad"), titles, strict=True):
        bottom = np.zeros(len(names))
        for part, colour in (("A", "tab:blue"), ("B", "tab:orange"), ("C", "tab:green")):
            height = np.array([max(entries[n][what][part], 0.0) for n in names])
            ax.bar(x, height, bottom=bottom, color=colour, label=f"{part}")
            bottom += height
        totals = np.array([entries[n][what]["total"] for n in names])
        ses = np.nan_to_num(np.array([entries[n][what]["se_total"] for n in names]))
        ax.errorbar(x, totals, yerr=ses, fmt="none", ecolor="black", capsize=3)
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_title(f"one draw: {title}")
        ax.set_yscale("symlog", linthresh=max(1e-12, float(np.abs(totals).min()) / 10))
        ax.legend(title="A mask, B rate, C data")
    figure.savefig(path, dpi=110)


def _plot_curves(curves: Mapping[str, Any], path: Path) -> None:
    """g, sqrt(v); S; the densities; the A and B integrands, against t."""
    t = np.asarray(curves["t"])
    figure, axes = _figure(2, 2, (10.0, 7.5))
    ax = axes[0, 0]
    ax.plot(t, curves["g"], "o-", label="g(t) = E[l | t]")
    ax.plot(t, np.sqrt(np.maximum(curves["v"], 0.0)), "s--", label="sqrt v(t)")
    ax.set_xlabel("t")
    ax.legend()
    ax = axes[0, 1]
    ax.semilogy(t, curves["S"], "o-", label="S(t) = E[l^2 | t]")
    ax.set_xlabel("t")
    ax.legend()
    ax = axes[1, 0]
    ax.plot(t, np.ones_like(t), ":", label="uniform (Standard)")
    fit = curves.get("ppots_fit")
    if fit:
        ax.plot(t, fit["optimal"], "o", label="sqrt S, normalised (p*)")
        ax.plot(t, fit["density"], "-", label=f"P-POTS fit ({fit['method']}, mix {fit['mix']})")
    if curves.get("ppots_method_density"):
        ax.plot(t, curves["ppots_method_density"], "--", label="ppots method's density")
    ax.set_xlabel("t")
    ax.set_ylabel("density")
    ax.legend()
    ax = axes[1, 1]
    for key, label in (("a", "a(t): integrand of A"), ("b", "b(t): integrand of B")):
        ax.errorbar(t, curves[key], yerr=curves[f"se_{key}"], fmt="o-", capsize=2, label=label)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("t")
    scale = float(np.abs(curves["b"]).max()) / 10
    ax.set_yscale("symlog", linthresh=scale if scale > 0 else 1e-9)
    ax.legend()
    figure.savefig(path, dpi=110)


def _plot_efficiency(report: Mapping[str, Any], path: Path) -> None:
    """Ratio to Standard of variance x forward passes (> 1 is better), with SE bars."""
    figure, axes = _figure(1, 2, (11.0, 0.35 * len(report["comparison"]["loss"]) + 2.5))
    for ax, what in zip(axes[0], ("grad", "loss"), strict=True):
        rows = report["comparison"][what]
        y = np.arange(len(rows))
        ratio = np.array([r["ratio_to_reference"] for r in rows], dtype=float)
        err = np.array([r["ratio_se"] for r in rows], dtype=float)
        shown = np.isfinite(ratio)
        ax.barh(y[shown], ratio[shown], xerr=np.nan_to_num(err[shown]), color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xscale("log")
        ax.set_yticks(y, [r["name"] for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel(
            "batch equivalent" if what == "grad" else "Standard's variance x passes / this one's"
        )
        ax.set_title(f"minibatch {'gradient' if what == 'grad' else 'loss'}")
    figure.savefig(path, dpi=110)
