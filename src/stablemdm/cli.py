"""The `stablemdm` command line: train, eval, generate, fit-t, variance, study, demo, lm-eval.

Each verb is a thin layer over the library; errors in user input end the command with one
clear line (exit status 2), never a traceback (`stablemdm --debug VERB ...` shows it).
Commands that write refuse to replace an existing output unless `--overwrite` is given
(`outputs`); see docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .training.config import StableMDMConfig
from .training.outputs import (
    check_output_file,
    config_inputs,
    make_room,
    write_failure,
    write_text,
)
from .training.recipe import field_help, load_config, parse_override
from .training.remote_code import add_trust_remote_code, allow_remote_code

DESCRIPTION = "stablemdm: train masked diffusion language models with low gradient variance."


def _train_epilog() -> str:
    rows = [f"  {name} (default {default})\n      {help_}" for name, default, help_ in field_help()]
    return (
        "Config fields (set them in the YAML recipe or as key=value; any other\n"
        "transformers.TrainingArguments field works too):\n" + "\n".join(rows)
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (NaN and infinity refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} if it exists (never a file the command reads)",
    )


def _add_train(verbs: Any) -> None:
    """`stablemdm train`: a recipe, overrides and --resume."""
    train = verbs.add_parser(
        "train",
        help="train an MDM or ARM from a recipe",
        description="Train from a YAML recipe with key=value overrides; the resolved config "
        "is written to <output_dir>/config.yaml, so `stablemdm train --config "
        "<output_dir>/config.yaml` re-runs it (add --trust-remote-code for a model that ships "
        "its own code: a saved config cannot allow that). For several processes: `torchrun "
        "--nproc_per_node N -m stablemdm.cli train ...` (CPU or GPU), or `accelerate launch "
        "--config_file configs/accelerate/{ddp_gpu,fsdp,deepspeed_zero2}.yaml -m stablemdm.cli "
        "train ...` on GPUs.",
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="flat YAML recipe (see recipes/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue a stopped run: the latest checkpoint in output_dir, or the folder given",
    )
    add_trust_remote_code(train)


def _add_decoding_options(p: argparse.ArgumentParser) -> None:
    """The decoding options `eval` and `generate` share."""
    p.add_argument(
        "--gen-length",
        type=positive_int,
        help="response canvas length (default: the run's, or the task's for another task)",
    )
    p.add_argument(
        "--steps", type=positive_int, help="MDM decoding iterations (default: gen-length)"
    )
    p.add_argument(
        "--block-length",
        type=positive_int,
        help="MDM semi-autoregressive block (default: 32 or less; a block-diffusion model "
        "decodes in its own block_size)",
    )
    p.add_argument(
        "--remasking",
        default="low_confidence",
        choices=["low_confidence", "random"],
        help="which predictions the MDM keeps each iteration",
    )
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        help="0 = greedy (default: the task's; image tasks sample at 1, text is greedy)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and random remasking")
    p.add_argument(
        "--no-kv-cache",
        dest="kv_cache",
        action="store_false",
        help="a block-diffusion model: run the whole canvas block-causally at every call instead "
        "of block by block over a KV cache (the same tokens greedily; slower)",
    )
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts decoded together")
    add_trust_remote_code(p)


def _add_eval(verbs: Any) -> None:
    """`stablemdm eval`: decode a task split with a saved model and score it."""
    ev = verbs.add_parser(
        "eval",
        help="decode a task split with a checkpoint and score it",
        description="Decode every item of a task split with a saved model and score it with "
        "the task's checker; prints the accuracy and writes one JSONL record per item.",
    )
    ev.add_argument("checkpoint", help="a run's output folder or checkpoint-N folder")
    ev.add_argument(
        "--task", help="task name (default: the task the run trained on, from its config.yaml)"
    )
    ev.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="key=value",
        help="task option, e.g. n_test=100 (repeatable); each replaces one of the run's "
        "task_options (used when the task is the run's)",
    )
    ev.add_argument("--split", default="test", choices=["train", "test"], help="which split")
    ev.add_argument("--limit", type=positive_int, help="score only the first N items")
    ev.add_argument(
        "--output",
        help="JSONL of per-item records (default: <checkpoint>/eval-<task>-<split>.jsonl)",
    )
    _add_overwrite(ev, "the records file")
    _add_decoding_options(ev)


def _add_generate(verbs: Any) -> None:
    """`stablemdm generate`: decode the user's prompts."""
    gen = verbs.add_parser(
        "generate",
        help="decode prompts with a checkpoint",
        description="Decode prompts given with --prompt or in a file (one per line, or JSONL "
        "with a 'prompt' field) and print one response per line.",
    )
    gen.add_argument("checkpoint", help="a run's output folder or checkpoint-N folder")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--file", help="prompts file: .txt (one per line) or .jsonl ('prompt' field)")
    gen.add_argument(
        "--png",
        metavar="PATH",
        help="an image run (text-to-image): also draw the generated images as a PNG grid, "
        "one row per distinct prompt",
    )
    _add_overwrite(gen, "the --png file")
    _add_decoding_options(gen)


def _add_fit(verbs: Any) -> None:
    """`stablemdm fit-t`: fit the P-POTS density once, for reuse."""
    fit = verbs.add_parser(
        "fit-t",
        help="estimate S(t) and fit the P-POTS density once, for reuse",
        description="Estimate S(t) = E[l^2 | t] on a grid of rates for the configured model "
        "(init_from, or a fresh initialisation) and task, fit the P-POTS density and write it "
        "as JSON; pass it to later runs with sampler=ppots ppots_file=PATH.",
    )
    fit.add_argument("--config", help="flat YAML recipe")
    fit.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    fit.add_argument("--output", required=True, help="where to write the density (JSON)")
    _add_overwrite(fit, "the density file")
    add_trust_remote_code(fit)


def _add_lm_eval(verbs: Any) -> None:
    """`stablemdm lm-eval ARGS`: everything after the verb goes to lm-eval's command line
    (`main` splits it off before parsing), so the verb itself takes no options."""
    verbs.add_parser(
        "lm-eval",
        add_help=False,
        help="evaluate a run with lm-eval: stablemdm lm-eval --model stablemdm --model_args "
        "run=RUN --tasks ... (needs stablemdm[lm-eval])",
    )


def _parser() -> argparse.ArgumentParser:
    """The CLI: one small function per verb adds its subcommand."""
    from .study.command import add_parsers as add_study_parsers
    from .variance.command import add_parser as add_variance_parser

    parser = _Parser(prog="stablemdm", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in (_add_train, _add_eval, _add_generate, _add_fit, add_variance_parser, _add_lm_eval):
        add(verbs)
    add_study_parsers(verbs)
    for verb in verbs.choices.values():  # `--debug` also after the verb
        verb.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback of an error",
        )
    return parser


def _decoding_kwargs(args: argparse.Namespace) -> dict:
    return {
        "gen_length": args.gen_length,
        "steps": args.steps,
        "block_length": args.block_length,
        "remasking": args.remasking,
        "temperature": args.temperature,
        "kv_cache": args.kv_cache,
    }


def _preflight(config: StableMDMConfig, resume: bool) -> None:
    """Inputs `train` reads only once output_dir exists, checked before it is created: the
    density file and, for the built-in model, the ISAD tokens."""
    from .data.tokenizer import CharTokenizer
    from .training.build import load_density

    if config.ppots_file and not resume:  # a resumed run reads its checkpoint's density
        load_density(config.ppots_file)
    if config.model is None:
        for text in config.isad_tokens:
            CharTokenizer().token_id(text, where="isad_tokens")


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.run import train

    resume, overrides = args.resume, args.overrides
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        resume, overrides = True, [resume, *overrides]  # `--resume key=value`: an override
    config = load_config(args.config, overrides)
    allow_remote_code(config, args.config, overrides, args.trust_remote_code)
    _preflight(config, bool(resume))
    result = train(config, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        done = "trained to" if result.trained else "already trained to"
        print(
            f"{done} step {result.global_step}; model, tokenizer and config in {result.output_dir}"
        )
    return 0


def _task_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The task `eval` scores: `--task`, else the one the run trained on (its config.yaml),
    with the run's task_options when it is the run's task, each `--task-option` replacing
    one."""
    from .training.saved import run_task_options, saved_run_config

    if not Path(args.checkpoint).is_dir():
        raise ConfigError(f"checkpoint folder {args.checkpoint} does not exist")
    name = args.task or saved_run_config(args.checkpoint).get("task")
    if name is None:
        raise ConfigError(
            f"no --task given, and {args.checkpoint} has no config.yaml naming the task it was "
            "trained on; pass --task NAME"
        )
    given = dict(parse_override(o) for o in args.task_option)
    return name, run_task_options(args.checkpoint, name, given)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.scoring import evaluate
    from .tasks.registry import get_task
    from .tasks.text import TextTask
    from .training.datasets import decode_length
    from .training.saved import load_checkpoint, objective_of

    name, options = _task_of(args)
    output = args.output or str(Path(args.checkpoint) / f"eval-{name}-{args.split}.jsonl")
    data = [v for v in options.values() if isinstance(v, str)]
    check_output_file(
        output,
        overwrite=args.overwrite,
        inputs=data,
        reads=[args.checkpoint, *(d for d in data if Path(d).is_dir())],
        allowed_in_reads="eval-*.jsonl",
    )
    model, tokenizer = load_checkpoint(args.checkpoint, args.trust_remote_code)
    task = get_task(name, **options)
    objective = objective_of(model)
    if isinstance(task, TextTask):  # no answers to score: bits per token
        return _eval_text(args, model, tokenizer, task, output)
    if args.gen_length is None:
        args.gen_length = decode_length(task, tokenizer, args.checkpoint)
    start = time.perf_counter()
    result = evaluate(
        model,
        tokenizer,
        task,
        args.split,
        objective=objective,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        output_path=output,
        **_decoding_kwargs(args),
    )
    print(
        json.dumps(
            {
                "task": name,
                "split": args.split,
                "objective": objective,
                "accuracy": result.accuracy,
                **result.metrics,
                "n": result.n,
                "n_correct": result.n_correct,
                "records": output,
                **({"grid": str(result.grid)} if result.grid else {}),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )
    return 0


def _eval_text(args: argparse.Namespace, model: Any, tokenizer: Any, task: Any, output: str) -> int:
    """`eval` of raw text (task 'text'): no answer to decode and score, so the held-out ELBO
    in bits per token with its standard error (`evaluation.perplexity`), printed and written
    to `output` as one record."""
    from dataclasses import asdict

    from .data import write_jsonl
    from .evaluation.perplexity import heldout_bits

    print(
        "stablemdm eval: raw text has no answers to decode and score (no accuracy): reporting "
        "the held-out ELBO in bits per token",
        file=sys.stderr,
    )
    start = time.perf_counter()
    rows = task.rows(args.split, tokenizer, args.limit)
    bits = heldout_bits(model, rows, seed=args.seed)
    record = {"task": "text", "split": args.split, **asdict(bits)}
    write_jsonl(output, [record])
    seconds = round(time.perf_counter() - start, 1)
    print(json.dumps({**record, "records": output, "seconds": seconds}))
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise ConfigError(f"prompts file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"prompts file {path} is not UTF-8 text (byte {err.start})") from None
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, RecursionError, KeyError, TypeError) as err:
                    raise ConfigError(
                        f"{path}:{n}: expected a JSON object with a 'prompt' field"
                    ) from err
            else:
                prompts.append(line.rstrip("\r"))
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT or --file PATH")
    return prompts


def _room(
    model: Any, ids: list[list[int]], saved: dict, args: argparse.Namespace, causal: bool
) -> tuple[int, int | None]:
    """(gen_length, the ARM's context) for `generate`: --gen-length, else the run's. An MDM's
    canvas must fit the length it was trained on; an ARM generates past it on a window of
    its latest tokens (`generate_arm`), so only each prompt must fit its context."""
    from .models.hf import max_positions

    positions = (max_positions(model) or (None,))[0]
    limit = saved.get("max_length") or positions
    gen_length = args.gen_length or saved.get("gen_length")
    if gen_length is None:
        gen_length = max(8, (limit or 0) - max(map(len, ids)))
    if causal:
        context = positions
        too_long = [i + 1 for i, x in enumerate(ids) if context and len(x) > context]
        if too_long:
            raise ConfigError(
                f"prompt(s) {too_long} are longer than the {context} positions the model "
                "attends to; shorten them"
            )
        return gen_length, context
    too_long = [i + 1 for i, x in enumerate(ids) if limit and len(x) + gen_length > limit]
    if too_long:
        raise ConfigError(
            f"prompt(s) {too_long} plus gen-length {gen_length} exceed the {limit} tokens the "
            "model was trained on; shorten them or lower --gen-length"
        )
    return gen_length, None


def _cmd_generate(args: argparse.Namespace) -> int:
    from .data import Example
    from .evaluation.decoding import generate
    from .training.saved import load_checkpoint, objective_of, saved_run_config

    model, tokenizer = load_checkpoint(args.checkpoint, args.trust_remote_code)
    prompts = _read_prompts(args)
    task = _image_task(args.checkpoint, tokenizer)
    png = _png_output(args, task)
    ids = [
        tokenizer.encode_prompt(Example(p, "", "", source=f"prompt {i + 1}"))
        for i, p in enumerate(prompts)
    ]
    objective = objective_of(model)
    causal = objective == "arm"
    gen_length, context = _room(model, ids, saved_run_config(args.checkpoint), args, causal)
    options = _generation_options(args, tokenizer, task, objective, gen_length, context)
    texts = []
    for start in range(0, len(ids), args.batch_size):
        out = generate(model, ids[start : start + args.batch_size], **options)
        for tokens in out:
            texts.append(tokenizer.decode(tokens))
            print(texts[-1])
    if png is not None:
        _save_png(png, task, prompts, texts)
    return 0


def _generation_options(
    args: argparse.Namespace,
    tokenizer: Any,
    task: Any,
    objective: str,
    gen_length: int,
    context: int | None,
) -> dict[str, Any]:
    """`generate`'s keyword arguments for an ARM (on a window of `context` tokens), an MDM or
    a block-diffusion model (its own blocks by default), with an image task's canvas
    constraint and sampling temperature by default."""
    import torch

    temperature = args.temperature
    if temperature is None:
        temperature = getattr(task, "temperature", 0.0)
    common = {
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "temperature": temperature,
        "generator": torch.Generator().manual_seed(args.seed),
        "canvas_tokens": task.canvas_tokens(tokenizer) if task is not None else None,
    }
    if objective == "arm":
        arm = {"max_new_tokens": gen_length, "context_length": context}
        return {"objective": "arm", **arm, **common}
    full = objective == "mdm"  # a block model's defaults are generate_block's
    return {
        "objective": objective,
        "mask_token_id": tokenizer.mask_token_id,
        "gen_length": gen_length,
        "steps": args.steps or (gen_length if full else None),
        "block_length": args.block_length or (gen_length if full else None),
        "remasking": args.remasking,
        **({} if full else {"kv_cache": args.kv_cache}),
        **common,
    }


def _image_task(checkpoint: str, tokenizer: Any) -> Any:
    """The text-to-image task of an image run (its tokenizer carries a codebook), built from
    its config.yaml (its canvas constraint and sampling temperature decode `generate`'s
    prompts as `eval` decodes the task's), or None."""
    from .data.image_tokens import ImageTokenizer
    from .tasks.registry import get_task
    from .training.saved import run_task_options, saved_run_config

    name = saved_run_config(checkpoint).get("task")
    if not isinstance(tokenizer, ImageTokenizer) or name is None:
        return None
    task = get_task(name, **run_task_options(checkpoint, name))
    task.tokenizer_for(tokenizer)  # the run's codebook is the task's
    return task


def _png_output(args: argparse.Namespace, task: Any) -> Path | None:
    """`generate --png`: the checked PNG path, refused before decoding unless the run is an
    image run."""
    if args.png is None:
        return None
    if task is None:
        raise ConfigError(
            f"--png draws the images of a text-to-image run; {args.checkpoint} is not one (no "
            "codebook.json, or no config.yaml naming its task)"
        )
    return check_output_file(
        args.png, overwrite=args.overwrite, reads=[args.checkpoint], flag="--png"
    )


def _save_png(path: Path, task: Any, prompts: list[str], texts: list[str]) -> None:
    """The images `texts` spell, one row per distinct prompt (positions without an image
    token blank), written to `path`."""
    import numpy as np

    from .evaluation.image_scoring import save_grid

    rows = list(dict.fromkeys(prompts))
    labels = np.asarray([rows.index(p) for p in prompts])
    images = np.stack([task.image_of(text) for text in texts])
    save_grid(images, labels, rows, path, per_class=max(np.bincount(labels)))
    print(f"stablemdm: {len(texts)} images drawn in {path}", file=sys.stderr)


def _cmd_fit(args: argparse.Namespace) -> int:
    from .estimators.ppots_fit import describe_fit
    from .tasks.registry import get_task
    from .training.build import build_model, fit_density

    config = load_config(args.config, [*args.overrides, "sampler=ppots"])
    allow_remote_code(config, args.config, args.overrides, args.trust_remote_code)
    files, folders = config_inputs(config, args.config)
    out = check_output_file(args.output, overwrite=args.overwrite, inputs=files, reads=folders)
    task = get_task(config.task, **config.task_options)
    model, tokenizer, canvas = build_model(config, task)
    start = time.perf_counter()
    density = fit_density(config, model, task, tokenizer, canvas)
    write_text(out, json.dumps(density.to_dict(), indent=1))
    print(f"{describe_fit(density)}; written to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_variance(args: argparse.Namespace) -> int:
    from .variance.command import run_cli

    return run_cli(args)


def _cmd_study(args: argparse.Namespace) -> int:
    from .study.command import run_cli

    return run_cli(args)


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from .lmeval.command import run_lm_eval

    return run_lm_eval(args.lm_eval_args)


def _split_lm_eval(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """(stablemdm's own arguments, lm-eval's) of `stablemdm [--debug] lm-eval ARGS`; lm-eval's
    are None for any other verb."""
    verb = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if verb is None or argv[verb] != "lm-eval":
        return argv, None
    return argv[: verb + 1], argv[verb + 1 :]


COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "generate": _cmd_generate,
    "fit-t": _cmd_fit,
    "study": _cmd_study,
    "demo": _cmd_study,
    "variance": _cmd_variance,
    "lm-eval": _cmd_lm_eval,
}


def one_line(message: str, limit: int = 1000) -> str:
    """A message on one line: its lines joined with '; ', shortened to `limit` characters."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text = f"{text.rstrip(':')}: {'; '.join(lines[1:])}"
    return textwrap.shorten(text, limit, placeholder=" [...]")


def describe_error(err: BaseException, verb: str) -> str | None:
    """The one-line message of a user error (bad input, a missing or corrupted file, a
    full disk), or None for anything else (a bug: it keeps its traceback)."""
    cause = None if isinstance(err, ConfigError) else write_failure(err)  # ours names more
    if cause is not None:
        again = (
            "re-run with --resume (the last complete checkpoint is kept)"
            if verb == "train"
            else "run the command again"
        )
        name = getattr(err, "filename", None)
        where = f" while writing {name}" if name else ""
        return f"{cause}{where}; {make_room(cause)}, then {again}"
    if isinstance(err, yaml.YAMLError):
        from .training.recipe import describe_yaml_error

        return f"not valid YAML: {describe_yaml_error(err)}"
    if isinstance(err, OSError) and err.filename:
        return f"{err.strerror or err}: {err.filename}"
    if isinstance(err, (ConfigError, ValueError, FileNotFoundError, FloatingPointError)):
        return str(err) or type(err).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `stablemdm` console command."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not sys.stderr.isatty():  # weight-loading and dataset bars only clutter a log
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    parser = _parser()
    argv, lm_eval_args = _split_lm_eval(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = parser.parse_known_args(argv)
        args.lm_eval_args = lm_eval_args
    except SystemExit as exit_:  # a one-line usage error: exit status 2, as a return value
        if exit_.code in (0, None):  # --help
            raise
        return exit_.code if isinstance(exit_.code, int) else 2
    stray = [
        e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")
    ]
    if stray:
        print(
            f"stablemdm {args.verb}: error: unrecognized arguments: {' '.join(stray)} "
            f"(see stablemdm {args.verb} --help)",
            file=sys.stderr,
        )
        return 2
    if extra:  # key=value overrides given after an option: argparse leaves them over
        args.overrides = [*args.overrides, *extra]
    try:
        return COMMANDS[args.verb](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"stablemdm {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = describe_error(err, args.verb)
        if message is None or args.debug:
            raise
        print(f"stablemdm {args.verb}: error: {one_line(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
