"""Task accuracy: decode every prompt of a split, extract and score the answers, keep records.

Decoding settings default to the paper's (section 4): one token per step (`steps =
gen_length`), blocks of at most 32 tokens, greedy low-confidence remasking. Any randomness
(sampling, random remasking) comes from one generator seeded with `seed`, so a rerun with the
same settings reproduces the records.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..data import DataError, Example, TextTokenizer, write_jsonl
from ..errors import ConfigError
from ..estimators.losses import Model
from ..models.hf import max_positions
from .decoding import GENERATORS, generate
from .image_scoring import image_scorer

MAX_BLOCK_LENGTH = 32


class ScoredTask(Protocol):
    """What `evaluate` needs from a task (tasks.Task provides it)."""

    name: str
    gen_length: int

    def examples(self, split: str) -> list[Example]: ...
    def extract(self, output: str) -> str | None: ...
    def score(self, output: str, example: Example) -> bool: ...


@dataclass
class EvalResult:
    """Accuracy over `n` items and one record per item (index, source, prompt, output,
    extracted, gold, correct); `metrics` holds a task's set-level scores (image tasks:
    mean_prob, fid, valid; see image_scoring) and `grid` the PNG of an image task's samples
    (when records were written); `output_tokens` (up to each `<eos>`) and the wall and
    process CPU seconds of the decoding give its speed (`speed`)."""

    accuracy: float
    n: int
    n_correct: int
    records: list[dict]
    metrics: dict[str, float | None] = field(default_factory=dict)
    grid: Path | None = None
    output_tokens: int = 0
    decode_seconds: float = 0.0
    decode_cpu_seconds: float = 0.0

    def speed(self) -> dict[str, float | int | None]:
        """Output tokens decoded, the wall and CPU seconds the decoding took, tokens per wall
        second (scoring and writing the records apart)."""
        wall = self.decode_seconds
        return {
            "output_tokens": self.output_tokens,
            "decode_seconds": wall,
            "decode_cpu_seconds": self.decode_cpu_seconds,
            "tokens_per_s": self.output_tokens / wall if wall > 0 else None,
        }


def check_scorer(task: ScoredTask, tokenizer: TextTokenizer, examples: list[Example]) -> None:
    """The scorer self-check: the gold response of every one of `examples`, encoded and
    decoded as a model's output is, must score (no model runs: it costs one encoding per
    item); otherwise one ConfigError names the example, the decoded text and the likely
    cause (a tokenizer whose decoding the task's answer rule cannot read would score every
    model 0%). Responses that cannot be encoded are left to the checks of training."""
    for example, ids in _gold_ids(tokenizer, examples):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not task.score(text, example):
            raise ConfigError(
                f"scorer self-check: the gold response of {example.source}, encoded and decoded "
                f"by the tokenizer, reads {_tail(text)!r} and does not score (task {task.name} "
                f"extracts {task.extract(text)!r}, gold {example.answer!r}); likely cause: "
                f"{_likely_cause(task, tokenizer, example, ids, text)}"
            )


def _gold_ids(tokenizer: TextTokenizer, examples: list[Example]) -> list[tuple[Example, list[int]]]:
    """Each example with its gold response's token ids (and `<eos>`), as a model would have
    to write it; responses that cannot be encoded are left out (training refuses them)."""
    out = []
    for example in examples:
        try:
            out.append((example, tokenizer.encode_response(example)))
        except (DataError, ValueError):
            continue
    return out


def canvas_note(tokenizer: TextTokenizer, examples: list[Example], gen_length: int) -> str | None:
    """A warning when gold responses are longer than the `gen_length` canvas (those items
    cannot score, whatever the model), saying how many and the length that fits them all."""
    needs = [len(ids) for _, ids in _gold_ids(tokenizer, examples)]  # with <eos>
    over = sum(n - 1 > gen_length for n in needs)
    if not over:
        return None
    return (
        f"{over} of {len(examples)} gold responses are longer than the canvas of "
        f"gen_length={gen_length} and cannot score: the longest needs {max(needs)} tokens "
        f"with its <eos>; raise --gen-length (gen_length) to {max(needs)}"
    )


def check_positions(
    model: Model, tokenizer: TextTokenizer, examples: list[Example], gen_length: int
) -> None:
    """ConfigError, before decoding, when the longest prompt and a canvas of `gen_length`
    need more positions than the model has (its max_seq_len or max_position_embeddings)."""
    bound = max_positions(model)
    if bound is None:
        return
    limit, name = bound
    prompt, example = max((len(tokenizer.encode_prompt(e)), e.source) for e in examples)
    if prompt + gen_length <= limit:
        return
    fix = f"lower --gen-length to {limit - prompt} or less" if prompt < limit else "shorten it"
    raise ConfigError(
        f"the longest prompt ({example}, {prompt} tokens) and a canvas of gen_length="
        f"{gen_length} need {prompt + gen_length} positions, more than the {limit} the model "
        f"has ({name} in its config): {fix}"
    )


def _tail(text: str, width: int = 80) -> str:
    """The end of `text` (where answers are), at most `width` characters."""
    return text if len(text) <= width else "..." + text[-width:]


def _likely_cause(
    task: ScoredTask, tokenizer: TextTokenizer, example: Example, ids: list[int], text: str
) -> str:
    """Why a gold response stops scoring once round-tripped through the tokenizer."""
    if not task.score(example.response, example):
        return (
            f"task {task.name} rejects this gold response as written, before any tokenizer "
            f"(its answer {example.answer!r} is not what the task extracts from the response): "
            "fix the example's answer, or the task's extract()"
        )
    unk = getattr(getattr(tokenizer, "tokenizer", None), "unk_token_id", None)
    gold, decoded = "".join(example.response.split()), "".join(text.split())
    if gold == decoded:
        how = "the tokenizer decodes with other spacing (WordPiece: '####' as '# # # #')"
    elif gold.lower() == decoded.lower():
        how = "the tokenizer lowercases the text (an uncased model)"
    elif unk is not None and unk in ids:
        how = "characters outside the tokenizer's vocabulary decode as its unknown token"
    else:
        how = "the tokenizer does not decode the text as it was written"
    return (
        f"{how}, and task {task.name}'s answer rule cannot read it: use a tokenizer that "
        "decodes the text faithfully, or a task whose extract() tolerates it"
    )


def default_block_length(gen_length: int) -> int:
    """The largest divisor of `gen_length` that is at most 32 (LLaDA's block of 32 when
    gen_length is a multiple of 32; gen_length itself when it is at most 32)."""
    if gen_length < 1:
        raise ValueError(f"default_block_length: gen_length={gen_length} must be positive")
    return max(b for b in range(1, min(MAX_BLOCK_LENGTH, gen_length) + 1) if gen_length % b == 0)


def _model_to(model: Model, device: str | torch.device | None) -> None:
    """Move an nn.Module to `device` when one is given (decoding runs where the model lives)."""
    if device is not None and isinstance(model, torch.nn.Module):
        model.to(device)


def evaluate(
    model: Model,
    tokenizer: TextTokenizer,
    task: ScoredTask,
    split: str = "test",
    *,
    objective: str = "mdm",
    limit: int | None = None,
    batch_size: int = 32,
    gen_length: int | None = None,
    steps: int | None = None,
    block_length: int | None = None,
    remasking: str = "low_confidence",
    temperature: float | None = None,
    kv_cache: bool = True,
    seed: int = 0,
    output_path: str | Path | None = None,
    device: str | torch.device | None = None,
    self_check: bool = True,
) -> EvalResult:
    """Decode the first `limit` examples of `task`'s `split` in batches, score them with the
    task, and optionally write the records as JSONL to `output_path`. An image task is also
    judged by `image_scoring` (accuracy = the share of images of the prompted class), with a
    PNG grid of samples beside the records (same name, `.png`).

    Defaults: `gen_length = task.gen_length`, `steps = gen_length`, `block_length =
    default_block_length(gen_length)`, `temperature` = the task's `temperature` if it has one
    (image tasks sample), else 0 (greedy); for "arm", `max_new_tokens = gen_length` (`steps`,
    `block_length`, `remasking` unused); "block" decodes over a KV cache unless `kv_cache` is
    False (`generate_block`). `device`, when given, moves the model there first.
    Before decoding: `_check_inputs` (the scorer self-check and the canvas warning, which a
    caller that ran them may skip with `self_check=False`; the model's positions).
    """
    examples = _examples(task, split, objective, limit, batch_size)
    images = image_scorer(task, tokenizer)  # None for a text task
    tokenizer = tokenizer if images is None else images.tokenizer
    gen_length = task.gen_length if gen_length is None else gen_length
    _check_inputs(model, task, tokenizer, examples, gen_length, self_check)
    if temperature is None:
        temperature = getattr(task, "temperature", 0.0)
    options = _decoding_options(objective, tokenizer, gen_length, steps, block_length, remasking)
    if objective == "block":
        options["kv_cache"] = kv_cache
    if images is not None:
        options["canvas_tokens"] = images.canvas_tokens
    _model_to(model, device)
    generator = torch.Generator().manual_seed(seed)

    records: list[dict] = []
    clock = {"wall": 0.0, "cpu": 0.0}
    tokens = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        with _timed(clock):
            outputs = generate(
                model,
                [tokenizer.encode_prompt(example) for example in batch],
                objective=objective,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                temperature=temperature,
                generator=generator,
                **options,
            )
        tokens += sum(map(len, outputs))
        records += _records(task, tokenizer, batch, outputs, start)

    metrics, grid = {}, None
    if images is not None:
        grid = None if output_path is None else Path(output_path).with_suffix(".png")
        metrics = images.score(records, grid)
    if output_path is not None:
        write_jsonl(output_path, records)
    n_correct = sum(r["correct"] for r in records)
    accuracy = n_correct / len(records)
    timing = (tokens, clock["wall"], clock["cpu"])
    return EvalResult(accuracy, len(records), n_correct, records, metrics, grid, *timing)


@contextlib.contextmanager
def _timed(clock: dict[str, float]) -> Iterator[None]:
    """Add the block's wall and process CPU seconds to `clock`."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        clock["wall"] += time.perf_counter() - wall
        clock["cpu"] += time.process_time() - cpu


def _check_inputs(
    model: Model,
    task: ScoredTask,
    tokenizer: TextTokenizer,
    examples: list[Example],
    gen_length: int,
    self_check: bool,
) -> None:
    """What `evaluate` checks before decoding: the scorer and the canvas's room for the gold
    responses (with `self_check`), and the model's positions."""
    if self_check:
        check_scorer(task, tokenizer, examples)
        note = canvas_note(tokenizer, examples, gen_length)
        if note:
            print(f"stablemdm: warning: {note}", file=sys.stderr)
    check_positions(model, tokenizer, examples, gen_length)


def _examples(
    task: ScoredTask, split: str, objective: str, limit: int | None, batch_size: int
) -> list[Example]:
    """The first `limit` examples of the split, after checking `evaluate`'s options (one
    line each, naming the task and split)."""
    where = f"evaluate(task={task.name!r}, split={split!r})"
    if objective not in GENERATORS:
        raise ValueError(
            f"{where}: unknown objective={objective!r}; choose one of {tuple(GENERATORS)}"
        )
    if batch_size < 1:
        raise ValueError(f"{where}: batch_size={batch_size} must be positive")
    if limit is not None and limit < 1:
        raise ValueError(f"{where}: limit={limit} must be positive or None (all examples)")
    examples = task.examples(split)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"{where}: the split has no examples; check the task's data")
    return examples


def _decoding_options(
    objective: str,
    tokenizer: TextTokenizer,
    gen_length: int,
    steps: int | None,
    block_length: int | None,
    remasking: str,
) -> dict:
    """The generator's keyword arguments, with `evaluate`'s defaults filled in ("block"
    leaves `generate_block`'s: the model's own block size, one token per call)."""
    if objective == "arm":
        return dict(max_new_tokens=gen_length)
    if objective == "mdm":
        steps = gen_length if steps is None else steps
        block_length = default_block_length(gen_length) if block_length is None else block_length
    return dict(
        mask_token_id=tokenizer.mask_token_id,
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        remasking=remasking,
    )


def _records(
    task: ScoredTask,
    tokenizer: TextTokenizer,
    batch: list[Example],
    outputs: list[list[int]],
    start: int,
) -> list[dict]:
    """One record per decoded example of a batch starting at index `start`."""
    records = []
    for offset, (example, tokens) in enumerate(zip(batch, outputs, strict=True)):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        records.append(
            {
                "index": start + offset,
                "source": example.source,
                "prompt": example.prompt,
                "output": text,
                "extracted": task.extract(text),
                "gold": example.answer,
                "correct": bool(task.score(text, example)),
            }
        )
    return records
