"""The estimator noise of a study's runs (docs/study.md, "Cost and noise").

What the optimiser sees is the minibatch *gradient*, so that is what is measured:
`variance_draws` minibatches of NOISE_BATCH training sequences drawn with replacement (data
noise included), with fresh rates and masks and the gradient reduced to a seeded projection
(`selection.GradientFeature`); every method of a seed gets the same minibatches. The trace of
the gradient's covariance times the minibatch's forward passes is the variance per sequence
forward pass: it does not change with the batch size, and MIRROR's second pass is charged, so
neither a bigger batch nor a doubled compute passes for a better estimator. The minibatch
loss's figure is kept beside it, labelled. Each run is measured on its own final model and on
Standard's final model of the same task and seed (the common checkpoint, where the estimator
alone differs); the report turns the latter into each method's batch equivalent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..data import TextTokenizer
from ..estimators.objective import Objective
from ..estimators.selection import GradientFeature, minibatch_draws, minibatch_variance
from ..rng import seeded_generator
from ..tasks.registry import get_task
from ..training.auto import chosen_config
from ..training.build import build_objective, build_sampler, load_density
from ..training.checkpoints import SAMPLER_STATE
from ..training.config import StableMDMConfig
from ..training.datasets import TensorDataset, encode_split, resolve_canvas
from ..training.outputs import write_text
from ..training.resume import load_sampler_state
from ..training.saved import load_checkpoint
from .spec import RESULT, StudySpec

NOISE = "estimator_noise"  # its key in a run's result.json
NOISE_BATCH = 32  # sequences per measured minibatch, the same for every method: auto's (even:
# MIRROR at a Standard step's compute masks half of them twice)
REFERENCE = "standard"  # whose final model is the common checkpoint


def run_objective(
    config: StableMDMConfig, tokenizer: TextTokenizer, checkpoint: Path | None = None
) -> Objective:
    """The estimator a run trained with, as training built it: for estimator=auto its last
    choice, with the P-POTS density the run fitted (its ppots.json); a fixed estimator's
    sampler as `checkpoint` holds it (an EMA's learned density, a refitted P-POTS)."""
    fixed = config.estimator != "auto"
    if not fixed:
        config = chosen_config(config, Path(config.output_dir))
    density = None
    if config.sampler == "ppots":
        density = load_density(Path(config.output_dir) / "ppots.json")
    objective = build_objective(config, tokenizer, build_sampler(config, density))
    if fixed and checkpoint is not None and (checkpoint / SAMPLER_STATE).is_file():
        load_sampler_state(objective.sampler, checkpoint)
    return objective


def per_pass_noise(
    model: torch.nn.Module,
    objective: Objective,
    data: TensorDataset,
    draws: int,
    seed: int,
    batch: int = NOISE_BATCH,
) -> dict[str, float]:
    """The variance per sequence forward pass of `objective`'s minibatch gradient (`grad`) and
    loss (`loss`), each with its jackknife SE, from `draws` minibatches of `batch` rows of
    `data` seeded by `seed` (the same rows whatever the model or objective)."""
    model.eval()
    rows = seeded_generator(seed, "noise-data")
    batches = (data[torch.randint(len(data), (batch,), generator=rows)] for _ in range(draws))
    out = minibatch_draws(
        model,
        objective,
        batches,
        lambda r: (
            seeded_generator(seed, "noise-rate", r),
            seeded_generator(seed, "noise-mask", r),
        ),
        GradientFeature(model, None, None, seed),
    )
    grad, grad_se = minibatch_variance(out.grad)
    loss, loss_se = minibatch_variance(out.loss)
    p = out.forward_passes
    return {"grad": grad * p, "grad_se": grad_se * p, "loss": loss * p, "loss_se": loss_se * p}


def run_noise(
    spec: StudySpec, task: str, method: str, seed: int, final: Path, reference: Path | None
) -> dict[str, Any] | None:
    """A run's estimator noise on its own final model (checkpoint `final`) and, for an MDM, on
    Standard's final model of the same task and seed (checkpoint `reference`; None without
    one); None when the study sets variance_draws below 2."""
    if spec.variance_draws < 2:
        return None
    config = spec.run_config(task, method, seed)
    model, tokenizer = load_checkpoint(final, config.trust_remote_code)
    if hasattr(model, "set_requires_grad") and hasattr(model, "active_adapters"):
        model.set_requires_grad(model.active_adapters)  # a LoRA run's trained parameters
    task_data = get_task(task, **config.task_options)
    canvas = resolve_canvas(config, task_data, tokenizer)
    data = encode_split(task_data, tokenizer, "train", canvas)
    objective = run_objective(config, tokenizer, final)
    own = per_pass_noise(model, objective, data, spec.variance_draws, seed)
    common = own if method == REFERENCE else None
    if common is None and config.objective == "mdm" and reference is not None:
        standard, _ = load_checkpoint(reference, config.trust_remote_code)
        common = per_pass_noise(standard, objective, data, spec.variance_draws, seed)
    measured = {"draws": spec.variance_draws, "batch": NOISE_BATCH, "split": "train"}
    return {**measured, "own": own, "common": common}


def final_checkpoint(spec: StudySpec, result: dict[str, Any]) -> Path:
    """The checkpoint of a finished run's last evaluation (the step it trained to)."""
    last = result["evaluations"][-1]
    step = last.get("trained_step", last["step"])
    return spec.run_dir(result["task"], result["method"], result["seed"]) / f"checkpoint-{step}"


def measure_noise(
    spec: StudySpec, results: list[dict[str, Any]], say: Callable[[str], None]
) -> None:
    """Add the estimator noise to every finished run that lacks it (after all runs, so that
    Standard's final models are there) and rewrite its result.json; a study stopped here
    measures the rest when it is run again."""
    finals = {(r["task"], r["method"], r["seed"]): final_checkpoint(spec, r) for r in results}
    todo = [r for r in results if NOISE not in r]
    if todo:
        say(f"estimator noise: {len(todo)} run(s), on their own and on Standard's final models")
    for result in todo:
        key = task, method, seed = result["task"], result["method"], result["seed"]
        reference = finals.get((task, REFERENCE, seed))
        result[NOISE] = run_noise(spec, task, method, seed, finals[key], reference)
        write_text(spec.run_dir(task, method, seed) / RESULT, json.dumps(result, indent=1))
