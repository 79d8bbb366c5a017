"""`StableMDMTrainer`: a `transformers.Trainer` whose loss is a stablemdm `Objective`.

The subclass works through the engine's public extension points: `compute_loss` (sampler ->
masks -> model -> loss), `log` (adds what the sampler did: mean and spread of the rates and
importance weights, tokens/s), `training_step` (its loss also goes into the `LossWindow`,
which carries the logged loss across a resume) and a callback of its own (`TrainerHooks`: the
learning rate of a resumed run, no checkpoint during non-finite steps). Everything else (DDP,
FSDP, DeepSpeed, gradient accumulation, clipping, schedules, bf16, checkpoints with optimizer,
scheduler and RNG states) is the engine's. Two private methods are overridden because no
public hook serves; each says why, and tests/test_trainer_contract.py pins what it relies on:
`_save_checkpoint` writes a checkpoint into a `tmp-` folder with the stablemdm pieces
(`checkpoint_extras`: model config, tokenizer, sampler state, config, density), renames it
when complete, and only then rotates old ones away (`checkpoints`); `_get_grad_norm` is where a
step whose loss or gradient is not finite is skipped, the run stopping after
`max_nonfinite_steps` in a row (docs/reliability.md).

Randomness: the rates of optimizer step s are drawn at once for every process and
micro-batch from a generator seeded by (seed, s), shared by all processes, and each
micro-batch j of each rank takes its slice (`rate_slice`), so StraTS stratifies the whole
global batch of the step (slices of the nominal micro-batch size: a short last micro-batch
of an epoch takes part of its slice, and no stratum twice); masks come from (seed, s, j,
rank). A resumed run therefore draws
exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import ConfigError
from ..estimators.ema import EMA
from ..estimators.objective import Objective
from ..rng import seeded_generator
from .checkpoints import STAGING, checkpoints, clear_staging, publish, rotate
from .compute import attach, carried, counts_of, log_fields, phase, record
from .finite import way_on, weights_finite
from .logwindow import LossWindow
from .outputs import make_room, write_failure


def rate_slice(micro: int, rank: int, world_size: int, accumulation: int) -> tuple[int, int]:
    """(slice, slices) of the rates of micro-batch `micro` on process `rank` within its
    optimizer step's draw: the step draws world_size x accumulation slices at once from one
    generator shared by all processes, ordered [micro-batch][rank], so StraTS stratifies the
    whole optimizer step (`Objective.draw_rates` takes the slice)."""
    return micro * world_size + rank, world_size * accumulation


def ema_of(objective: Objective) -> EMA | None:
    """The EMA sampler inside the objective's sampler (wrapped by a scheme or not)."""
    sampler = objective.sampler
    while not isinstance(sampler, EMA) and hasattr(sampler, "base"):
        sampler = sampler.base
    return sampler if isinstance(sampler, EMA) else None


class StableMDMTrainer(Trainer):
    """A Trainer training `objective`; `eval_objective` gives the held-out loss."""

    def __init__(self, *args, objective: Objective, eval_objective: Objective, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # the objective averages per-sequence estimates itself: the engine must divide each
        # micro-batch loss by the accumulation steps, whatever the model's forward accepts
        self.model_accepts_loss_kwargs = False
        self.objective = objective
        self.eval_objective = eval_objective
        self._micro = (-1, 0)  # (optimizer step, micro-batch index within it)
        self._seen: dict[str, list[torch.Tensor]] = {"rate": [], "weight": [], "loss": []}
        # every pass through the model, by phase (`compute`); `compute_plan`: auto's, if charged
        self.compute = attach(self.model)
        self.compute_plan: dict | None = None
        self._tokens = 0  # training token positions counted at the last log line
        self._clock = time.perf_counter()
        # writes the stablemdm files into a checkpoint folder before it is published
        self.checkpoint_extras: Callable[[Path], None] | None = None
        self._bad_loss: torch.Tensor | None = None  # a non-finite micro-batch loss this step
        self._streak = 0  # non-finite steps in a row, up to now
        # the loss and skipped steps since the last log line, carried across a resume
        self.loss_window = LossWindow()
        self.add_callback(TrainerHooks(self))  # after every callback that may ask to save
        self.add_callback(self.loss_window)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The engine's training step; its loss goes into the log window too."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.loss_window.add(loss, self.state.global_step, self.args.logging_nan_inf_filter)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """One Monte Carlo estimate of the objective on this micro-batch."""
        seed = self.args.seed
        if model.training:
            step = self.state.global_step
            micro = self._micro[1] + 1 if self._micro[0] == step else 0
            self._micro = (step, micro)
            rank = self.args.process_index
            part, parts = rate_slice(
                micro, rank, self.args.world_size, self.args.gradient_accumulation_steps
            )
            with phase("train"):
                out = self.objective(
                    model,
                    inputs,
                    rate_generator=seeded_generator(seed, "rate", step),
                    mask_generator=seeded_generator(seed, "mask", step, micro, rank),
                    rank=part,
                    world_size=parts,
                    micro_batch_size=self.args.per_device_train_batch_size,
                )
            self._record(out, inputs)
            bad = ~torch.isfinite(out.loss.detach())  # judged with the gradient (no sync here)
            self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        else:  # held-out loss: a fixed draw per batch, the same for every method and eval
            key = int(inputs["input_ids"].sum()), int(inputs["eligible"].sum())
            with phase("eval"):
                out = self.eval_objective(
                    model,
                    inputs,
                    seeded_generator(seed, "eval-rate", *key),
                    seeded_generator(seed, "eval-mask", *key),
                )
            if not torch.isfinite(out.loss):
                raise FloatingPointError(
                    f"non-finite held-out loss {out.loss.item()} at step "
                    f"{self.state.global_step}; checkpoints already written in "
                    f"{self.args.output_dir} are intact. Lower learning_rate, raise mix (bounds "
                    "the importance weights) or use bf16=false."
                )
        return (out.loss, {"per_sequence": out.per_sequence}) if return_outputs else out.loss

    # Private override: the engine's gradient norm exists only here, just before the optimizer
    # step. The public `on_pre_optimizer_step` runs at the same point but is given no norm, and
    # computing one there would cost another pass over the gradients and miss DeepSpeed's, which
    # are not in `param.grad`. Pinned by tests/test_trainer_contract.py.
    def _get_grad_norm(self, model, grad_norm=None):
        """The engine's gradient norm, just before the optimizer step: where a non-finite
        step is skipped (`_skip_if_nonfinite`)."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._skip_if_nonfinite(grad_norm)
        return grad_norm

    def _skip_if_nonfinite(self, grad_norm) -> None:
        """If this step's loss or gradient norm is not finite on any process, drop the
        gradients, so that the optimizer step changes neither weights nor optimizer state (the
        schedule still advances: the learning rate stays a function of the step), count it,
        and stop after `max_nonfinite_steps` in a row. The decision is the same on every
        process. With fp16 the gradient scaler skips such a step itself."""
        device = self.args.device
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 clips sharded gradients: a DTensor norm
            grad_norm = grad_norm.full_tensor()
        bad = ~torch.isfinite(torch.as_tensor(grad_norm, device=device, dtype=torch.float32))
        if self._bad_loss is not None:
            bad = bad | self._bad_loss.to(device)
        self._bad_loss = None
        if self.args.world_size > 1:
            bad = self.accelerator.reduce(bad.float(), reduction="sum") > 0
        if not bool(bad):
            self._streak = 0
            return
        if getattr(self.accelerator, "scaler", None) is None:
            self.optimizer.zero_grad(set_to_none=True)  # no gradient: the optimizer skips
        self._streak += 1
        self.loss_window.skipped += 1
        if self._streak >= self.args.max_nonfinite_steps:
            raise FloatingPointError(self._nonfinite_message())

    def _nonfinite_message(self) -> str:
        """The one line a run stopped for non-finite steps ends with."""
        step, run_dir = self.state.global_step + 1, Path(self.args.output_dir)
        return (
            f"{self._streak} steps in a row up to step {step} had a non-finite loss or gradient "
            f"(max_nonfinite_steps={self.args.max_nonfinite_steps}); "
            f"{way_on(run_dir, self.args.trust_remote_code)} "
            "(docs/reliability.md)"
        )

    def _record(self, out, inputs) -> None:
        """Remember what the sampler drew (on the device: no host sync in the training step;
        `log` moves it once per log line); feed the EMA sampler (pooled over processes)."""
        rate, weight = out.rate.detach(), out.weight.detach()
        self._seen["rate"].append(rate.float())
        self._seen["weight"].append(weight.float())
        self._seen["loss"].append(out.unweighted.float())
        ema = ema_of(self.objective)
        if ema is not None:
            both = torch.stack([rate.float(), out.unweighted.float()])  # [2, B]
            if self.args.world_size > 1:
                both = self.accelerator.gather(both.T.contiguous()).T
            keep = torch.isfinite(both).all(0)  # a non-finite loss says nothing about S(t)
            ema.observe(both[0][keep].cpu(), both[1][keep].cpu())

    def _rate_bins(self, rate: torch.Tensor, loss: torch.Tensor) -> dict[str, float]:
        """Per-bin mean and second moment of the unweighted loss since the last log line."""
        n_bins = self.args.log_rate_bins
        if n_bins == 0:
            return {}
        bins = torch.clamp((rate * n_bins).long(), 0, n_bins - 1)
        count = torch.bincount(bins, minlength=n_bins)
        total = torch.bincount(bins, loss.double(), minlength=n_bins)
        squares = torch.bincount(bins, loss.double() ** 2, minlength=n_bins)
        out = {}
        for j in torch.nonzero(count).flatten().tolist():
            key = f"rate_bin/{(j + 0.5) / n_bins:.3f}"
            out[f"{key}/mean"] = (total[j] / count[j]).item()
            out[f"{key}/m2"] = (squares[j] / count[j]).item()
        return out

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the sampler's diagnostics, throughput, the count of skipped non-finite
        steps since the last line and the passes counted so far (`compute/*`, every process's)
        to each training log line (and a block-diffusion run's `block_size`). Its loss is the
        log window's (the engine's, carried across a resume), NaN (null in metrics.jsonl) when
        every step since the last line was skipped."""
        if "loss" in logs:
            window = self.loss_window
            skipped, steps = window.skipped, self.state.global_step - window.start
            logs["loss"] = window.take(self.state.global_step)
            if skipped and skipped >= steps:
                logs["loss"] = float("nan")
            logs["nonfinite_steps"] = skipped
            if self.objective.block_size is not None:  # block diffusion: its t_* are per block
                logs["block_size"] = self.objective.block_size
            logs.update(log_fields(self.compute_counts()))
        if "loss" in logs and self._seen["rate"]:
            rate, weight, loss = (
                torch.cat(self._seen[k]).cpu() for k in ("rate", "weight", "loss")
            )
            finite = torch.isfinite(weight) & torch.isfinite(loss)  # skipped steps' draws out
            rate, weight, loss = rate[finite], weight[finite], loss[finite]
            now = time.perf_counter()
            if self.objective.kind != "arm" and len(rate):  # an ARM draws no rates or weights
                logs.update(
                    t_mean=rate.mean().item(),
                    t_std=rate.std().item() if len(rate) > 1 else 0.0,
                    weight_mean=weight.mean().item(),
                    weight_std=weight.std().item() if len(weight) > 1 else 0.0,
                    weight_max=weight.max().item(),
                )
                logs.update(self._rate_bins(rate, loss))
            tokens = self.compute.counts["train"]["tokens"]  # this process's
            logs["tokens_per_s"] = (
                (tokens - self._tokens) * self.args.world_size / max(now - self._clock, 1e-9)
            )
            self._seen = {"rate": [], "weight": [], "loss": []}
            self._tokens, self._clock = tokens, now
        super().log(logs, *args, **kwargs)

    def compute_counts(self) -> dict:
        """The passes counted so far, summed over processes (with several, a collective:
        every process calls it)."""
        vector = self.compute.vector()
        if self.args.world_size > 1:
            total = torch.tensor(vector, dtype=torch.int64, device=self.args.device)
            vector = self.accelerator.reduce(total, reduction="sum").tolist()
        return counts_of(vector)

    def compute_record(self) -> dict:
        """What a checkpoint (`compute.CarryCompute`) and the finished run's trainer state
        carry of the compute (every process calls it)."""
        return record(self.state.global_step, self.compute_counts(), self.compute_plan)

    def restore_compute(self, state) -> None:
        """A resumed run goes on from the counts its checkpoint carried (added once, by the
        main process, so that the sum over processes is the run's)."""
        counts = carried(state.stateful_callbacks, state.global_step)
        if counts is not None and self.args.process_index == 0:
            self.compute.load(counts)
        self._tokens = self.compute.counts["train"]["tokens"]

    # Private override: no public hook decides where a checkpoint is written or when old ones
    # are rotated; `save_model` and `on_save` run inside and after the engine's own writes into
    # checkpoint-N and its rotation. The engine pieces it calls are pinned by
    # tests/test_trainer_contract.py, which also checks it writes every file the engine's does.
    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-N whole or not at all: every file (the engine's and
        `checkpoint_extras`') goes into tmp-checkpoint-N, which the main process renames once
        every process is done; only then are old checkpoints rotated away."""
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = run_dir / f"{STAGING}{final.name}"
        if self.args.should_save:
            clear_staging(run_dir)
        self.accelerator.wait_for_everyone()
        try:
            self._write_checkpoint(model, trial, staged, final)
        except Exception as err:
            shutil.rmtree(staged, ignore_errors=True)  # give the space back
            failure = _save_failure(err, run_dir, final)
            if failure is None:
                raise
            raise failure from err
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(staged, final)
            best = self.state.best_model_checkpoint
            rotate(run_dir, self.args.save_total_limit, {final, *([Path(best)] if best else [])})
            if self.args.push_to_hub:
                self._push_from_checkpoint(str(final))
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, model, trial, staged: Path, final: Path) -> None:
        """Everything a checkpoint holds, into `staged`; each process writes its share (the
        main one the weights, optimizer, scheduler, states and extras; each its RNG state)."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(str(staged), _internal_call=True)
        if self.state.best_global_step:
            best = final.with_name(f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if best == final or best.is_dir():
                self.state.best_model_checkpoint = str(best)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staged))
            self._save_scaler(str(staged))
            self._save_rng_state(str(staged))
        if self.args.should_save:
            self._save_trainer_state(staged)
            if self.checkpoint_extras is not None:
                self.checkpoint_extras(staged)

    def _save_trainer_state(self, folder: Path) -> None:
        """trainer_state.json with the exportable callbacks' states, as the engine writes it."""
        for cb in [*self.callback_handler.callbacks, self.control]:
            if isinstance(cb, ExportableState):
                name, state = type(cb).__name__, cb.state()
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(state)
                else:
                    self.state.stateful_callbacks[name] = state
        self.state.save_to_json(str(folder / TRAINER_STATE_NAME))

    def _apply_learning_rate(self) -> None:
        """Rescale the schedule loaded from a checkpoint so that its peak is the configured
        `learning_rate` (same shape, same position in it): the loaded optimizer and scheduler
        states carry the checkpoint's. Nothing changes when the learning rate did not."""
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        base = getattr(scheduler, "base_lrs", None)
        if not base or base[0] == self.args.learning_rate:
            return
        ratio = self.args.learning_rate / base[0]
        scheduler.base_lrs = [lr * ratio for lr in base]
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class TrainerHooks(TrainerCallback):
    """The trainer's own uses of the engine's public events. Registered after the engine's
    flow callback and the callbacks given to the constructor (any of which may set
    `should_save`), and before the run's other callbacks."""

    def __init__(self, trainer: StableMDMTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run's optimizer, scheduler and trainer state are loaded by now: apply a
        changed learning_rate to them, and go on from the compute its checkpoint counted."""
        if state.global_step > 0:
            self.trainer._apply_learning_rate()
            self.trainer.restore_compute(state)

    def on_step_end(self, args, state, control, **kwargs):
        """No checkpoint in a run of non-finite steps or of non-finite weights: the latest
        checkpoint stays the last finite one."""
        trainer = self.trainer
        if trainer._streak or (control.should_save and not weights_finite(trainer)):
            control.should_save = False

    on_epoch_end = on_step_end


def _save_failure(err: Exception, run_dir: Path, final: Path) -> ConfigError | None:
    """The one-line error of a checkpoint save that failed for want of room (a full disk, a
    file-size limit) or of permission (output_dir made read-only), or None for any other
    failure."""
    staged = f"the unfinished {STAGING}{final.name} was removed"
    cause = write_failure(err, run_dir)
    if cause is not None:
        return ConfigError(
            f"{cause} while writing {final} ({staged}); {_way_forward(run_dir, make_room(cause))}"
        )
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConfigError(
            f"cannot write {final}: {err.strerror} ({err.filename}); "
            f"{_way_forward(run_dir, f'make {run_dir} writable')}"
        )
    return None


def _way_forward(run_dir: Path, remedy: str) -> str:
    """The end of a failed save's message: what is intact and how to go on."""
    found = checkpoints(run_dir)
    if found:
        return f"the previous checkpoint, {found[0]}, is intact: {remedy}, then run with --resume"
    return f"no checkpoint was written yet: {remedy}, then run the same command again"
