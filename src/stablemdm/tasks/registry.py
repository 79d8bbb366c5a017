"""The task interface and registry: what a task provides (examples per split, a scorer), text
normalisation and answer extraction, and `get_task` by name."""

from __future__ import annotations

import inspect
import re
import typing
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..data import DataError, Example, TextTokenizer
from ..data.tokenizer import DEFAULT_ALPHABET, CharTokenizer

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


_MARKER = re.compile(r"#\s*#\s*#\s*#")  # '####', or '# # # #' as WordPiece decodes it


_SPACED_NUMBER = (  # spaces a tokenizer puts around the pieces of one number
    (re.compile(r"(\d)\s*(\.)\s*(?=\d)"), r"\1\2"),  # '1. 5' -> '1.5'
    (re.compile(r"(\d)\s*(,)\s*(?=\d{3}(?!\d))"), r"\1\2"),  # '1, 234' -> '1,234'
    (re.compile(r"(^|[^\w)\]])-\s+(?=\d)"), r"\1-"),  # '- 5' -> '-5'
)


def after_marker(output: str) -> str | None:
    """The text after the last '####' of `output` (also when decoded as '# # # #'), or None."""
    markers = list(_MARKER.finditer(output))
    return output[markers[-1].end() :] if markers else None


def join_number_pieces(text: str) -> str:
    """`text` with the spaces a subword tokenizer's decoding puts inside numbers removed
    (WordPiece decodes '-1,234.5' as '- 1, 234. 5')."""
    for pattern, replacement in _SPACED_NUMBER:
        text = pattern.sub(replacement, text)
    return text


def final_number(output: str) -> str | None:
    """The normalised first number after the last '####' of `output`, or None; robust to how
    a tokenizer decodes: '# # # # - 1, 234' reads as -1234."""
    tail = after_marker(output)
    if tail is None:
        return None
    match = _NUMBER.search(join_number_pieces(tail))
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

    def tokenizer_for(self, tokenizer: TextTokenizer | None) -> TextTokenizer:
        """The tokenizer this task is encoded and decoded with: `tokenizer` (a Hugging Face
        model's or a saved run's), or the character tokenizer for the built-in model (None).
        A task with tokens of its own (the image tasks) extends or checks it."""
        return CharTokenizer() if tokenizer is None else tokenizer


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


def path_options(name: str) -> list[str]:
    """The options of task `name` that name a file or folder: those its factory types as
    `Path` (e.g. `train: str | Path`); [] for an unknown task."""
    factory = _REGISTRY.get(name)
    if factory is None:
        return []
    params = inspect.signature(factory, eval_str=True).parameters
    return [n for n, p in params.items() if _mentions_path(p.annotation)]


def _mentions_path(hint: Any) -> bool:
    return hint is Path or any(_mentions_path(h) for h in typing.get_args(hint))


def map_paths(
    name: str, options: Mapping[str, Any], fn: Callable[[str, Any], Any], where: str = ""
) -> dict[str, Any]:
    """`options` of task `name` with each path option's value v replaced by fn(key, v), where
    key says where it sits ('train', or 'parts[0].train' inside a list of {task: name, ...}
    entries, as a mixture's parts)."""
    out = dict(options)
    paths = path_options(name)
    for key, value in out.items():
        if key in paths and isinstance(value, (str, Path)):
            out[key] = fn(f"{where}{key}", value)
        elif isinstance(value, list):
            out[key] = [_map_entry(v, fn, f"{where}{key}[{i}].") for i, v in enumerate(value)]
    return out


def _map_entry(entry: Any, fn: Callable[[str, Any], Any], where: str) -> Any:
    """`map_paths` of a nested task entry {task: name, **options} (anything else as it is)."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("task"), str):
        return entry
    options = {k: v for k, v in entry.items() if k != "task"}
    return {"task": entry["task"], **map_paths(entry["task"], options, fn, where)}


def resolve_paths(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with every path option that exists made absolute and resolved (symlinks
    followed), so a run's saved config names its data from any working directory."""
    return map_paths(name, options, lambda _, v: str(Path(v).resolve()) if Path(v).exists() else v)


def missing_paths(name: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, path) of each path option of `options` that names nothing on disk."""
    gone: list[tuple[str, str]] = []

    def note(where: str, value: Any) -> Any:
        if not Path(value).exists():
            gone.append((where, str(value)))
        return value

    map_paths(name, options, note)
    return gone


GSM8K_ENV = "STABLEMDM_GSM8K_DIR"
