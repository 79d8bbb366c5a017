"""Trainer callbacks: progress (a bar, or plain lines in a log), EMA decay, P-POTS refits,
metrics and accuracy logging."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..estimators.ppots import PPOTS
from .compute import phase
from .trainer import ema_of


class ProgressBar(ProgressCallback):
    """The engine's progress bar, with the latest loss, learning rate and tokens/s on it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and "loss" in (logs or {}):
            self.training_bar.set_postfix(
                loss=f"{logs['loss']:.4g}",
                lr=f"{logs.get('learning_rate', 0.0):.3g}",
                tok_s=f"{logs.get('tokens_per_s', 0.0):.0f}",
                refresh=False,
            )
        super().on_log(args, state, control, logs=logs, **kwargs)


class LogLines(TrainerCallback):
    """Progress for a log file (stderr is not a terminal): one plain line per log record,
    instead of a bar redrawn with carriage returns into one huge line. A training record shows
    the loss, learning rate and tokens/s; any other (evaluation, the final summary) all of its
    numbers."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            shown = {
                "loss": logs["loss"],
                "lr": logs.get("learning_rate", 0.0),
                "tok_s": round(logs.get("tokens_per_s", 0.0)),
            }
        else:
            shown = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        text = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
        )
        print(
            f"stablemdm: step {state.global_step}/{state.max_steps}: {text}",
            file=sys.stderr,
            flush=True,
        )


class EMACallback(TrainerCallback):
    """Ends each optimizer step for the EMA sampler of the objective the trainer trains
    (estimator=auto may switch it): it folds the step's draws (all micro-batches) into its
    averages, once per step, and refreshes its density every N."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        ema = ema_of(self.trainer.objective)
        if ema is not None:
            ema.step()


class RefitCallback(TrainerCallback):
    """Refits the P-POTS density every `every` optimizer steps on the current model:
    `refit(step)` fits a new one (the same on every process) and `density`, the sampler's, takes
    its state, so every later draw comes from and is weighted by the new density (earlier draws
    kept theirs: unbiased). It runs before the step's checkpoint is written, which therefore
    holds the refitted density; the self-check is logged as `ppots/*`."""

    def __init__(
        self, trainer: Trainer, density: PPOTS, refit: Callable[[int], PPOTS], every: int
    ) -> None:
        self.trainer, self.density, self.refit, self.every = trainer, density, refit, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        fresh = self.refit(state.global_step)
        self.density.load_state_dict(fresh.state_dict())
        should_log = control.should_log  # logging resets it: keep this step's loss line
        self.trainer.log({f"ppots/{k}": float(v) for k, v in (fresh.check or {}).items()})
        control.should_log = should_log


class MetricsCallback(TrainerCallback):
    """Appends every log line to `<output_dir>/metrics.jsonl` (main process only), with the
    fields `extra()` adds (estimator=auto: the estimator the line's steps were trained with).
    `begin()` runs once training has begun, when a resumed run's checkpoint has been loaded
    (the run's config.yaml, and dropping what a resumed run will log again): a refused
    resume leaves the run folder untouched."""

    def __init__(
        self,
        begin: Callable[[], None] | None = None,
        extra: Callable[[], dict] | None = None,
    ) -> None:
        self.begin = begin
        self.extra = extra

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.begin is not None:
            self.begin()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, **{k: _finite(v) for k, v in logs.items()}}
            record.update(self.extra() if self.extra is not None else {})
            with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


class AccuracyCallback(TrainerCallback):
    """After each evaluation, decode part of the test split and log the accuracy (its
    passes counted as evaluation, not as the run's compute); a `run_eval` that returns a
    dict of metrics (a text run's held-out bits per token) has them logged instead."""

    def __init__(self, trainer: Trainer, run_eval) -> None:
        self.trainer = trainer
        self.run_eval = run_eval

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with phase("eval"):
                value = self.run_eval(self.trainer.model)
            self.trainer.log(value if isinstance(value, dict) else {"eval_accuracy": value})
