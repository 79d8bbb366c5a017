"""A mixture of tasks as one task: the data a shared base is pretrained on.

    task: mixture
    task_options:
      parts: [{task: countdown, n_train: 8000}, {task: chain_sum, max_terms: 2}]
      exclude: [{task: chain_sum}, {task: mini_sudoku}]   # the fine-tune targets

The training split is every part's training split; any item whose prompt is a test prompt of
an `exclude` task is removed (counted in `excluded`), so a base never sees a target's test
items. Prompts are compared as `prompt_key` writes them: Unicode NFKC, case-folded, each run
of whitespace one space, none at the ends. The test split is every part's test split, each
item scored by its own part. Every part needs known lengths: a `dataset` part is given its
`max_length` and `gen_length`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any

from ..data import Example
from .registry import Task, check_split, get_task, register_task
from .text import TextTask

TaskSpec = Mapping[str, Any]  # {task: name, **options}


def spec_of(entry: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(name, options) of a part or exclude entry: a task name, or {task: name, **options}."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, Mapping) and isinstance(entry.get("task"), str):
        options = {k: v for k, v in entry.items() if k != "task"}
        return entry["task"], options
    raise ValueError(f"{where} entry {entry!r} must be a task name or {{task: name, ...options}}")


def build_part(entry: Any, where: str) -> Task:
    """The task an entry names, built with its options (errors name the entry)."""
    name, options = spec_of(entry, where)
    if name == "mixture":
        raise ValueError(f"{where}: a mixture cannot contain a mixture")
    try:
        task = get_task(name, **options)
    except ValueError as err:
        raise ValueError(f"{where} {name}: {err}") from None
    if isinstance(task, TextTask):
        raise ValueError(
            f"{where} text: raw text cannot be mixed with examples; pretrain a study's base on "
            "it alone (base.data: {task: text, train: ...})"
        )
    if type(task).tokenizer_for is not Task.tokenizer_for:
        raise ValueError(f"{where} {name}: a task with tokens of its own cannot be mixed")
    return task


def prompt_key(prompt: str) -> str:
    """What exclusion compares of a prompt: NFKC, case-folded, runs of whitespace as one
    space, none at the ends (so "Q1 " is the prompt "q1")."""
    return " ".join(unicodedata.normalize("NFKC", prompt).casefold().split())


def overlap(examples: list[Example], tests: list[Example]) -> list[Example]:
    """The examples whose prompt is the prompt of one of `tests` (as `prompt_key` writes it)."""
    prompts = {prompt_key(e.prompt) for e in tests}
    return [e for e in examples if prompt_key(e.prompt) in prompts]


def _check_lengths(part: Task, where: str) -> None:
    """A part's lengths must be known: a mixture measures none (a `dataset` part's lengths
    are otherwise measured with the model's tokenizer)."""
    if getattr(part, "max_length", None) is None or getattr(part, "gen_length", None) is None:
        raise ValueError(
            f"{where} {part.name}: its lengths are measured with the model's tokenizer, which a "
            "mixture does not do; give the part max_length and gen_length (in the run's tokens)"
        )


@register_task("mixture")
class Mixture(Task):
    """Several tasks' training and test splits as one (see the module docstring)."""

    def __init__(self, parts: list, exclude: list | None = None) -> None:
        if not isinstance(parts, list) or not parts:
            raise ValueError("task 'mixture': parts must be a non-empty list of tasks")
        self.parts = [build_part(p, f"mixture part {i}") for i, p in enumerate(parts)]
        for i, part in enumerate(self.parts):
            _check_lengths(part, f"mixture part {i}")
        self.targets = [build_part(e, "mixture exclude") for e in exclude or []]
        for part in self.parts:
            for other in self.targets:
                if other.name in part.contaminates:
                    raise ValueError(
                        f"mixture part {part.name} is derived from {other.name}'s test items "
                        f"and cannot be pretrained on when {other.name} is a target"
                    )
        tests = [e for task in self.targets for e in task.examples("test")]
        train = [e for part in self.parts for e in part.examples("train")]
        removed = {id(e) for e in overlap(train, tests)}
        self.excluded = len(removed)
        self._train = [e for e in train if id(e) not in removed]
        self._test = [(i, e) for i, part in enumerate(self.parts) for e in part.examples("test")]
        self.contaminates = frozenset().union(*(p.contaminates for p in self.parts))
        self.max_length = max(p.max_length for p in self.parts)
        self.gen_length = max(p.gen_length for p in self.parts)

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        if split == "train":
            return list(self._train)
        return [e for _, e in self._test]

    def _part_of(self, example: Example) -> Task:
        for i, candidate in self._test:
            if candidate is example or candidate == example:
                return self.parts[i]
        raise ValueError(f"{example.source}: not a test item of this mixture")

    def extract(self, output: str) -> str | None:
        return output.strip() or None

    def score(self, output: str, example: Example) -> bool:
        """The scorer of the part the test item came from."""
        return self._part_of(example).score(output, example)
