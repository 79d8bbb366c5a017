"""A mixture of tasks as one task: the data a shared base is pretrained on.

    task: mixture
    task_options:
      parts: [{task: countdown, n_train: 8000}, {task: chain_sum, max_terms: 2}]
      exclude: [{task: chain_sum}, {task: mini_sudoku}]   # the fine-tune targets

The training split is every part's training split; any item whose prompt is a test prompt of
an `exclude` task is removed (counted in `excluded`), so a base never sees a target's test
items. The test split is every part's test split, each item scored by its own part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..data import Example
from .registry import Task, check_split, get_task, register_task

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
    if type(task).tokenizer_for is not Task.tokenizer_for:
        raise ValueError(f"{where} {name}: a task with tokens of its own cannot be mixed")
    return task


def overlap(examples: list[Example], tests: list[Example]) -> list[Example]:
    """The examples whose prompt is the prompt of one of `tests` (exact match)."""
    prompts = {e.prompt for e in tests}
    return [e for e in examples if e.prompt in prompts]


@register_task("mixture")
class Mixture(Task):
    """Several tasks' training and test splits as one (see the module docstring)."""

    def __init__(self, parts: list, exclude: list | None = None) -> None:
        if not isinstance(parts, list) or not parts:
            raise ValueError("task 'mixture': parts must be a non-empty list of tasks")
        self.parts = [build_part(p, f"mixture part {i}") for i, p in enumerate(parts)]
        excluded = [build_part(e, "mixture exclude") for e in exclude or []]
        for part in self.parts:
            for other in excluded:
                if other.name in part.contaminates:
                    raise ValueError(
                        f"mixture part {part.name} is derived from {other.name}'s test items "
                        f"and cannot be pretrained on when {other.name} is a target"
                    )
        tests = [e for task in excluded for e in task.examples("test")]
        train = [e for part in self.parts for e in part.examples("train")]
        self.excluded = len(overlap(train, tests))
        prompts = {e.prompt for e in tests}
        self._train = [e for e in train if e.prompt not in prompts]
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
