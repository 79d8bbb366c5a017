"""The likelihood estimators on a multiple-choice task (issue 26, item 3): per estimator, with
and without common random numbers, at LLaDA's budget (128 passes per choice, batches of 32)
over Monte Carlo seeds: the accuracy's mean and spread, the share of answers that change with
the seed, agreement with the exact answer (`exact_elbo`, every mask pattern), and the passes
per choice to reach a fixed standard error of the gap between the two best choices.

Those passes are projected from the variance measured at the fixed budget, not found by
adaptive sampling: a gap standard error s after n sampling passes reaches a target s* after
n (s / s*)^2 passes, so the mean over questions and seeds of n (s / s*)^2 is what an adaptive
sampler stopping exactly at s* spends on average (with no cap and no minimum of draws). It
costs nothing beyond the fixed-budget runs; an adaptive run of `standard`, which settles
slowly, would mostly measure its cap. A P-POTS fit's passes are added on top.
`--adaptive N` checks the projection: the first N questions run adaptively to the target
(common random numbers, batches of 32, at least 8 draws, `--adaptive-cap` passes at most)
for `--adaptive-estimators`, and their mean passes are printed beside the projection.

The task: next-word questions cut from the held-out fables (data/corpus): the context is up
to 8 words of a document as written, the choices are the next word and two other words of the
held-out documents, each after the separator the next word has in the document. The model: a
run given with `--run`, else the tiny preset trained here on the fables' training share for
`--steps` steps (count mode with MIRROR).

    .venv/bin/python benchmarks/likelihood.py [--questions 300] [--seeds 5] [--run RUN]

Prints one JSON line per row and a markdown table (docs/likelihood.md, "Measured").
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import time
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
CONTEXT_WORDS = 8
EXACT_MAX = 10  # continuations this long or shorter are enumerated (2^L - 1 passes)
LLADA_BUDGET = Budget(batch_size=32, max_passes=128)  # LLaDA's mc_num=128, batches of 32


def trained_run(folder: Path, steps: int) -> Path:
    """The tiny preset trained on the fables (count mode with MIRROR)."""
    options = {"train": str(CORPUS), "max_length": MAX_LENGTH}
    overrides = [
        "task=text",
        "task_options=" + json.dumps(options),
        "model_preset=tiny",
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
    """(context, choices, index of the true next word) cut from held-out documents. The
    context keeps the document's own separators (a newline before "Moral:"), as in training;
    every choice is the true next word's separator followed by a word."""
    task = get_task("text", train=str(CORPUS), max_length=MAX_LENGTH)
    documents = list(task.documents("test"))
    vocabulary = sorted({w for d in documents for w in d.split()})
    rng, out = random.Random(seed), []
    while len(out) < n:
        document = rng.choice(documents)
        words = list(re.finditer(r"\S+", document))
        cut = rng.randrange(2, len(words))
        start, end = words[max(0, cut - CONTEXT_WORDS)].start(), words[cut - 1].end()
        separator, word = document[end : words[cut].start()], words[cut].group()
        others = rng.sample([w for w in vocabulary if w != word], 2)
        choices = [word, *others]
        rng.shuffle(choices)
        ids = [tokenizer.encode(separator + c) for c in choices]
        out.append((tokenizer.encode(document[start:end]), ids, choices.index(word)))
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


def projected_passes(passes_per_choice: float, gap_se: float, target: float) -> float:
    """Passes per choice to bring the gap's standard error to `target`: the sampling passes
    (LLADA_BUDGET's) scaled by (gap_se / target)^2, plus what else was spent (a P-POTS fit)."""
    sampling = LLADA_BUDGET.max_passes
    return sampling * (gap_se / target) ** 2 + passes_per_choice - sampling


def one_seed(model, items, estimator: str, crn: bool, seed: int, target: float):
    """At LLaDA's budget with Monte Carlo seed `seed`: each question's best choice and its
    projected passes per choice to the target gap error."""
    best, passes = [], []
    for q, (context, choices, _) in enumerate(items):
        got = loglikelihood_choices(
            model,
            context,
            choices,
            generator=seeded_generator(seed, "fixed", q),
            estimator=estimator,
            budget=LLADA_BUDGET,
            crn=crn,
        )
        best.append(got.best)
        passes.append(projected_passes(got.passes / len(choices), got.gap_se, target))
    return best, passes


def adaptive_check(model, items, estimator: str, target: float, cap: int) -> dict:
    """The projection checked by adaptive runs (common random numbers, seed 0): per choice,
    the passes an adaptive sampler spends to the target gap error (batches of 32, at least 8
    draws, at most `cap` passes) against the fixed-budget projection for the same questions."""
    adaptive = Budget(batch_size=32, max_passes=cap, target_se=target)
    spent, projected, capped = [], [], 0
    for q, (context, choices, _) in enumerate(items):
        runs = [
            loglikelihood_choices(
                model, context, choices, generator=seeded_generator(0, "fixed", q),
                estimator=estimator, budget=budget, crn=True,
            )
            for budget in (adaptive, LLADA_BUDGET)
        ]  # fmt: skip
        spent.append(runs[0].passes / len(choices))
        capped += runs[0].gap_se > target
        projected.append(projected_passes(runs[1].passes / len(choices), runs[1].gap_se, target))
    return {
        "estimator": estimator,
        "questions": len(items),
        "adaptive_passes_per_choice": statistics.mean(spent),
        "projected_passes_per_choice": statistics.mean(projected),
        "stopped_at_cap": capped,
        "cap": cap,
    }


def measure(model, items, exact, estimator: str, crn: bool, seeds: int, target: float) -> dict:
    """One estimator, with or without common random numbers, over `seeds` Monte Carlo seeds at
    LLaDA's budget: accuracy, answer changes, agreement with the exact answer, and the
    projected passes per choice to the target gap error."""
    accuracy, agreement, picks, passes = [], [], [], []
    for seed in range(seeds):
        best, projected = one_seed(model, items, estimator, crn, seed, target)
        picks.append(best)
        passes.extend(projected)
        accuracy.append(statistics.mean(b == item[2] for b, item in zip(best, items, strict=True)))
        known = [(b, e) for b, e in zip(best, exact, strict=True) if e is not None]
        agreement.append(statistics.mean(b == e for b, e in known) if known else float("nan"))
    flips = statistics.mean(len(set(p)) > 1 for p in zip(*picks, strict=True))
    return {
        "estimator": estimator,
        "crn": crn,
        "passes_per_choice_to_target": statistics.mean(passes),
        "median_passes_per_choice_to_target": statistics.median(passes),
        "accuracy_mean": statistics.mean(accuracy),
        "accuracy_sd_over_seeds": statistics.stdev(accuracy) if seeds > 1 else 0.0,
        "answer_changes_with_seed": flips,
        "agreement_with_exact": statistics.mean(agreement),
    }


def table(rows: list[dict], target: float, n: int, seeds: int, exact_n: int) -> str:
    """The markdown table of the rows; passes also as a share of `llada`'s with the same
    common random numbers setting."""
    baseline = {
        r["crn"]: r["passes_per_choice_to_target"] for r in rows if r["estimator"] == "llada"
    }
    head = (
        f"| estimator | common random numbers | passes per choice to gap SE {target}: mean "
        f"(median) | mean of `llada`'s | accuracy at 128 (mean +- sd over {seeds} seeds) | "
        f"answers that change with the seed | agreement with exact ({exact_n} of {n} questions) |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = []
    for r in rows:
        passes = r["passes_per_choice_to_target"]
        share = f"{passes / baseline[r['crn']]:.2f}" if baseline.get(r["crn"]) else "-"
        lines.append(
            f"| `{r['estimator']}` | {'yes' if r['crn'] else 'no'} | {passes:.0f} "
            f"({r['median_passes_per_choice_to_target']:.0f}) | {share} | "
            f"{r['accuracy_mean']:.3f} +- {r['accuracy_sd_over_seeds']:.3f} | "
            f"{r['answer_changes_with_seed']:.1%} | {r['agreement_with_exact']:.1%} |"
        )
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--target-se", type=float, default=0.1, help="gap SE target (nats)")
    parser.add_argument("--steps", type=int, default=600, help="training steps (no --run)")
    parser.add_argument("--run", help="a trained MDM run to measure instead")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--crn", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--adaptive", type=int, default=0, help="questions run adaptively")
    parser.add_argument("--adaptive-estimators", default="llada,count_mirror")
    parser.add_argument("--adaptive-cap", type=int, default=8192, help="passes per choice")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wall, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or trained_run(Path(tmp) / "run", args.steps)
        model, tokenizer = load_checkpoint(run)
    model.eval()
    items = questions(tokenizer, args.questions, seed=0)
    exact = exact_answers(model, items, tokenizer.mask_token_id)
    settings = {"both": (True, False), "yes": (True,), "no": (False,)}[args.crn]
    rows = []
    for estimator in args.estimators.split(","):
        for crn in settings:
            rows.append(measure(model, items, exact, estimator, crn, args.seeds, args.target_se))
            print(json.dumps(rows[-1]), flush=True)
    exact_n = sum(e is not None for e in exact)
    print(table(rows, args.target_se, len(items), args.seeds, exact_n))
    for estimator in args.adaptive_estimators.split(",") if args.adaptive else ():
        check = adaptive_check(
            model, items[: args.adaptive], estimator, args.target_se, args.adaptive_cap
        )
        print(json.dumps(check), flush=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"wall {wall:.0f} s, CPU {cpu:.0f} s")


if __name__ == "__main__":
    main()
