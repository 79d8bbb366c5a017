"""The study's figures, one set per task: accuracy per seed per method, accuracy against
training tokens with the spread across seeds, and training-loss curves with their spread."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..training.outputs import atomic_path

KINDS = ("seeds", "tokens", "loss")


def _by_method(results: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    out: dict[str, list[Mapping]] = {}
    for r in results:
        out.setdefault(r["method"], []).append(r)
    return out


def _band(ax, x, rows: np.ndarray, label: str) -> None:
    """Mean line and min-max band of `rows` `[seeds, points]`."""
    line = ax.plot(x, rows.mean(axis=0), label=label)[0]
    ax.fill_between(x, rows.min(axis=0), rows.max(axis=0), color=line.get_color(), alpha=0.2)


def _seeds(ax, methods: dict[str, list[Mapping]], task: str) -> None:
    """Final accuracy of every run, one colour per seed joined across methods (the pairs)."""
    seeds = sorted({r["seed"] for runs in methods.values() for r in runs})
    for seed in seeds:
        points = [
            (i, 100 * r["accuracy"])
            for i, runs in enumerate(methods.values())
            for r in runs
            if r["seed"] == seed
        ]
        ax.plot(*zip(*points, strict=True), marker="o", ms=4, lw=0.6, label=f"seed {seed}")
    for i, runs in enumerate(methods.values()):
        ax.hlines(np.mean([100 * r["accuracy"] for r in runs]), i - 0.3, i + 0.3, color="k")
    ax.set_xticks(range(len(methods)), list(methods), rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: final accuracy per seed (black: mean)")


def _tokens(ax, methods: dict[str, list[Mapping]], task: str) -> None:
    """Accuracy at each evaluation point against the training forward token positions counted
    up to it (a run's own steps: auto may train fewer), band over seeds; a run trained before
    passes were counted has no curve."""
    for method, runs in methods.items():
        per_step = runs[0].get("forward_tokens_per_step")
        if per_step is None:
            continue
        steps = [e.get("trained_step", e["step"]) for e in runs[0]["evaluations"]]
        acc = np.asarray([[100 * e["accuracy"] for e in r["evaluations"]] for r in runs])
        _band(ax, np.asarray(steps) * per_step, acc, method)
    ax.set_xlabel("training forward token positions (counted)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: accuracy vs compute (mean, min-max over seeds)")


def _loss(ax, methods: dict[str, list[Mapping]], task: str) -> None:
    """Training-loss curves (each method's own estimator), band over seeds."""
    positive = True
    for method, runs in methods.items():
        n = min(len(r["losses"]) for r in runs)
        if n == 0:  # a run shorter than logging_steps logs no training loss
            continue
        steps = [s for s, _ in runs[0]["losses"][:n]]
        losses = np.asarray([[loss for _, loss in r["losses"][:n]] for r in runs])
        positive = positive and bool((losses > 0).all())
        _band(ax, steps, losses, method)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{task}: training loss (mean, min-max over seeds)")
    if positive:
        ax.set_yscale("log")


def plot_task(results: Sequence[Mapping], task: str, folder: Path) -> list[Path]:
    """Write `<task>-seeds.png`, `<task>-tokens.png` and `<task>-loss.png`; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = _by_method(results)
    paths = []
    for kind, draw in zip(KINDS, (_seeds, _tokens, _loss), strict=True):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        draw(ax, methods, task)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(folder / f"{task}-{kind}.png")
        with atomic_path(paths[-1]) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
    return paths
