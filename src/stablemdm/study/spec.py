"""A study file: which methods, seeds and tasks to train under identical settings, when to
evaluate, and an optional shared base model. Everything is validated before any training.

    name: demo
    output_dir: runs/demo
    tasks: [chain_sum]
    seeds: [42, 731, 20231]
    methods: [arm, standard, ppots_mirror, standard_matched, auto]  # or {name: {overrides}}
    matched_by: batch                           # standard_matched: a larger batch, or steps
    eval_points: [0.25, 0.5, 1.0]               # fractions of the training budget
    eval_limit: 200                             # test items decoded per evaluation
    variance_draws: 32                          # estimator draws at the final checkpoint
    threads: 1                                  # torch CPU threads (default: one per core)
    task_options: {chain_sum: {n_train: 20000, n_test: 200}}
    train: {model_preset: tiny, max_steps: 1000, ...}   # StableMDMConfig fields, every run
    base: {max_steps: 500}                      # optional: pretrain one MDM and one ARM first
    base_cache: runs/bases                      # where bases are cached (study.bases)

`base` takes config fields shared by both bases, `seed` (default 0), `mdm:` / `arm:` fields
for one of them (a longer pretraining for the weaker), and `data:` (a `mixture` of other
tasks, one base for every target; a bare task name in its `exclude` is that task with the
study's task_options; without it each target's base pretrains on its own train split).

`key=value` overrides reach any of these (`seeds=[1,2]`, `train.max_steps=50`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..estimators.registry import ESTIMATOR_DEFAULTS, ISAD_DEFAULT_TOKENS
from ..estimators.registry import METHODS as ESTIMATORS
from ..tasks.registry import Task, available_tasks, get_task
from ..training.compute import step_passes
from ..training.config import StableMDMConfig
from ..training.recipe import (
    config_from_values,
    load_yaml,
    parse_override,
    read_yaml_file,
    suggest,
    unused_options,
)
from .bases import OWN_KEYS as BASE_KEYS
from .bases import (
    base_length,
    cache_key,
    cache_root,
    check_data,
    data_task,
    examples_digest,
    trained_on,
)
from .matched import MATCHED, MATCHED_BY, matched_budget

# every estimator of the variance tool, the ARM, MIRROR at a Standard step's compute, and
# auto (measures the unbiased ones on the model being trained and trains with the best)
METHODS: dict[str, dict[str, Any]] = {
    "arm": {"objective": "arm"},
    "auto": {"estimator": "auto"},
    **ESTIMATORS,
    "mirror_matched": {"masking": "mirror", "compute_matched": True},
    "ppots_mirror_matched": {"sampler": "ppots", "masking": "mirror", "compute_matched": True},
    "count_ppots_mirror_matched": {
        "rate": "count",
        "sampler": "ppots",
        "masking": "mirror",
        "compute_matched": True,
    },
    MATCHED: {},  # Standard at the most expensive method's training compute (`matched`)
}
# fields the study sets for every run (train may not), and the estimator fields only a
# method sets (so `standard` means Standard whatever the shared fields say)
OWN_FIELDS = ("output_dir", "seed", "task", "task_options", "init_from", "save_steps")
METHOD_FIELDS = ("objective", *ESTIMATOR_DEFAULTS)
# fields that decide the network (the MDM and ARM bases share them)
ARCHITECTURE = (
    "model",
    "gguf_file",
    "model_preset",
    "d_model",
    "n_layers",
    "n_heads",
    "max_length",
)
METHOD_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")  # one folder name
RESULT = "result.json"  # in a run folder: the run is finished
# config fields a finished or checkpointed run may differ in from the study's current config
HARMLESS = ("output_dir", "logging_steps", "disable_tqdm", "report_to", "dataloader_num_workers")
HARMLESS += ("trust_remote_code",)  # a permission (`remote_code`), not a setting of the run
MEASURED = ("max_length", "gen_length")  # measured on the data when the study leaves them unset


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_fraction(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, list) and all(check(v) for v in x)


# field: (type check, what it must be); `methods` is checked by `_methods`
FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda x: isinstance(x, str) and bool(x), "a non-empty string"),
    "output_dir": (lambda x: isinstance(x, str) and bool(x), "a folder path"),
    "tasks": (_list_of(lambda x: isinstance(x, str)), "a list of task names"),
    "seeds": (_list_of(_is_int), "a list of integers"),
    "eval_points": (_list_of(_is_fraction), "a list of fractions of the budget"),
    "eval_limit": (_is_int, "an integer"),
    "variance_draws": (_is_int, "an integer (0 to skip)"),
    "threads": (lambda x: x is None or (_is_int(x) and x >= 1), "a positive integer"),
    "task_options": (
        lambda x: isinstance(x, dict) and all(isinstance(v, dict) for v in x.values()),
        "a mapping of task name to its options",
    ),
    "train": (lambda x: isinstance(x, dict), "a mapping of config fields"),
    "base": (lambda x: x is None or isinstance(x, dict), "a mapping of config fields"),
    "base_cache": (lambda x: x is None or (isinstance(x, str) and bool(x)), "a folder path"),
    "matched_by": (lambda x: x in MATCHED_BY, f"one of {', '.join(MATCHED_BY)}"),
}
REQUIRED = ("name", "output_dir", "tasks", "seeds", "methods")


@dataclass
class StudySpec:
    """A validated study file (see the module docstring)."""

    name: str
    output_dir: str
    tasks: list[str]
    seeds: list[int]
    methods: dict[str, dict[str, Any]]
    eval_points: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    eval_limit: int = 200
    variance_draws: int = 32
    threads: int | None = None
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] | None = None
    base_cache: str | None = None
    matched_by: str = "batch"  # how standard_matched reaches its compute (`matched`)
    # the task each base trains on and its examples' digest, built once per spec (`_base_task`)
    _data: dict[str, tuple[Task, dict]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def run_dir(self, task: str, method: str, seed: int) -> Path:
        return Path(self.output_dir) / task / method / f"seed-{seed}"

    def base_dir(self, task: str, objective: str) -> Path:
        """The cached base of `objective` that `task` fine-tunes from, named by what it is
        trained on (`base_record`)."""
        label = self._base_values(task, objective)["task"]
        key = cache_key(self.base_record(task, objective))
        return cache_root(self.base_cache) / f"{label}-{objective}-{key}"

    def base_record(self, task: str, objective: str) -> dict[str, Any]:
        """What that base is trained on (`bases.trained_on`: resolved config values, data
        contents, version): its cache key and its folder's trained_on.json."""
        values = self._base_values(task, objective)
        where = self._base_where(task, objective)
        resolved = _build(values, where).resolved()
        config = {k: v for k, v in resolved.items() if k not in HARMLESS}
        return trained_on(config, self._base_task(values)[1])

    def _base_task(self, values: dict[str, Any]) -> tuple[Task, dict[str, Any]]:
        """The task a base's config `values` train on and the digest of its examples, built
        once per spec (a file edited since is read again by the next `load_study`)."""
        memo = json.dumps([values["task"], values["task_options"]], sort_keys=True, default=str)
        if memo not in self._data:
            task = _task_of(values, "study file")
            self._data[memo] = (task, examples_digest(task))
        return self._data[memo]

    def base_data(self) -> dict[str, Any] | None:
        """`base.data`, each bare task name in its `exclude` given the study's task_options
        for that task (the target as the study runs it)."""
        data = (self.base or {}).get("data")
        if not isinstance(data, dict) or not isinstance(data.get("exclude"), list):
            return data
        exclude = [
            {"task": e, **self.task_options[e]}
            if isinstance(e, str) and e in self.task_options
            else e
            for e in data["exclude"]
        ]
        return {**data, "exclude": exclude}

    def max_steps(self) -> int:
        """Every run's budget in optimizer steps."""
        return self.train.get("max_steps", _default("max_steps"))

    def eval_steps(self, total: int | None = None) -> list[int]:
        """The optimizer steps at which each run is decoded; for a run of `total` steps (auto
        charged its measurements trains fewer, standard_matched by steps more), the same
        fractions of its own, one per step of the study's."""
        points = {max(1, round(f * self.max_steps())): f for f in sorted(self.eval_points)}
        if total is None:
            return sorted(points)
        return [max(1, round(points[step] * total)) for step in sorted(points)]

    def run_config(self, task: str, method: str, seed: int) -> StableMDMConfig:
        """The training config of one run: shared fields, the method's, the study's own."""
        values = {**self.train, **ESTIMATOR_DEFAULTS, **self.methods[method]}
        if values["masking"] == "isad" and not values.get("isad_tokens"):
            values["isad_tokens"] = ISAD_DEFAULT_TOKENS.get(task, [])
        objective = values.get("objective", "mdm")
        values.update(
            output_dir=str(self.run_dir(task, method, seed)),
            seed=seed,
            task=task,
            task_options=self.task_options.get(task, {}),
            save_steps=values.get("max_steps", self.max_steps()),  # the run's own end
            disable_tqdm=True,
        )
        if self.base is not None:
            values["init_from"] = str(self.base_dir(task, objective))
        return _build(values, f"{task}/{method}/seed-{seed}", self.methods[method])

    def _base_values(self, task: str, objective: str) -> dict[str, Any]:
        """The config values of a base, but its folder: the study's fields, the base's own
        (and its objective's), Standard's estimator for the MDM, seed 0 unless set."""
        base = {k: v for k, v in (self.base or {}).items() if k != "data"}
        seed, data = base.pop("seed", 0), self.base_data()
        own = {name: base.pop(name, None) or {} for name in ("mdm", "arm")}
        values = {**self.train, **ESTIMATOR_DEFAULTS, **base, **own[objective]}
        values.update(objective=objective, seed=seed, disable_tqdm=True)
        values["save_steps"] = values.get("max_steps", _default("max_steps"))
        if data is None:
            values.update(task=task, task_options=self.task_options.get(task, {}))
        else:
            text = isinstance(data, dict) and data.get("task") == "text"  # {task: text, ...}
            options = {k: v for k, v in data.items() if k != "task"} if text else data
            values.update(task="text" if text else "mixture", task_options=options)
            if values.get("max_length") is None:
                values["max_length"] = base_length(self._base_task(values)[0])
        return values

    def base_config(self, task: str, objective: str) -> StableMDMConfig:
        """The shared base of `objective` that `task` fine-tunes from."""
        values = self._base_values(task, objective)
        values["output_dir"] = str(self.base_dir(task, objective))
        return _build(values, self._base_where(task, objective))

    def _base_where(self, task: str, objective: str) -> str:
        """How errors name a base."""
        where = "base" if (self.base or {}).get("data") else f"base of {task}"
        return f"{where} ({objective})"

    def base_tasks(self) -> list[str]:
        """One target per distinct base: each task, or the first when base.data is shared."""
        return self.tasks[:1] if (self.base or {}).get("data") is not None else self.tasks


def _build(
    values: dict[str, Any], where: str, method: dict[str, Any] | None = None
) -> StableMDMConfig:
    """The run's config, its errors prefixed by the run they belong to; a field the method
    sets but its estimator ignores is refused (`unused_options`)."""
    try:
        config = config_from_values(values, dict.fromkeys(values, "study file"))
        unused = unused_options(config, method or {}, dict.fromkeys(method or {}, "method"))
        if unused:
            raise ConfigError(f"{unused[0]}; remove it from the method or change its estimator")
        return config
    except ConfigError as err:
        raise ConfigError(f"study run {where}: {err}") from None


def _task_of(values: dict[str, Any], where: str) -> Task:
    """The task a config's values name (base.data's mixture with its own messages)."""
    name = values["task"]
    if name == "mixture":
        return data_task(values["task_options"], where)
    try:
        return get_task(name, **values["task_options"])
    except ValueError as err:
        raise ConfigError(f"{where}: task_options of {name}: {err}") from None


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(StableMDMConfig) if f.name == name)


def _methods(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    """Method names (from METHODS), a mapping of names to overrides (None: the registry's;
    a table name's overrides add to its fields), or a list mixing names and one-entry
    mappings `{name: {overrides}}`."""
    if isinstance(raw, list):
        raw = _method_list(raw, where)
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: methods must be a non-empty list of names or a mapping")
    out = {}
    for name, overrides in raw.items():
        if not isinstance(name, str) or not METHOD_NAME.match(name):
            raise ConfigError(
                f"{where}: method name {name!r} must be letters, digits and _.+- (a folder name)"
            )
        if overrides is None:
            if name not in METHODS:
                raise ConfigError(
                    f"{where}: unknown method {name!r}; known: {', '.join(METHODS)} (or give "
                    "its config overrides: {name: {sampler: ppots, ...}})"
                )
            overrides = METHODS[name]
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: method {name!r} needs a mapping of config overrides")
        _check_keeps_meaning(name, overrides, where)
        out[name] = {**METHODS.get(name, {}), **overrides}
    return out


def _method_list(raw: list, where: str) -> dict[str, Any]:
    """`[standard, {mine: {sampler: ppots}}]` as a mapping of names to overrides (None for a
    bare name); duplicate names and other entries are refused."""
    out: dict[str, Any] = {}
    for entry in raw:
        if isinstance(entry, dict) and len(entry) == 1:
            name, overrides = next(iter(entry.items()))
        elif isinstance(entry, str):
            name, overrides = entry, None
        else:
            raise ConfigError(
                f"{where}: methods entry {entry!r} is neither a method name nor one "
                "{name: {overrides}} mapping"
            )
        if not isinstance(name, str) or name in out:
            raise ConfigError(f"{where}: method {name!r} is given twice")
        out[name] = overrides
    return out


def _check_keeps_meaning(name: str, overrides: dict[str, Any], where: str) -> None:
    """A table method's name means its estimator: overrides (added to the table's fields)
    may tune it (mix, ema_decay, ...) but not change it, or every paired difference would be
    against the wrong method."""
    if name not in METHODS:
        return
    meant = {"objective": "mdm", **ESTIMATOR_DEFAULTS, **METHODS[name]}
    given = {**meant, **overrides}
    changed = [k for k in METHOD_FIELDS if given.get(k) != meant.get(k)]
    if changed:
        sets = ", ".join(f"{k}={given[k]}" for k in changed)
        table = ", ".join(f"{k}={v}" for k, v in METHODS[name].items()) or "every field default"
        example = ", ".join(f"{k}: {given[k]}" for k in changed)
        raise ConfigError(
            f"{where}: method {name!r} sets {sets}, which changes what {name!r} means "
            f"({table}); give the changed method another name, e.g. "
            f"{{{name}_{given[changed[0]]}: {{{example}}}}}"
        )


def _apply_override(values: dict[str, Any], text: str) -> None:
    """`key=value` or `parent.key=value` (into a mapping such as train or task_options)."""
    key, value = parse_override(text)
    *parents, last = key.split(".")
    target = values
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {text!r}: {part} is not a mapping")
    target[last] = value


def load_study(path: str | Path, overrides: list[str] = ()) -> StudySpec:
    """Read, override and validate a study file (one clear line per problem)."""
    path = Path(path)
    values = read_yaml_file(path, "study file")
    for text in overrides:
        _apply_override(values, text)
    known = {f.name for f in dataclasses.fields(StudySpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{path}: unknown study field {unknown[0]!r}{suggest(unknown[0], known)} "
            f"(known: {', '.join(sorted(known))})"
        )
    missing = [f for f in REQUIRED if f not in values]
    if missing:
        raise ConfigError(f"{path}: missing study field(s) {missing}")
    for key, (check, what) in FIELD_TYPES.items():
        if key in values and not check(values[key]):
            raise ConfigError(f"{path}: {key} must be {what}, got {values[key]!r}")
    values["methods"] = _methods(values["methods"], str(path))
    spec = StudySpec(**values)
    validate(spec, str(path))
    return spec


def _matched(spec: StudySpec, where: str) -> dict[str, int]:
    """standard_matched's batch or steps (`matched.matched_budget`): each method's training
    forward passes (its run on the first task and seed) against Standard's."""
    task, seed = spec.tasks[0], spec.seeds[0]
    configs = {m: spec.run_config(task, m, seed) for m in spec.methods}
    costs = {m: step_passes(c) * c.max_steps for m, c in configs.items() if m != MATCHED}
    standard = configs[MATCHED]
    return matched_budget(
        costs,
        step_passes(standard) * standard.max_steps,
        standard.per_device_train_batch_size,
        standard.max_steps,
        spec.matched_by,
        where,
    )


def validate(spec: StudySpec, where: str) -> None:
    """Refuse before any training: bad seeds, tasks, eval points, fields the study or a method
    sets, a mismatched cached base, and any run config that does not build; set
    standard_matched's batch or steps (once: its overrides then include them)."""
    seeds = spec.seeds
    if not seeds:
        raise ConfigError(f"{where}: seeds is empty; give at least one (the paper: 42, 731, 20231)")
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise ConfigError(f"{where}: seeds must be integers in [0, 2**32), got {bad}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"{where}: duplicate seeds {sorted({s for s in seeds if seeds.count(s) > 1})}"
        )
    unknown = [t for t in spec.tasks if t not in available_tasks()]
    if not spec.tasks or unknown:
        raise ConfigError(
            f"{where}: unknown task(s) {unknown}; known: {', '.join(available_tasks())}"
        )
    # options for a known task left out of `tasks` are kept for later (`tasks=[chain_sum]` on
    # a two-task study file); options for a name that is no task are a typo
    stray = sorted(set(spec.task_options) - set(available_tasks()))
    if stray:
        raise ConfigError(
            f"{where}: task_options for {stray}, which is not a task; known: "
            f"{', '.join(available_tasks())}"
        )
    if not spec.eval_points or not all(0 < f <= 1 for f in spec.eval_points):
        raise ConfigError(
            f"{where}: eval_points must be fractions in (0, 1], got {spec.eval_points}"
        )
    if spec.eval_limit < 1:
        raise ConfigError(f"{where}: eval_limit must be >= 1, got {spec.eval_limit}")
    if spec.variance_draws < 0 or spec.variance_draws in (1, 2):
        raise ConfigError(
            f"{where}: variance_draws must be 0 (skip) or >= 3 (a variance and its standard "
            f"error), got {spec.variance_draws}"
        )
    _check_shared_fields(spec, where)
    if spec.base is not None:
        check_bases(spec, where)
    if MATCHED in spec.methods:  # its own overrides (say, a learning rate) on top
        spec.methods[MATCHED] = {**_matched(spec, where), **spec.methods[MATCHED]}
    for task in spec.tasks:
        try:
            get_task(task, **spec.task_options.get(task, {}))
        except ValueError as err:
            raise ConfigError(f"{where}: task_options of {task}: {err}") from None
        for method in spec.methods:
            for seed in spec.seeds:
                check_started(spec, task, method, seed)


def _check_shared_fields(spec: StudySpec, where: str) -> None:
    """`train` and `base` leave per-run fields to the study and estimators to the methods."""
    for part, values in (("train", spec.train), ("base", spec.base or {})):
        allowed_here = BASE_KEYS if part == "base" else ()
        clash = [k for k in OWN_FIELDS if k in values and k not in allowed_here]
        if clash:
            raise ConfigError(f"{where}: {part} sets {clash}, which the study sets per run")
        own = [values.get(k) or {} for k in ("mdm", "arm")] if part == "base" else []
        if own:
            _check_one_base_fields(own, where)
        estimators = [k for k in METHOD_FIELDS if k in values or any(k in v for v in own)]
        if estimators:
            raise ConfigError(
                f"{where}: {part} sets {estimators}, which each method sets; move them into a "
                "method ({name: {sampler: ppots, ...}})"
            )
    if not _is_int(spec.max_steps()) or spec.max_steps() < 1:
        raise ConfigError(f"{where}: train.max_steps must be a positive integer (the budget)")


def _check_one_base_fields(own: list[Any], where: str) -> None:
    """`base.mdm` / `base.arm` may change a budget or optimiser, never the architecture (the
    two bases are the same network) or a field the study sets."""
    if not all(isinstance(v, dict) for v in own):
        raise ConfigError(f"{where}: base.mdm and base.arm must be mappings of config fields")
    for name, fields in zip(("mdm", "arm"), own, strict=True):
        bad = [k for k in (*ARCHITECTURE, *OWN_FIELDS) if k in fields]
        if bad:
            raise ConfigError(
                f"{where}: base.{name} sets {bad}; both bases share the architecture and the "
                "study's per-run fields (set them in base or train)"
            )


def check_bases(spec: StudySpec, where: str) -> None:
    """Every base's config builds, and shared base data holds no target's test items."""
    for task in spec.base_tasks():
        for objective in ("mdm", "arm"):
            spec.base_config(task, objective)
    data = spec.base_data()
    if data is not None:
        targets = {t: spec.task_options.get(t, {}) for t in spec.tasks}
        length = spec.base_config(spec.tasks[0], "mdm").max_length
        check_data(data, targets, length, where)


def _read_saved(folder: Path, name: str, parse: Callable[[str], Any]) -> Any:
    """A run's saved `name` parsed, or a ConfigError naming it and the way out."""
    try:
        return parse((folder / name).read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(
            f"{folder / name} cannot be read ({type(err).__name__}); delete {folder} to redo "
            "that run"
        ) from None


def check_started(spec: StudySpec, task: str, method: str, seed: int) -> None:
    """A run's config must build, and a run already finished or checkpointed in the study
    folder must have been trained with it (and evaluated at the same points)."""
    config = spec.run_config(task, method, seed)
    folder = spec.run_dir(task, method, seed)
    if not (folder / RESULT).is_file() and not any(folder.glob("checkpoint-*")):
        return  # nothing there yet, or a run that will be restarted
    saved = _read_saved(folder, "config.yaml", load_yaml)
    now = config.resolved()
    changed = [
        k
        for k in sorted(set(saved) & set(now))
        if k not in HARMLESS and saved[k] != now[k] and not (k in MEASURED and now[k] is None)
    ]
    if (folder / RESULT).is_file() and not changed:
        done = _read_saved(folder, RESULT, json.loads)
        if [e["step"] for e in done["evaluations"]] != spec.eval_steps():
            changed = ["eval_points"]
        elif done.get("eval_limit", spec.eval_limit) != spec.eval_limit:
            changed = ["eval_limit"]
    if changed:
        raise ConfigError(
            f"{folder} was run with other settings ({', '.join(changed)}): give the study "
            "another output_dir, or delete that run to redo it"
        )
