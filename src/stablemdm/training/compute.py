"""Compute accounting: every sequence pass a run makes through its model, by phase.

`attach(model)` counts at the model itself, so no pass escapes: a forward hook adds the batch
rows (sequences) and token positions of every call, and a hook on its output the rows of
every backward pass through that output, to the phase current at the forward call (`phase`):

- `train`: the training steps (MIRROR: two passes per sequence; a block-diffusion row counts
  one pass per noised copy it scores, `noised_copies`);
- `auto`: estimator=auto's measurements;
- `ppots_fit`: P-POTS fits and refits (auto's too);
- `other`: a pass no phase names;
- `eval`: the held-out loss and accuracy during training, reported apart as evaluation.

A run's compute is its forward plus backward sequence passes outside `eval`: training, and
the overhead (every other phase). Counting adds Python integers read from tensor shapes (no
device sync), once per model call. The counts are carried in each checkpoint's
trainer_state.json (as `logwindow` carries the loss window), so a resumed run reports the
uninterrupted run's totals; `compute.json` in the run folder and in each checkpoint holds
them, with estimator=auto's plan when it is charged its measurements (docs/methods.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .config import StableMDMConfig
from .outputs import write_text

PHASES = ("train", "auto", "ppots_fit", "other", "eval")
OVERHEAD = ("auto", "ppots_fit", "other")
KINDS = ("forward", "backward", "tokens")  # sequence passes each way, forward token positions
KEY = "stablemdm_compute"  # its entry in trainer_state.json's stateful_callbacks
COMPUTE_FILE = "compute.json"
UNIT = "sequence passes through the model, forward plus backward"

_PHASE: contextvars.ContextVar[str] = contextvars.ContextVar("stablemdm_phase", default="other")
_COUNTERS: weakref.WeakKeyDictionary[torch.nn.Module, PassCounter] = weakref.WeakKeyDictionary()

Counts = dict[str, dict[str, int]]


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the passes made inside the block (and their backward passes) as `name`'s; the
    innermost phase wins."""
    if name not in PHASES:
        raise ValueError(f"unknown compute phase {name!r}; known: {', '.join(PHASES)}")
    token = _PHASE.set(name)
    try:
        yield
    finally:
        _PHASE.reset(token)


def zero() -> Counts:
    """No passes in any phase."""
    return {p: dict.fromkeys(KINDS, 0) for p in PHASES}


class PassCounter:
    """The passes one model made, by phase (`counts[phase][kind]`)."""

    def __init__(self) -> None:
        self.counts = zero()

    def add(self, name: str, kind: str, n: int) -> None:
        self.counts[name][kind] += n

    def load(self, carried: Mapping[str, Mapping[str, int]]) -> None:
        """Add counts carried from a checkpoint (a resumed run goes on from them)."""
        for name, kinds in carried.items():
            for kind, n in kinds.items():
                self.add(name, kind, int(n))

    def vector(self) -> list[int]:
        """The counts in a fixed order (to sum them over processes)."""
        return [self.counts[p][k] for p in PHASES for k in KINDS]

    def _on_forward(self, module, args, kwargs, output) -> None:
        """The forward hook: a call's rows and tokens, and a hook counting its backward."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            return
        name, rows = _PHASE.get(), int(ids.shape[0]) * noised_copies(ids, kwargs)
        self.add(name, "forward", rows)
        self.add(name, "tokens", ids.numel())
        out = getattr(output, "logits", output)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: self.add(name, "backward", rows))


def noised_copies(ids: torch.Tensor, kwargs: Mapping[str, Any]) -> int:
    """Sequence passes one row of a model call stands for: 1, or for block diffusion
    (`block_ids` given, the row [noised copies | clean] of (c + 1) L positions) its c noised
    copies, so block MIRROR's [noised | mirror | clean] counts two, as its estimator does."""
    block_ids = kwargs.get("block_ids")
    if not isinstance(block_ids, torch.Tensor) or block_ids.dim() < 2 or ids.dim() < 2:
        return 1
    return max(1, ids.shape[1] // block_ids.shape[1] - 1)


def attach(model: torch.nn.Module) -> PassCounter:
    """The counter of `model`'s passes, hooked on at the first call and the same after."""
    counter = _COUNTERS.get(model)
    if counter is None:
        counter = _COUNTERS[model] = PassCounter()
        model.register_forward_hook(counter._on_forward, with_kwargs=True)
    return counter


def counts_of(vector: list[int]) -> Counts:
    """`PassCounter.vector()` (or a sum of them) back as counts."""
    it = iter(vector)
    return {p: {k: int(next(it)) for k in KINDS} for p in PHASES}


def passes(counts: Mapping[str, Mapping[str, int]], names: tuple[str, ...]) -> int:
    """Forward plus backward sequence passes of the phases `names`."""
    return sum(counts[p]["forward"] + counts[p]["backward"] for p in names)


def summary(counts: Counts, plan: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """compute.json: the counts per phase, then training, overhead and their sum (the run's
    compute), evaluation apart, training forward token positions, and auto's plan if any."""
    training, overhead = passes(counts, ("train",)), passes(counts, OVERHEAD)
    return {
        "unit": UNIT,
        "training": training,
        "overhead": overhead,
        "total": training + overhead,
        "evaluation": passes(counts, ("eval",)),
        "training_forward_tokens": counts["train"]["tokens"],
        "phases": counts,
        "plan": dict(plan) if plan else None,
    }


def log_fields(counts: Counts) -> dict[str, int]:
    """A metrics.jsonl training line's running totals: passes per phase, overhead, total."""
    fields = {f"compute/{p}": passes(counts, (p,)) for p in PHASES}
    fields["compute/overhead"] = passes(counts, OVERHEAD)
    fields["compute/total"] = fields["compute/train"] + fields["compute/overhead"]
    return fields


def record(step: int, counts: Counts, plan: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint's trainer state carries: the counts at `step` and auto's plan."""
    return {"step": step, "counts": counts, "plan": dict(plan) if plan else None}


class CarryCompute(TrainerCallback):
    """Before a checkpoint is written, records `record()` (the trainer's `compute_record`:
    the counts so far, summed over processes) in the trainer state it carries. Added after
    every callback that makes passes at a step's end (P-POTS refits, auto's measurements):
    the checkpoint holds their results, so it must count their passes."""

    def __init__(self, record: Callable[[], dict[str, Any]]) -> None:
        self.record = record

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            state.stateful_callbacks[KEY] = self.record()

    on_epoch_end = on_step_end  # save_strategy=epoch decides there


def carried(stateful: Mapping[str, Any], step: int) -> Counts | None:
    """The counts a checkpoint of `step` carried in its trainer state's `stateful_callbacks`
    (None from one written before passes were counted)."""
    entry = stateful.get(KEY)
    if isinstance(entry, dict) and entry.get("step") == step:
        return entry["counts"]
    return None


def planned_end(state: Mapping[str, Any], max_steps: int) -> int:
    """The step a run of `max_steps` ends at: the planned steps when its trainer state records
    a charged plan for that budget (estimator=auto), else max_steps."""
    entry = (state.get("stateful_callbacks") or {}).get(KEY)
    plan = entry.get("plan") if isinstance(entry, dict) else None
    if isinstance(plan, dict) and plan.get("max_steps") == max_steps:
        return int(plan["steps"])
    return max_steps


def write_compute(folder: Path, entry: Mapping[str, Any] | None) -> None:
    """Write `compute.json` (the `summary` of a trainer-state record) into `folder`."""
    if entry is not None:
        text = json.dumps(summary(entry["counts"], entry.get("plan")), indent=1)
        write_text(Path(folder) / COMPUTE_FILE, text)


def read_compute(folder: Path) -> dict[str, Any] | None:
    """A run folder's compute.json (None when the run was trained before it was written)."""
    try:
        return json.loads((Path(folder) / COMPUTE_FILE).read_text())
    except (OSError, ValueError):
        return None


def step_passes(config: StableMDMConfig) -> int:
    """Forward sequence passes of one optimizer step on one process, as the config's objective
    makes them: its sequences, twice for MIRROR (full canvas or block: two noised copies per
    sequence), half of them twice for compute-matched MIRROR."""
    sequences = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if config.objective == "arm" or config.masking != "mirror":
        return sequences
    if config.compute_matched:
        return config.gradient_accumulation_steps * (config.per_device_train_batch_size // 2) * 2
    return 2 * sequences
