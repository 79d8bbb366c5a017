"""The `stablemdm variance` command: its options and entry point."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ConfigError
from ..estimators.registry import DEFAULT_METHODS, METHODS
from ..training.config import StableMDMConfig
from ..training.outputs import check_output_folder, config_inputs
from ..training.recipe import load_config, parse_override
from ..training.saved import run_task_options, saved_run_config
from .inputs import VarianceOptions
from .measure import DEFAULT_PROJECTION, FULL_GRADIENT_MAX, Design
from .output import TERMINAL_WIDTH, print_report, write_report
from .report import run_variance


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `variance` verb on the main parser's subparsers."""
    parser = subparsers.add_parser(
        "variance",
        help="decompose a model's training noise into A/B/C and compare estimators",
        description="Measure, for the configured model (or --checkpoint) and task: (1) the "
        "variance of one draw of the per-sequence loss and gradient split into A (mask), "
        "B (rate) and C (data) for each method and for the ARM, (2) the variance of the "
        "minibatch estimate at equal compute, against Standard and the data-noise floor, "
        "(3) per-rate curves g, v, S and the P-POTS fit. Writes variance.json, variance.md "
        "and PNG plots to --output. See docs/variance.md.",
    )
    parser.add_argument(
        "--config", metavar="RECIPE", help="flat YAML recipe (task, model, eps, mix, ...)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a run's output folder or checkpoint-N folder, measured on the run's task, "
        "task_options and lengths (its config.yaml) unless --config is given; default: the "
        "config's model (init_from, else a seeded fresh initialisation)",
    )
    parser.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="key=value",
        help="with --checkpoint and no --config: replace one of the run's task_options, e.g. "
        "train=data/train.jsonl (repeatable)",
    )
    parser.add_argument(
        "--methods",
        metavar="LIST",
        default=",".join(DEFAULT_METHODS),
        help=f"comma list of methods (default: %(default)s; known: {', '.join(METHODS)}); "
        "standard is always added",
    )
    _add_sizes(parser)
    _add_gradient_and_outputs(parser)
    return parser


def _add_sizes(parser: argparse.ArgumentParser) -> None:
    """The integer sizes of the three measurements, defaulting to `VarianceOptions`'."""
    d = VarianceOptions()
    integers = (
        ("--sequences", d.loss_design.sequences, "loss design: sequences I"),
        ("--rates", d.loss_design.rates, "loss design: rates J per sequence"),
        ("--masks", d.loss_design.masks, "loss design: masks K per rate"),
        ("--grad-sequences", d.grad_design.sequences, "gradient design: sequences"),
        ("--grad-rates", d.grad_design.rates, "gradient design: rates per sequence"),
        ("--grad-masks", d.grad_design.masks, "gradient design: masks per rate (a backward each)"),
        ("--draws", d.draws, "comparison: independent minibatches per method"),
        ("--batch", d.batch, "comparison: sequences per minibatch n"),
        ("--bootstrap", d.bootstrap, "bootstrap resamples flagging unstable A/B/C, 0 = off"),
        ("--grid", d.grid, "per-rate curves: midpoints of t"),
        ("--grid-sequences", d.grid_sequences, "per-rate curves: sequences"),
        ("--grid-masks", d.grid_masks, "per-rate curves: masks per (sequence, t)"),
        ("--ema-warmup", d.ema_warmup, "draws the EMA sampler observes before it is frozen"),
    )
    for flag, default, help_ in integers:
        parser.add_argument(
            flag, type=int, default=default, metavar="N", help=f"{help_} (default {default})"
        )


def _add_gradient_and_outputs(parser: argparse.ArgumentParser) -> None:
    """Which gradient is measured, the ARM reference, and where the report goes."""
    parser.add_argument(
        "--params",
        metavar="REGEX",
        help="gradient of the parameters whose names match REGEX (re.search), e.g. 'lm_head'; "
        f"default all, projected to {DEFAULT_PROJECTION} dims above {FULL_GRADIENT_MAX} "
        "coordinates",
    )
    parser.add_argument(
        "--project",
        type=int,
        metavar="P",
        help="project the gradient onto P seeded Gaussian directions (traces stay unbiased)",
    )
    parser.add_argument(
        "--arm-checkpoint",
        metavar="DIR",
        help="a trained ARM of the same size for the reference C (default: the model's own "
        "weights with causal attention, a like-for-like baseline only at initialisation)",
    )
    parser.add_argument(
        "--output",
        default="runs/variance",
        metavar="DIR",
        help="report folder (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, help="seed of every draw and of a fresh model (default: the config's)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a --output folder that already holds files (replacing an earlier "
        "report there)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the code a Hugging Face model ships (its auto_map); only for a model you "
        "trust: a trust_remote_code in a config file is never used",
    )


def options_from_args(args: argparse.Namespace) -> VarianceOptions:
    """The `VarianceOptions` the command-line arguments describe."""
    return VarianceOptions(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        loss_design=Design(args.sequences, args.rates, args.masks),
        grad_design=Design(args.grad_sequences, args.grad_rates, args.grad_masks),
        draws=args.draws,
        batch=args.batch,
        params=args.params,
        project=args.project,
        bootstrap=args.bootstrap,
        grid=args.grid,
        grid_sequences=args.grid_sequences,
        grid_masks=args.grid_masks,
        ema_warmup=args.ema_warmup,
    )


# what a run's config.yaml says about the data and loss it trained on, besides its task
RUN_FIELDS = ("max_length", "gen_length", "eos_fill", "loss_normalizer", "normalizer_length")


def run_settings(checkpoint: str, overrides: list[str], task_options: list[str]) -> dict:
    """The config values of the run in `checkpoint` that `variance` measures it with when no
    --config is given: its task, its task_options (each of `task_options` replacing one) and
    RUN_FIELDS, as `eval` reads them (a `task=` override naming another task keeps none), and
    a block run's objective and block_size, so that it is measured as it trained."""
    saved = saved_run_config(checkpoint)
    if not saved:
        if task_options:
            raise ConfigError(f"--task-option: {checkpoint} has no config.yaml (no run's options)")
        print(
            f"stablemdm: warning: {checkpoint} has no config.yaml naming the task it was trained "
            "on: measuring on the config's task (set task=NAME or --config)",
            file=sys.stderr,
        )
        return {}
    given = dict(parse_override(o) for o in overrides)
    task = given.get("task", saved.get("task"))
    values = {k: saved[k] for k in RUN_FIELDS if k in saved} if task == saved.get("task") else {}
    if "task_options" not in given:
        values["task_options"] = run_task_options(
            checkpoint, task, dict(parse_override(o) for o in task_options)
        )
    if saved.get("objective") == "block":
        values |= {"objective": "block", "block_size": saved.get("block_size")}
    return {**values, "task": task}


def base_config(args: argparse.Namespace) -> StableMDMConfig:
    """The config every method shares: --config (a recipe), else the run of --checkpoint
    (`run_settings`), with the key=value overrides and --seed on top."""
    overrides = [*args.overrides, *([f"seed={args.seed}"] if args.seed is not None else [])]
    if args.task_option and (args.checkpoint is None or args.config is not None):
        raise ConfigError(
            "--task-option replaces one of a run's task_options: it needs --checkpoint RUN "
            "and no --config (with --config, set task_options={...})"
        )
    base = {}
    if args.checkpoint is not None and args.config is None:
        base = run_settings(args.checkpoint, overrides, args.task_option)
    source = f"{args.checkpoint}/config.yaml"
    return load_config(args.config, overrides, allow_unused=True, base=base, base_source=source)


def run_cli(args: argparse.Namespace) -> int:
    """`stablemdm variance`: run, print the tables, write the report; returns the exit code."""
    from rich.console import Console

    options = options_from_args(args)
    config = base_config(args)
    if config.trust_remote_code and not args.trust_remote_code:
        raise ConfigError(
            "stablemdm variance runs a model's own code only with --trust-remote-code on its "
            "command line, never because a config says trust_remote_code=true: pass the flag if "
            "you trust the model, or remove trust_remote_code from the config (nothing was run)"
        )
    config.trust_remote_code = args.trust_remote_code
    folders = config_inputs(config, args.config)[1]
    reads = [args.checkpoint, args.arm_checkpoint, *folders]
    check_output_folder(args.output, overwrite=args.overwrite, reads=reads)
    console = Console() if sys.stdout.isatty() else Console(width=TERMINAL_WIDTH)
    report = run_variance(
        config,
        options,
        args.checkpoint,
        log=lambda m: console.log(m),
        arm_checkpoint=args.arm_checkpoint,
    )
    print_report(report, console)
    paths = write_report(report, args.output)
    console.print(f"report in {paths[0].parent} ({report['timing_s']['total']:.0f} s)")
    return 0
