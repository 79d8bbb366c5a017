"""What the `stablemdm variance` experiment measures (`report`): its options, the model with
its train split in a seeded order, and the methods, each estimator built by
`training.build` exactly as training builds it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import TextTokenizer
from ..errors import ConfigError
from ..estimators.objective import Objective
from ..estimators.ppots import PPOTS
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
from .arm import arm_reference
from .blocks import ROW_SCHEMES
from .measure import Design, GradientFeature, density_sampler, warm_ema


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


def same_draw(a: Method, b: Method) -> bool:
    """Whether one draw of a and one of b have the same distribution: the same rate mode,
    masking and density (a scheme only couples the draws of a minibatch; for block diffusion
    one within each sequence, `blocks.ROW_SCHEMES`, changes the draw of its block rates)."""
    if any(getattr(a.config, f) != getattr(b.config, f) for f in ("rate", "sampler", "masking")):
        return False
    schemes = {a.config.scheme, b.config.scheme}
    if a.config.objective == "block" and len(schemes) > 1 and schemes & ROW_SCHEMES:
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
    """Each method's Objective via `training.build.build_objective`/`build_sampler`, with
    P-POTS densities fitted by `fit_density` (or read from `ppots_file`) and EMA warmed up."""
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
        if _unfit_for_blocks(config, name, notes):
            continue
        cfg = method_config(config, name, isad_tokens)
        density = None
        if cfg.sampler == "ppots":
            key = (cfg.rate, cfg.masking)
            if key not in densities:
                if cfg.ppots_file:
                    densities[key] = load_density(cfg.ppots_file, cfg)
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


def _unfit_for_blocks(config: StableMDMConfig, name: str, notes: list[str]) -> bool:
    """Whether P-POTS method `name` cannot be fitted on the block config (its fit needs
    ppots_method=grid or family), noted with the fix; False for every other case."""
    ppots = METHODS[name].get("sampler") == "ppots"
    if not (config.objective == "block" and ppots and config.ppots_method == "counts"):
        return False
    notes.append(
        f"{name}: skipped, P-POTS for blocks is fitted on a grid of rates pooled over block "
        "positions: set ppots_method=grid (or family) to measure it"
    )
    return True


def load_model(
    config: StableMDMConfig, checkpoint: str | Path | None, task: Any
) -> tuple[torch.nn.Module, TextTokenizer, Canvas]:
    """The checkpoint's model, tokenizer and canvas (as an MDM; the canvas lengths saved with
    its run; a LoRA run's adapters, which peft loads frozen, take gradients again), or the
    config's (`training.build.build_model`: `model`, `init_from` or a seeded
    init)."""
    if checkpoint is None:
        return build_model(config, task)
    model, tokenizer = load_checkpoint(checkpoint, config.trust_remote_code)
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


@dataclass
class Inputs:
    """What every measurement reads: the model and its tokenizer, the train split in a seeded
    order, the gradient feature, and the ARM reference (`arm.arm_reference`: a trained ARM,
    the model itself made causal, or None when there is none)."""

    task: Any
    model: torch.nn.Module
    tokenizer: TextTokenizer
    canvas: Canvas
    data: TensorDataset
    index: torch.Tensor
    feature: GradientFeature
    arm_model: torch.nn.Module | None


def load_inputs(
    config: StableMDMConfig,
    options: VarianceOptions,
    checkpoint: str | Path | None,
    arm_checkpoint: str | Path | None,
    notes: list[str],
) -> Inputs:
    """The model (`load_model`), the ARM of `arm_checkpoint`, the train split and its seeded
    order, and the gradient feature; every input is checked before any measurement starts."""
    task = get_task(config.task, **config.task_options)
    model, tokenizer, canvas = load_model(config, checkpoint, task)
    model.eval()
    # decided before any measurement starts: a trained ARM, the model itself, or None
    arm_model = arm_reference(
        model, tokenizer, canvas.max_length, arm_checkpoint, notes, config.trust_remote_code
    )
    data = encode_split(task, tokenizer, "train", canvas)
    needed = max(
        options.loss_design.sequences, options.grad_design.sequences, options.grid_sequences
    )
    if len(data) < needed:
        raise ConfigError(
            f"task {config.task}: the train split has {len(data)} sequences but the design "
            f"needs {needed}; lower --sequences/--grad-sequences/--grid-sequences or add data"
        )
    generator = seeded_generator(config.seed, "variance-sequences")
    index = torch.randperm(len(data), generator=generator)
    feature = GradientFeature(model, options.params, options.project, config.seed)
    if feature.project is not None and options.project is None:
        notes.append(
            f"gradients: {feature.n_coordinates} coordinates, projected to {feature.project} "
            "seeded Gaussian directions (set --params or --project to choose)"
        )
    return Inputs(task, model, tokenizer, canvas, data, index, feature, arm_model)
