"""Task registry: where examples come from, how long the canvas is, how outputs are scored.

Built-in tasks: `gsm8k` (local JSONL files), the reasoning-gym tasks `chain_sum`,
`mini_sudoku`, `countdown`, `gsm_symbolic` (generated, re-serialised compactly for small
character-level models, scored by reasoning-gym's own checkers), `jsonl` (user files in the
character alphabet) and `dataset` (files through `datasets`, for Hugging Face tokenizers).
Character tasks' text is in the tokenizer's DEFAULT_ALPHABET. Add a task with
`@register_task("name")`.
"""

from __future__ import annotations

import inspect
import os
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import reasoning_gym

from .data import DataError, Example, map_jsonl, read_jsonl
from .data.examples import cap_note, length_cap
from .data.sources import examples_from_records, load_records
from .tokenizer import DEFAULT_ALPHABET, CharTokenizer

SPLITS = ("train", "test")

_ALPHABET = frozenset(DEFAULT_ALPHABET)
_ASCII_REPLACEMENTS = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2014": "-",
        "\u2013": "-",
        "\u2212": "-",
        "\u2022": "-",
        "\u00d7": "*",
        "\u00f7": "/",
        "\u2044": "/",
        "\u00a0": " ",
        "\t": " ",
        "\u2028": "\n",
        "\u20ac": "EUR",
        "\u00a3": "GBP",
        "\u00a2": "c",
    }
)


def normalize_text(text: str) -> str:
    """Map text into DEFAULT_ALPHABET: NFKD, common typographic characters to ASCII, tabs to
    spaces; any other character is dropped."""
    text = unicodedata.normalize("NFKD", text).translate(_ASCII_REPLACEMENTS)
    return "".join(ch for ch in text if ch in _ALPHABET)


def normalize_number(text: str) -> str:
    """Canonical spelling of a number: commas removed, trailing decimal zeros and '.' dropped."""
    text = text.strip().replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def final_number(output: str) -> str | None:
    """The normalised first number after the last '####' of `output`, or None."""
    if "####" not in output:
        return None
    match = _NUMBER.search(output.rsplit("####", 1)[1])
    return normalize_number(match.group()) if match else None


def check_split(split: str) -> None:
    """Raise a ValueError unless `split` is one of SPLITS."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")


def fits(example: Example, max_length: int, gen_length: int) -> bool:
    """Whether prompt + <sep> + a gen_length canvas fit max_length and response + <eos> fits
    the canvas (character-level: one token per character)."""
    return (
        len(example.prompt) + 1 + gen_length <= max_length
        and len(example.response) + 1 <= gen_length
    )


def _check_prompts_fit(examples: list[Example], max_length: int, gen_length: int) -> None:
    """DataError naming the first example whose prompt leaves no room for the canvas."""
    for example in examples:
        if len(example.prompt) + 1 + gen_length > max_length:
            raise DataError(
                f"{example.source}: prompt + <sep> is {len(example.prompt) + 1} tokens, plus "
                f"gen_length {gen_length} exceeds max_length {max_length}; raise max_length"
            )


class Task(ABC):
    """A source of train/test examples with a fixed sequence layout and a scorer."""

    name: str
    max_length: int
    gen_length: int
    contaminates: frozenset[str] = frozenset()

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """The examples of `split` ("train" or "test")."""

    @abstractmethod
    def extract(self, output: str) -> str | None:
        """The final answer in a decoded response text, or None when there is none."""

    def score(self, output: str, example: Example) -> bool:
        """Whether the decoded response `output` answers `example` correctly."""
        predicted = self.extract(output)
        return predicted is not None and predicted == example.answer


TaskFactory = Callable[..., Task]
_REGISTRY: dict[str, TaskFactory] = {}


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Decorator registering a Task subclass (its `name` is set) or a factory under `name`."""

    def decorator(factory: TaskFactory) -> TaskFactory:
        if name in _REGISTRY:
            raise ValueError(f"a task named {name!r} is already registered")
        if isinstance(factory, type):
            if not issubclass(factory, Task):
                raise TypeError(f"register_task({name!r}) needs a Task subclass, got {factory}")
            factory.name = name
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_tasks() -> list[str]:
    """Names of all registered tasks."""
    return sorted(_REGISTRY)


def get_task(name: str, **options: Any) -> Task:
    """Build the task registered as `name` with its keyword `options`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
    factory = _REGISTRY[name]
    signature = inspect.signature(factory)
    params = signature.parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            hint = " (in YAML, write 'key: value' with a space after ':')" * any(
                ":" in str(k) for k in unknown
            )
            raise ValueError(
                f"task {name!r} has no option(s) {unknown}; its options are {sorted(params)}{hint}"
            )
    try:
        signature.bind(**options)
    except TypeError as err:
        raise ValueError(f"task {name!r}: {err}") from None
    task = factory(**options)
    if not isinstance(task, Task):
        raise TypeError(f"the factory of task {name!r} returned {type(task).__name__}, not a Task")
    return task


# --- gsm8k -------------------------------------------------------------------------------

GSM8K_ENV = "STABLEMDM_GSM8K_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_CALCULATOR = re.compile(r"<<.*?>>")


def _gsm8k_dir(data_dir: str | Path | None) -> Path:
    """The GSM8K folder: the option, else $STABLEMDM_GSM8K_DIR, else the shared data folder."""
    if data_dir is not None:
        tried, how = [Path(data_dir)], "the data_dir option"
    elif os.environ.get(GSM8K_ENV):
        tried, how = [Path(os.environ[GSM8K_ENV])], f"${GSM8K_ENV}"
    else:
        rel = Path("..") / "shared" / "data" / "gsm8k"
        tried, how = [Path.cwd() / rel, _REPO_ROOT / rel], "the default locations"
    for path in tried:
        if (path / "train.jsonl").is_file() and (path / "test.jsonl").is_file():
            return path.resolve()
    raise DataError(
        f"GSM8K data not found via {how}: no train.jsonl and test.jsonl in "
        f"{', '.join(str(p) for p in tried)}; pass data_dir=... or set ${GSM8K_ENV}"
    )


def _gsm8k_example(record: dict, source: str) -> Example:
    """An Example from a GSM8K record {"question", "answer": "... #### <number>"}."""
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise DataError(f"field '{key}' must be a non-empty string")
    response = normalize_text(_CALCULATOR.sub("", record["answer"])).strip()
    answer = final_number(response)
    if answer is None:
        raise DataError("field 'answer' does not end with '#### <number>'")
    return Example(normalize_text(record["question"]).strip(), response, answer, source)


@register_task("gsm8k")
class GSM8K(Task):
    """Grade-school math word problems; response = the worked solution without `<<...>>`
    calculator annotations, scored by exact match of the number after '####'.

    The lengths (characters) cover every test prompt and all but ~0.4% of training examples;
    training examples that do not fit are dropped and counted in `dropped`.
    """

    max_length = 1664
    gen_length = 768

    def __init__(self, data_dir: str | Path | None = None) -> None:
        folder = _gsm8k_dir(data_dir)
        train = map_jsonl(folder / "train.jsonl", _gsm8k_example)
        self._splits = {
            "train": [e for e in train if fits(e, self.max_length, self.gen_length)],
            "test": map_jsonl(folder / "test.jsonl", _gsm8k_example),
        }
        self.dropped = len(train) - len(self._splits["train"])
        _check_prompts_fit(self._splits["test"], self.max_length, self.gen_length)

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        return list(self._splits[split])

    def extract(self, output: str) -> str | None:
        return final_number(output)


# --- reasoning-gym -----------------------------------------------------------------------

_TRAIN_SEED_OFFSET = 1_000_003
_DRAW_BUDGET = 4  # draw at most this many times n (+ 1000) items when looking for n examples
_RG_CACHE: dict[tuple, tuple[dict[str, list[Example]], int]] = {}


class ReasoningGymTask(Task):
    """A reasoning-gym dataset, re-serialised compactly and scored by its own `score_answer`.

    The test split is n_test distinct prompts drawn with `seed`; the training split is drawn
    with another seed and never contains a test prompt. Test items whose gold answer the
    checker itself rejects are skipped and counted in `unscorable`. Lengths are the longest in
    the data.
    """

    rg_name: str

    def __init__(self, n_train: int, n_test: int, seed: int, config: Mapping[str, Any]) -> None:
        for key, value in (("n_train", n_train), ("n_test", n_test)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"task {self.name!r}: {key} must be a positive int, got {value!r}")
        try:
            self._checker = reasoning_gym.create_dataset(self.rg_name, seed=seed, size=1, **config)
        except (AssertionError, TypeError, ValueError) as err:
            raise ValueError(f"task {self.name!r}: invalid options {dict(config)}: {err}") from None
        key = (self.name, n_train, n_test, seed, tuple(sorted(config.items())))
        if key not in _RG_CACHE:
            test, unscorable = self._draw("test", seed, n_test, config, exclude=set())
            prompts = {e.prompt for e in test}
            train, _ = self._draw(
                "train", seed + _TRAIN_SEED_OFFSET, n_train, config, exclude=prompts
            )
            _RG_CACHE[key] = ({"train": train, "test": test}, unscorable)
        self._splits, self.unscorable = _RG_CACHE[key]
        everything = self._splits["train"] + self._splits["test"]
        self.gen_length = max(len(e.response) for e in everything) + 1
        self.max_length = max(len(e.prompt) for e in everything) + 1 + self.gen_length

    @abstractmethod
    def compact(self, entry: Mapping[str, Any]) -> tuple[str, str, str]:
        """(prompt, response, gold answer) of a reasoning-gym entry in the compact format."""

    @abstractmethod
    def to_reasoning_gym(self, answer: str) -> str:
        """An extracted compact answer in the format the reasoning-gym checker expects."""

    def _draw(
        self, split: str, seed: int, n: int, config: Mapping[str, Any], exclude: set[str]
    ) -> tuple[list[Example], int]:
        """n examples from seed, skipping prompts in `exclude`; for the test split also
        repeats and items whose gold the checker rejects (returns how many)."""
        budget = _DRAW_BUDGET * n + 1000
        dataset = reasoning_gym.create_dataset(self.rg_name, seed=seed, size=budget, **config)
        examples: list[Example] = []
        seen: set[str] = set()
        unscorable = 0
        for idx in range(budget):
            try:
                entry = dataset[idx]
            except (ValueError, RuntimeError) as err:
                raise ValueError(
                    f"task {self.name!r}: reasoning-gym failed on {split} item {idx} with "
                    f"{dict(config)}: {err}; change the difficulty options"
                ) from None
            prompt, response, answer = self.compact(entry)
            if prompt in exclude or (split == "test" and prompt in seen):
                continue
            seen.add(prompt)
            example = Example(prompt, response, answer, f"{self.name} {split} #{idx}", entry)
            if split == "test" and not self.score(response, example):
                unscorable += 1
                continue
            examples.append(example)
            if len(examples) == n:
                return examples, unscorable
        raise ValueError(
            f"task {self.name!r}: found only {len(examples)} of {n} usable distinct {split} "
            f"items in {budget} draws ({unscorable} rejected by the checker on their own gold "
            f"answer): the configured problem space is too small (lower n_{split} or raise "
            "the difficulty options) or, if most were rejected, compact() and "
            "to_reasoning_gym() disagree"
        )

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        return list(self._splits[split])

    def score(self, output: str, example: Example) -> bool:
        """reasoning-gym's own checker on the extracted answer, requiring full credit."""
        if not example.meta:
            raise ValueError(
                f"{example.source}: no reasoning-gym entry in meta; score examples that come "
                f"from task {self.name!r}"
            )
        predicted = self.extract(output)
        if predicted is None:
            return False
        return (
            self._checker.score_answer(self.to_reasoning_gym(predicted), dict(example.meta)) == 1.0
        )


def _stripped(output: str) -> str | None:
    """The stripped output, or None when nothing is left."""
    return output.strip() or None


@register_task("chain_sum")
class ChainSum(ReasoningGymTask):
    """Sums and differences of small integers: prompt "4-1-7", response "-4"."""

    rg_name = "chain_sum"

    def __init__(
        self,
        n_train: int = 20_000,
        n_test: int = 200,
        seed: int = 0,
        max_terms: int = 3,
        max_digits: int = 2,
    ) -> None:
        config = dict(min_terms=2, max_terms=max_terms, min_digits=1, max_digits=max_digits)
        super().__init__(n_train, n_test, seed, config)

    def compact(self, entry: Mapping[str, Any]) -> tuple[str, str, str]:
        return entry["metadata"]["expression"].replace(" ", ""), entry["answer"], entry["answer"]

    def to_reasoning_gym(self, answer: str) -> str:
        return answer

    def extract(self, output: str) -> str | None:
        return _stripped(output)


@register_task("mini_sudoku")
class MiniSudoku(ReasoningGymTask):
    """4x4 sudoku: prompt = the 16 cells row by row ('_' for blanks), response = the 16
    solution digits."""

    rg_name = "mini_sudoku"

    def __init__(
        self,
        n_train: int = 5_000,
        n_test: int = 200,
        seed: int = 0,
        min_empty: int = 8,
        max_empty: int = 12,
    ) -> None:
        super().__init__(n_train, n_test, seed, dict(min_empty=min_empty, max_empty=max_empty))

    def compact(self, entry: Mapping[str, Any]) -> tuple[str, str, str]:
        meta = entry["metadata"]
        prompt = "".join(str(x) if x else "_" for row in meta["puzzle"] for x in row)
        solution = "".join(str(x) for row in meta["solution"] for x in row)
        return prompt, solution, solution

    def to_reasoning_gym(self, answer: str) -> str:
        return "\n".join(" ".join(answer[i : i + 4]) for i in range(0, 16, 4))

    def extract(self, output: str) -> str | None:
        cells = "".join(output.split())
        return cells if len(cells) == 16 else None


@register_task("countdown")
class Countdown(ReasoningGymTask):
    """Reach a target with each given number once: prompt "13:19,9,3", response "19+3-9"
    (any expression the reasoning-gym checker accepts scores)."""

    rg_name = "countdown"

    def __init__(
        self,
        n_train: int = 3_000,
        n_test: int = 200,
        seed: int = 0,
        numbers: int = 3,
        max_value: int = 20,
        max_target: int = 100,
    ) -> None:
        config = dict(
            min_numbers=numbers,
            max_numbers=numbers,
            min_value=1,
            max_value=max_value,
            min_target=1,
            max_target=max_target,
        )
        super().__init__(n_train, n_test, seed, config)

    def compact(self, entry: Mapping[str, Any]) -> tuple[str, str, str]:
        meta = entry["metadata"]
        prompt = f"{meta['target']}:{','.join(str(n) for n in meta['numbers'])}"
        expression = entry["answer"].replace(" ", "")
        return prompt, expression, expression

    def to_reasoning_gym(self, answer: str) -> str:
        return answer

    def extract(self, output: str) -> str | None:
        return _stripped(output)


_GSM_SYMBOLIC_SUFFIX = " Give the result as your final answer. Do not include units."


@register_task("gsm_symbolic")
class GSMSymbolic(ReasoningGymTask):
    """GSM-style word problems from reasoning-gym templates; response = the worked solution
    ending in '#### <number>'.

    The templates are derived from GSM8K *test* problems, so this task contaminates gsm8k:
    never train on one and report the other as held out.
    """

    rg_name = "gsm_symbolic"
    contaminates = frozenset({"gsm8k"})

    def __init__(self, n_train: int = 20_000, n_test: int = 200, seed: int = 0) -> None:
        super().__init__(n_train, n_test, seed, {})

    def compact(self, entry: Mapping[str, Any]) -> tuple[str, str, str]:
        prompt = normalize_text(entry["question"].removesuffix(_GSM_SYMBOLIC_SUFFIX)).strip()
        response = normalize_text(entry["metadata"]["answer_cot"]).strip()
        if final_number(response) is None:
            response = f"{response}\n#### {entry['answer']}"
        return prompt, response, normalize_number(entry["answer"])

    def to_reasoning_gym(self, answer: str) -> str:
        return answer

    def extract(self, output: str) -> str | None:
        return final_number(output)


# --- user files --------------------------------------------------------------------------


@register_task("jsonl")
class JsonlTask(Task):
    """A task from user JSONL files (see `read_jsonl`); scored by exact match of the stripped
    answer, taken after the last '####' when present.

    Lengths default to the longest in the data, under the outlier rule of `data.length_cap`
    (warnings in `notes`); training examples that do not fit are dropped and counted in
    `dropped`.
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
            test = [e for e in splits["test"] if fits(e, max_length, gen_length)]
            if len(test) < len(splits["test"]):
                self.notes.append(
                    f"{len(splits['test']) - len(test)} of {len(splits['test'])} test examples "
                    f"of {test} are left out of scoring (longer than the measured lengths)"
                )
            splits["test"] = test
        _check_prompts_fit(splits["test"], max_length, gen_length)
        kept = [e for e in splits["train"] if fits(e, max_length, gen_length)]
        self.dropped = len(splits["train"]) - len(kept)
        if not kept:
            raise DataError(
                f"no example of {train} fits max_length={max_length}, gen_length={gen_length}; "
                "raise them"
            )
        self._splits = {"train": kept, "test": splits["test"]}

    def _lengths(
        self, splits: dict[str, list[Example]], max_length: int | None, gen_length: int | None
    ) -> tuple[int, int]:
        """The given lengths, else measured on both splits under `length_cap`'s outlier rule
        (its warnings go to `notes`)."""
        everything = splits["train"] + splits["test"]
        self.notes: list[str] = []
        if gen_length is None:
            responses = [len(e.response) + 1 for e in everything]
            gen_length = length_cap(responses)
            setting = f"gen_length={max(responses)}"
            self.notes.append(cap_note("response (with <eos>)", responses, gen_length, setting))
        if max_length is None:
            prompts = [len(e.prompt) + 1 for e in everything]
            max_length = length_cap(prompts) + gen_length
            setting = f"max_length={max(prompts) + gen_length}"
            head = max_length - gen_length
            self.notes.append(cap_note("prompt (with <sep>)", prompts, head, setting))
        self.notes = [n for n in self.notes if n]
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
        if "####" in output:
            output = output.rsplit("####", 1)[1]
        return _stripped(output)

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
        self.dropped = 0
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
