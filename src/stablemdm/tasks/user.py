"""The user's own data: JSONL files and Hugging Face `datasets` inputs as tasks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..data import DataError, Example, read_jsonl
from ..data.examples import measured_lengths
from ..data.sources import examples_from_records, load_records
from ..data.tokenizer import CharTokenizer
from .registry import Task, _check_prompts_fit, after_marker, check_split, fits, register_task


def _stripped(output: str) -> str | None:
    """The stripped output, or None when nothing is left."""
    return output.strip() or None


@register_task("jsonl")
class JsonlTask(Task):
    """A task from user JSONL files (see `read_jsonl`); scored by exact match of the stripped
    answer, taken after the last '####' when present.

    Lengths default to the longest in the data, under the outlier rule of `data.length_cap`
    (warnings in `notes`). Every training example is kept: the run leaves out, and counts,
    those that do not fit the lengths it trains with, which the config may set.
    """

    def __init__(
        self,
        train: str | Path,
        test: str | Path,
        max_length: int | None = None,
        gen_length: int | None = None,
    ) -> None:
        splits = {"train": read_jsonl(train), "test": read_jsonl(test)}
        tokenizer = CharTokenizer()
        for example in splits["train"] + splits["test"]:
            tokenizer.encode(example.prompt, where=f"{example.source}, field 'prompt'")
            tokenizer.encode(example.response, where=f"{example.source}, field 'response'")
        max_length, gen_length = self._lengths(splits, max_length, gen_length)
        if self.notes:  # an outlier the cap set aside in the test split is counted in a note
            kept = [e for e in splits["test"] if fits(e, max_length, gen_length)]
            if len(kept) < len(splits["test"]):
                self.notes.append(
                    f"{len(splits['test']) - len(kept)} of {len(splits['test'])} test examples "
                    f"of {test} are left out of scoring (longer than the measured lengths)"
                )
            splits["test"] = kept
        _check_prompts_fit(splits["test"], max_length, gen_length)
        self._splits = splits

    def _lengths(
        self, splits: dict[str, list[Example]], max_length: int | None, gen_length: int | None
    ) -> tuple[int, int]:
        """The given lengths, else measured on both splits under `length_cap`'s outlier rule
        (its warnings go to `notes`)."""
        everything = splits["train"] + splits["test"]
        self.notes: list[str] = []
        max_length, gen_length = measured_lengths(
            [len(e.prompt) + 1 for e in everything],
            [len(e.response) + 1 for e in everything],
            max_length,
            gen_length,
            self.notes,
        )
        if gen_length <= 0 or max_length <= gen_length:
            raise ValueError(
                f"task 'jsonl': need 0 < gen_length < max_length, got gen_length={gen_length}, "
                f"max_length={max_length}"
            )
        self.max_length, self.gen_length = max_length, gen_length
        return max_length, gen_length

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        return list(self._splits[split])

    def extract(self, output: str) -> str | None:
        tail = after_marker(output)
        return _stripped(output if tail is None else tail)

    def score(self, output: str, example: Example) -> bool:
        """Exact match of the extracted answers of `output` and of the gold answer."""
        predicted = self.extract(output)
        return predicted is not None and predicted == self.extract(example.answer)


@register_task("dataset")
class DatasetTask(JsonlTask):
    """A task from JSONL, JSON or Parquet files or saved datasets read through `datasets`,
    with configurable columns (or a chat `messages_column`), for any tokenizer: the text is
    not restricted to the character alphabet. Lengths are None unless given: the run measures
    them with the model's tokenizer. `streaming` reads the train file lazily (`stream`).
    Scored like `jsonl`."""

    def __init__(
        self,
        train: str | Path,
        test: str | Path,
        prompt_column: str = "prompt",
        response_column: str = "response",
        answer_column: str = "answer",
        messages_column: str | None = None,
        streaming: bool = False,
        max_length: int | None = None,
        gen_length: int | None = None,
    ) -> None:
        self.columns = {
            "prompt_column": prompt_column,
            "response_column": response_column,
            "answer_column": answer_column,
            "messages_column": messages_column,
        }
        self.paths = {"train": Path(train), "test": Path(test)}
        self.streaming = streaming
        self.max_length, self.gen_length = max_length, gen_length
        self._splits = {"test": self._read("test", streaming=False)}
        if not self._splits["test"]:
            raise DataError(f"{test} contains no records")
        if streaming:
            next(self.stream("train"), None)  # checks the file and its columns now
        else:
            self._splits["train"] = self._read("train", streaming=False)

    def _read(self, split: str, streaming: bool):
        path = self.paths[split]
        records = load_records(path, split=split, streaming=streaming)
        examples = examples_from_records(records, source=str(path), **self.columns)
        return examples if streaming else list(examples)

    def examples(self, split: str) -> list[Example]:
        return list(self.stream(split))

    def stream(self, split: str) -> Iterator[Example]:
        """The examples of `split` one at a time (the file is read lazily when streaming)."""
        check_split(split)
        if split in self._splits:
            return iter(self._splits[split])
        return self._read(split, streaming=True)
