"""A training run from a `StableMDMConfig`: task, tokenizer, model, sampler, objective, Trainer.

This is the glue the CLI, the demo and the tests call (`train(config)`); the math lives in
the modules it wires together. Checks that can fail are made before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from transformers.trainer_callback import ProgressCallback

from ..data import TextTokenizer
from ..estimators.objective import Objective
from ..estimators.ppots import PPOTS
from ..estimators.ppots_fit import describe_fit
from ..estimators.rates import Uniform
from ..estimators.stratified import Stratified
from ..evaluation.scoring import evaluate
from ..models import Transformer
from ..models.hf import unwrap
from ..tasks.registry import Task, get_task
from .auto import AutoCallback, AutoEstimator, build_auto
from .build import build_model, build_objective, build_sampler, fit_density, load_density
from .callbacks import AccuracyCallback, EMACallback, MetricsCallback, ProgressBar, RefitCallback
from .checkpoints import PPOTS_FILE, RUN_CONFIG, SAMPLER_STATE
from .config import StableMDMConfig
from .datasets import Canvas, TensorDataset, collate, encode_split, fitting_data, train_dataset
from .recipe import save_config
from .resume import _restart_metrics, find_checkpoint, prepare_output
from .trainer import StableMDMTrainer

AUTO_DATA = 4096  # estimator=auto on a streamed task: sequences its measurements draw from


@dataclasses.dataclass
class RunResult:
    """What a finished run left: its folder, the final step and the log history."""

    output_dir: Path
    global_step: int
    log_history: list[dict]


def train(
    config: StableMDMConfig, resume: bool | str = False, callbacks: list | None = None
) -> RunResult:
    """Train the configured model; `resume` is True (latest checkpoint) or a folder.
    Extra `transformers.TrainerCallback`s may watch the run. The canvas lengths measured on
    the data are written into `config` (and so into config.yaml) before anything else."""
    task = get_task(config.task, **config.task_options)
    model, tokenizer, canvas = build_model(config, task)
    config.max_length, config.gen_length = canvas.max_length, canvas.gen_length
    checkpoint = find_checkpoint(config, resume) if resume else None
    prepare_output(config, bool(resume))
    if checkpoint is not None and config.process_index == 0:
        _restart_metrics(config, checkpoint)
    train_data = train_dataset(task, tokenizer, canvas)
    encoded = train_data if isinstance(train_data, TensorDataset) else None  # not streamed
    objective, density, auto = _estimator(
        config, model, task, tokenizer, canvas, checkpoint, encoded
    )

    def save_extras(folder: Path, with_model: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if with_model:
            model.save_pretrained(folder)
        else:  # the spec travels in config.json, also beside a LoRA adapter
            unwrap(model).config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.save(trainer.objective.sampler.state_dict(), folder / SAMPLER_STATE)
        if density is not None:
            (folder / PPOTS_FILE).write_text(json.dumps(density.to_dict()))
        if auto is not None:
            auto.save(folder)
        save_config(config, folder / RUN_CONFIG)

    if config.process_index == 0:
        save_config(config, Path(config.output_dir) / RUN_CONFIG)
    trainer = _trainer(config, model, tokenizer, task, canvas, train_data, objective)
    builtin = isinstance(model, Transformer)
    # a Hugging Face model's weights are saved by the Trainer itself (sharded, LoRA, FSDP)
    watch = AutoCallback(trainer, auto) if auto is not None else None
    refits = []
    if config.ppots_refit_steps:

        def refit(step: int) -> PPOTS:
            return fit_density(config, model, task, tokenizer, canvas, step, encoded)

        refits.append(RefitCallback(trainer, density, refit, config.ppots_refit_steps))
    trainer.checkpoint_extras = lambda folder: save_extras(folder, with_model=builtin)
    for callback in (
        MetricsCallback(watch.fields if watch is not None else None),
        EMACallback(trainer),
        *refits,
        *([watch] if watch is not None else []),
        *(callbacks or []),
    ):
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if not builtin:
        trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        save_extras(Path(config.output_dir), with_model=builtin)
    return RunResult(Path(config.output_dir), trainer.state.global_step, trainer.state.log_history)


def _estimator(
    config: StableMDMConfig,
    model: torch.nn.Module,
    task: Task,
    tokenizer: TextTokenizer,
    canvas: Canvas,
    checkpoint: Path | None,
    encoded: TensorDataset | None,
) -> tuple[Objective, PPOTS | None, AutoEstimator | None]:
    """(the objective to start with, the P-POTS density, estimator=auto's state or None):
    the density is the checkpoint's, `ppots_file`'s, or fitted now (its self-check said on
    stderr); the sampler state is the checkpoint's."""
    auto, density = None, None
    if config.estimator == "auto":
        data = encoded if encoded is not None else fitting_data(task, tokenizer, canvas, AUTO_DATA)
        auto = build_auto(config, model, task, tokenizer, canvas, data, checkpoint)
        density = auto.density
    elif config.sampler == "ppots":
        if checkpoint is not None and (checkpoint / PPOTS_FILE).is_file():
            density = load_density(checkpoint / PPOTS_FILE)
        elif config.ppots_file:
            density = load_density(config.ppots_file)
        else:
            density = fit_density(config, model, task, tokenizer, canvas, data=encoded)
            if config.process_index == 0:
                print(f"stablemdm: {describe_fit(density)}", file=sys.stderr)
    if auto is not None:
        objective = auto.objective
    else:
        objective = build_objective(config, tokenizer, build_sampler(config, density))
    if checkpoint is not None:
        objective.sampler.load_state_dict(torch.load(checkpoint / SAMPLER_STATE, weights_only=True))
    return objective, density, auto


def _trainer(
    config: StableMDMConfig,
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    task: Task,
    canvas: Canvas,
    train_data,
    objective: Objective,
) -> StableMDMTrainer:
    """The Trainer of a run: held-out loss at fixed draws (Standard, stratified) and, with
    `eval_accuracy`, decoding accuracy on the test split."""
    eval_objective = Objective(
        mask_token_id=tokenizer.mask_token_id,
        kind=config.objective,
        rate=config.rate,
        sampler=Stratified(Uniform()),
        eps=config.eps,
        normalizer=config.loss_normalizer,
        normalizer_length=config.normalizer_length,
    )
    evaluating = config.eval_strategy != "no"
    trainer = StableMDMTrainer(
        model=model,
        args=config,
        train_dataset=train_data,
        eval_dataset=encode_split(task, tokenizer, "test", canvas, config.eval_heldout)
        if evaluating
        else None,
        data_collator=collate,
        objective=objective,
        eval_objective=eval_objective,
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBar)
    if config.eval_accuracy:

        def accuracy(m: torch.nn.Module) -> float:
            result = evaluate(
                m,
                tokenizer,
                task,
                "test",
                objective=config.objective,
                limit=config.eval_limit,
                seed=config.seed,
                gen_length=canvas.gen_length,
            )
            return result.accuracy

        trainer.add_callback(AccuracyCallback(trainer, accuracy))
    return trainer
