"""Decoding speed at measured quality on trained runs (issue 25, item 4): a block-diffusion
model over its KV cache against today's full-canvas semi-AR decoding of an MDM.

Each run folder (a saved run: config.yaml names its task and task_options) is loaded as
`stablemdm eval` loads it and decodes the first `--limit` problems of its task's test split
through `evaluation.scoring.evaluate` (the task's own prompts and checker), greedy, one
token unmasked per model call, at each `--gen-lengths` canvas:

- MDM (objective mdm): semi-AR over the whole canvas of gen_length masks, blocks of
  `default_block_length` (32), one call per token; it stops after the first block in which
  every row of the batch has written `<eos>` (as `eval` does);
- block model: `generate_block` over the KV cache (each block denoised over its own
  positions, one call per token, plus one call to cache the finished block; a row leaves the
  batch at its block with `<eos>`), and uncached (every call runs the whole canvas
  block-causally; stops like the MDM);
- ARM: one call per new token over the prefix, until every row has written `<eos>`.

The study's models were trained on 34 positions; their RoPE tables are widened to the
trained length plus the canvas (`widened`): RoPE has no learnt parameter, so the weights are
the same, and what each model does at positions it never saw is part of what is measured.

Per row: accuracy with its binomial standard error, output tokens (before `<eos>`) and
sequences per wall second, wall and process CPU seconds of decoding, the speed-up as the
baseline MDM's wall (and CPU) time over the row's, and whether the accuracy equals the
baseline's within two standard errors of the difference. The baseline of a row is the MDM
run listed last before it at its gen_length. Run on one thread:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/block_decoding.py \
        --study runs/study-blocks/mini_sudoku --seed 42

`--gen-lengths own` decodes each run folder (or checkpoint-N folder) given at the canvas it
trained on (its config.yaml's gen_length), against the MDM of that canvas listed before it:
runs trained for the canvas they decode (docs/methods.md, the same-quality table):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/block_decoding.py --gen-lengths own \
        runs/decode-speed/mini_sudoku-64/standard/seed-42 \
        runs/decode-speed/mini_sudoku-64/block4_standard/seed-42
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from stablemdm.evaluation.scoring import evaluate
from stablemdm.models import Transformer
from stablemdm.tasks.registry import get_task
from stablemdm.training.saved import (
    load_checkpoint,
    objective_of,
    run_task_options,
    saved_run_config,
)

METHODS = ("standard", "block4_standard", "block8_standard", "arm")
MDM = "MDM semi-AR (full canvas)"
DECODERS = {
    "mdm": {MDM: {}},
    "block": {"block, KV cache": {"kv_cache": True}, "block, no cache": {"kv_cache": False}},
    "arm": {"ARM": {}},
}


def widened(model: torch.nn.Module, canvas: int) -> torch.nn.Module:
    """A built-in transformer with the same weights and RoPE tables for `canvas` positions
    more than it was built with (RoPE is a fixed function of the position: only its tables
    depend on the length); any other model as it is."""
    if not isinstance(model, Transformer) or canvas < 1:
        return model
    length = model.config.max_seq_len + canvas
    wide = Transformer(dataclasses.replace(model.config, max_seq_len=length))
    wide.load_state_dict(model.state_dict())
    return wide.eval()


def measure(folder: Path, gen_length: int, limit: int, batch_size: int) -> list[dict]:
    """One row per decoder of the run in `folder` (its objective's), decoding its task's
    test split at `gen_length`; `outputs` holds each row's decoded texts."""
    saved = saved_run_config(folder)
    task = get_task(saved["task"], **run_task_options(folder, saved["task"]))
    model, tokenizer = load_checkpoint(folder)
    objective = objective_of(model)
    model = widened(model, gen_length)
    rows = []
    for decoder, options in DECODERS[objective].items():
        result = evaluate(
            model, tokenizer, task, "test", objective=objective, limit=limit,
            batch_size=batch_size, gen_length=gen_length, **options,
        )  # fmt: skip
        wall = result.decode_seconds
        rows.append(
            dict(
                run=run_name(folder),
                decoder=decoder,
                gen_length=gen_length,
                n=result.n,
                accuracy=result.accuracy,
                se=standard_error(result.accuracy, result.n),
                tokens_per_s=result.output_tokens / wall,
                sequences_per_s=result.n / wall,
                wall=wall,
                cpu=result.decode_cpu_seconds,
                outputs=[r["output"] for r in result.records],
            )  # fmt: skip
        )
    return rows


def run_name(folder: Path) -> str:
    """A study run's method (`METHOD/seed-N`), else the folder's name; a checkpoint's is its
    run's and step (`METHOD@STEP`)."""
    if folder.name.startswith("checkpoint-"):
        return f"{run_name(folder.parent)}@{folder.name.removeprefix('checkpoint-')}"
    return folder.parent.name if folder.name.startswith("seed-") else folder.name


def standard_error(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy over `n` items."""
    return math.sqrt(accuracy * (1 - accuracy) / n)


def compare(rows: list[dict]) -> None:
    """Add, in place, each row's speed-up over the MDM row last before it at its gen_length
    (an MDM's over itself) and whether their accuracies agree within two standard errors of
    the difference: listing an MDM run before the runs it is the baseline of."""
    bases: dict[int, dict] = {}
    for r in rows:
        if r["decoder"] == MDM:
            bases[r["gen_length"]] = r
        base = bases.get(r["gen_length"])
        if base is None:
            raise SystemExit("block_decoding: give a full-canvas MDM run before the runs")
        r["speedup"] = base["wall"] / r["wall"]
        r["cpu_speedup"] = base["cpu"] / r["cpu"]
        r["z"] = z_score(r["accuracy"] - base["accuracy"], math.hypot(r["se"], base["se"]))
        r["same_quality"] = abs(r["z"]) <= 2


def z_score(difference: float, se: float) -> float:
    """A difference in standard errors (infinite when it is certain: both SEs zero)."""
    if se > 0:
        return difference / se
    return math.copysign(math.inf, difference) if difference else 0.0


def cache_identical(rows: list[dict]) -> dict[tuple[str, int], bool]:
    """For each block run and gen_length, whether its cached and uncached decoders wrote the
    same outputs for every problem."""
    found: dict[tuple[str, int], list] = {}
    for r in rows:
        if r["decoder"].startswith("block"):
            found.setdefault((r["run"], r["gen_length"]), []).append(r["outputs"])
    return {key: all(o == outs[0] for o in outs) for key, outs in found.items()}


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| gen_length | run | decoder | accuracy ± SE | same as MDM (z) | output tokens/s "
        "| sequences/s | wall s | CPU s | speed-up vs MDM, wall (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        same = f"{'yes' if r['same_quality'] else 'no'} ({r['z']:+.1f})"
        cells = [
            r["gen_length"], r["run"], r["decoder"], f"{r['accuracy']:.3f} ± {r['se']:.3f}",
            same, f"{r['tokens_per_s']:,.0f}", f"{r['sequences_per_s']:.1f}",
            f"{r['wall']:.2f}", f"{r['cpu']:.2f}", f"{r['speedup']:.1f}x ({r['cpu_speedup']:.1f}x)",
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def plan(folders: list[Path], gen_lengths: list[int] | None) -> list[tuple[Path, int]]:
    """(run folder, gen_length) pairs: every run at every gen_length, or with None each run at
    the canvas it trained on (its config.yaml's gen_length), shortest canvas first."""
    if gen_lengths is not None:
        return [(f, g) for g in gen_lengths for f in folders]
    own = [(f, saved_run_config(f)["gen_length"]) for f in folders]
    return sorted(own, key=lambda pair: pair[1])


def run(
    folders: list[Path], gen_lengths: list[int] | None, limit: int, batch_size: int
) -> list[dict]:
    """Every run's rows at every gen_length (None: each at its own trained canvas), compared
    with their baseline MDM's; prints the table and the cached-against-uncached check."""
    rows = [r for f, g in plan(folders, gen_lengths) for r in measure(f, g, limit, batch_size)]
    compare(rows)
    print(table(rows))
    for (name, g), same in cache_identical(rows).items():
        print(f"{name}, gen_length {g}: cached and uncached outputs identical: {same}")
    return rows


def folders_of(args: argparse.Namespace) -> list[Path]:
    """The run folders: those given, else `--methods` of `--study` at `--seed`; the first
    must be an MDM's (the baseline of those after it)."""
    if args.runs:
        return [Path(f) for f in args.runs]
    if args.study is None:
        raise SystemExit("block_decoding: give run folders, or --study DIR with --seed")
    return [Path(args.study) / m / f"seed-{args.seed}" for m in args.methods.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run folders, each MDM before those it baselines")
    parser.add_argument("--study", help="a study's task folder, e.g. runs/study-blocks/mini_sudoku")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--gen-lengths", default="64,256", help="comma-separated, or 'own': each run's own canvas"
    )
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    own = args.gen_lengths == "own"
    lengths = None if own else [int(g) for g in args.gen_lengths.split(",")]
    print(f"{args.limit} test problems, batches of {args.batch_size}, greedy, 1 thread")
    run(folders_of(args), lengths, args.limit, args.batch_size)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
