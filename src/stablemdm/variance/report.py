"""The `stablemdm variance` experiment (paper.md sections 2 and 3, issue 5): how noisy is a
model's training signal, where does the noise come from, and which estimator buys the most
variance reduction per forward pass.

Three measurements over one model and task, all drawn from generators seeded by the config's
seed, with every estimator built by `run.build_objective` exactly as training builds it:

1. Decomposition. A nested design (I sequences from the train split x J rates from the
   method's density x K masks per rate, `Objective.at_rates`) gives y_ijk, the importance-
   weighted per-sequence loss (`ObjectiveOutput.per_sequence`) or its gradient (flattened,
   a parameter subset, or a seeded Gaussian projection), and `variance.nested_components`
   splits its variance into A (mask), B (rate) and C (data). The ARM (the same network with
   causal attention) goes through the same design: its A and B are 0, its C is the floor.
2. Equal-compute comparison. R independent minibatches of n fresh sequences per method; the
   trace of the covariance of the minibatch loss and gradient, times forward passes
   (`variance.compare_estimators`), against Standard and against the floor C / n.
3. Per-rate curves of the Standard estimator on a grid of t: g(t), v(t), S(t), the P-POTS
   fit, and the integrands a(t), b(t) whose integrals are A and B (see docs/variance.md).

The measurement primitives live in `variance_measure`, the tables and plots in
`variance_output`; this module builds the methods, runs the experiment and is the CLI.

Scheme methods (StraTS, SyRM) couple the rates *across the sequences of a minibatch*; a single
draw has the same distribution as under their base density, so their decomposition is the
base's (reported as `same_as`) and their effect shows only in the comparison.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import TextTokenizer
from ..errors import ConfigError
from ..estimators.objective import Objective
from ..estimators.ppots import PPOTS
from ..estimators.ppots_fit import density_from_second_moment
from ..estimators.registry import DEFAULT_METHODS, ESTIMATOR_DEFAULTS, ISAD_DEFAULT_TOKENS, METHODS
from ..models import Transformer
from ..rng import seeded_generator
from ..tasks.registry import get_task
from ..training.build import (
    build_model,
    build_objective,
    build_sampler,
    check_fits,
    fit_density,
    load_density,
)
from ..training.config import StableMDMConfig
from ..training.datasets import Canvas, TensorDataset, encode_split, resolve_canvas
from ..training.saved import load_checkpoint, objective_of, saved_run_config
from .arm import arm_objective, arm_reference
from .measure import (
    REFERENCE,
    Design,
    GradientFeature,
    causal,
    compare_methods,
    decompose,
    density_sampler,
    rate_curves,
    semi_analytic_total,
    warm_ema,
)

F64 = torch.float64


@dataclass(frozen=True)
class VarianceOptions:
    """What `run_variance` measures and how hard; validated on construction."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    loss_design: Design = Design(32, 8, 8)
    grad_design: Design = Design(8, 4, 4)
    draws: int = 128
    batch: int = 8
    params: str | None = None
    project: int | None = None
    bootstrap: int = 200
    grid: int = 20
    grid_sequences: int = 16
    grid_masks: int = 4
    ema_warmup: int = 256

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(
                f"--methods: unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"known methods: {', '.join(METHODS)}"
            )
        self.loss_design.check("")
        self.grad_design.check("grad-")
        bounds = (
            ("draws", self.draws, 3, "independent minibatches per method"),
            ("batch", self.batch, 1, "sequences per minibatch"),
            ("grid", self.grid, 2, "rates in the per-rate curves"),
            ("grid-sequences", self.grid_sequences, 2, "sequences in the per-rate curves"),
            ("grid-masks", self.grid_masks, 2, "masks per (sequence, rate) in the curves"),
            ("ema-warmup", self.ema_warmup, 0, "draws the EMA sampler observes first"),
        )
        for name, value, low, what in bounds:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name} ({what}) must be an integer >= {low}, got {value!r}")
        if self.bootstrap < 0 or self.bootstrap == 1:
            raise ConfigError(
                f"--bootstrap must be 0 (off) or >= 2 resamples, got {self.bootstrap}"
            )
        if self.project is not None and self.project < 1:
            raise ConfigError(f"--project must be >= 1 dimensions, got {self.project}")
        if self.params is not None:
            try:
                re.compile(self.params)
            except re.error as err:
                raise ConfigError(
                    f"--params {self.params!r} is not a valid regular expression ({err})"
                ) from None


@dataclass
class Method:
    """One configured estimator: its overrides, the resolved config and its Objective."""

    name: str
    overrides: dict[str, Any]
    config: StableMDMConfig
    objective: Objective


def _same_draw(a: Method, b: Method) -> bool:
    """Whether one draw of a and one of b have the same distribution: the same rate mode,
    masking and density (a scheme only couples the draws of a minibatch)."""
    if any(getattr(a.config, f) != getattr(b.config, f) for f in ("rate", "sampler", "masking")):
        return False
    if a.config.sampler in ("uniform", "clipped"):  # both built from the same base fields
        return True
    return density_sampler(a.objective.sampler) is density_sampler(b.objective.sampler)


def method_config(
    config: StableMDMConfig, name: str, isad_tokens: Sequence[str] = ()
) -> StableMDMConfig:
    """The base config with the estimator fields reset (`ESTIMATOR_DEFAULTS`) and the method's
    overrides applied; every other field (eps, mix, clip_*, ema_*, ppots_*) is the base's."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    values = {**config.resolved(), **ESTIMATOR_DEFAULTS, **METHODS[name]}
    if values["sampler"] != "ppots":
        values["ppots_file"] = None
    if values["masking"] == "isad" and not values.get("isad_tokens"):
        values["isad_tokens"] = list(isad_tokens)
    try:
        return StableMDMConfig(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method {name} ({METHODS[name]}): {err}") from err


def build_methods(
    config: StableMDMConfig,
    names: Sequence[str],
    model: Transformer,
    task: Any,
    tokenizer: TextTokenizer,
    data: TensorDataset,
    options: VarianceOptions,
    notes: list[str],
    canvas: Canvas,
) -> dict[str, Method]:
    """Each method's Objective via `run.build_objective`/`build_sampler`, with P-POTS densities
    fitted by `run.fit_density` (or read from `ppots_file`) and EMA warmed up."""
    isad_tokens = config.isad_tokens or ISAD_DEFAULT_TOKENS.get(config.task, [])
    if not config.isad_tokens and isad_tokens and "isad" in names:
        notes.append(f"isad: raises {isad_tokens}, task {config.task}'s default delimiter")
    densities: dict[tuple, PPOTS] = {}
    methods = {}
    for name in names:
        if METHODS[name].get("masking") == "isad" and not isad_tokens:
            notes.append(
                f"{name}: skipped, no ISAD tokens (set isad_tokens=[...]; task {config.task} "
                "has no default answer delimiter)"
            )
            continue
        cfg = method_config(config, name, isad_tokens)
        density = None
        if cfg.sampler == "ppots":
            key = (cfg.rate, cfg.masking)
            if key not in densities:
                if cfg.ppots_file:
                    densities[key] = load_density(cfg.ppots_file)
                else:
                    densities[key] = fit_density(cfg, model, task, tokenizer, canvas)
            density = densities[key]
        objective = build_objective(cfg, tokenizer, build_sampler(cfg, density))
        if not objective.sampler.unbiased:
            notes.append(
                f"{name}: biased by design (it estimates the objective restricted to "
                f"[{cfg.clip_low}, {cfg.clip_high}], not the ELBO); a lower variance does not "
                "make it a better ELBO estimator"
            )
        observed = warm_ema(objective, model, data, options.ema_warmup, options.batch, cfg.seed)
        if observed:
            notes.append(
                f"{name}: the EMA density was warmed on {observed} draws (minibatches of "
                f"{options.batch}), refreshed once and then frozen for the measurement"
            )
        methods[name] = Method(name, dict(METHODS[name]), cfg, objective)
    return methods


def load_model(
    config: StableMDMConfig, checkpoint: str | Path | None, task: Any
) -> tuple[torch.nn.Module, TextTokenizer, Canvas]:
    """The checkpoint's model, tokenizer and canvas (as an MDM; the canvas lengths saved with
    its run; a LoRA run's adapters, which peft loads frozen, take gradients again), or the
    config's (`run.build_model`: `model`, `init_from` or a seeded init)."""
    if checkpoint is None:
        return build_model(config, task)
    model, tokenizer = load_checkpoint(checkpoint)
    saved = saved_run_config(checkpoint)
    config.max_length = config.max_length or saved.get("max_length")
    config.gen_length = config.gen_length or saved.get("gen_length")
    canvas = resolve_canvas(config, task, tokenizer)
    check_fits(model, tokenizer, canvas.max_length, f"--checkpoint {checkpoint}")
    if hasattr(model, "set_requires_grad") and hasattr(model, "active_adapters"):
        model.set_requires_grad(model.active_adapters)  # a LoRA run's trained parameters
    if isinstance(model, Transformer):
        model.config.causal = False
    elif objective_of(model) != "mdm":
        raise ConfigError(f"--checkpoint {checkpoint} holds an ARM; pass an MDM checkpoint")
    return model, tokenizer, canvas


def run_variance(
    config: StableMDMConfig,
    options: VarianceOptions,
    checkpoint: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    arm_checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Run the three measurements for `config`'s task and model (or `checkpoint`) and return
    the report (what `write_report` stores as variance.json). `log(str)` reports progress.
    The ARM reference is `arm_checkpoint`, else the same weights with causal attention
    (a like-for-like baseline at initialisation, not for a trained MDM)."""
    say = log or (lambda message: None)
    if config.objective != "mdm":
        raise ConfigError(
            "stablemdm variance measures MDM estimators (the ARM reference is always included): "
            "leave objective=mdm"
        )
    started = time.perf_counter()
    timing: dict[str, float] = {}
    notes: list[str] = []
    seed = config.seed
    if REFERENCE not in options.methods:
        notes.append(f"{REFERENCE}: added, it is the reference of the comparison")
    names = list(dict.fromkeys([REFERENCE, *options.methods]))  # the reference first
    task = get_task(config.task, **config.task_options)
    model, tokenizer, canvas = load_model(config, checkpoint, task)
    model.eval()
    # decided before any measurement starts
    arm_model = arm_reference(model, tokenizer, canvas.max_length, arm_checkpoint, notes)
    data = encode_split(task, tokenizer, "train", canvas)
    needed = max(
        options.loss_design.sequences, options.grad_design.sequences, options.grid_sequences
    )
    if len(data) < needed:
        raise ConfigError(
            f"task {config.task}: the train split has {len(data)} sequences but the design "
            f"needs {needed}; lower --sequences/--grad-sequences/--grid-sequences or add data"
        )
    index = torch.randperm(len(data), generator=seeded_generator(seed, "variance-sequences"))
    feature = GradientFeature(model, options.params, options.project, seed)
    if feature.project is not None and options.project is None:
        notes.append(
            f"gradients: {feature.n_coordinates} coordinates, projected to {feature.project} "
            "seeded Gaussian directions (set --params or --project to choose)"
        )

    say("building the estimators")
    methods = build_methods(config, names, model, task, tokenizer, data, options, notes, canvas)
    timing["build"] = time.perf_counter() - started

    say(f"per-rate curves ({options.grid} rates)")
    mark = time.perf_counter()
    standard = methods[REFERENCE].objective
    curves = rate_curves(
        model,
        standard,
        data,
        index[: options.grid_sequences],
        options.grid,
        options.grid_masks,
        seed,
    )
    curves["ppots_fit"] = _fit_curve_density(curves, config, notes)
    for method in methods.values():
        if method.config.sampler == "ppots" and method.config.rate == "t":
            sampler = density_sampler(method.objective.sampler)
            density = sampler.density(torch.tensor(curves["t"], dtype=F64))
            curves["ppots_method_density"] = density.tolist()
            break
    timing["curves"] = time.perf_counter() - mark

    mark = time.perf_counter()
    decomposition = {}
    for method in methods.values():
        same = next((m for m in decomposition if _same_draw(methods[m], method)), None)
        if same is not None:
            decomposition[method.name] = {"same_as": same}
            notes.append(
                f"{method.name}: one draw has the same distribution as under {same} (its "
                "scheme couples rates across a minibatch), so its decomposition is that one; "
                "its effect shows in the comparison"
            )
            continue
        say(f"decomposition: {method.name}")
        decomposition[method.name] = _decompose_method(
            model, method.objective, data, index, options, feature, seed, method.name
        )
        iid_rate = method.config.rate == "t" and method.config.masking == "iid"
        decomposition[method.name]["semi_analytic_total"] = (
            semi_analytic_total(curves, method.objective.sampler) if iid_rate else None
        )
    if arm_model is model and (checkpoint is not None or config.init_from):
        notes.append(
            "arm: the MDM's own weights with causal attention; for a trained model this is "
            "not a trained ARM (pass --arm-checkpoint for one)"
        )
    arm = None
    if arm_model is not None:
        say("decomposition: arm")
        arm_loss = arm_objective(config, tokenizer)
        arm = _decompose_arm(arm_model, model, arm_loss, data, index, options, feature, seed, notes)
    timing["decomposition"] = time.perf_counter() - mark

    say(f"comparison: {options.draws} minibatches of {options.batch} per method")
    mark = time.perf_counter()
    reference = decomposition[REFERENCE]
    loss_floor = _floor(reference["loss"]["C"], options.batch, "loss", notes)
    grad_floor = _floor(reference["grad"]["C"], options.batch, "gradient", notes)
    comparison = compare_methods(
        model,
        {name: m.objective for name, m in methods.items()},
        data,
        options.draws,
        options.batch,
        seed,
        feature,
        loss_floor,
        grad_floor,
    )
    comparison["floor"] = {"loss": loss_floor, "grad": grad_floor}
    comparison["arm_floor"] = None
    if arm is not None:
        comparison["arm_floor"] = {
            "loss": arm["loss"]["C"] / options.batch,
            "grad": arm["grad"]["C"] / options.batch,
        }
    timing["comparison"] = time.perf_counter() - mark
    timing["total"] = time.perf_counter() - started

    unstable = sorted(
        f"{name} {what}"
        for name, entry in [*decomposition.items(), ("arm", arm or {})]
        for what in ("loss", "grad")
        if entry.get(what, {}).get("unstable")
    )
    return {
        "config": config.resolved(),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "options": _options_dict(options),
        "feature": feature.describe(),
        "methods": {name: m.overrides for name, m in methods.items()},
        "forward_passes": {row["name"]: row["forward_passes"] for row in comparison["loss"]},
        "decomposition": decomposition,
        "arm": arm,
        "curves": curves,
        "comparison": comparison,
        "unstable": unstable,
        "heavy_tail_warning": _heavy_tail_warning(unstable, config.eps),
        "notes": notes,
        "timing_s": timing,
    }


def _decompose_method(
    model: torch.nn.Module,
    objective: Objective,
    data: TensorDataset,
    index: torch.Tensor,
    options: VarianceOptions,
    feature: GradientFeature,
    seed: int,
    name: str,
) -> dict[str, Any]:
    """Loss and gradient components of one estimator as JSON-ready dicts."""
    loss = decompose(
        model,
        objective,
        data,
        index,
        options.loss_design,
        seed,
        f"{name}/loss",
        bootstrap=options.bootstrap,
    )
    grad = decompose(
        model,
        objective,
        data,
        index,
        options.grad_design,
        seed,
        f"{name}/grad",
        feature,
        bootstrap=options.bootstrap,
    )
    return {"loss": loss.to_dict(), "grad": grad.to_dict()}


def _decompose_arm(
    arm_model: torch.nn.Module,
    model: torch.nn.Module,
    objective: Objective,
    data: TensorDataset,
    index: torch.Tensor,
    options: VarianceOptions,
    feature: GradientFeature,
    seed: int,
    notes: list[str],
) -> dict[str, Any] | None:
    """The ARM row: `model` with causal attention, or a separate trained ARM (its own
    gradient feature). A failure here is a note, not the loss of every finished measurement."""
    try:
        if arm_model is not model:
            own = GradientFeature(arm_model, options.params, options.project, seed)
            return _decompose_method(arm_model, objective, data, index, options, own, seed, "arm")
        with causal(model):
            return _decompose_method(model, objective, data, index, options, feature, seed, "arm")
    except ConfigError as err:
        notes.append(f"arm: not measured ({err}); the other measurements are kept")
        return None


def _fit_curve_density(
    curves: Mapping[str, Any], config: StableMDMConfig, notes: list[str]
) -> dict[str, Any] | None:
    """The P-POTS density fitted to the curves' S(t) (`density_from_second_moment`) on the grid,
    with the optimal density sqrt(S) / int sqrt(S) and its best-case second-moment ratio."""
    t, S = np.asarray(curves["t"]), np.asarray(curves["S"])
    try:
        fitted = density_from_second_moment(t, S, method=config.ppots_method, mix=config.mix)
    except ValueError as err:
        notes.append(f"per-rate curves: no P-POTS fit ({err})")
        return None
    root = np.sqrt(S)
    return {
        "method": config.ppots_method,
        "mix": config.mix,
        "density": fitted.density(torch.tensor(t, dtype=F64)).tolist(),
        "optimal": (root / root.mean()).tolist(),
        "optimal_second_moment_ratio": float(root.mean() ** 2 / S.mean()),
    }


def _floor(C: float, batch: int, what: str, notes: list[str]) -> float | None:
    """The data-noise floor C / n of a minibatch, or None (with a note) when C <= 0."""
    if C > 0:
        return C / batch
    notes.append(f"{what}: Standard's C estimate is {C:.3g} <= 0, so no floor is reported")
    return None


def _heavy_tail_warning(unstable: Sequence[str], eps: float) -> str | None:
    """The caveat printed when the bootstrap flags any estimate."""
    if not unstable:
        return None
    return (
        f"unstable estimates ({', '.join(unstable)}): the single-draw MDM loss is heavy-tailed "
        f"(the 1/p_mask(t) weight reaches 1/eps = {1 / eps:.0f} near t = 0, and P-POTS adds "
        "1/p(t)), so a few draws can dominate A and B; raise --sequences/--rates/--masks, or "
        "read these numbers as orders of magnitude"
    )


def _options_dict(options: VarianceOptions) -> dict[str, Any]:
    out = asdict(options)
    out["methods"] = list(options.methods)
    return out
