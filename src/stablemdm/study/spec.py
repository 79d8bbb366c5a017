"""A study file: which methods, seeds and tasks to train under identical settings, when to
evaluate, and an optional shared base model. Everything is validated before any training.

    name: demo
    output_dir: runs/demo
    tasks: [chain_sum]
    seeds: [42, 731, 20231]
    methods: [arm, standard, ppots_mirror]      # names of METHODS, or {name: {overrides}}
    eval_points: [0.25, 0.5, 1.0]               # fractions of the training budget
    eval_limit: 200                             # test items decoded per evaluation
    variance_draws: 32                          # estimator draws at the final checkpoint
    task_options: {chain_sum: {n_train: 20000, n_test: 200}}
    train: {model_preset: tiny, max_steps: 1000, ...}   # StableMDMConfig fields, every run
    base: {max_steps: 500}                      # optional: pretrain one MDM and one ARM first

`key=value` overrides reach any of these (`seeds=[1,2]`, `train.max_steps=50`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, StableMDMConfig, config_from_values, load_yaml, parse_override
from ..tasks import available_tasks, get_task
from ..variance_report import METHODS as ESTIMATORS

# every estimator of the variance tool, the ARM, and MIRROR at a Standard step's compute
METHODS: dict[str, dict[str, Any]] = {
    "arm": {"objective": "arm"},
    **ESTIMATORS,
    "mirror_matched": {"masking": "mirror", "compute_matched": True},
    "ppots_mirror_matched": {"sampler": "ppots", "masking": "mirror", "compute_matched": True},
    "count_ppots_mirror_matched": {
        "rate": "count",
        "sampler": "ppots",
        "masking": "mirror",
        "compute_matched": True,
    },
}
# fields a study sets itself for every run
OWN_FIELDS = ("output_dir", "seed", "task", "task_options", "init_from", "objective")
MODEL_FIELDS = ("model_preset", "d_model", "n_layers", "n_heads", "model")


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
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] | None = None

    def run_dir(self, task: str, method: str, seed: int) -> Path:
        return Path(self.output_dir) / task / method / f"seed-{seed}"

    def base_dir(self, task: str, objective: str) -> Path:
        return Path(self.output_dir) / task / f"base-{objective}"

    def eval_steps(self) -> list[int]:
        """The optimizer steps at which each run is decoded."""
        steps = self.train.get("max_steps", 200)
        return sorted({max(1, round(f * steps)) for f in self.eval_points})

    def run_config(self, task: str, method: str, seed: int) -> StableMDMConfig:
        """The training config of one run: shared fields, the method's, the study's own."""
        values = {**self.train, **self.methods[method]}
        objective = values.get("objective", "mdm")
        values.update(
            output_dir=str(self.run_dir(task, method, seed)),
            seed=seed,
            task=task,
            task_options=self.task_options.get(task, {}),
            save_steps=values.get("max_steps", 200),
            disable_tqdm=True,
        )
        if self.base is not None:
            values["init_from"] = str(self.base_dir(task, objective))
        return _build(values, f"{task}/{method}/seed-{seed}")

    def base_config(self, task: str, objective: str) -> StableMDMConfig:
        """The shared base of `objective` for `task`: the study's fields, the base's budget."""
        values = {**self.train, **self.base, "objective": objective}
        values.update(
            output_dir=str(self.base_dir(task, objective)),
            seed=self.base.get("seed", 0),
            task=task,
            task_options=self.task_options.get(task, {}),
            save_steps=values.get("max_steps", 200),
            disable_tqdm=True,
        )
        return _build(values, f"base of {task} ({objective})")


def _build(values: dict[str, Any], where: str) -> StableMDMConfig:
    """The run's config, its errors prefixed by the run they belong to."""
    try:
        return config_from_values(values, dict.fromkeys(values, "study file"))
    except ConfigError as err:
        raise ConfigError(f"study run {where}: {err}") from None


def _methods(raw: Any) -> dict[str, dict[str, Any]]:
    """Method names (from METHODS) or a mapping of names to overrides (None: the registry's)."""
    if isinstance(raw, list):
        raw = {name: None for name in raw}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("study: methods must be a non-empty list of names or a mapping")
    out = {}
    for name, overrides in raw.items():
        if overrides is None:
            if name not in METHODS:
                raise ConfigError(
                    f"study: unknown method {name!r}; known: {', '.join(METHODS)} (or give its "
                    "config overrides: {name: {sampler: ppots, ...}})"
                )
            overrides = METHODS[name]
        if not isinstance(overrides, dict):
            raise ConfigError(f"study: method {name!r} needs a mapping of config overrides")
        out[str(name)] = dict(overrides)
    return out


def _apply_override(values: dict[str, Any], text: str) -> None:
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
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    values = load_yaml(path.read_text())
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a study file is a mapping of study fields")
    for text in overrides:
        _apply_override(values, text)
    known = {f.name for f in dataclasses.fields(StudySpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown study field(s) {unknown}; known: {sorted(known)}")
    missing = sorted(
        f for f in ("name", "output_dir", "tasks", "seeds", "methods") if f not in values
    )
    if missing:
        raise ConfigError(f"{path}: missing study field(s) {missing}")
    values["methods"] = _methods(values["methods"])
    try:
        spec = StudySpec(**values)
    except TypeError as err:
        raise ConfigError(f"{path}: {err}") from None
    validate(spec, str(path))
    return spec


def validate(spec: StudySpec, where: str) -> None:
    """Refuse before any training: bad seeds, tasks, eval points, fields the study sets, and
    any run config that does not build."""
    seeds = spec.seeds
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"{where}: duplicate seeds {sorted(s for s in seeds if seeds.count(s) > 1)}"
        )
    unknown = [t for t in spec.tasks if t not in available_tasks()]
    if not spec.tasks or unknown:
        raise ConfigError(
            f"{where}: unknown task(s) {unknown}; known: {', '.join(available_tasks())}"
        )
    if not spec.eval_points or not all(0 < f <= 1 for f in spec.eval_points):
        raise ConfigError(
            f"{where}: eval_points must be fractions in (0, 1], got {spec.eval_points}"
        )
    if spec.eval_limit < 1 or spec.variance_draws < 0:
        raise ConfigError(f"{where}: need eval_limit >= 1 and variance_draws >= 0")
    clash = [k for k in OWN_FIELDS if k in spec.train]
    if clash:
        raise ConfigError(f"{where}: train sets {clash}, which the study sets per run")
    for task in spec.tasks:
        get_task(task, **spec.task_options.get(task, {}))
        if spec.base is not None:
            for objective in ("mdm", "arm"):
                check_base(spec, task, objective)
        for method in spec.methods:
            spec.run_config(task, method, spec.seeds[0])


def check_base(spec: StudySpec, task: str, objective: str) -> None:
    """A cached base must have the architecture the study now asks for."""
    spec.base_config(task, objective)
    saved = spec.base_dir(task, objective) / "config.yaml"
    if not saved.is_file():
        return
    before = load_yaml(saved.read_text()) or {}
    changed = [
        k for k in MODEL_FIELDS if before.get(k) != {**spec.train, **spec.base}.get(k, _default(k))
    ]
    if changed:
        raise ConfigError(
            f"base checkpoint {saved.parent} was trained with a different architecture "
            f"({', '.join(f'{k}: {before.get(k)!r}' for k in changed)}); delete it to retrain "
            "the base, or restore those fields"
        )


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(StableMDMConfig) if f.name == name)
