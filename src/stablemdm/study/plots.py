"""The study's figures, one set per task: accuracy per seed per method, accuracy against
training tokens with the spread across seeds, and training-loss curves with their spread."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _by_method(results: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    out: dict[str, list[Mapping]] = {}
    for r in results:
        out.setdefault(r["method"], []).append(r)
    return out


def _band(ax, x, rows: np.ndarray, label: str) -> None:
    """Mean line and min-max band of `rows` `[seeds, points]`."""
    line = ax.plot(x, rows.mean(axis=0), label=label)[0]
    ax.fill_between(x, rows.min(axis=0), rows.max(axis=0), color=line.get_color(), alpha=0.2)


def plot_task(results: Sequence[Mapping], task: str, folder: Path) -> list[Path]:
    """Write `<task>-seeds.png`, `<task>-tokens.png` and `<task>-loss.png`; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = _by_method(results)
    paths = [folder / f"{task}-{kind}.png" for kind in ("seeds", "tokens", "loss")]

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, runs in enumerate(methods.values()):
        acc = [100 * r["accuracy"] for r in runs]
        ax.scatter([i] * len(acc), acc, s=18)
        ax.hlines(np.mean(acc), i - 0.3, i + 0.3)
    ax.set_xticks(range(len(methods)), list(methods), rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: final accuracy per seed (line: mean)")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for method, runs in methods.items():
        steps = [e["step"] for e in runs[0]["evaluations"]]
        tokens = np.asarray(steps) * runs[0]["forward_tokens_per_step"]
        acc = np.asarray([[100 * e["accuracy"] for e in r["evaluations"]] for r in runs])
        _band(ax, tokens, acc, method)
    ax.set_xlabel("forward token positions")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    positive = True
    for method, runs in methods.items():
        steps = [s for s, _ in runs[0]["losses"]]
        if not steps:  # a run shorter than logging_steps logs no training loss
            continue
        losses = np.asarray([[loss for _, loss in r["losses"]][: len(steps)] for r in runs])
        positive = positive and bool((losses > 0).all())
        _band(ax, steps, losses, method)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (each method's own estimator)")
    if positive:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths
