"""Progress over a whole study: on a terminal a live display (rich) of the study's runs and
the current run's steps; in a log file one line per finished run and nothing else."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from transformers import TrainerCallback


class StudyProgress:
    """Reports a study's runs as they finish; `live` (default: stdout and stderr are both
    terminals) adds progress bars, drawn on stderr like the lines."""

    def __init__(
        self, name: str, total: int, live: bool | None = None, stream: TextIO | None = None
    ) -> None:
        self.name, self.total, self.done = name, total, 0
        self.stream = stream or sys.stderr
        self.live = sys.stdout.isatty() and self.stream.isatty() if live is None else live
        self.started = time.perf_counter()
        self._bars = None
        self._study = self._run = None
        self._label = ""

    def __enter__(self) -> StudyProgress:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bars.start()
            self._study = self._bars.add_task(f"study {self.name}", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def say(self, message: str) -> None:
        """One line (above the bars on a terminal)."""
        if self._bars is not None:
            self._bars.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(message, file=self.stream, flush=True)

    def start_run(self, label: str, steps: int) -> TrainerCallback:
        """A run begins: returns the callback that moves its step bar."""
        if self._bars is not None:
            if self._run is not None:  # a base, which has no finish_run
                self._bars.remove_task(self._run)
            self._run = self._bars.add_task(f"  {label}", total=steps)
        self._label = label
        return _Steps(self)

    def phase(self, text: str) -> None:
        """What the current run is doing besides training (decoding, measuring)."""
        if self._bars is not None and self._run is not None:
            self._bars.update(self._run, description=f"  {self._label} ({text})")

    def finish_run(self, label: str, result: dict[str, Any] | None) -> None:
        """A run is done (`result` None: it was done before this invocation)."""
        self.done += 1
        prefix = f"[{self.done}/{self.total}] {label}"
        if result is None:
            self.say(f"{prefix}: done already")
        else:
            minutes = (time.perf_counter() - self.started) / 60
            points = " ".join(f"{100 * e['accuracy']:.1f}" for e in result["evaluations"])
            self.say(
                f"{prefix}: accuracy {100 * result['accuracy']:.1f}% (at each eval point: "
                f"{points}), trained in {result['train_seconds']:.0f} s, study {minutes:.1f} min"
            )
        if self._bars is not None:
            self._bars.update(self._study, completed=self.done)
            if self._run is not None:
                self._bars.remove_task(self._run)
                self._run = None

    def step(self, step: int) -> None:
        """The current run reached optimizer step `step`."""
        if self._bars is not None and self._run is not None:
            self._bars.update(self._run, completed=step)


class _Steps(TrainerCallback):
    """Moves the current run's step bar (a resumed run starts at its checkpoint's step)."""

    def __init__(self, progress: StudyProgress) -> None:
        self.progress = progress

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.step(state.global_step)
