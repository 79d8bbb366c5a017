"""The `stablemdm variance` experiment (paper.md sections 2 and 3, issue 5): how noisy is a
model's training signal, where does the noise come from, and which estimator buys the most
variance reduction per forward pass.

Three measurements over one model and task, all drawn from generators seeded by the config's
seed, with every estimator built by `training.build` exactly as training builds it:

1. Decomposition. A nested design (I sequences from the train split x J rates from the
   method's density x K masks per rate, `Objective.at_rates`) gives y_ijk, the importance-
   weighted per-sequence loss (`ObjectiveOutput.per_sequence`) or its gradient (flattened,
   a parameter subset, or a seeded Gaussian projection), and `decompose.nested_components`
   splits its variance into A (mask), B (rate) and C (data). The ARM (the same network with
   causal attention) goes through the same design: its A and B are 0, its C is the floor.
2. Equal-compute comparison. R independent minibatches of n fresh sequences per method; the
   trace of the covariance of the minibatch loss and gradient, times forward passes
   (`decompose.compare_estimators`), against Standard and against the floor C / n.
3. Per-rate curves of the Standard estimator on a grid of t: g(t), v(t), S(t), the P-POTS
   fit, and the integrands a(t), b(t) whose integrals are A and B (see docs/variance.md).

The options, model, data and methods come from `inputs`, the measurement primitives from
`measure`; the tables and plots are `output`'s and the command is `command`'s. This module
runs the experiment and assembles its report.

Scheme methods (StraTS, SyRM) couple the rates *across the sequences of a minibatch*; a single
draw has the same distribution as under their base density, so their decomposition is the
base's (reported as `same_as`) and their effect shows only in the comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..estimators.objective import Objective
from ..estimators.ppots_fit import density_from_second_moment
from ..estimators.registry import BLOCK_ONLY_METHODS, DEFAULT_METHODS
from ..training.config import StableMDMConfig
from ..training.datasets import TensorDataset
from .arm import arm_objective
from .inputs import Inputs, Method, VarianceOptions, build_methods, load_inputs, same_draw
from .measure import (
    REFERENCE,
    GradientFeature,
    causal,
    compare_methods,
    decompose,
    density_sampler,
    rate_curves,
    semi_analytic_total,
)

F64 = torch.float64


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
    if config.objective == "arm":
        raise ConfigError(
            "stablemdm variance measures diffusion estimators (the ARM reference is added when "
            "there is one): set objective=mdm or objective=block"
        )
    started = time.perf_counter()
    timing: dict[str, float] = {}
    notes: list[str] = []
    names = _method_names(config, options, notes)
    inputs = load_inputs(config, options, checkpoint, arm_checkpoint, notes)

    say("building the estimators")
    methods = build_methods(
        config,
        names,
        inputs.model,
        inputs.task,
        inputs.tokenizer,
        inputs.data,
        options,
        notes,
        inputs.canvas,
    )
    timing["build"] = time.perf_counter() - started

    say(f"per-rate curves ({options.grid} rates)")
    mark = time.perf_counter()
    curves = _measure_curves(inputs, methods, options, config, notes)
    timing["curves"] = time.perf_counter() - mark

    mark = time.perf_counter()
    decomposition = _decompose_methods(inputs, methods, options, config.seed, curves, notes, say)
    say("decomposition: arm")
    arm = _decompose_arm(inputs, options, config, checkpoint, notes)
    timing["decomposition"] = time.perf_counter() - mark

    say(f"comparison: {options.draws} minibatches of {options.batch} per method")
    mark = time.perf_counter()
    comparison = _compare(inputs, methods, options, config.seed, decomposition, arm, notes)
    timing["comparison"] = time.perf_counter() - mark
    timing["total"] = time.perf_counter() - started

    return _report(
        config, checkpoint, options, inputs, methods, curves, decomposition, arm, comparison
    ) | {"notes": notes, "timing_s": timing}


def _method_names(config: StableMDMConfig, options: VarianceOptions, notes: list[str]) -> list[str]:
    """The methods measured, the reference first; a block config's default list adds the
    methods only block diffusion trains (StraTS within each sequence)."""
    if REFERENCE not in options.methods:
        notes.append(f"{REFERENCE}: added, it is the reference of the comparison")
    extra: tuple[str, ...] = ()
    if config.objective == "block" and options.methods == DEFAULT_METHODS:
        extra = BLOCK_ONLY_METHODS
        notes.append(f"block diffusion: {', '.join(extra)} added to the default methods")
    return list(dict.fromkeys([REFERENCE, *options.methods, *extra]))


def _measure_curves(
    inputs: Inputs,
    methods: Mapping[str, Method],
    options: VarianceOptions,
    config: StableMDMConfig,
    notes: list[str],
) -> dict[str, Any]:
    """Measurement 3: the Standard estimator's per-rate curves, the P-POTS density fitted to
    them, and the density of the first P-POTS method on the grid."""
    curves = rate_curves(
        inputs.model,
        methods[REFERENCE].objective,
        inputs.data,
        inputs.index[: options.grid_sequences],
        options.grid,
        options.grid_masks,
        config.seed,
    )
    curves["ppots_fit"] = _fit_curve_density(curves, config, notes)
    for method in methods.values():
        if method.config.sampler == "ppots" and method.config.rate == "t":
            sampler = density_sampler(method.objective.sampler)
            density = sampler.density(torch.tensor(curves["t"], dtype=F64))
            curves["ppots_method_density"] = density.tolist()
            break
    return curves


def _decompose_methods(
    inputs: Inputs,
    methods: Mapping[str, Method],
    options: VarianceOptions,
    seed: int,
    curves: Mapping[str, Any],
    notes: list[str],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Measurement 1 for every method; a method whose single draw has the distribution of an
    earlier one's is reported as `same_as` that one."""
    decomposition: dict[str, Any] = {}
    for method in methods.values():
        same = next((m for m in decomposition if same_draw(methods[m], method)), None)
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
            inputs.model,
            method.objective,
            inputs.data,
            inputs.index,
            options,
            inputs.feature,
            seed,
            method.name,
        )
        config = method.config
        iid_rate = (config.objective, config.rate, config.masking) == ("mdm", "t", "iid")
        decomposition[method.name]["semi_analytic_total"] = (
            semi_analytic_total(curves, method.objective.sampler) if iid_rate else None
        )
    return decomposition


def _decompose_arm(
    inputs: Inputs,
    options: VarianceOptions,
    config: StableMDMConfig,
    checkpoint: str | Path | None,
    notes: list[str],
) -> dict[str, Any] | None:
    """Measurement 1 for the ARM reference (`inputs.arm_model`: a trained ARM, the model made
    causal, or None: skipped). A failure here is a note, not the loss of every finished
    measurement."""
    model, arm_model = inputs.model, inputs.arm_model
    if arm_model is None:
        return None
    if arm_model is model and (checkpoint is not None or config.init_from):
        notes.append(
            "arm: the MDM's own weights with causal attention; for a trained model this is "
            "not a trained ARM (pass --arm-checkpoint for one)"
        )
    objective = arm_objective(config, inputs.tokenizer)
    data, index, seed = inputs.data, inputs.index, config.seed
    try:
        if arm_model is not model:
            own = GradientFeature(arm_model, options.params, options.project, seed)
            return _decompose_method(arm_model, objective, data, index, options, own, seed, "arm")
        with causal(model):
            return _decompose_method(
                model, objective, data, index, options, inputs.feature, seed, "arm"
            )
    except ConfigError as err:
        notes.append(f"arm: not measured ({err}); the other measurements are kept")
        return None


def _compare(
    inputs: Inputs,
    methods: Mapping[str, Method],
    options: VarianceOptions,
    seed: int,
    decomposition: Mapping[str, Any],
    arm: Mapping[str, Any] | None,
    notes: list[str],
) -> dict[str, Any]:
    """Measurement 2, with the data-noise floors C / n of Standard and of the ARM."""
    reference = decomposition[REFERENCE]
    loss_floor = _floor(reference["loss"]["C"], options.batch, "loss", notes)
    grad_floor = _floor(reference["grad"]["C"], options.batch, "gradient", notes)
    comparison = compare_methods(
        inputs.model,
        {name: m.objective for name, m in methods.items()},
        inputs.data,
        options.draws,
        options.batch,
        seed,
        inputs.feature,
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
    return comparison


def _report(
    config: StableMDMConfig,
    checkpoint: str | Path | None,
    options: VarianceOptions,
    inputs: Inputs,
    methods: Mapping[str, Method],
    curves: dict[str, Any],
    decomposition: dict[str, Any],
    arm: dict[str, Any] | None,
    comparison: dict[str, Any],
) -> dict[str, Any]:
    """The report of the three measurements, with the estimates the bootstrap flags."""
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
        "feature": inputs.feature.describe(),
        "methods": {name: m.overrides for name, m in methods.items()},
        "forward_passes": {row["name"]: row["forward_passes"] for row in comparison["loss"]},
        "decomposition": decomposition,
        "arm": arm,
        "curves": curves,
        "comparison": comparison,
        "unstable": unstable,
        "heavy_tail_warning": _heavy_tail_warning(unstable, config.eps),
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
