"""The training data as tensors: the canvas (sequence and generation lengths) measured on the
task, encoded splits and the sample the P-POTS fit uses."""

from __future__ import annotations

import itertools
import sys
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
from transformers import default_data_collator

from ..data import Example, TextTokenizer, canvas_lengths, encode_examples, fits
from ..data.sources import EncodedStream
from ..data.tokenizer import CharTokenizer
from ..errors import ConfigError
from ..tasks.registry import Task
from ..tasks.text import TextTask
from .config import StableMDMConfig
from .saved import saved_run_config


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


# streamed train examples the canvas is measured on, and whose fit is counted before training
STREAM_SAMPLE = 1000


def stream_sample(task: Task) -> tuple[list[Example], bool]:
    """The first STREAM_SAMPLE examples of a streamed train split, and whether they are all
    of it (one more is read to know)."""
    first = list(itertools.islice(task.stream("train"), STREAM_SAMPLE + 1))
    return first[:STREAM_SAMPLE], len(first) <= STREAM_SAMPLE


def resolve_canvas(config: StableMDMConfig, task: Task, tokenizer: TextTokenizer) -> Canvas:
    """Lengths from the config, else the task's (character tasks), else measured on the data
    with this tokenizer (a streamed train split on its first STREAM_SAMPLE examples), where
    one overlong example does not inflate every sequence (`data.length_cap`: it is left out,
    with a warning on stderr). A text task's rows are its own `max_length` long."""
    if isinstance(task, TextTask):
        return _text_canvas(config, task)
    max_length, gen_length, notes = config.max_length, config.gen_length, []
    if isinstance(tokenizer, CharTokenizer):
        max_length, gen_length, notes = _char_lengths(config, task)
    if max_length is None or gen_length is None:
        streamed = getattr(task, "streaming", False)
        train = stream_sample(task)[0] if streamed else task.examples("train")
        examples = [*train, *task.examples("test")]
        max_length, gen_length = canvas_lengths(
            examples, tokenizer, max_length, gen_length, notes=notes
        )
    if config.process_index == 0:
        for note in notes:
            print(f"stablemdm: warning: {note}", file=sys.stderr)
    return Canvas(max_length, gen_length, config.eos_fill)


def _text_canvas(config: StableMDMConfig, task: TextTask) -> Canvas:
    """A text task's canvas: its rows, `max_length` long (set in task_options, where the
    packing reads it); a config length that differs is refused."""
    for name, own in (("max_length", task.max_length), ("gen_length", task.gen_length)):
        given = getattr(config, name)
        if given is not None and given != own:
            raise ConfigError(
                f"{name}={given} differs from task 'text''s {own}: a corpus is packed into rows "
                "of task_options.max_length tokens (gen_length is one less); set it there"
            )
    return Canvas(task.max_length, task.gen_length, config.eos_fill)


def _char_lengths(config: StableMDMConfig, task: Task) -> tuple[int | None, int | None, list]:
    """A character task's lengths and warnings: the config's, with the task's filling in
    what it leaves unset (gen_length alone keeps the task's room for the prompt). A task
    that set examples aside under the outlier rule (its `notes`) fills in nothing once the
    config gives a length: the other is measured again, so the advice fits the lengths used."""
    max_length, gen_length = config.max_length, config.gen_length
    own_max, own_gen = getattr(task, "max_length", None), getattr(task, "gen_length", None)
    notes = list(getattr(task, "notes", []))
    if max_length is None and gen_length is None:
        return own_max, own_gen, notes
    if notes:
        return max_length, gen_length, []
    if max_length is None and own_max and own_gen:
        max_length = own_max - own_gen + gen_length
    return max_length, gen_length or own_gen, []


def encode_split(
    task: Task,
    tokenizer: TextTokenizer,
    split: str,
    canvas: Canvas,
    limit: int | None = None,
) -> TensorDataset:
    """A task split encoded for training (docs/architecture.md layout). Examples that do not
    fit the canvas are left out and counted on stderr (a held-out loss skips them too). A
    text task's split is its packed rows."""
    if isinstance(task, TextTask):
        return TensorDataset(task.rows(split, tokenizer, limit))
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


def train_dataset(task: Task, tokenizer: TextTokenizer, canvas: Canvas, max_steps: int = -1):
    """The training split: encoded in memory, or encoded lazily from a streamed task, whose
    first STREAM_SAMPLE examples are counted now (the whole split's count follows at the end
    of the first pass when it is longer)."""
    if not getattr(task, "streaming", False):
        return encode_split(task, tokenizer, "train", canvas)
    if max_steps < 1:
        raise ConfigError("a streamed train split has no length to count epochs in: set max_steps")
    if isinstance(task, TextTask):
        return task.stream(tokenizer)
    sample, whole = stream_sample(task)
    size = canvas.max_length, canvas.gen_length
    left_out = sum(not fits(e, tokenizer, *size) for e in sample)
    where = f"max_length={size[0]}, gen_length={size[1]}"
    if left_out == len(sample):
        raise ConfigError(
            f"none of the first {len(sample)} streamed train examples of task {task.name} "
            f"fits {where}; raise them (or leave them unset to measure them on the data)"
        )
    if left_out:
        which = f"{len(sample)}" if whole else f"the first {len(sample)} streamed"
        later = "" if whole else "; the count over the whole split follows after the first pass"
        print(
            f"stablemdm: {left_out} of {which} train examples of task {task.name} do not fit "
            f"{where} and are left out{later}",
            file=sys.stderr,
        )
    return EncodedStream(
        lambda: task.stream("train"), tokenizer, *size, eos_fill=canvas.eos_fill, counted=whole
    )


def fitting_data(task: Task, tokenizer: TextTokenizer, canvas: Canvas, n: int) -> TensorDataset:
    """Training sequences for fitting P-POTS: the train split, or the first `n` fitting
    examples of a streamed one."""
    if not getattr(task, "streaming", False):
        return encode_split(task, tokenizer, "train", canvas)
    if isinstance(task, TextTask):
        return TensorDataset(task.rows("train", tokenizer, n))
    first = itertools.islice(
        (e for e in task.stream("train") if fits(e, tokenizer, *astuple(canvas)[:2])), n
    )
    return TensorDataset(
        encode_examples(list(first), tokenizer, *astuple(canvas)[:2], eos_fill=canvas.eos_fill)
    )


def decode_length(task: Task, tokenizer: TextTokenizer, folder: str | Path) -> int:
    """The canvas to decode `task` into with a saved model: the one its run trained on (for
    the character tokenizer only when `task` is the run's own: another task has its own
    canvas), else the task's own, else measured on the task's test split."""
    saved = saved_run_config(folder)
    char = isinstance(tokenizer, CharTokenizer)
    if saved.get("gen_length") and (not char or saved.get("task") == task.name):
        return saved["gen_length"]
    if char and getattr(task, "gen_length", None):
        return task.gen_length
    return canvas_lengths(task.examples("test"), tokenizer)[1]
