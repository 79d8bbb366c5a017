"""The likelihood estimators on a multiple-choice task (issue 26, item 3): per estimator, the
forward passes per question to reach a fixed standard error of the gap between the two best
choices, the accuracy's spread over Monte Carlo seeds at a fixed budget (LLaDA's 128 passes
per choice), and agreement with the exact answer (`exact_elbo`, every mask pattern).

The task: next-word questions cut from the held-out fables (data/corpus): the context is a
document up to a word, the choices are the next word and two other words of the corpus.
The model: a run given with `--run`, else a small MDM trained here on the fables' training
share for `--steps` steps.

    .venv/bin/python benchmarks/likelihood.py [--questions 300] [--seeds 5] [--run RUN]

Prints one JSON line per estimator and a markdown table (docs/likelihood.md, "Measured").
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch

from stablemdm.likelihood import ESTIMATORS, Budget, exact_elbo, loglikelihood_choices
from stablemdm.rng import seeded_generator
from stablemdm.tasks.registry import get_task
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train
from stablemdm.training.saved import load_checkpoint

CORPUS = Path(__file__).parents[1] / "data" / "corpus" / "fables.txt"
MAX_LENGTH = 64
EXACT_MAX = 10  # continuations this long or shorter are enumerated (2^L - 1 passes)


def trained_run(folder: Path, steps: int) -> Path:
    """A small MDM trained on the fables (count mode with MIRROR)."""
    options = {"train": str(CORPUS), "max_length": MAX_LENGTH}
    overrides = [
        "task=text",
        "task_options=" + json.dumps(options),
        "d_model=64",
        "n_layers=2",
        "n_heads=4",
        "per_device_train_batch_size=16",
        f"max_steps={steps}",
        f"save_steps={steps}",
        "learning_rate=3e-3",
        "disable_tqdm=true",
        "eval_strategy=no",
        "rate=count",
        "masking=mirror",
        f"output_dir={folder}",
    ]
    train(load_config(None, overrides))
    return folder


def questions(tokenizer, n: int, seed: int) -> list[tuple[list[int], list[list[int]], int]]:
    """(context, choices, index of the true next word) cut from held-out documents."""
    task = get_task("text", train=str(CORPUS), max_length=MAX_LENGTH)
    documents = [d.replace("\n", " ") for d in task.documents("test")]
    vocabulary = sorted({w for d in documents for w in d.split()})
    rng, out = random.Random(seed), []
    while len(out) < n:
        words = rng.choice(documents).split()
        cut = rng.randrange(2, len(words))
        context = " ".join(words[max(0, cut - 8) : cut])
        others = rng.sample([w for w in vocabulary if w != words[cut]], 2)
        choices = [words[cut], *others]
        rng.shuffle(choices)
        ids = [tokenizer.encode(" " + c) for c in choices]
        out.append((tokenizer.encode(context), ids, choices.index(words[cut])))
    return out


def exact_answers(model, items, mask_id: int) -> list[int | None]:
    """Each question's best choice by the exact ELBO, None where a choice is too long."""
    answers = []
    for context, choices, _ in items:
        if max(map(len, choices)) > EXACT_MAX:
            answers.append(None)
            continue
        values = [exact_elbo(model, context, c, mask_token_id=mask_id) for c in choices]
        answers.append(max(range(len(values)), key=values.__getitem__))
    return answers


def measure(model, items, exact, estimator: str, seeds: int, target: float) -> dict:
    """One estimator: passes per question to the target gap error (adaptive, batches of 8,
    cap 2048), and at LLaDA's budget (128 per choice, batches of 32) the accuracy and the
    agreement with the exact answer per seed."""
    adaptive = Budget(batch_size=8, max_passes=2048, target_se=target, min_draws=4)
    passes, reached = [], 0
    for q, (context, choices, _) in enumerate(items):
        got = loglikelihood_choices(
            model,
            context,
            choices,
            generator=seeded_generator(0, "adaptive", q),
            estimator=estimator,
            budget=adaptive,
        )
        passes.append(got.passes / len(choices))
        reached += got.gap_se <= target
    fixed = Budget(batch_size=32, max_passes=128)
    accuracy, agreement, picks = [], [], []
    for seed in range(seeds):
        best = [
            loglikelihood_choices(
                model,
                context,
                choices,
                generator=seeded_generator(seed, "fixed", q),
                estimator=estimator,
                budget=fixed,
            ).best
            for q, (context, choices, _) in enumerate(items)
        ]
        picks.append(best)
        accuracy.append(statistics.mean(b == item[2] for b, item in zip(best, items, strict=True)))
        known = [(b, e) for b, e in zip(best, exact, strict=True) if e is not None]
        agreement.append(statistics.mean(b == e for b, e in known) if known else float("nan"))
    flips = statistics.mean(len(set(p)) > 1 for p in zip(*picks, strict=True))
    return {
        "estimator": estimator,
        "passes_per_choice_to_target": statistics.mean(passes),
        "reached_target": reached / len(items),
        "accuracy_mean": statistics.mean(accuracy),
        "accuracy_sd_over_seeds": statistics.stdev(accuracy) if seeds > 1 else 0.0,
        "answer_changes_with_seed": flips,
        "agreement_with_exact": statistics.mean(agreement),
    }


def table(rows: list[dict], target: float, n: int, seeds: int, exact_n: int) -> str:
    """The markdown table of the rows."""
    head = (
        f"| estimator | passes per choice to gap SE <= {target} | reached | accuracy at 128 "
        f"(mean, sd over {seeds} seeds) | answers that change with the seed | agreement with "
        f"exact ({exact_n} of {n} questions) |\n| --- | --- | --- | --- | --- | --- |"
    )
    lines = [
        f"| `{r['estimator']}` | {r['passes_per_choice_to_target']:.0f} | "
        f"{r['reached_target']:.0%} | {r['accuracy_mean']:.3f} +- "
        f"{r['accuracy_sd_over_seeds']:.3f} | {r['answer_changes_with_seed']:.1%} | "
        f"{r['agreement_with_exact']:.1%} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--target-se", type=float, default=0.1, help="gap SE target (nats)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (no --run)")
    parser.add_argument("--run", help="a trained MDM run to measure instead")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or trained_run(Path(tmp) / "run", args.steps)
        model, tokenizer = load_checkpoint(run)
    model.eval()
    items = questions(tokenizer, args.questions, seed=0)
    exact = exact_answers(model, items, tokenizer.mask_token_id)
    rows = []
    for estimator in args.estimators.split(","):
        rows.append(measure(model, items, exact, estimator, args.seeds, args.target_se))
        print(json.dumps(rows[-1]), flush=True)
    exact_n = sum(e is not None for e in exact)
    print(table(rows, args.target_se, len(items), args.seeds, exact_n))


if __name__ == "__main__":
    main()
