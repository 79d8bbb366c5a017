"""Recipes and overrides: YAML files and `key=value` pairs turned into a checked
`StableMDMConfig`, and the config written back."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from ..errors import ConfigError, short_repr
from .config import (
    _OVERRIDDEN,
    _OWN_FIELDS,
    AUTO_CHOSEN,
    ESTIMATOR_FIELDS,
    METHOD_OPTIONS,
    StableMDMConfig,
)


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a parsed literal fits a field's annotation (lenient for complex HF unions)."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        inner = get_args(hint)
        return (
            isinstance(value, list) and all(_type_ok(v, inner[0]) for v in value)
            if inner
            else isinstance(value, list)
        )
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint) or isinstance(value, str)  # enums accept their string values
    return True


def _coerce(key: str, value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the field's type; ints are accepted for floats."""
    if not _type_ok(value, hint):
        shown = short_repr(value)
        if get_origin(hint) is Literal:
            allowed = ", ".join(map(str, get_args(hint)))
            raise ConfigError(f"{where}: {key} must be one of {allowed}; got {shown}")
        if isinstance(value, str) and value.strip().lower().lstrip("+-.") in ("nan", "inf"):
            raise ConfigError(f"{where}: {key} must be a finite number, got {shown}")
        raise ConfigError(f"{where}: {key}={shown} has the wrong type; expected {_type_name(hint)}")
    if hint is float and isinstance(value, int):
        return float(value)
    return value


def _type_name(hint: Any) -> str:
    """`int`, `list[str]`, `int | None`: a field's type as its annotation reads."""
    if get_args(hint) or getattr(hint, "__name__", None) is None:
        return str(hint).replace("typing.", "")
    return hint.__name__


# values a YAML document may stand for once its aliases are written out: a recipe or study
# holds a few hundred, a "billion laughs" of nested aliases billions
MAX_YAML_VALUES = 10_000


def _expanded_size(node: yaml.Node, sizes: dict[int, float]) -> float:
    """How many values `node` stands for with every alias written out (inf when it contains
    itself); `sizes` holds each node once, so this is linear in the text however it nests."""
    key = id(node)
    if key not in sizes:
        sizes[key] = math.inf  # met again before it is summed: the node contains itself
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        total = 1.0
        for child in children:
            total += _expanded_size(child, sizes)
        sizes[key] = total
    return sizes[key]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (`eval_strategy: no` stays the string
    'no') and `1e-3` is a float, as a user means them; a key given twice in one mapping is an
    error (PyYAML would silently keep the last); aliases that expand to more than
    MAX_YAML_VALUES values are refused before any value is built."""

    def get_single_node(self) -> yaml.Node | None:
        """The document's node, refused when its aliases expand it past MAX_YAML_VALUES."""
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                problem=f"its aliases (*name) stand for more than {MAX_YAML_VALUES:,} values; "
                "write the values out instead"
            )
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """The mapping of `node`, refusing a key that appears twice."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first given on line {seen[key] + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text with the YAML 1.2 reading of booleans and floats; a YAMLError for a
    document nested deeper than Python's stack allows."""
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise yaml.YAMLError(
            "nested too deeply (more lists and mappings inside each other than Python can read)"
        ) from None


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """One line for a YAML error: `line L, column C: problem` (PyYAML's own spans lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def read_yaml_file(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in a user's YAML file (`what`: "config file", "study file"); ConfigError,
    naming the file and line, when it is missing, unreadable, empty, invalid or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {describe_yaml_error(err)}") from None
    if data is None:
        raise ConfigError(f"{path} is empty: a {what} is a mapping of field: value")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a {what} is a mapping of field: value, not {type(data).__name__}"
        )
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value`; the value is parsed as a YAML literal (`3`, `1e-3`, `true`, `[a, b]`)."""
    if "=" not in text:
        raise ConfigError(f"override {short_repr(text)} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {short_repr(text)}: the value does not parse ({describe_yaml_error(err)})"
        ) from None
    if not key.strip():
        raise ConfigError(f"override {short_repr(text)} has no key before '='")
    return key.strip(), value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    *,
    allow_unused: bool = False,
    base: dict[str, Any] | None = None,
    base_source: str = "base",
) -> StableMDMConfig:
    """Build the config from `base` field values (named `base_source` in messages), a flat
    YAML recipe and `key=value` overrides (later wins). A field set to a non-default value
    that the chosen method ignores is warned about on stderr unless `allow_unused` (a base
    config shared by several methods, as in `stablemdm variance`)."""
    values: dict[str, Any] = dict(base or {})
    sources: dict[str, str] = dict.fromkeys(values, base_source)
    literals: dict[str, str] = {}  # the text of each command-line value, for string fields
    if path is not None:
        for key, value in read_yaml_file(path, "config file").items():
            values[key], sources[key] = value, str(path)
    for text in overrides:
        key, value = parse_override(text)
        values[key], sources[key] = value, "command line"
        literals[key] = text.split("=", 1)[1].strip()
    notes = drop_estimator_fields(values, sources)
    config = config_from_values(values, sources, literals)
    if os.environ.get("RANK", "0") == "0":
        for message in notes:
            print(f"stablemdm: note: {message}", file=sys.stderr)
        for message in [] if allow_unused else unused_options(config, values, sources):
            print(f"stablemdm: warning: {message}", file=sys.stderr)
    return config


def _default(name: str) -> Any:
    """The declared default of a config field."""
    f = next(f for f in dataclasses.fields(StableMDMConfig) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def drop_estimator_fields(values: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """Remove from `values` the fields the objective or estimator decides itself, so an ARM
    or estimator=auto trains over any method recipe: under objective=arm all that draw rates
    and masks (`ESTIMATOR_FIELDS`), under estimator=auto those auto chooses (`AUTO_CHOSEN`);
    returns one note naming those set to something other than their default (none when
    there are none)."""
    if values.get("objective") == "arm":
        fields, why = ESTIMATOR_FIELDS, "objective=arm draws no rates or masks"
        then = "the ARM trains with the defaults"
    elif values.get("estimator") == "auto":
        fields, then = AUTO_CHOSEN, "auto_candidates=[...] narrows its choice"
        why = (
            "estimator=auto chooses rate, sampler, scheme, masking and compute_matched (and "
            "refits P-POTS at each measurement) itself"
        )
    else:
        return []
    named = [k for k in values if k in fields and values[k] != _default(k)]
    settings = ", ".join(f"{k}={values[k]}" for k in named)
    where = ", ".join(sorted({sources.get(k, "config") for k in named}))
    for key in [k for k in values if k in fields]:
        del values[key]
    return [f"{why}: ignoring {settings} (from {where}); {then}"] if named else []


def unused_options(
    config: StableMDMConfig, values: dict[str, Any], sources: dict[str, str] | None = None
) -> list[str]:
    """One message per field given a non-default value that the configured method never
    reads (`clip_low` without sampler=clipped): such a run silently trains something else."""
    fields = {f.name: f for f in dataclasses.fields(StableMDMConfig)}
    messages = []
    for name, (used, needs) in METHOD_OPTIONS.items():
        if name not in values or used(config):
            continue
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(config, name) != default:
            where = (sources or {}).get(name, "config")
            messages.append(
                f"{where}: {name}={getattr(config, name)!r} is ignored: it is used only with "
                f"{needs}"
            )
    return messages


def config_from_values(
    values: dict[str, Any],
    sources: dict[str, str] | None = None,
    literals: dict[str, str] | None = None,
) -> StableMDMConfig:
    """Build the config from field values, each type-checked against its field; `sources`
    names where each came from (for the error message). `literals` are the typed texts of
    command-line values: a string field takes its text when YAML read something else
    (`mask_token=[MASK]` is the token, not a list)."""
    sources, literals = sources or {}, literals or {}
    values = dict(values)
    hints = typing.get_type_hints(StableMDMConfig)
    known = {f.name for f in dataclasses.fields(StableMDMConfig) if f.init}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"{sources.get(key, 'config')}: unknown config key {key!r}{suggest(key, known)}"
            )
        text = literals.get(key)
        if text is not None and not _type_ok(value, hints[key]) and _type_ok(text, hints[key]):
            value = text
        values[key] = _coerce(key, value, hints[key], sources.get(key, "config"))
    try:
        return StableMDMConfig(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid configuration: {err}") from err


def suggest(key: str, known: typing.Iterable[str]) -> str:
    """ "; did you mean X?" for the known names closest to a mistyped `key` (or "")."""
    names = sorted(known)
    close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.75)
    close += [k for k in names if str(key) in k and k not in close]
    return f"; did you mean {', '.join(close[:3])}?" if close else ""


# the first line of a run's saved config: a model's code never runs because it says so
SAVED_MARK = "# The resolved config of a stablemdm run"


def save_config(config: StableMDMConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically, under `SAVED_MARK`."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    mark = f"{SAVED_MARK} (its trust_remote_code needs --trust-remote-code to run code)\n"
    tmp.write_text(mark + yaml.safe_dump(config.resolved(), sort_keys=True))
    tmp.replace(path)


def field_help() -> list[tuple[str, str, str]]:
    """(name, default, help) for every stablemdm field, for `--help` and the docs."""
    rows = []
    for f in dataclasses.fields(StableMDMConfig):
        if f.name in _OWN_FIELDS or f.name in _OVERRIDDEN:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f.name, repr(default), f.metadata.get("help", "")))
    return rows
