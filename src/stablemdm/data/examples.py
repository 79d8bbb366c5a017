"""Examples, JSONL files, and encoding examples into the `[B, L]` batch layout of
docs/architecture.md: `[prompt][<sep>][response][<eos>][<eos> fill ...][<pad> ...]`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from .atomic import replaced_atomically

MAX_ERRORS_SHOWN = 20

T = TypeVar("T")


class DataError(ValueError):
    """Bad training or evaluation data; the message names the file, line or example."""


@dataclass(frozen=True)
class Example:
    """One prompt/response pair with its gold final answer; `source` locates it for errors and
    `meta` carries task-specific data (ignored by equality and hashing)."""

    prompt: str
    response: str
    answer: str
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


def check_data_file(path: Path, folder_ok: bool = False) -> None:
    """DataError unless `path` is a regular file (or, if `folder_ok`, a folder): refused
    before a byte is read, since reading a device or pipe such as /dev/zero never ends."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_file() or (folder_ok and path.is_dir()):
        return
    what = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
    raise DataError(f"{path} is {what}: point at a data file")


def json_object(line: str) -> dict:
    """The JSON object on one line of a JSONL file; DataError saying why it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataError(
            "nested too deeply to read (more arrays and objects inside each other than "
            "Python's JSON reader allows)"
        ) from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    return record


def map_jsonl(path: str | Path, parse: Callable[[dict, str], T]) -> list[T]:
    """Apply `parse(record, source)` to every JSON object line of `path` (blank lines skipped).

    `parse` raises DataError for a bad record; all errors of the file are collected and raised
    as one DataError with one `path:line: problem` entry per bad line.
    """
    path = Path(path)
    check_data_file(path)
    try:
        # lines end at "\n" only: U+2028 and friends are legal inside a JSON string
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data file {path}: {err}") from None
    results: list[T] = []
    errors: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            results.append(parse(json_object(line), where))
        except DataError as err:
            errors.append(f"{where}: {err}")
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        if len(errors) > len(shown):
            shown.append(f"... and {len(errors) - len(shown)} more")
        raise DataError(f"{len(errors)} malformed line(s) in {path}:\n" + "\n".join(shown))
    if not results:
        raise DataError(f"{path} contains no records")
    return results


def _string_field(record: dict, key: str, required: bool) -> str | None:
    """The string value of `record[key]`; DataError when it is missing (if required) or bad."""
    if key not in record:
        if required:
            raise DataError(f"missing field '{key}'")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"field '{key}' must be a string, got {type(value).__name__}")
    if required and not value:
        raise DataError(f"field '{key}' is empty")
    return value


def _example_from_record(record: dict, source: str) -> Example:
    """An Example from {"prompt", "response", "answer" (optional, default: the response)}."""
    prompt = _string_field(record, "prompt", required=True)
    response = _string_field(record, "response", required=True)
    answer = _string_field(record, "answer", required=False)
    return Example(prompt, response, response if answer is None else answer, source)


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file of {"prompt": str, "response": str, "answer": str (optional)};
    extra keys are ignored."""
    return map_jsonl(path, _example_from_record)


def write_jsonl(path: str | Path, records: Iterable[Mapping]) -> None:
    """Write one JSON object per line, atomically (temp file in the same folder, then rename)."""
    with replaced_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


class TextTokenizer(Protocol):
    """What encoding, decoding and the objective need from a tokenizer: the character
    tokenizer and `HFTokenizer` (Hugging Face tokenizers and chat templates) both provide it."""

    pad_token_id: int
    mask_token_id: int | None
    eos_token_id: int
    vocab_size: int

    def encode_prompt(self, example: Example) -> list[int]: ...
    def encode_response(self, example: Example) -> list[int]: ...
    def token_id(self, text: str, where: str) -> int: ...
    def decode(
        self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True
    ) -> str: ...
    def save_pretrained(self, directory: str | Path) -> None: ...


def fits(example: Example, tokenizer: TextTokenizer, max_length: int, gen_length: int) -> bool:
    """Whether the prompt leaves room for a `gen_length` canvas in `max_length` tokens and the
    response with its `<eos>` fits the canvas."""
    head = len(tokenizer.encode_prompt(example))
    return head + gen_length <= max_length and len(tokenizer.encode_response(example)) <= gen_length


# the outlier rule of measured lengths (docs/reliability.md, "Data surprises")
OUTLIER_FACTOR = 1.5
OUTLIER_MIN_EXAMPLES = 20


def length_cap(lengths: Sequence[int]) -> int:
    """The length to size sequences for: the longest, unless it is more than OUTLIER_FACTOR
    times the 99th-percentile length (the longest once the top 1%, at least one, is set
    aside); then that percentile, so one overlong example cannot inflate every sequence.
    With fewer than OUTLIER_MIN_EXAMPLES lengths it is always the longest."""
    ordered = sorted(lengths)
    if len(ordered) < OUTLIER_MIN_EXAMPLES:
        return ordered[-1]
    reference = ordered[-1 - max(1, len(ordered) // 100)]
    return reference if ordered[-1] > OUTLIER_FACTOR * reference else ordered[-1]


def cap_note(what: str, lengths: Sequence[int], cap: int, setting: str) -> str | None:
    """The warning when `length_cap` set aside the longest `what` (None when it did not)."""
    longer = sum(n > cap for n in lengths)
    if not longer:
        return None
    return (
        f"the longest {what} is {max(lengths)} tokens, more than {OUTLIER_FACTOR}x the "
        f"99th-percentile length {cap}: sequences are sized for {cap} and the {longer} "
        f"longer example(s) are left out; set {setting} to keep them"
    )


def measured_lengths(
    prompts: Sequence[int],
    responses: Sequence[int],
    max_length: int | None = None,
    gen_length: int | None = None,
    notes: list[str] | None = None,
) -> tuple[int, int]:
    """(max_length, gen_length) with each one not given measured from the prompt (with
    `<sep>`) and response (with `<eos>`) lengths: the canvas holds the longest response, the
    row the longest prompt plus the canvas, each under `length_cap`'s outlier rule. Its
    warnings (appended to `notes`) advise settings under which every example fits: setting
    all that they name keeps the examples they set aside."""
    keep_gen = max(responses) if gen_length is None else gen_length
    keep_max = max(prompts) + keep_gen
    found: list[str | None] = []
    if gen_length is None:
        gen_length = length_cap(responses)
        setting = f"gen_length={keep_gen}"
        if max_length is not None and max_length < keep_max:  # the row must grow with it
            setting += f" max_length={keep_max}"
        found.append(cap_note("response (with <eos>)", responses, gen_length, setting))
    if max_length is None:
        head = length_cap(prompts)
        max_length = head + gen_length
        found.append(cap_note("prompt (with <sep>)", prompts, head, f"max_length={keep_max}"))
    if notes is not None:
        notes.extend(n for n in found if n)
    return max_length, gen_length


def canvas_lengths(
    examples: Sequence[Example],
    tokenizer: TextTokenizer,
    max_length: int | None = None,
    gen_length: int | None = None,
    notes: list[str] | None = None,
) -> tuple[int, int]:
    """`measured_lengths` of `examples` as `tokenizer` encodes them."""
    if not examples:
        raise DataError("no examples to measure max_length and gen_length on")
    prompts = [len(tokenizer.encode_prompt(e)) for e in examples]
    responses = [len(tokenizer.encode_response(e)) for e in examples]
    max_length, gen_length = measured_lengths(prompts, responses, max_length, gen_length, notes)
    if gen_length >= max_length:
        raise DataError(
            f"gen_length {gen_length} leaves no room for a prompt in max_length {max_length}; "
            "raise max_length"
        )
    return max_length, gen_length


def encode_examples(
    examples: Sequence[Example],
    tokenizer: TextTokenizer,
    max_length: int,
    gen_length: int | None = None,
    eos_fill: bool = True,
) -> dict[str, torch.Tensor]:
    """Encode examples into `input_ids` (long), `attention_mask` and `eligible` (bool), all
    `[N, max_length]`, and `n_response` `[N]` (response tokens + `<eos>`, without the fill).

    With `gen_length` (MDM canvas) the response region is exactly `gen_length` long: with
    `eos_fill` (LLaDA SFT) the rest of the canvas is `<eos>`, attended, masked and scored;
    without it, padding (not attended, not scored). Without `gen_length` the row ends at the
    first `<eos>`. Attention comes from row lengths, so PAD may equal EOS.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if gen_length is not None and gen_length <= 0:
        raise ValueError(f"gen_length must be positive, got {gen_length}")
    n = len(examples)
    input_ids = torch.full((n, max_length), tokenizer.pad_token_id, dtype=torch.long)  # [N, L]
    eligible = torch.zeros((n, max_length), dtype=torch.bool)  # [N, L]
    attention_mask = torch.zeros((n, max_length), dtype=torch.bool)  # [N, L]
    n_response = torch.zeros(n, dtype=torch.long)  # [N]
    for row, example in enumerate(examples):
        head = tokenizer.encode_prompt(example)
        tail = tokenizer.encode_response(example)
        n_response[row] = len(tail)
        if gen_length is not None:
            if len(tail) > gen_length:
                raise DataError(
                    f"{example.source}: response + <eos> is {len(tail)} tokens but gen_length "
                    f"is {gen_length}; raise gen_length or drop this example"
                )
            if len(head) + gen_length > max_length:
                raise DataError(
                    f"{example.source}: prompt + <sep> is {len(head)} tokens, plus gen_length "
                    f"{gen_length} makes {len(head) + gen_length} > max_length {max_length}; "
                    "raise max_length or drop this example"
                )
            if eos_fill:
                tail = tail + [tokenizer.eos_token_id] * (gen_length - len(tail))
        elif len(head) + len(tail) > max_length:
            raise DataError(
                f"{example.source}: prompt + <sep> ({len(head)}) + response + <eos> "
                f"({len(tail)}) is {len(head) + len(tail)} tokens > max_length {max_length}; "
                "raise max_length or drop this example"
            )
        end = len(head) + len(tail)
        input_ids[row, : len(head)] = torch.tensor(head, dtype=torch.long)
        input_ids[row, len(head) : end] = torch.tensor(tail, dtype=torch.long)
        eligible[row, len(head) : end] = True
        attention_mask[row, :end] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "eligible": eligible,
        "n_response": n_response,
    }
