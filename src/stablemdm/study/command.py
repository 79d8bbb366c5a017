"""`stablemdm study` and `stablemdm demo`: run a study file, then print and write its report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError
from ..training.lock import LOCK, output_lock
from ..training.remote_code import add_trust_remote_code, allow_remote_code
from .report import build_report, markdown, write_report
from .runner import run_study
from .spec import StudySpec, load_study

SHIPPED = Path(__file__).resolve().parents[1] / "studies"


def study_path(name: str) -> Path:
    """A study file: a path, or the name of a shipped one (`stablemdm/studies/*.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = SHIPPED / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
    raise ConfigError(f"study file {name} does not exist (shipped studies: {names})")


def add_parsers(verbs) -> None:
    """The `study` and `demo` verbs."""
    study = verbs.add_parser(
        "study",
        help="train every method x seed x task of a study file and report it",
        description="Train every method x seed x task of a study file under identical "
        "settings, decode the test split at each evaluation point, and write report.md, "
        "report.json and figures into the study's output_dir. Re-running skips finished runs "
        "and resumes stopped ones. Shipped studies: "
        + ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
        + ". Your own data: tasks: [jsonl] with task_options: {jsonl: {train: FILE, test: "
        "FILE}}, and a shared base pretrained on your files with base: {max_steps: N, data: "
        "{parts: [{task: jsonl, train: FILE, test: FILE}], exclude: [jsonl]}} (docs/study.md, "
        "'Your own data', has a complete study file on examples/jsonl).",
    )
    study.add_argument("--config", required=True, help="a study file, or a shipped study's name")
    study.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. seeds=[1,2]")
    demo = verbs.add_parser(
        "demo",
        help="the built-in default study (what `make demo` runs)",
        description="The shipped study `demo`: a tiny ARM and tiny MDMs (Standard, "
        "P-POTS+MIRROR as published, count+P-POTS+MIRROR at Standard's compute, auto) on 4x4 "
        "sudokus over three seeds, in about twelve minutes on two CPU cores; prints the report, "
        "which opens with what the methods did.",
    )
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. output_dir=runs/x")
    for verb in (study, demo):
        verb.add_argument(
            "--overwrite",
            action="store_true",
            help="write into an output_dir that holds files of something other than this study",
        )
        add_trust_remote_code(verb)


def check_study_folder(spec: StudySpec, overwrite: bool) -> None:
    """The study's output_dir must be new, empty or this study's own (a re-run resumes it and
    rewrites its report); a folder holding anything else is refused unless `overwrite`."""
    folder = Path(spec.output_dir)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir {folder} is a file, not a folder (nothing was written)")
    if overwrite or not folder.is_dir() or not any(p.name != LOCK for p in folder.iterdir()):
        return
    report = folder / "report.json"
    if report.is_file():
        try:
            name = json.loads(report.read_text()).get("study")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            name = None
        if name == spec.name:
            return
        raise ConfigError(
            f"output_dir {folder} holds the report of study {name!r}, not {spec.name!r}; choose "
            "another output_dir, or pass --overwrite (nothing was written)"
        )
    if not any((folder / task).is_dir() for task in spec.tasks):
        raise ConfigError(
            f"output_dir {folder} already holds files that are not this study's; choose another "
            "output_dir, or pass --overwrite to write the study there (nothing was written)"
        )


def check_remote_code(spec: StudySpec, path: Path, overrides: list[str]) -> None:
    """The code a study's models ship runs only as `remote_code.allow_remote_code` allows
    (a study file inside a run or model folder cannot allow it); checked once per model,
    before anything is loaded."""
    configs = [spec.run_config(spec.tasks[0], m, spec.seeds[0]) for m in spec.methods]
    if spec.base is not None:
        configs += [spec.base_config(spec.tasks[0], o) for o in ("mdm", "arm")]
    seen = set()
    for config in configs:
        if (config.model, config.tokenizer_name, config.trust_remote_code) not in seen:
            seen.add((config.model, config.tokenizer_name, config.trust_remote_code))
            allow_remote_code(config, path, overrides, False)


def run_cli(args: argparse.Namespace) -> int:
    """Run the study named by the arguments and report it."""
    path = study_path(getattr(args, "config", None) or "demo")
    trust = ["train.trust_remote_code=true"] if args.trust_remote_code else []
    overrides = [*args.overrides, *trust]
    spec = load_study(path, overrides)
    check_remote_code(spec, path, overrides)
    check_study_folder(spec, args.overwrite)
    with output_lock(spec.output_dir, what="study output_dir"):
        results, bases = run_study(spec)
        report = build_report(spec.name, results, spec.eval_steps(), bases)
        written = write_report(report, results, spec.output_dir)
    print(markdown(report))
    print(f"report: {written[0]} (+ report.json and figures)", file=sys.stderr)
    return 0
