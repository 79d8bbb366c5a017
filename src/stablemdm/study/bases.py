"""Shared bases of a study: where they are cached, the key they are cached under, and the
checks that their pretraining data never holds a target's test items.

A base is one MDM or one ARM pretrained before the fine-tunes, either on each target's own
train split or, with `base.data`, on a mixture of other tasks shared by every target
(`tasks.mixture`). Its folder is named by a hash of everything that decides its weights (the
resolved config values, the contents of its data, the stablemdm version; `trained_on`), so
any study or rerun asking for the same base reuses it, and a changed spec or data file trains
a new one beside it. The folder's `trained_on.json` records what it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..tasks.mixture import Mixture, overlap
from ..tasks.registry import SPLITS, Task, get_task
from ..tasks.text import TextTask

CACHE_ENV = "STABLEMDM_CACHE"
OWN_KEYS = ("seed", "data", "mdm", "arm")  # base keys that are not config fields
MATCH_POINTS = 5.0  # bases within this many accuracy points count as equally strong
TRAINED_ON = "trained_on.json"  # in a base folder: what the base was trained on


def cache_root(base_cache: str | None) -> Path:
    """Where bases are cached: the study's `base_cache`, else $STABLEMDM_CACHE/bases, else
    ~/.cache/stablemdm/bases."""
    if base_cache:
        return Path(base_cache)
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "stablemdm"
    return Path(root) / "bases"


def cache_key(values: Mapping[str, Any]) -> str:
    """A short stable hash of `values`: a base's (of `trained_on`), a step-0 result's."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def examples_digest(task: Task, splits: Sequence[str] = SPLITS) -> dict[str, dict[str, Any]]:
    """Per split, the count and a sha256 of the examples (prompt, response, answer): the
    data's contents, whichever file, generator or option they came from; of raw text
    (task 'text'), of its documents."""
    out = {}
    for split in splits:
        text = isinstance(task, TextTask)
        items = task.documents(split) if text else task.examples(split)
        digest, count = hashlib.sha256(), 0
        for e in items:
            digest.update(json.dumps(e if text else [e.prompt, e.response, e.answer]).encode())
            count += 1
        out[split] = {"documents" if text else "examples": count, "sha256": digest.hexdigest()}
    return out


def trained_on(config: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a base's weights: its resolved `config` values (less its folder), the
    contents of its data (`examples_digest`), and the stablemdm version (its key, and its
    trained_on.json)."""
    return {"stablemdm": version("stablemdm"), "data": dict(data), "config": dict(config)}


def data_task(data: Mapping[str, Any], where: str) -> Task:
    """The mixture `base.data` describes ({parts: [...], exclude: [...]}), or raw text
    ({task: text, train: ..., ...})."""
    if isinstance(data, Mapping) and data.get("task") == "text":
        try:
            return get_task("text", **{k: v for k, v in data.items() if k != "task"})
        except ValueError as err:
            raise ConfigError(f"{where}: base.data: {err}") from None
    if not isinstance(data, Mapping) or "parts" not in data:
        raise ConfigError(
            f"{where}: base.data must be a mapping with parts (and exclude), e.g. "
            "{parts: [countdown, {task: chain_sum, max_terms: 2}], exclude: [chain_sum]}, or "
            "raw text: {task: text, train: corpus.txt}"
        )
    unknown = sorted(set(data) - {"parts", "exclude"})
    if unknown:
        raise ConfigError(
            f"{where}: base.data has unknown key(s) {unknown} (known: parts, exclude)"
        )
    try:
        return get_task("mixture", **data)
    except ValueError as err:
        raise ConfigError(f"{where}: base.data: {err}") from None


def check_data(
    data: Mapping[str, Any],
    targets: Mapping[str, Mapping[str, Any]],
    max_length: int | None,
    where: str,
) -> Task:
    """The mixture of `base.data`, refused when a part is derived from a target's test items,
    its training split holds a target's test prompt, or a target is longer than the base's
    `max_length` (`targets`: name -> options)."""
    mixture = data_task(data, where)
    for name, options in targets.items():
        target = get_task(name, **options)
        derived = [p.name for p in getattr(mixture, "parts", []) if name in p.contaminates]
        if derived:
            raise ConfigError(
                f"{where}: base.data part {derived[0]} is derived from the test items of target "
                f"{name}; pretrain on other data"
            )
        length = getattr(target, "max_length", None)
        if None not in (length, max_length) and length > max_length:
            raise ConfigError(
                f"{where}: target {name} needs max_length {length}, longer than the base's "
                f"{max_length}; add {{task: {name}}} to base.data.exclude (the base is then "
                "sized for it) or raise base.max_length"
            )
        shared = overlap(mixture.examples("train"), target.examples("test"))
        if shared:
            entry = {"task": name, **options}
            raise ConfigError(
                f"{where}: {len(shared)} training item(s) of base.data are test items of target "
                f"{name} (e.g. {shared[0].prompt!r}); add {entry} to base.data.exclude"
            )
    return mixture


def base_length(mixture: Mixture | TextTask) -> int | None:
    """The base's max_length: the longest of the mixture and of its excluded targets (raw
    text's rows)."""
    targets = getattr(mixture, "targets", [])
    lengths = [mixture.max_length, *(getattr(t, "max_length", None) for t in targets)]
    known = [n for n in lengths if n is not None]
    return max(known) if known else None


def gap_verdict(mdm: float, arm: float) -> str:
    """How close two bases' step-0 accuracies are, in words, with the way to match them."""
    gap = 100 * (arm - mdm)
    if abs(gap) <= MATCH_POINTS:
        return f"close: within {MATCH_POINTS:.0f} points"
    weaker, stronger = ("mdm", "arm") if gap > 0 else ("arm", "mdm")
    return (
        f"far apart: the {weaker.upper()} base is {abs(gap):.1f} points weaker; match them by "
        f"pretraining it longer (base.{weaker}.max_steps=...) or the {stronger.upper()} base "
        f"shorter (base.{stronger}.max_steps=...), which the report lists as unequal budgets"
    )
