"""A training run from a `StableMDMConfig`: task, tokenizer, model, sampler, objective, Trainer.

This is the glue the CLI, the demo and the tests call (`train(config)`); the math lives in
the modules it wires together. Checks that can fail are made before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import default_data_collator
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from .config import ConfigError, StableMDMConfig, load_yaml, save_config
from .data import encode_examples
from .evaluation import evaluate
from .model import ModelConfig, Transformer
from .objective import Objective
from .ppots import fit_ppots
from .samplers import EMA, PPOTS, Clipped, Stratified, Uniform, with_scheme
from .tasks import Task, fits, get_task
from .tokenizer import CharTokenizer
from .trainer import (
    SAMPLER_STATE,
    AccuracyCallback,
    CheckpointCallback,
    EMACallback,
    MetricsCallback,
    ProgressBar,
    StableMDMTrainer,
    seeded_generator,
)

PPOTS_FILE = "ppots.json"
RUN_CONFIG = "config.yaml"
# fields that may differ between a run and its resumption
RESUMABLE_CHANGES = {
    "output_dir",
    "max_steps",
    "num_train_epochs",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "eval_steps",
    "eval_strategy",
    "eval_accuracy",
    "eval_limit",
    "report_to",
    "disable_tqdm",
    "dataloader_num_workers",
    "resume_from_checkpoint",
}


class TensorDataset(torch.utils.data.Dataset):
    """Rows of a dict of equal-length tensors, as dicts (what the default collator stacks)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def encode_split(task: Task, tokenizer: CharTokenizer, split: str, limit: int | None = None):
    """A task split encoded for training: prompt, separator, response canvas, padding.
    Test items whose gold response overflows the canvas are left out of a held-out loss."""
    examples = [e for e in task.examples(split) if fits(e, task.max_length, task.gen_length)][
        :limit
    ]
    return TensorDataset(encode_examples(examples, tokenizer, task.max_length, task.gen_length))


def check_fits(model: Transformer, tokenizer: CharTokenizer, task: Task, where: str) -> None:
    """Refuse a model whose vocabulary or length does not match the tokenizer and task."""
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"{where}: the model has {model.config.vocab_size} tokens, the tokenizer "
            f"{tokenizer.vocab_size}"
        )
    if model.config.max_seq_len < task.max_length:
        raise ConfigError(
            f"{where}: max_seq_len {model.config.max_seq_len} is shorter than task "
            f"{task.name}'s sequences ({task.max_length})"
        )


def load_checkpoint(folder: str | Path) -> tuple[Transformer, CharTokenizer]:
    """A saved model and its tokenizer (the default character tokenizer if none is saved)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"checkpoint folder {folder} does not exist")
    model = Transformer.from_pretrained(folder)
    has_tokenizer = (folder / "tokenizer.json").is_file()
    return model, CharTokenizer.from_pretrained(folder) if has_tokenizer else CharTokenizer()


def build_model(config: StableMDMConfig, task: Task, tokenizer: CharTokenizer) -> Transformer:
    """A fresh model of the configured size, or the `init_from` checkpoint with the
    attention pattern the objective needs (same parameters either way)."""
    causal = config.objective == "arm"
    if config.init_from:
        model = Transformer.from_pretrained(config.init_from)
        check_fits(model, tokenizer, task, f"init_from={config.init_from}")
        model.config.causal = causal
        return model
    overrides = {
        k: getattr(config, k) for k in ("d_model", "n_layers", "n_heads") if getattr(config, k)
    }
    model_config = ModelConfig.from_preset(
        config.model_preset,
        vocab_size=tokenizer.vocab_size,
        max_seq_len=task.max_length,
        causal=causal,
        mask_token_id=tokenizer.mask_token_id,
        **overrides,
    )
    return Transformer(model_config, generator=seeded_generator(config.seed, "init"))


def build_objective(config: StableMDMConfig, tokenizer: CharTokenizer, sampler=None) -> Objective:
    """The training objective the config names (sampler defaults to `build_sampler`)."""
    isad_ids = tuple(tokenizer.encode(s, where="isad_tokens")[0] for s in config.isad_tokens)
    for s in config.isad_tokens:
        if len(s) != 1:
            raise ConfigError(
                f"isad_tokens: {s!r} is not a single token of the character tokenizer"
            )
    return Objective(
        mask_token_id=tokenizer.mask_token_id,
        kind=config.objective,
        rate=config.rate,
        masking=config.masking,
        sampler=sampler if sampler is not None else build_sampler(config),
        eps=config.eps,
        isad_token_ids=isad_ids,
        isad_delta=config.isad_delta,
        isad_q_max=config.isad_q_max,
        compute_matched=config.compute_matched,
    )


def build_sampler(config: StableMDMConfig, density: PPOTS | None = None):
    """The rate sampler: a density (uniform, clipped, P-POTS, EMA) under a uniform scheme."""
    if config.sampler == "uniform":
        base = Uniform()
    elif config.sampler == "clipped":
        base = Clipped(config.clip_low, config.clip_high)
    elif config.sampler == "ema":
        base = EMA(
            n_bins=config.ema_bins,
            decay=config.ema_decay,
            refresh_every=config.ema_refresh_every,
            mix=config.mix,
        )
    else:
        if density is None:
            raise ConfigError("sampler=ppots needs a fitted density (ppots_file, or fit first)")
        base = density
    return with_scheme(base, config.scheme)


def load_density(path: str | Path) -> PPOTS:
    """A P-POTS density saved by `stablemdm fit-t` or a run (JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ppots_file {path} does not exist")
    try:
        return PPOTS.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"ppots_file {path}: {err}") from err


def fit_density(
    config: StableMDMConfig, model: Transformer, task: Task, tokenizer: CharTokenizer
) -> PPOTS:
    """Estimate S(t) on a grid for this model and data and fit the P-POTS density. With
    several processes each estimates on its own `ppots_sequences` sequences and `fit_ppots`
    averages the estimates, so all processes fit the same density from the pooled data."""
    data = encode_split(task, tokenizer, "train")
    rank, n = config.process_index, config.ppots_sequences
    if (rank + 1) * n > len(data):
        raise ConfigError(
            f"ppots_sequences={n} per process needs {(rank + 1) * n} train sequences; "
            f"task {task.name} has {len(data)}"
        )
    pick = torch.randperm(len(data), generator=seeded_generator(config.seed, "ppots-data"))
    batch = default_data_collator([data[int(i)] for i in pick[rank * n : (rank + 1) * n]])
    plain = build_objective(config, tokenizer, sampler=Uniform())
    return fit_ppots(
        plain,
        model,
        batch,
        n_rates=config.ppots_rates,
        n_masks=config.ppots_masks,
        method=config.ppots_method,
        target=config.ppots_target,
        params=config.ppots_params,
        mix=config.mix,
        generator=seeded_generator(config.seed, "ppots-masks", rank),
    )


def prepare_output(config: StableMDMConfig, resume: bool) -> None:
    """Create the output folder and refuse to overwrite an earlier run unless resuming."""
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: ranks run this together
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {out} is not writable: {err.strerror}") from err
    if not resume and (any(out.glob("checkpoint-*")) or (out / "metrics.jsonl").exists()):
        raise ConfigError(
            f"output_dir {out} already holds a run; pass --resume to continue it, or choose "
            "another output_dir (nothing there was changed)"
        )


def find_checkpoint(config: StableMDMConfig, resume: bool | str) -> Path:
    """The checkpoint to resume from, checked to be complete and readable."""
    if resume is True:
        last = get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
        if last is None:
            raise ConfigError(f"--resume: no checkpoint-* folder in {config.output_dir}")
        path = Path(last)
    else:
        path = Path(resume)
    needed = ("trainer_state.json", "model.safetensors", RUN_CONFIG, SAMPLER_STATE)
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise ConfigError(
            f"--resume: {path} is not a complete checkpoint (missing {', '.join(missing)})"
        )
    try:
        json.loads((path / "trainer_state.json").read_text())
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            list(f.keys())
        torch.load(path / SAMPLER_STATE, weights_only=True)
    except Exception as err:  # any parse failure means the same thing to the user
        raise ConfigError(
            f"--resume: checkpoint {path} is corrupted ({type(err).__name__}: {err})"
        ) from err
    saved = load_yaml((path / RUN_CONFIG).read_text())
    now = config.resolved()
    changed = sorted(
        k
        for k in set(saved) | set(now)
        if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)
    )
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume: the config differs from the checkpoint's ({details})")
    return path


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
    Extra `transformers.TrainerCallback`s may watch the run."""
    task = get_task(config.task, **config.task_options)
    tokenizer = CharTokenizer()
    checkpoint = find_checkpoint(config, resume) if resume else None
    prepare_output(config, bool(resume))
    model = build_model(config, task, tokenizer)
    train_data = encode_split(task, tokenizer, "train")
    density = None
    if config.sampler == "ppots":
        if checkpoint is not None and (checkpoint / PPOTS_FILE).is_file():
            density = load_density(checkpoint / PPOTS_FILE)
        elif config.ppots_file:
            density = load_density(config.ppots_file)
        else:
            density = fit_density(config, model, task, tokenizer)
    objective = build_objective(config, tokenizer, build_sampler(config, density))
    if checkpoint is not None:
        objective.sampler.load_state_dict(torch.load(checkpoint / SAMPLER_STATE, weights_only=True))
    eval_objective = Objective(
        mask_token_id=tokenizer.mask_token_id,
        kind=config.objective,
        rate=config.rate,
        sampler=Stratified(Uniform()),
        eps=config.eps,
    )

    def save_extras(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.save(objective.sampler.state_dict(), folder / SAMPLER_STATE)
        if density is not None:
            (folder / PPOTS_FILE).write_text(json.dumps(density.to_dict()))
        save_config(config, folder / RUN_CONFIG)

    if config.process_index == 0:
        save_config(config, Path(config.output_dir) / RUN_CONFIG)
    evaluating = config.eval_strategy != "no"
    trainer = StableMDMTrainer(
        model=model,
        args=config,
        train_dataset=train_data,
        eval_dataset=encode_split(task, tokenizer, "test", config.eval_heldout)
        if evaluating
        else None,
        data_collator=default_data_collator,
        objective=objective,
        eval_objective=eval_objective,
        callbacks=[
            MetricsCallback(),
            CheckpointCallback(save_extras),
            EMACallback(objective),
            *(callbacks or []),
        ],
    )
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBar)
    if config.eval_accuracy:
        trainer.add_callback(
            AccuracyCallback(
                trainer,
                lambda m: (
                    evaluate(
                        m,
                        tokenizer,
                        task,
                        "test",
                        objective=config.objective,
                        limit=config.eval_limit,
                        seed=config.seed,
                    ).accuracy
                ),
            )
        )
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.is_world_process_zero():
        save_extras(Path(config.output_dir))
    return RunResult(Path(config.output_dir), trainer.state.global_step, trainer.state.log_history)
