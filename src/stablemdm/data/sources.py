"""Training data from files through `datasets`, and lazy encoding of streamed examples."""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .examples import (
    DataError,
    Example,
    TextTokenizer,
    check_data_file,
    encode_examples,
    fits,
    json_object,
)


class EncodedStream(torch.utils.data.IterableDataset):
    """A streamed train split too large to hold, encoded one example at a time into rows of
    `encode_examples`, pass after pass without end: `examples()` opens a new pass, the run's
    max_steps ends training, and a resumed run is brought to its place by skipping batches,
    as the Trainer does. Examples that do not fit the canvas are left out; their count over
    the first full pass is printed (unless `counted`: the whole split was counted already),
    and a pass in which nothing fits is a DataError. Each of several DataLoader workers
    takes every n-th example."""

    def __init__(
        self,
        examples: Callable[[], Iterable[Example]],
        tokenizer: TextTokenizer,
        max_length: int,
        gen_length: int,
        eos_fill: bool = True,
        counted: bool = False,
    ) -> None:
        self.examples = examples
        self.tokenizer = tokenizer
        self.max_length, self.gen_length, self.eos_fill = max_length, gen_length, eos_fill
        self.counted = counted
        self.skipped: int | None = None  # left out in the latest full pass

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        shard, shards = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        canvas = f"max_length={self.max_length}, gen_length={self.gen_length}"
        for n_pass in itertools.count():
            seen, skipped = 0, 0
            for i, example in enumerate(self.examples()):
                if i % shards != shard:
                    continue
                seen += 1
                if not fits(example, self.tokenizer, self.max_length, self.gen_length):
                    skipped += 1
                    continue
                row = encode_examples(
                    [example], self.tokenizer, self.max_length, self.gen_length, self.eos_fill
                )
                yield {k: v[0] for k, v in row.items()}
            if skipped == seen:
                raise DataError(
                    f"none of the {seen} streamed train examples fits {canvas}; raise them "
                    "(or leave them unset to measure them on the data)"
                )
            self.skipped = skipped
            if n_pass == 0 and skipped and not self.counted:
                share = f" (worker {shard} of {shards})" if shards > 1 else ""
                print(
                    f"stablemdm: {skipped} of {seen} streamed train examples{share} do not fit "
                    f"{canvas} and are left out (counted over the first full pass)",
                    file=sys.stderr,
                )


def _builder(path: Path) -> str:
    """The `datasets` builder of a data file."""
    suffixes = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if path.suffix not in suffixes:
        raise DataError(f"{path}: expected a .jsonl, .json or .parquet file or a saved dataset")
    return suffixes[path.suffix]


def load_records(path: str | Path, *, split: str = "train", streaming: bool = False) -> Any:
    """Rows of a JSONL, JSON or Parquet file, or of a folder written by `save_to_disk` (a
    DatasetDict's `split`); `streaming` reads a file lazily (an `IterableDataset`)."""
    import datasets

    path = Path(path)
    check_data_file(path, folder_ok=True)
    try:
        if path.is_dir():
            if streaming:
                raise DataError(f"{path}: a saved dataset is read whole; set streaming=false")
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DataError(f"{path}: no split {split!r}; it has {', '.join(data)}")
                data = data[split]
            return data
        with _quiet_datasets():  # its own log of a parse failure would repeat ours
            return datasets.load_dataset(
                _builder(path), data_files=str(path), split="train", streaming=streaming
            )
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as err:
        if isinstance(err, DataError):
            raise
        where = _bad_json_line(path) if path.suffix == ".jsonl" else None
        reason = where or str(err).splitlines()[0]
        raise DataError(f"cannot read {path}: {reason}") from None


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the `datasets` logger (errors included) while a file is read."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _bad_json_line(path: Path) -> str | None:
    """`line N: problem` for the first line of a JSONL file that is not a JSON object."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        return f"not UTF-8 text (byte {err.start})"
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            json_object(line)
        except DataError as err:
            return f"line {n}: {err}"
    return None


def _check_columns(columns: Sequence[str], needed: Sequence[str], source: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"{source}: missing column {', '.join(map(repr, missing))}; available: "
            f"{', '.join(columns)}; set prompt_column=..., response_column=... (or "
            "messages_column=...) in task_options"
        )


def examples_from_records(
    records: Iterable[dict[str, Any]],
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    answer_column: str = "answer",
    messages_column: str | None = None,
    source: str = "data",
) -> Iterator[Example]:
    """Examples from rows with the named columns (the answer defaults to the response), or
    from a column of chat messages whose last message is the assistant's response."""
    needed = [messages_column] if messages_column else [prompt_column, response_column]
    names = getattr(records, "column_names", None)
    if names is not None:
        _check_columns(list(names), needed, source)
    for i, row in enumerate(records):
        if i == 0 and names is None:
            _check_columns(list(row), needed, source)
        where = f"{source}:row {i}"
        if messages_column:
            yield _chat_example(row[messages_column], row.get(answer_column), where)
            continue
        prompt, response = row[prompt_column], row[response_column]
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            raise DataError(f"{where}: {prompt_column!r} and {response_column!r} must be text")
        answer = row.get(answer_column)
        yield Example(prompt, response, response if answer is None else str(answer), where)


def _chat_example(messages: Any, answer: Any, where: str) -> Example:
    """An Example from chat messages [..., user, assistant] (kept whole in `meta`)."""
    ok = (
        isinstance(messages, list)
        and messages
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)
    )
    if not ok or messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        raise DataError(
            f"{where}: messages must be a list of {{role, content}} ending with a non-empty "
            "assistant message"
        )
    users = [m["content"] for m in messages if m["role"] == "user"]
    response = messages[-1]["content"]
    return Example(
        users[-1] if users else "",
        response,
        response if answer is None else str(answer),
        where,
        meta={"messages": [dict(m) for m in messages]},
    )
