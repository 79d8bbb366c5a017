"""`estimator: auto`: measure every estimator that fits the model on the model being trained,
train with the one of lowest gradient variance x forward passes, and measure again every
`auto_every` steps (docs/methods.md).

Candidates are the unbiased methods of the method table (`registry.UNBIASED_METHODS`, or
`auto_candidates`) at the run's forward compute: MIRROR in its compute-matched form. A model
that conditions on t has no count mode, and ISAD needs its tokens (`isad_tokens`, or the
task's answer delimiter). The P-POTS candidates share one density, fitted before each
measurement (or read from `ppots_file`); the EMA candidate keeps one sampler, fed by its own
measured draws and, while trained with, by the training draws.

A measurement draws `auto_draws` minibatches of `auto_batch` training sequences and gives
every candidate the same ones, with rates and masks from generators seeded by (seed, "auto",
step): it never touches the training draws, so each step uses one unbiased estimator chosen
before the step, and a resumed run measures and chooses exactly as before.
`estimators.selection` does the math; this module builds the candidates, keeps the history
(`auto.json`, in the run folder and every checkpoint) and switches the trainer's objective
(`AutoCallback`).

`auto_budget: charged` (the default) pays for the measurements and fits out of Standard's
budget, max_steps steps of the run's batch: the first measurement is made before the engine
starts, its counted passes (`training.compute`) fix how many steps the run trains and how many
measurements it makes (`charged_plan`), and the run trains that many, so its total compute is
Standard's within one step. The plan follows from the config and that first measurement
(kept in `auto.json`), so a resumed run plans the same. `extra` trains max_steps steps and
measures on top.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..data import TextTokenizer
from ..errors import ConfigError
from ..estimators.losses import conditions_on_t
from ..estimators.objective import Objective, ObjectiveOutput
from ..estimators.ppots import PPOTS
from ..estimators.registry import (
    BLOCK_ONLY_METHODS,
    ESTIMATOR_DEFAULTS,
    ISAD_DEFAULT_TOKENS,
    METHODS,
    UNBIASED_METHODS,
)
from ..estimators.selection import (
    MARGIN,
    GradientFeature,
    MinibatchDraws,
    choose,
    compare_estimators,
    minibatch_draws,
)
from ..rng import seeded_generator
from ..tasks.registry import Task
from .build import build_objective, build_sampler, fit_density, load_density
from .checkpoints import AUTO_FILE, PPOTS_FILE
from .compute import OVERHEAD, attach, passes, phase, step_passes
from .config import StableMDMConfig
from .datasets import Canvas, TensorDataset
from .outputs import write_text
from .trainer import ema_of

REFERENCE = "standard"  # the ratio column of the table is relative to it


# auto_every=0: measure every so many steps that a measurement's sequence forward+backward
# passes (candidates x auto_draws x auto_batch) are this share of those trained in between;
# on the demo model that was 1.6-2.6% of the training time (docs/methods.md)
AUTO_BUDGET = 0.02


def measurement_interval(config: StableMDMConfig, candidates: int) -> int:
    """Steps between measurements: `auto_every`, or derived from AUTO_BUDGET (at least 1)."""
    if config.auto_every:
        return config.auto_every
    measured = candidates * config.auto_draws * config.auto_batch
    trained = config.per_device_train_batch_size * config.gradient_accumulation_steps
    return max(1, math.ceil(measured / (AUTO_BUDGET * trained)))


def charged_plan(budget: int, step: int, measurement: int, every: int) -> tuple[int, int]:
    """(steps, measurements) of a run charged its measurements: the most steps S such that S
    steps of `step` passes and m measurements of `measurement` passes, at steps 0, every, ...,
    (m - 1) x every < S, fit in `budget`; m is the most measurements the schedule reaches
    before the end (a later one would leave no budget for the steps after it)."""
    plan, m = None, 1
    while (steps := (budget - m * measurement) // step) > (m - 1) * every:
        plan, m = (steps, m), m + 1
    if plan is None:
        raise ConfigError(
            f"auto_budget=charged: one measurement counted {measurement} passes, more than the "
            f"budget of max_steps Standard steps leaves for it ({budget} passes in all): raise "
            "max_steps, measure less (auto_candidates, auto_draws, auto_batch) or set "
            "auto_budget=extra"
        )
    return plan


def candidate_config(config: StableMDMConfig, name: str, isad_tokens: list[str]) -> StableMDMConfig:
    """The run's config with method `name`'s estimator fields (MIRROR compute-matched: its
    two copies of half the sequences, so every candidate's step costs Standard's). A shallow
    copy: building a new config mid-run would reset the accelerator's state."""
    view = copy.copy(config)
    for key, value in {**ESTIMATOR_DEFAULTS, **METHODS[name]}.items():
        setattr(view, key, value)
    view.compute_matched = view.masking == "mirror"
    if view.masking == "isad":
        view.isad_tokens = list(isad_tokens)
    return view


def isad_tokens_of(config: StableMDMConfig) -> list[str]:
    """The tokens ISAD raises: `isad_tokens`, else the task's answer delimiter (or none)."""
    return list(config.isad_tokens or ISAD_DEFAULT_TOKENS.get(config.task, []))


def candidate_names(
    config: StableMDMConfig, model: torch.nn.Module, tokenizer: TextTokenizer
) -> tuple[list[str], list[str]]:
    """(the candidates, a note per method left out): `auto_candidates`, or every unbiased
    method this model and task allow. A listed method the model cannot train is an error."""
    named = bool(config.auto_candidates)
    names, notes = list(config.auto_candidates or UNBIASED_METHODS), []
    if config.objective != "block":
        block_only = [n for n in names if n in BLOCK_ONLY_METHODS]
        if named and block_only:
            raise ConfigError(
                f"auto_candidates: {', '.join(block_only)} stratify each sequence's blocks: "
                "remove them or set objective=block"
            )
        names = [n for n in names if n not in BLOCK_ONLY_METHODS]
    if conditions_on_t(model):
        counts = [n for n in names if METHODS[n].get("rate") == "count"]
        if named and counts:
            raise ConfigError(
                f"auto_candidates: {', '.join(counts)} integrate t out, but this model "
                "conditions on t: remove them"
            )
        names = [n for n in names if n not in counts]
        if counts:
            notes.append(f"{', '.join(counts)}: left out, the model conditions on t")
    if "isad" in names:
        tokens = isad_tokens_of(config)
        try:
            if not tokens:
                raise ValueError(f"task {config.task} has no default; set isad_tokens=[...]")
            for token in tokens:
                tokenizer.token_id(token, where="isad_tokens")
        except ValueError as err:
            if named:
                raise ConfigError(f"auto_candidates: isad: {err}") from None
            names.remove("isad")
            notes.append(f"isad: left out, no ISAD token ({err})")
    return names, notes


class AutoEstimator:
    """The candidates' objectives (sharing one P-POTS density and one EMA sampler), their
    measurement, the choice and its history; `state_dict` / `load_state_dict` round-trip
    through JSON so that a resumed run chooses exactly as the uninterrupted one."""

    def __init__(
        self,
        config: StableMDMConfig,
        model: torch.nn.Module,
        tokenizer: TextTokenizer,
        data: TensorDataset,
        density: PPOTS | None = None,
        fit: Callable[[int], PPOTS] | None = None,
    ) -> None:
        names, self.notes = candidate_names(config, model, tokenizer)
        self.config, self.model, self.data = config, model, data
        self.density, self.fit = density, fit
        isad = isad_tokens_of(config)
        self.objectives: dict[str, Objective] = {}
        for name in names:
            view = candidate_config(config, name, isad)
            self.objectives[name] = build_objective(view, tokenizer, build_sampler(view, density))
        self.feature = GradientFeature(model, None, None, config.seed)
        self.every = measurement_interval(config, len(names))
        self.choice = names[0]  # until the first measurement (before step 1) chooses
        self.history: list[dict[str, Any]] = []
        self.counter = attach(model)  # the measurements' passes (training.compute)
        self.planned: dict[str, Any] | None = None  # `plan()`, once made
        self.cost = {"measure_seconds": 0.0, "train_seconds": 0.0}
        self._clock: float | None = None  # training time runs from here

    @property
    def objective(self) -> Objective:
        """The objective of the current choice."""
        return self.objectives[self.choice]

    def measure(self, step: int, context: Callable = contextlib.nullcontext) -> dict[str, Any]:
        """Refit the P-POTS density, measure every candidate on the same minibatches and
        choose (`selection.choose`, the current choice the incumbent); returns the record
        appended to `history`, with the passes it counted (fit included). `context()` wraps
        the forward passes (the trainer's autocast)."""
        self.tick()
        start, before = time.perf_counter(), passes(self.counter.counts, OVERHEAD)
        if self.fit is not None:
            self.density.load_state_dict(self.fit(step).state_dict())
        fitted = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            with context(), phase("auto"):
                draws = self._draws(step)
        finally:
            self.model.train(was_training)
        record = self._decide(step, draws)
        record.update(fit_seconds=fitted - start, seconds=time.perf_counter() - start)
        record["passes"] = passes(self.counter.counts, OVERHEAD) - before
        self.cost["measure_seconds"] += record["seconds"]
        self.history.append(record)
        self._clock = time.perf_counter()
        return record

    def _draws(self, step: int) -> dict[str, MinibatchDraws]:
        """Every candidate's `auto_draws` minibatch gradients on the same minibatches."""
        seed, config = self.config.seed, self.config
        device = next(self.model.parameters()).device
        data_generator = seeded_generator(seed, "auto", step, "data")
        batches = []
        for _ in range(config.auto_draws):
            index = torch.randint(len(self.data), (config.auto_batch,), generator=data_generator)
            batches.append({k: v[index].to(device) for k, v in self.data.tensors.items()})

        def generators(r: int) -> tuple[torch.Generator, torch.Generator]:
            return (
                seeded_generator(seed, "auto", step, "rate", r),
                seeded_generator(seed, "auto", step, "mask", r),
            )

        out = {}
        for name, objective in self.objectives.items():
            ema = ema_of(objective)
            seen: list[ObjectiveOutput] = []
            observe = seen.append if ema is not None else None
            out[name] = minibatch_draws(
                self.model, objective, batches, generators, self.feature, observe
            )
            if ema is not None and out[name].finite():  # after its own measurement: no peeking
                for o in seen:
                    ema.observe(o.rate.float().cpu(), o.unweighted.float().cpu())
                ema.refresh()
        return out

    def _decide(self, step: int, draws: dict[str, MinibatchDraws]) -> dict[str, Any]:
        """The measurement's record: the table, the choice and why (non-finite candidates are
        left out; with none left the incumbent stays)."""
        results = {n: (d.grad, d.forward_passes) for n, d in draws.items() if d.finite()}
        left_out = [n for n in draws if n not in results]
        incumbent = self.choice if self.history else None
        record: dict[str, Any] = {"step": step, "incumbent": incumbent, "left_out": left_out}
        if not results:
            why = "no candidate gave finite gradients"
            return {**record, "choice": self.choice, "switched": False, "reason": why}
        choice = choose(results, incumbent, MARGIN, REFERENCE)
        reference = REFERENCE if REFERENCE in results else next(iter(results))
        self.choice = choice.name
        return {
            **record,
            "choice": choice.name,
            "switched": choice.switched,
            "reason": choice.reason,
            "reference": reference,
            "table": compare_estimators(results, reference),
        }

    def plan(self) -> dict[str, Any]:
        """The run's steps and measurements (whole-run passes: every process's): charged, from
        the first measurement's counted passes (`charged_plan`); extra, max_steps steps and a
        measurement every `every` steps on top. Kept as `planned`."""
        config, world = self.config, self.config.world_size
        step = 2 * step_passes(config)  # Standard's step, forward and backward
        plan: dict[str, Any] = {"auto_budget": config.auto_budget, "max_steps": config.max_steps}
        if config.auto_budget == "extra":
            plan.update(steps=config.max_steps, measurements=None)
        else:
            first = self.history[0].get("passes")
            if first is None:
                raise ConfigError(
                    "--resume: this estimator=auto run was started before its measurements were "
                    "charged (its auto.json counts no passes): resume it with auto_budget=extra"
                )
            budget = config.max_steps * step
            steps, measurements = charged_plan(budget, step, first, self.every)
            plan.update(steps=steps, measurements=measurements, budget=budget * world)
            plan.update(measurement_passes=first * world)
        self.planned = {**plan, "step_passes": step * world, "every": self.every}
        return self.planned

    def measures_after(self, step: int, end: int) -> bool:
        """Whether a measurement follows optimizer step `step` (0: before step 1) of a run
        that ends at `end`: every `every` steps before the end, up to the planned number."""
        cap = (self.planned or {}).get("measurements")
        return step % self.every == 0 and step < end and (cap is None or step // self.every < cap)

    def tick(self) -> None:
        """Add the training time since the last tick (measurements excluded)."""
        now = time.perf_counter()
        if self._clock is not None:
            self.cost["train_seconds"] += now - self._clock
        self._clock = now

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state: choice, history, cost, the EMA candidate's sampler, settings."""
        self.tick()
        ema = next((e for e in map(ema_of, self.objectives.values()) if e is not None), None)
        state = ema.state_dict() if ema is not None else None
        return {
            "choice": self.choice,
            "candidates": list(self.objectives),
            "left_out": self.notes,
            "every": self.every,
            "draws": self.config.auto_draws,
            "batch": self.config.auto_batch,
            "margin": MARGIN,
            "feature": self.feature.describe(),
            "cost": dict(self.cost),
            "plan": self.planned,
            "history": self.history,
            "ema": None if state is None else {k: _plain(v) for k, v in state.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (of a run with the same candidates)."""
        if state["candidates"] != list(self.objectives):
            raise ConfigError(
                f"--resume: the checkpoint's auto candidates {state['candidates']} are not this "
                f"run's {list(self.objectives)}: resume with the same model and auto_candidates"
            )
        self.choice, self.history = state["choice"], list(state["history"])
        self.cost = dict(state["cost"])
        for objective in self.objectives.values():
            if ema_of(objective) is not None and state["ema"] is not None:
                ema_of(objective).load_state_dict(state["ema"])

    def save(self, folder: Path) -> Path:
        """Write `auto.json` into `folder` atomically."""
        return write_text(
            Path(folder) / AUTO_FILE, json.dumps(_finite(self.state_dict()), indent=1)
        )


def _plain(value: Any) -> Any:
    """A sampler state value as JSON (tensors become lists: float64 round-trips exactly)."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _finite(value: Any) -> Any:
    """A JSON-safe copy: non-finite floats become None."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def build_auto(
    config: StableMDMConfig,
    model: torch.nn.Module,
    task: Task,
    tokenizer: TextTokenizer,
    canvas: Canvas,
    data: TensorDataset,
    checkpoint: Path | None,
) -> AutoEstimator:
    """The run's `AutoEstimator`: its P-POTS density from the checkpoint, `ppots_file`, or a
    uniform placeholder that the first measurement fits; its state from the checkpoint."""
    names = candidate_names(config, model, tokenizer)[0]
    density, fit = None, None
    if any(METHODS[n].get("sampler") == "ppots" for n in names):
        if checkpoint is not None and (checkpoint / PPOTS_FILE).is_file():
            density = load_density(checkpoint / PPOTS_FILE)
        elif config.ppots_file:
            density = load_density(config.ppots_file)
        else:
            density = PPOTS.uniform(source={"method": "placeholder until the first fit"})
        if not config.ppots_file:

            def fit(step: int) -> PPOTS:
                return fit_density(config, model, task, tokenizer, canvas, step, data)

    auto = AutoEstimator(config, model, tokenizer, data, density, fit)
    if checkpoint is not None:
        auto.load_state_dict(json.loads((checkpoint / AUTO_FILE).read_text()))
    return auto


def describe(record: dict[str, Any], auto: AutoEstimator) -> str:
    """The console text of one measurement: the table and the choice with its reason."""
    config = auto.config
    lines = [
        f"auto: step {record['step']}: {len(auto.objectives)} candidates x {config.auto_draws} "
        f"minibatches of {config.auto_batch} sequences, gradient variance x forward passes "
        f"(measured every {auto.every} steps)"
    ]
    if record.get("table"):
        lines.append(f"  {'candidate':<20} {'var x fwd':>10} {'SE':>9}  ratio to {REFERENCE}")
        for row in record["table"]:
            se = row["se"] * row["forward_passes"]
            lines.append(
                f"  {row['name']:<20} {row['variance_x_passes']:>10.3g} {se:>9.2g}  "
                f"{row['ratio_to_reference']:.3g}"
            )
    verb = "keeps" if record["choice"] == record["incumbent"] else "trains with"
    lines.append(
        f"auto: {verb} {record['choice']} ({record['reason']}); measured in "
        f"{record['seconds']:.1f} s (P-POTS fit {record['fit_seconds']:.1f} s)"
        + "".join(f"; left out {n} (not finite)" for n in record["left_out"])
    )
    return "\n".join(lines)


def cost_line(auto: AutoEstimator) -> str:
    """What the measurements have cost so far, in seconds and in % of the training time."""
    measured, trained = auto.cost["measure_seconds"], auto.cost["train_seconds"]
    share = f"{100 * measured / trained:.1f}% of" if trained > 0 else "before any"
    return (
        f"auto: {len(auto.history)} measurement(s) took {measured:.1f} s, {share} the training "
        f"time ({trained:.1f} s); measured every {auto.every} steps"
    )


def budget_line(plan: dict[str, Any] | None, counts: dict) -> str:
    """The run's counted compute against Standard's budget (training.compute's passes)."""
    training, overhead = passes(counts, ("train",)), passes(counts, OVERHEAD)
    text = (
        f"auto: counted {training + overhead:,} passes (training {training:,}, measurements and "
        f"fits {overhead:,})"
    )
    if plan is None or plan["auto_budget"] == "extra":
        return f"{text}; auto_budget=extra: the measurements came on top of the training"
    share = 100 * (training + overhead - plan["budget"]) / plan["budget"]
    return (
        f"{text} against Standard's {plan['budget']:,} ({share:+.1f}%); auto_budget=charged: "
        f"trained {plan['steps']} of max_steps={plan['max_steps']} steps, "
        f"{plan['measurements']} measurement(s)"
    )


class AutoCallback(TrainerCallback):
    """Runs `estimator: auto` in a Trainer: the first measurement before the engine starts
    (`prepare`, which also plans the run's steps), again after every `auto_every` steps up to
    the planned number (before that step's checkpoint is written, so the checkpoint holds the
    new choice), switching `trainer.objective`; prints the table and the cost and logs a
    record per measurement (`auto/*`). `fields()` is what each metrics.jsonl line gets: the
    estimator its steps were trained with."""

    def __init__(self, trainer: Trainer, auto: AutoEstimator) -> None:
        self.trainer, self.auto = trainer, auto
        self.trained_with: str | None = None
        self.pending: dict[str, Any] = {}
        self.first: dict[str, Any] | None = None  # measured in `prepare`, reported at the start

    def fields(self) -> dict[str, Any]:
        """Fields added to each metrics.jsonl line."""
        return {"estimator": self.trained_with or self.auto.choice, **self.pending}

    def prepare(self) -> dict[str, Any]:
        """Before `trainer.train()`: a fresh run's first measurement (its counted passes fix a
        charged plan), then the plan, which sets the trainer's max_steps (its `args` must be
        the run config's copy: config.yaml keeps Standard's budget) and what the run's
        compute record carries."""
        if not self.auto.history:
            self.first = self.auto.measure(0, self.trainer.autocast_smart_context_manager)
        plan = self.auto.plan()
        if plan["auto_budget"] == "charged":
            self.trainer.args.max_steps = plan["steps"]
        self.trainer.compute_plan = plan
        return plan

    def on_train_begin(self, args, state, control, **kwargs):
        if self.first is not None:
            self._report(self.first, state, control)
            self.first = None
        self.trainer.objective = self.auto.objective
        self.auto.tick()  # the training time starts now

    def on_step_begin(self, args, state, control, **kwargs):
        self.trained_with = self.auto.choice

    def on_step_end(self, args, state, control, **kwargs):
        if not self.auto.measures_after(state.global_step, state.max_steps):
            return
        record = self.auto.measure(state.global_step, self.trainer.autocast_smart_context_manager)
        self._report(record, state, control)
        self.trainer.objective = self.auto.objective

    def on_train_end(self, args, state, control, **kwargs):
        self.auto.tick()
        counts = self.trainer.compute_counts()  # every process takes part
        if state.is_world_process_zero:
            print(cost_line(self.auto), flush=True)
            print(budget_line(self.auto.planned, counts), flush=True)

    def _report(self, record: dict[str, Any], state, control) -> None:
        """One measurement's record: print it, write auto.json, log it."""
        if state.is_world_process_zero:
            print(describe(record, self.auto), flush=True)
            if state.global_step > 0:
                print(cost_line(self.auto), flush=True)
            self.auto.save(Path(self.trainer.args.output_dir))
        logs = {
            "auto/seconds": record["seconds"],
            "auto/fit_seconds": record["fit_seconds"],
            "auto/passes": record["passes"],
            "auto/switched": float(record["switched"]),
            **{f"auto/ratio/{r['name']}": r["ratio_to_reference"] for r in record.get("table", [])},
        }
        if state.global_step > 0 and self.auto.cost["train_seconds"] > 0:
            logs["auto/cost_fraction"] = (
                self.auto.cost["measure_seconds"] / self.auto.cost["train_seconds"]
            )
        should_log = control.should_log  # logging resets it: keep this step's loss line
        self.pending = {"auto/choice": record["choice"]}
        self.trainer.log(logs)
        self.pending = {}
        control.should_log = should_log


def chosen_config(config: StableMDMConfig, run_dir: Path) -> StableMDMConfig:
    """An estimator=auto run's config as the method it chose last (from its `auto.json`)."""
    choice = json.loads((Path(run_dir) / AUTO_FILE).read_text())["choice"]
    return candidate_config(config, choice, isad_tokens_of(config))
