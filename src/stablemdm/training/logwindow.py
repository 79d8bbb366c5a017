"""The training loss since the last log line, carried across a resume.

The engine logs the mean loss per step since its previous log line, from a running sum it
restarts at every resume, so a run resumed between two log lines used to log the mean of
only the steps after its checkpoint. `LossWindow` keeps that sum exactly as the engine does
(the micro-batch losses added in order; with `logging_nan_inf_filter`, a non-finite one
replaced by the window's mean so far) with the step the window began at and the non-finite
steps skipped in it, and writes them into each checkpoint's trainer_state.json (under
`stateful_callbacks`), so the resumed run logs what the uninterrupted one logs: bit for bit
in one process, to rounding with several (the carried sum is their mean). Public hooks only:
a callback, and the trainer's `training_step` and `log` (docs/reliability.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback

KEY = "stablemdm_loss_window"  # its entry in trainer_state.json's stateful_callbacks


def _mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over every process (itself with one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


class LossWindow(TrainerCallback):
    """The log window: `add` each micro-batch loss, `take` the mean per step at a log line."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None  # summed micro-batch losses, on the device
        self.start = 0  # the optimizer step the window began after
        self.skipped = 0  # non-finite (skipped) steps in the window

    def add(self, loss: torch.Tensor, step: int, nan_filter: bool) -> None:
        """Add one micro-batch's loss as the engine adds it to its own sum."""
        if self.total is None:
            self.total = torch.zeros((), dtype=loss.dtype, device=loss.device)
        if nan_filter and not torch.isfinite(loss):
            self.total += self.total / (1 + step - self.start)
        else:
            self.total += loss

    def take(self, step: int) -> float:
        """The mean loss per step since the window began; a new window begins at `step`."""
        total = 0.0 if self.total is None else _mean_over_processes(self.total).item()
        loss = total / max(step - self.start, 1)
        if self.total is not None:
            self.total.zero_()
        self.start, self.skipped = step, 0
        return loss

    def on_train_begin(self, args, state, control, **kwargs):
        """Start at the loaded step, with the window a checkpoint of that step carried."""
        carried = state.stateful_callbacks.get(KEY)
        self.start, self.skipped, total = state.global_step, 0, 0.0
        if isinstance(carried, dict) and carried.get("step") == state.global_step:
            self.start, self.skipped, total = carried["start"], carried["skipped"], carried["total"]
        self.total = torch.tensor(total, dtype=torch.float32, device=args.device)

    def on_step_end(self, args, state, control, **kwargs):
        """Before a checkpoint of this step is written, record the window it carries (empty
        when this step also logs: the log line closes the window first). A record of another
        step is ignored on loading."""
        if not control.should_save or self.total is None:
            return
        logs = control.should_log
        state.stateful_callbacks[KEY] = {
            "step": state.global_step,
            "start": state.global_step if logs else self.start,
            "skipped": 0 if logs else self.skipped,
            "total": 0.0 if logs else _mean_over_processes(self.total).item(),
        }

    on_epoch_end = on_step_end  # save_strategy=epoch decides there
