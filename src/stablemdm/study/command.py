"""`stablemdm study` and `stablemdm demo`: run a study file, then print and write its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError
from .report import build_report, markdown, write_report
from .runner import run_study
from .spec import load_study

SHIPPED = Path(__file__).resolve().parents[1] / "studies"


def study_path(name: str) -> Path:
    """A study file: a path, or the name of a shipped one (demo, cpu, screen, gpu)."""
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
        + ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml"))),
    )
    study.add_argument("--config", required=True, help="a study file, or a shipped study's name")
    study.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. seeds=[1,2]")
    demo = verbs.add_parser(
        "demo",
        help="the built-in default study (what `make demo` runs)",
        description="The shipped study `demo`: a tiny ARM and tiny MDMs (Standard, "
        "P-POTS+MIRROR as published, count+P-POTS+MIRROR at Standard's compute) on chain_sum "
        "over three seeds, in about twelve minutes on two CPU cores; prints the table.",
    )
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. output_dir=runs/x")


def run_cli(args: argparse.Namespace) -> int:
    """Run the study named by the arguments and report it."""
    spec = load_study(study_path(getattr(args, "config", None) or "demo"), args.overrides)
    results = run_study(spec)
    report = build_report(spec.name, results, spec.eval_steps())
    written = write_report(report, results, spec.output_dir)
    print(markdown(report))
    print(f"report: {written[0]} (+ report.json and figures)", file=sys.stderr)
    return 0
