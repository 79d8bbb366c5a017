"""`StableMDMTrainer`: a `transformers.Trainer` whose loss is a stablemdm `Objective`.

The subclass overrides `compute_loss` (sampler -> masks -> model -> loss) and `log` (to add
what the sampler did: mean and spread of the rates and importance weights, tokens/s).
Everything else (DDP, FSDP, DeepSpeed, gradient accumulation, clipping, schedules, bf16,
checkpoints with optimizer, scheduler and RNG states) is the engine's. Callbacks write
the stablemdm pieces into every checkpoint: model config, tokenizer, sampler state, config.

Randomness: the rates of optimizer step s are drawn at once for every process and
micro-batch from a generator seeded by (seed, s), shared by all processes, and each
micro-batch j of each rank takes its slice (`rate_slice`), so StraTS stratifies the whole
global batch of the step; masks come from (seed, s, j, rank). A resumed run therefore draws
exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .objective import Objective
from .samplers import EMA, PPOTS

SAMPLER_STATE = "sampler_state.pt"  # torch.save of the sampler's state_dict


def seeded_generator(seed: int, *key: object) -> torch.Generator:
    """A CPU generator whose seed is a stable hash of (seed, *key)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *key))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


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
        self._tokens = 0
        self._clock = time.perf_counter()

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
            out = self.objective(
                model,
                inputs,
                rate_generator=seeded_generator(seed, "rate", step),
                mask_generator=seeded_generator(seed, "mask", step, micro, rank),
                rank=part,
                world_size=parts,
            )
            self._record(out, inputs)
        else:  # held-out loss: a fixed draw per batch, the same for every method and eval
            key = int(inputs["input_ids"].sum()), int(inputs["eligible"].sum())
            out = self.eval_objective(
                model,
                inputs,
                seeded_generator(seed, "eval-rate", *key),
                seeded_generator(seed, "eval-mask", *key),
            )
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite loss {out.loss.item()} at step {self.state.global_step}; "
                f"checkpoints already written in {self.args.output_dir} are intact. Lower "
                "learning_rate, raise mix (bounds the importance weights) or use bf16=false."
            )
        return (out.loss, {"per_sequence": out.per_sequence}) if return_outputs else out.loss

    def _record(self, out, inputs) -> None:
        """Remember what the sampler drew (on the device: no host sync in the training step;
        `log` moves it once per log line); feed the EMA sampler (pooled over processes)."""
        rate, weight = out.rate.detach(), out.weight.detach()
        self._seen["rate"].append(rate.float())
        self._seen["weight"].append(weight.float())
        self._seen["loss"].append(out.unweighted.float())
        n = len(rate)  # sequences actually used (compute_matched MIRROR uses half the batch)
        self._tokens = self._tokens + inputs["attention_mask"][:n].sum() * (out.forward_passes // n)
        ema = ema_of(self.objective)
        if ema is not None:
            both = torch.stack([rate.float(), out.unweighted.float()])  # [2, B]
            if self.args.world_size > 1:
                both = self.accelerator.gather(both.T.contiguous()).T
            ema.observe(both[0].cpu(), both[1].cpu())

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
        """Add the sampler's diagnostics and throughput to each training log line."""
        if "loss" in logs and self._seen["rate"]:
            rate, weight, loss = (
                torch.cat(self._seen[k]).cpu() for k in ("rate", "weight", "loss")
            )
            now = time.perf_counter()
            if self.objective.kind == "mdm":  # an ARM draws no rates and carries no weights
                logs.update(
                    t_mean=rate.mean().item(),
                    t_std=rate.std().item() if len(rate) > 1 else 0.0,
                    weight_mean=weight.mean().item(),
                    weight_std=weight.std().item() if len(weight) > 1 else 0.0,
                    weight_max=weight.max().item(),
                )
                logs.update(self._rate_bins(rate, loss))
            logs["tokens_per_s"] = (
                float(self._tokens) * self.args.world_size / max(now - self._clock, 1e-9)
            )
            self._seen = {"rate": [], "weight": [], "loss": []}
            self._tokens, self._clock = 0, now
        super().log(logs, *args, **kwargs)


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


class EMACallback(TrainerCallback):
    """Ends each optimizer step for the EMA sampler: it folds the step's draws (all
    micro-batches) into its averages, once per step, and refreshes its density every N."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective

    def on_step_end(self, args, state, control, **kwargs):
        ema = ema_of(self.objective)
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
    """Appends every log line to `<output_dir>/metrics.jsonl` (main process only)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, **{k: _finite(v) for k, v in logs.items()}}
            with open(Path(args.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


class CheckpointCallback(TrainerCallback):
    """Writes model config, tokenizer, sampler state and run config into each checkpoint,
    so a checkpoint folder loads with `Transformer.from_pretrained` and describes itself."""

    def __init__(self, save_extras) -> None:
        self.save_extras = save_extras

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.save_extras(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class AccuracyCallback(TrainerCallback):
    """After each evaluation, decode part of the test split and log the accuracy."""

    def __init__(self, trainer: Trainer, run_eval) -> None:
        self.trainer = trainer
        self.run_eval = run_eval

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.trainer.log({"eval_accuracy": self.run_eval(self.trainer.model)})
