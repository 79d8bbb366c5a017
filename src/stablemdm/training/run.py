"""A training run from a `StableMDMConfig`: task, tokenizer, model, sampler, objective, Trainer.

This is the glue the CLI, the demo and the tests call (`train(config)`); the math lives in
the modules it wires together. Checks that can fail are made before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from transformers.trainer_callback import ProgressCallback

from ..data import TextTokenizer
from ..data.atomic import follow_umask
from ..errors import ConfigError
from ..estimators.objective import Objective
from ..estimators.ppots import PPOTS
from ..estimators.ppots_fit import describe_fit
from ..estimators.rates import Uniform
from ..estimators.stratified import Stratified
from ..evaluation.perplexity import heldout_bits
from ..evaluation.scoring import check_scorer, evaluate
from ..models import Transformer
from ..models.hf import adapter_spec, unwrap
from ..tasks.registry import Task, get_task
from ..tasks.text import TextTask
from .auto import AutoCallback, AutoEstimator, build_auto
from .build import build_model, build_objective, build_sampler, fit_density, load_density
from .callbacks import (
    AccuracyCallback,
    EMACallback,
    LogLines,
    MetricsCallback,
    ProgressBar,
    RefitCallback,
)
from .checkpoints import PPOTS_FILE, RUN_CONFIG, SAMPLER_STATE
from .compute import KEY as COMPUTE_KEY
from .compute import CarryCompute, attach, write_compute
from .config import StableMDMConfig
from .datasets import Canvas, TensorDataset, collate, encode_split, fitting_data, train_dataset
from .finished import FINISHED, finished_at, mark_finished, publish_final, reached
from .finite import check_final_weights
from .lock import output_lock
from .memory import check_attention_memory
from .recipe import save_config
from .resume import (
    _restart_metrics,
    check_output_dir,
    find_checkpoint,
    load_sampler_state,
    prepare_output,
)
from .trainer import StableMDMTrainer

AUTO_DATA = 4096  # estimator=auto on a streamed task: sequences its measurements draw from


@dataclasses.dataclass
class RunResult:
    """What a run left: its folder, the final step and the log history; `trained` is False
    when the run was finished already (nothing was trained)."""

    output_dir: Path
    global_step: int
    log_history: list[dict]
    trained: bool = True


def train(
    config: StableMDMConfig, resume: bool | str = False, callbacks: list | None = None
) -> RunResult:
    """Train the configured model; `resume` is True (latest checkpoint) or a folder.
    Extra `transformers.TrainerCallback`s may watch or steer the run: they run right after
    the engine's flow callback, before the trainer's own, so a checkpoint one of them asks
    for (the study's evaluation points) carries the log window and is refused on non-finite
    weights like any other. The canvas lengths measured on
    the data and a Hugging Face model's resolved `shift_logits` are written into `config`
    (and so into config.yaml) before anything else. The output folder is locked for the run
    (`lock.output_lock`); a finished run is left as it is (`finished`)."""
    _check_launch(config)
    check_output_dir(config)
    task = get_task(config.task, **config.task_options)
    if isinstance(task, TextTask) and config.eval_accuracy:
        raise ConfigError(
            "eval_accuracy=true: raw text (task 'text') has no answers to decode and score; "
            "drop it: a text run logs the held-out eval_bits_per_token at each evaluation"
        )
    model, tokenizer, canvas = build_model(config, task)
    check_attention_memory(config, model, canvas.max_length)
    check_scorer(task, tokenizer, task.examples("test"))
    config.max_length, config.gen_length = canvas.max_length, canvas.gen_length
    if config.model is not None:  # config.yaml records the resolved convention, not null
        config.shift_logits = adapter_spec(model).shift_logits
    train_data = train_dataset(task, tokenizer, canvas, config.max_steps)
    with output_lock(config.output_dir, held=config.process_index == 0):
        out = Path(config.output_dir)
        step = finished_at(out, config) if resume else None
        if step is not None:
            if config.process_index == 0:
                print(
                    f"stablemdm: {out} holds a run that finished at step {step}: nothing to train, "
                    "nothing was changed (raise max_steps to train it further)",
                    file=sys.stderr,
                )
            return _result(out, out, trained=False)
        checkpoint = find_checkpoint(config, resume) if resume else None
        prepare_output(config, bool(resume))
        if checkpoint is not None and reached(checkpoint, config) is not None:
            return _finish(config, checkpoint)
        return _run(config, task, model, tokenizer, canvas, train_data, checkpoint, callbacks)


def _result(out: Path, folder: Path, trained: bool) -> RunResult:
    """The result of a run as the trainer state saved in `folder` records it."""
    state = json.loads((folder / FINISHED).read_text())
    return RunResult(out, state["global_step"], state.get("log_history", []), trained)


def _finish(config: StableMDMConfig, checkpoint: Path) -> RunResult:
    """A run stopped after its checkpoint at the end was written but before its final model:
    that checkpoint's model becomes the final one, without training a step past the end."""
    out = Path(config.output_dir)
    if config.process_index == 0:
        publish_final(checkpoint, out, config)
        save_config(config, out / RUN_CONFIG)
        print(
            f"stablemdm: {checkpoint} is at the end of the run: its model is now the final one "
            f"in {out} (nothing was trained)",
            file=sys.stderr,
        )
    return _result(out, checkpoint, trained=False)


def _run(
    config: StableMDMConfig,
    task: Task,
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    canvas: Canvas,
    train_data: torch.utils.data.Dataset,
    checkpoint: Path | None,
    callbacks: list | None,
) -> RunResult:
    """The training itself, from `checkpoint` if given, and the final model (only finite
    weights; `trainer_state.json` beside it, written last, marks the run finished). Every
    pass through the model is counted from here on (`compute`, in compute.json)."""
    attach(model)
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
        write_compute(folder, trainer.state.stateful_callbacks.get(COMPUTE_KEY))
        save_config(config, folder / RUN_CONFIG)

    # auto plans its own steps into the trainer's copy of the config (config.yaml keeps max_steps)
    args = copy.copy(config) if auto is not None else config
    trainer = _trainer(args, model, tokenizer, task, canvas, train_data, objective, callbacks)
    _note_launch(trainer)
    builtin = isinstance(model, Transformer)
    # a Hugging Face model's weights are saved by the Trainer itself (sharded, LoRA, FSDP)
    watch = AutoCallback(trainer, auto) if auto is not None else None
    refits = []
    if config.ppots_refit_steps:

        def refit(step: int) -> PPOTS:
            return fit_density(config, model, task, tokenizer, canvas, step, encoded)

        refits.append(RefitCallback(trainer, density, refit, config.ppots_refit_steps))
    trainer.checkpoint_extras = lambda folder: save_extras(folder, with_model=builtin)

    def begin() -> None:
        """Write config.yaml and drop from metrics.jsonl what a resumed run logs again, once
        training begins: a resume refused before (here or by the engine's loading of the
        checkpoint) leaves the run folder as it was."""
        save_config(config, Path(config.output_dir) / RUN_CONFIG)
        if checkpoint is not None:
            _restart_metrics(config, checkpoint)

    for callback in (
        MetricsCallback(begin, watch.fields if watch is not None else None),
        EMACallback(trainer),
        *refits,
        *([watch] if watch is not None else []),
        CarryCompute(trainer.compute_record),
    ):
        trainer.add_callback(callback)
    if watch is not None:
        watch.prepare()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.state.stateful_callbacks[COMPUTE_KEY] = trainer.compute_record()
    check_final_weights(trainer)
    if not builtin:
        trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        save_extras(Path(config.output_dir), with_model=builtin)
        follow_umask(Path(config.output_dir).glob("*.safetensors"))  # written private
        mark_finished(trainer, Path(config.output_dir))
    return RunResult(Path(config.output_dir), trainer.state.global_step, trainer.state.log_history)


def _density(
    config: StableMDMConfig,
    checkpoint: Path | None,
    model: torch.nn.Module,
    task: Task,
    tokenizer: TextTokenizer,
    canvas: Canvas,
    encoded: TensorDataset | None,
) -> PPOTS | None:
    """The run's P-POTS density (None for other samplers): the checkpoint's when resuming,
    else `ppots_file`'s, else one fitted on the model now."""
    if config.sampler != "ppots":
        return None
    if checkpoint is not None and (checkpoint / PPOTS_FILE).is_file():
        return load_density(checkpoint / PPOTS_FILE)
    if config.ppots_file:
        return load_density(config.ppots_file, config)
    density = fit_density(config, model, task, tokenizer, canvas, data=encoded)
    if config.process_index == 0:
        print(f"stablemdm: {describe_fit(density)}", file=sys.stderr)
    return density


def _estimator(
    config: StableMDMConfig,
    model: torch.nn.Module,
    task: Task,
    tokenizer: TextTokenizer,
    canvas: Canvas,
    checkpoint: Path | None,
    encoded: TensorDataset | None,
) -> tuple[Objective, PPOTS | None, AutoEstimator | None]:
    """(the objective to start with, the P-POTS density, estimator=auto's state or None);
    the sampler state is the checkpoint's when resuming."""
    auto = None
    if config.estimator == "auto":
        data = encoded if encoded is not None else fitting_data(task, tokenizer, canvas, AUTO_DATA)
        auto = build_auto(config, model, task, tokenizer, canvas, data, checkpoint)
        density, objective = auto.density, auto.objective
    else:
        density = _density(config, checkpoint, model, task, tokenizer, canvas, encoded)
        objective = build_objective(config, tokenizer, build_sampler(config, density))
    if checkpoint is not None:
        load_sampler_state(objective.sampler, checkpoint)
    return objective, density, auto


def _launched_with(name: str) -> bool:
    """Whether `accelerate launch` was told to use FSDP or DEEPSPEED (its config file)."""
    return os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true"


def _check_launch(config: StableMDMConfig) -> None:
    """Refuse before anything is built: FSDP for the built-in transformer (FSDP is for
    Hugging Face models too large for one device: configs/accelerate/fsdp.yaml), and a
    DeepSpeed precision the run does not ask for (the Trainer would refuse it on every rank)."""
    if _launched_with("FSDP") and config.model is None:
        raise ConfigError(
            "FSDP (configs/accelerate/fsdp.yaml) shards Hugging Face models (model=PATH); train "
            "the built-in transformer with DDP: torchrun, or configs/accelerate/ddp_gpu.yaml"
        )
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if _launched_with("DEEPSPEED") and precision != "no" and not (config.bf16 or config.fp16):
        flag = "fp16" if precision == "fp16" else "bf16"
        raise ConfigError(
            f"accelerate asks DeepSpeed for mixed_precision {precision}, which the run must ask "
            f"for too: add {flag}=true, or launch with mixed_precision 'no' (as "
            "configs/accelerate/deepspeed_zero2.yaml does: DeepSpeed then follows the run)"
        )


def _note_launch(trainer: StableMDMTrainer) -> None:
    """Say so when accelerate was asked for FSDP or DeepSpeed but did not enable it (it does
    only on GPUs): the processes then train with plain DDP."""
    for name, enabled in (
        ("FSDP", trainer.is_fsdp_enabled),
        ("DEEPSPEED", trainer.is_deepspeed_enabled),
    ):
        if _launched_with(name) and not enabled and trainer.is_world_process_zero():
            print(
                f"stablemdm: note: accelerate did not enable {name} for these processes (it "
                "does only on GPUs); they train with DDP",
                file=sys.stderr,
            )


def _trainer(
    config: StableMDMConfig,
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    task: Task,
    canvas: Canvas,
    train_data,
    objective: Objective,
    callbacks: list | None = None,
) -> StableMDMTrainer:
    """The Trainer of a run: held-out loss at fixed draws (Standard, stratified) and, with
    `eval_accuracy`, decoding accuracy on the test split; `callbacks` come right after the
    engine's flow callback (`train`)."""
    eval_objective = Objective(
        mask_token_id=tokenizer.mask_token_id,
        kind=config.objective,
        rate=config.rate,
        sampler=Stratified(Uniform()),
        eps=config.eps,
        normalizer=config.loss_normalizer,
        normalizer_length=config.normalizer_length,
        block_size=config.block_size,
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
        callbacks=callbacks,
    )
    if trainer.pop_callback(ProgressCallback) is not None:  # a bar on a terminal only
        trainer.add_callback(ProgressBar if sys.stderr.isatty() else LogLines)
    if isinstance(task, TextTask) and evaluating:
        rows = trainer.eval_dataset.tensors
        trainer.add_callback(
            AccuracyCallback(trainer, lambda m: heldout_bits(m, rows, seed=config.seed).metrics())
        )
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
                self_check=False,  # done before training
            )
            return result.accuracy

        trainer.add_callback(AccuracyCallback(trainer, accuracy))
    return trainer
