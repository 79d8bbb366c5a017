"""A training run from a `StableMDMConfig`: task, tokenizer, model, sampler, objective, Trainer.

This is the glue the CLI, the demo and the tests call (`train(config)`); the math lives in
the modules it wires together. Checks that can fail are made before anything is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import default_data_collator
from transformers.trainer_callback import ProgressCallback

from .checkpoints import (
    METRICS,
    MODEL_FILES,
    PPOTS_FILE,
    SAMPLER_STATE,
    checkpoints,
    latest_complete,
    leftovers,
    missing_files,
    previous_complete,
    restart_metrics,
)
from .config import ConfigError, StableMDMConfig, load_yaml, save_config
from .data import TextTokenizer, canvas_lengths, encode_examples, fits
from .data.sources import EncodedStream
from .evaluation import evaluate
from .models import Transformer
from .models.hf import unwrap
from .models.loading import RUN_CONFIG, build_builtin, build_hf, saved_run_config
from .objective import Objective
from .ppots import FitDesign, describe_fit, fit_ppots
from .samplers import EMA, PPOTS, Clipped, Stratified, Uniform, with_scheme
from .tasks import Task, get_task
from .tokenizer import CharTokenizer
from .trainer import (
    AccuracyCallback,
    EMACallback,
    MetricsCallback,
    ProgressBar,
    RefitCallback,
    StableMDMTrainer,
    seeded_generator,
)

# fields that may differ between a run and its resumption: cadence, length, how processes
# talk (a run written by several processes resumes in one), and what a run stopped by
# non-finite steps needs to continue (a lower learning_rate, tighter clipping)
RESUMABLE_CHANGES = {
    "output_dir",
    "learning_rate",
    "max_grad_norm",
    "max_nonfinite_steps",
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
    "ddp_backend",
    "resume_from_checkpoint",
}


class TensorDataset(torch.utils.data.Dataset):
    """Rows of a dict of equal-length tensors, as dicts (what the default collator stacks); a
    DataLoader takes a whole batch at once (`__getitems__`: one indexing per key, not a dict
    per row, which cost the demo's Trainer about 4% of a step)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices)
        return {k: v[index] for k, v in self.tensors.items()}  # [b, ...] each


def collate(batch: dict | list[dict]) -> dict[str, torch.Tensor]:
    """The Trainer's collator: a batch `TensorDataset` stacked itself passes as it is; rows
    (a streamed dataset's) are stacked by the default collator."""
    return batch if isinstance(batch, dict) else default_data_collator(batch)


@dataclass(frozen=True)
class Canvas:
    """The sequence layout in tokens: `max_length` in all, the last `gen_length` of each row's
    response region the canvas the MDM decodes into, `eos_fill` as in the config."""

    max_length: int
    gen_length: int
    eos_fill: bool = True


def resolve_canvas(config: StableMDMConfig, task: Task, tokenizer: TextTokenizer) -> Canvas:
    """Lengths from the config, else the task's (character tasks), else measured on the data
    with this tokenizer (a streamed train split is not read: its test split is measured),
    where one overlong example does not inflate every sequence (`data.length_cap`: it is
    left out, with a warning on stderr)."""
    max_length, gen_length = config.max_length, config.gen_length
    if isinstance(tokenizer, CharTokenizer):
        max_length = max_length or getattr(task, "max_length", None)
        gen_length = gen_length or getattr(task, "gen_length", None)
    notes = list(getattr(task, "notes", []))
    if max_length is None or gen_length is None:
        splits = ("test",) if getattr(task, "streaming", False) else ("train", "test")
        examples = [e for split in splits for e in task.examples(split)]
        max_length, gen_length = canvas_lengths(
            examples, tokenizer, max_length, gen_length, notes=notes
        )
    if config.process_index == 0:
        for note in notes:
            print(f"stablemdm: warning: {note}", file=sys.stderr)
    return Canvas(max_length, gen_length, config.eos_fill)


def encode_split(
    task: Task,
    tokenizer: TextTokenizer,
    split: str,
    canvas: Canvas,
    limit: int | None = None,
) -> TensorDataset:
    """A task split encoded for training (docs/architecture.md layout). Examples that do not
    fit the canvas are left out and counted on stderr (a held-out loss skips them too)."""
    examples = task.examples(split)
    kept = [e for e in examples if fits(e, tokenizer, canvas.max_length, canvas.gen_length)]
    # training examples the task itself left out for length (jsonl, gsm8k) count too
    before = getattr(task, "dropped", 0) if split == "train" else 0
    if not kept:
        raise ConfigError(
            f"no {split} example of task {task.name} fits max_length={canvas.max_length}, "
            f"gen_length={canvas.gen_length}: the prompts leave no room for the responses; "
            "raise max_length (or leave it unset to measure it on the data)"
        )
    left_out, total = len(examples) - len(kept) + before, len(examples) + before
    if left_out:
        print(
            f"stablemdm: {left_out} of {total} {split} examples of task {task.name} do not fit "
            f"max_length={canvas.max_length}, gen_length={canvas.gen_length} and are left out",
            file=sys.stderr,
        )
    tensors = encode_examples(
        kept[:limit], tokenizer, canvas.max_length, canvas.gen_length, eos_fill=canvas.eos_fill
    )
    return TensorDataset(tensors)


def train_dataset(task: Task, tokenizer: TextTokenizer, canvas: Canvas):
    """The training split: encoded in memory, or encoded lazily from a streamed task."""
    if getattr(task, "streaming", False):
        return EncodedStream(
            task.stream("train"),
            tokenizer,
            canvas.max_length,
            canvas.gen_length,
            eos_fill=canvas.eos_fill,
        )
    return encode_split(task, tokenizer, "train", canvas)


def fitting_data(task: Task, tokenizer: TextTokenizer, canvas: Canvas, n: int) -> TensorDataset:
    """Training sequences for fitting P-POTS: the train split, or the first `n` fitting
    examples of a streamed one."""
    if not getattr(task, "streaming", False):
        return encode_split(task, tokenizer, "train", canvas)
    first = itertools.islice(
        (e for e in task.stream("train") if fits(e, tokenizer, *astuple(canvas)[:2])), n
    )
    return TensorDataset(
        encode_examples(list(first), tokenizer, *astuple(canvas)[:2], eos_fill=canvas.eos_fill)
    )


def decode_length(task: Task, tokenizer: TextTokenizer, folder: str | Path) -> int:
    """The canvas to decode `task` into with a saved model: the task's own for the character
    tokenizer, else the one its run trained on, else measured on the task's test split."""
    if isinstance(tokenizer, CharTokenizer) and getattr(task, "gen_length", None):
        return task.gen_length
    saved = saved_run_config(folder).get("gen_length")
    if saved:
        return saved
    return canvas_lengths(task.examples("test"), tokenizer)[1]


def build_model(
    config: StableMDMConfig, task: Task
) -> tuple[torch.nn.Module, TextTokenizer, Canvas]:
    """The model, tokenizer and canvas a config names (see `models.loading`)."""
    if config.model is not None:
        model, tokenizer = build_hf(config)
        return model, tokenizer, resolve_canvas(config, task, tokenizer)
    tokenizer = CharTokenizer()
    canvas = resolve_canvas(config, task, tokenizer)
    return build_builtin(config, tokenizer, canvas.max_length), tokenizer, canvas


def build_objective(config: StableMDMConfig, tokenizer: TextTokenizer, sampler=None) -> Objective:
    """The training objective the config names (sampler defaults to `build_sampler`)."""
    isad_ids = tuple(tokenizer.token_id(s, where="isad_tokens") for s in config.isad_tokens)
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
        normalizer=config.loss_normalizer,
        normalizer_length=config.normalizer_length,
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
    config: StableMDMConfig,
    model: torch.nn.Module,
    task: Task,
    tokenizer: TextTokenizer,
    canvas: Canvas,
    step: int = 0,
    data: TensorDataset | None = None,
) -> PPOTS:
    """Estimate S(t) for this model and data, fit the P-POTS density and check it on held-out
    sequences (`ppots.fit_ppots`). Each process estimates on its own `ppots_sequences`
    sequences and checks on as many others, and the estimates are pooled, so all processes
    fit the same density. A refit at optimizer step `step` draws other sequences and masks.
    `data` is the encoded train split when the caller has it (else it is encoded here)."""
    rank, n = config.process_index, config.ppots_sequences
    need = 2 * n * (rank + 1)
    data = data if data is not None else fitting_data(task, tokenizer, canvas, need)
    if need > len(data):
        raise ConfigError(
            f"ppots_sequences={n} per process needs {need} train sequences (half of them held "
            f"out for the self-check); task {task.name} has {len(data)}: lower ppots_sequences"
        )
    pick = torch.randperm(len(data), generator=seeded_generator(config.seed, "ppots-data", step))
    mine = [data[int(i)] for i in pick[2 * n * rank : need]]
    plain = build_objective(config, tokenizer, sampler=Uniform())
    design = FitDesign(
        method=config.ppots_method,
        counts=config.ppots_counts,
        rates=config.ppots_rates,
        masks=config.ppots_masks,
        mix=config.mix,
    )
    return fit_ppots(
        plain,
        model,
        default_data_collator(mine[:n]),
        default_data_collator(mine[n:]),
        generator=seeded_generator(config.seed, "ppots-masks", rank, step),
        design=design,
        target=config.ppots_target,
        params=config.ppots_params,
    )


def prepare_output(config: StableMDMConfig, resume: bool) -> None:
    """Create the output folder and refuse to overwrite an earlier run unless resuming; a
    folder whose run stopped before its first complete checkpoint is reused (said on stderr)."""
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: ranks run this together
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {out} is not writable: {err.strerror}") from err
    if resume or not (checkpoints(out) or leftovers(out) or (out / METRICS).exists()):
        return
    if latest_complete(out)[0] is not None or any((out / n).is_file() for n in MODEL_FILES):
        raise ConfigError(
            f"output_dir {out} already holds a run; pass --resume to continue it, or choose "
            "another output_dir (nothing there was changed)"
        )
    if config.process_index == 0:
        print(
            f"stablemdm: {out} holds a run that stopped before its first complete checkpoint; "
            f"starting it again there ({METRICS} starts afresh)",
            file=sys.stderr,
        )
        (out / METRICS).unlink(missing_ok=True)


def find_checkpoint(config: StableMDMConfig, resume: bool | str) -> Path:
    """The checkpoint to resume from: complete, readable, and of the same config."""
    path = _latest_checkpoint(config) if resume is True else _named_checkpoint(Path(resume))
    try:
        json.loads((path / "trainer_state.json").read_text())
        if (path / MODEL_FILES[0]).is_file():
            with safe_open(str(path / MODEL_FILES[0]), "pt") as f:
                list(f.keys())
        torch.load(path / SAMPLER_STATE, weights_only=True)
        saved = load_yaml((path / RUN_CONFIG).read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"{RUN_CONFIG} holds no mapping")
    except Exception as err:  # any parse failure means the same thing to the user
        raise ConfigError(
            f"--resume: checkpoint {path} is corrupted ({type(err).__name__}: {err}); "
            f"{_way_back(path)}"
        ) from err
    _check_unchanged(config, saved, path)
    return path


def _latest_checkpoint(config: StableMDMConfig) -> Path:
    """The latest complete checkpoint in output_dir; the folders skipped (incomplete ones,
    leftovers of an interrupted save) are named on stderr."""
    out = Path(config.output_dir)
    if not out.is_dir() or not (checkpoints(out) or leftovers(out)):
        raise ConfigError(f"--resume: no checkpoint-* folder in {out}")
    path, skipped = latest_complete(out)
    if path is None:
        raise ConfigError(
            f"--resume: no complete checkpoint in {out} ({'; '.join(skipped)}); run the same "
            "command without --resume to start again there"
        )
    if skipped and config.process_index == 0:
        print(
            f"stablemdm: --resume skips {'; '.join(skipped)}; resuming from {path}",
            file=sys.stderr,
        )
    return path


def _named_checkpoint(path: Path) -> Path:
    """The folder given as `--resume PATH`, refused unless it is a complete checkpoint (a
    missing optimizer or scheduler would silently restart them)."""
    if not path.is_dir():
        raise ConfigError(f"--resume: {path} is not a folder")
    missing = missing_files(path)
    if missing:
        raise ConfigError(
            f"--resume: {path} is not a complete checkpoint (missing {', '.join(missing)}); "
            f"{_way_back(path)}"
        )
    return path


def _way_back(path: Path) -> str:
    """Where to resume instead of a broken checkpoint: the complete one before it."""
    previous = previous_complete(path)
    if previous is None:
        return "there is no complete checkpoint before it to resume from"
    return f"the previous complete checkpoint is {previous} (--resume {previous})"


def _check_unchanged(config: StableMDMConfig, saved: dict, path: Path) -> None:
    """Refuse a resumed config that differs from the checkpoint's beyond RESUMABLE_CHANGES."""
    now = config.resolved()
    changed = sorted(
        k
        for k in set(saved) | set(now)
        if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)
    )
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        allowed = ", ".join(sorted(RESUMABLE_CHANGES - {"output_dir", "resume_from_checkpoint"}))
        raise ConfigError(
            f"--resume: the config differs from the checkpoint's ({details}); only {allowed} "
            f"may change on --resume: for other changes start a new run in another output_dir "
            f"(init_from={path} starts from its weights)"
        )


def _restart_metrics(config: StableMDMConfig, checkpoint: Path) -> None:
    """Drop from metrics.jsonl the records the run resumed from `checkpoint` writes again, so
    that each logged step appears once (said on stderr)."""
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    dropped = restart_metrics(Path(config.output_dir), step)
    if dropped:
        print(
            f"stablemdm: {METRICS}: dropped {dropped} record(s) written after the checkpoint "
            f"of step {step} (the resumed run logs those steps again)",
            file=sys.stderr,
        )


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
    density = None
    if config.sampler == "ppots":
        if checkpoint is not None and (checkpoint / PPOTS_FILE).is_file():
            density = load_density(checkpoint / PPOTS_FILE)
        elif config.ppots_file:
            density = load_density(config.ppots_file)
        else:
            density = fit_density(config, model, task, tokenizer, canvas, data=encoded)
            if config.process_index == 0:
                print(f"stablemdm: {describe_fit(density)}", file=sys.stderr)
    objective = build_objective(config, tokenizer, build_sampler(config, density))
    if checkpoint is not None:
        objective.sampler.load_state_dict(torch.load(checkpoint / SAMPLER_STATE, weights_only=True))

    def save_extras(folder: Path, with_model: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if with_model:
            model.save_pretrained(folder)
        else:  # the spec travels in config.json, also beside a LoRA adapter
            unwrap(model).config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.save(objective.sampler.state_dict(), folder / SAMPLER_STATE)
        if density is not None:
            (folder / PPOTS_FILE).write_text(json.dumps(density.to_dict()))
        save_config(config, folder / RUN_CONFIG)

    if config.process_index == 0:
        save_config(config, Path(config.output_dir) / RUN_CONFIG)
    trainer = _trainer(config, model, tokenizer, task, canvas, train_data, objective)
    builtin = isinstance(model, Transformer)
    # a Hugging Face model's weights are saved by the Trainer itself (sharded, LoRA, FSDP)
    refits = []
    if config.ppots_refit_steps:

        def refit(step: int) -> PPOTS:
            return fit_density(config, model, task, tokenizer, canvas, step, encoded)

        refits.append(RefitCallback(trainer, density, refit, config.ppots_refit_steps))
    trainer.checkpoint_extras = lambda folder: save_extras(folder, with_model=builtin)
    for callback in (
        MetricsCallback(),
        EMACallback(objective),
        *refits,
        *(callbacks or []),
    ):
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if not builtin:
        trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        save_extras(Path(config.output_dir), with_model=builtin)
    return RunResult(Path(config.output_dir), trainer.state.global_step, trainer.state.log_history)


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
