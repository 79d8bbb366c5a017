"""How much of the available variance reduction the default P-POTS fit delivers, fit after
fit, on the demo task (chain_sum, tiny preset) at initialisation and after training.

For each model, S(t) = E[l^2 | t] of Standard is computed as the truth from every mask
pattern of a pool of training sequences (exact per sequence: |E| = 5, so 31 patterns), and
checked against a direct Monte Carlo estimate at a few rates. Then `training.build.fit_density` fits
the density again and again with different seeds (other sequences and masks, the real code
path), and each fit's delivered second moment int S/p is compared with the optimum
(int sqrt S)^2. The paper's family at the former default design (10 sequences x 24 rates x
4 masks) is fitted the same way for comparison. The fit's cost is timed against training
steps of the demo (batch 64) in the same process.

    .venv/bin/python benchmarks/ppots_fit.py [--fits 20] [--pool 2000]

The trained model is cached in runs/ppots_fit/standard (trained once, Standard, with the
demo study's settings, 1000 steps: a few minutes on two busy cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import default_data_collator

from stablemdm.estimators import ppots_fit as ppots
from stablemdm.estimators.losses import mdm_loss
from stablemdm.estimators.ppots_counts import CountMoments
from stablemdm.estimators.rates import Uniform
from stablemdm.models import Transformer
from stablemdm.rng import seeded_generator
from stablemdm.tasks.registry import get_task
from stablemdm.training.build import build_model, build_objective, fit_density
from stablemdm.training.datasets import encode_split
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

OUT = Path("runs/ppots_fit")
DEMO = [  # the `train:` section of src/stablemdm/studies/demo.yaml, Standard
    "task=chain_sum",
    "task_options={n_train: 20000, n_test: 200}",
    "model_preset=tiny",
    "max_steps=1000",
    "per_device_train_batch_size=64",
    "learning_rate=0.002",
    "warmup_steps=30",
    "lr_scheduler_type=cosine",
    "logging_steps=100",
    "save_steps=1000",
    "disable_tqdm=true",
]
METHODS = {
    "counts (default)": [],
    "family, former default": [
        "ppots_method=family",
        "ppots_sequences=10",
        "ppots_rates=24",
        "ppots_masks=4",
    ],
}
DESIGNS = ((10, 4), (16, 4), (32, 2), (32, 4), (64, 2))  # counts: sequences x masks per count
CHECK_RATES = (0.002, 0.02, 0.1, 0.5, 0.9)  # where the truth is checked by Monte Carlo
TARGET = 1.10  # every fit within 10% of the optimum


def trained_model(config_overrides: list[str]) -> Path:
    """The Standard demo model, trained once into OUT / "standard"."""
    folder = OUT / "standard"
    if not (folder / "model.safetensors").is_file():
        train(load_config(None, [*DEMO, f"output_dir={folder}", *config_overrides]))
    return folder


def pattern_sums(model, data, index: torch.Tensor, mask_id: int) -> np.ndarray:
    """T `[I, 2^L]`: the summed masked cross-entropy of each sequence under every mask pattern
    of its L eligible positions (bit j of the column masks the j-th; column 0 masks none)."""
    rows = [data[i] for i in index.tolist()]
    positions = [row["eligible"].nonzero().flatten() for row in rows]
    L = len(positions[0])
    if any(len(p) != L for p in positions):
        raise ValueError("the exact S needs sequences with equal numbers of eligible tokens")
    patterns = torch.arange(1, 1 << L)
    bits = (patterns[:, None] >> torch.arange(L)) & 1  # [2^L - 1, L]
    T = np.zeros((len(rows), 1 << L))
    with torch.no_grad():
        for n, (row, where) in enumerate(zip(rows, positions, strict=True)):
            masks = torch.zeros(len(patterns), len(row["eligible"]), dtype=torch.bool)
            masks[:, where] = bits.bool()
            copies = {k: v.expand(len(patterns), -1) for k, v in row.items() if v.dim() == 1}
            ones = torch.ones(len(patterns))
            out = mdm_loss(
                model,
                copies["input_ids"],
                copies["eligible"],
                masks,
                ones,
                mask_id,
                copies["attention_mask"],
                normalizer=ones,
            )
            T[n, 1:] = out.per_sequence.double().numpy()
    return T


def exact_moments(T: np.ndarray) -> CountMoments:
    """M(x0, k) = E[u^2 | x0, k] exactly from the pattern sums `[I, 2^L]` (u = T / k: the
    demo's normaliser is |E|)."""
    I, L = len(T), int(np.log2(T.shape[1]))
    k = np.array([bin(j).count("1") for j in range(T.shape[1])])
    moment = np.stack([((T[:, k == c] / c) ** 2).mean(1) for c in range(1, L + 1)], 1)
    return CountMoments(
        sequence=np.repeat(np.arange(I), L),
        count=np.tile(np.arange(1, L + 1), I),
        moment=moment.ravel(),
        eligible=np.full(I, L),
        rate="t",
        eps=1e-3,
    )


def mirror_S(T: np.ndarray, eps: float = 1e-3):
    """S(t) of rate-mode MIRROR exactly: per token, with u ~ U(0, 1) and p = p_mask(t), it is
    in m1 = {u < p} only, m2 = {u > 1 - p} only, both, or neither; l = (T(m1) + T(m2)) / (2 L p)."""
    L = int(np.log2(T.shape[1]))
    states = np.array(list(itertools.product(range(4), repeat=L)))  # 0 none, 1 m1, 2 m2, 3 both
    weights = 1 << np.arange(L)
    m1, m2 = ((states % 2) == 1) @ weights, (states >= 2) @ weights
    v = ((T[:, m1] + T[:, m2]) ** 2).mean(0)  # [4^L] over sequences
    counts = np.stack([(states == s).sum(1) for s in range(4)], 1)  # [4^L, 4]

    def S(t: np.ndarray) -> np.ndarray:
        p = (1 - eps) * t + eps
        one = np.minimum(p, 1 - p)
        probs = np.stack([np.maximum(1 - 2 * p, 0), one, one, np.maximum(2 * p - 1, 0)], 1)
        joint = np.exp(np.log(np.maximum(probs, 1e-300)) @ counts.T)  # [n, 4^L]
        return joint @ v / (2 * L * p) ** 2

    return S


def direct_S(model, objective, data, index: torch.Tensor, masks: int) -> dict[float, tuple]:
    """Monte Carlo S at CHECK_RATES from iid masks: (mean of l^2, its standard error)."""
    batch = default_data_collator([data[i] for i in index.tolist()])
    rows = {k: v.repeat(masks, *([1] * (v.dim() - 1))) for k, v in batch.items()}
    out = {}
    with torch.no_grad():
        for t in CHECK_RATES:
            r = torch.full((len(rows["input_ids"]),), t, dtype=torch.float64)
            generator = seeded_generator(0, "benchmark-direct", t)
            l2 = objective.at_rates(model, rows, r, mask_generator=generator).unweighted ** 2
            l2 = l2.double().view(masks, -1).mean(0)  # [I] per sequence over its masks
            out[t] = (float(l2.mean()), float(l2.std() / len(l2) ** 0.5))
    return out


def training_step_seconds(model, objective, data, steps: int = 10) -> float:
    """Median seconds of one demo training step (batch 64: forward, backward, AdamW)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(steps):
        batch = default_data_collator([data[i] for i in range(64 * step, 64 * step + 64)])
        start = time.perf_counter()
        out = objective(
            model, batch, seeded_generator(0, "r", step), seeded_generator(0, "m", step)
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate_fits(config, model, task, tokenizer, canvas, data, S, fits: int) -> dict:
    """Delivered / optimal for `fits` default fits of `config` with seeds 1..fits."""
    t, w = ppots.sqrt_cells(1 << 16)  # nests in the 1024 sqrt bins: exact in the density
    S_t = S(t)
    standard, optimal = float(np.sum(w * S_t)), float(np.sum(w * np.sqrt(S_t)) ** 2)
    ratios, predicted, seconds, fallbacks = [], [], [], 0
    for seed in range(1, fits + 1):
        config.seed = seed
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            density = fit_density(config, model, task, tokenizer, canvas, data=data)
        seconds.append(time.perf_counter() - start)
        fallbacks += bool(caught)
        p = density.density(torch.from_numpy(t)).numpy()
        ratios.append(float(np.sum(w * S_t / p)) / optimal)
        predicted.append(density.check["ratio_to_optimal"])
    return {
        "optimal_to_standard": optimal / standard,
        "delivered_to_optimal": ratios,
        "predicted_to_optimal": predicted,
        "fallbacks": fallbacks,
        "fit_seconds": statistics.median(seconds),
    }


def binned_ratio(S, edges: np.ndarray, mix: float = 0.1) -> float:
    """Delivered / optimal of the best density piecewise constant on `edges` (sqrt of the
    bin mean of S, what EMA's moments converge to), mixed with the uniform."""
    t, w = ppots.sqrt_cells(1 << 16)
    S_t = S(t)
    j = np.clip(np.searchsorted(edges[1:-1], t, side="right"), 0, len(edges) - 2)
    widths = np.diff(edges)
    h = np.sqrt(np.bincount(j, w * S_t) / widths)
    p = mix + (1 - mix) * h / np.sum(h * widths)
    return float(np.sum(w * S_t / p[j]) / np.sum(w * np.sqrt(S_t)) ** 2)


def mirror_ratios(S_iid, S_mirror, mix: float = 0.1) -> dict[str, float]:
    """MIRROR's delivered / optimal under p = sqrt(S) of iid masks (what the counts fit uses
    in rate mode) and of MIRROR itself, both mixed like the default; and its optimum over
    its own uniform second moment."""
    t, w = ppots.sqrt_cells(1 << 12)
    S = S_mirror(t)
    optimal = float(np.sum(w * np.sqrt(S)) ** 2)

    def ratio(root: np.ndarray) -> float:
        p = mix + (1 - mix) * root / np.sum(w * root)
        return float(np.sum(w * S / p)) / optimal

    return {
        "iid_density": ratio(np.sqrt(S_iid(t))),
        "own_density": ratio(np.sqrt(S)),
        "optimal_to_uniform": optimal / float(np.sum(w * S)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=20, help="independent fits per case")
    parser.add_argument("--pool", type=int, default=2000, help="sequences in the exact S")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    folder = trained_model([])
    config = load_config(None, [*DEMO, "sampler=ppots", f"output_dir={OUT / 'unused'}"])
    task = get_task(config.task, **config.task_options)
    init, tokenizer, canvas = build_model(config, task)
    data = encode_split(task, tokenizer, "train", canvas)
    objective = build_objective(config, tokenizer, sampler=Uniform())
    pool = torch.randperm(len(data), generator=seeded_generator(0, "benchmark-pool"))
    models = {
        "initialisation": init.eval(),
        "trained 1000 steps": Transformer.from_pretrained(folder).eval(),
    }
    step = training_step_seconds(Transformer.from_pretrained(folder), objective, data)
    results = {"training_step_seconds": step, "models": {}}
    for name, model in models.items():
        T = pattern_sums(model, data, pool[: args.pool], tokenizer.mask_token_id)
        moments = exact_moments(T)
        direct = direct_S(model, objective, data, pool[args.pool : args.pool + 512], 8)
        entry = {
            "check": {str(t): [float(moments.S(np.array([t]))[0]), *direct[t]] for t in direct},
            "methods": {},
        }
        for method, overrides in METHODS.items():
            fitting = load_config(None, [*DEMO, "sampler=ppots", *overrides])
            entry["methods"][method] = evaluate_fits(
                fitting, model, task, tokenizer, canvas, data, moments.S, args.fits
            )
        entry["designs"] = {}
        for sequences, masks in DESIGNS:
            options = [f"ppots_sequences={sequences}", f"ppots_masks={masks}"]
            fitting = load_config(None, [*DEMO, "sampler=ppots", *options])
            r = evaluate_fits(fitting, model, task, tokenizer, canvas, data, moments.S, args.fits)
            entry["designs"][f"{sequences} x {masks}"] = r["delivered_to_optimal"]
        bins = np.arange(21) / 20
        entry["ema_20_bins"] = {
            "equal": binned_ratio(moments.S, bins),
            "sqrt": binned_ratio(moments.S, bins**2),
        }
        entry["mirror"] = mirror_ratios(moments.S, mirror_S(T))
        results["models"][name] = entry
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results, args))


def report(results: dict, args: argparse.Namespace) -> str:
    """The markdown tables of docs/results.md."""
    lines = [
        f"Exact S from {args.pool} sequences; {args.fits} fits per row (seeds 1..{args.fits}).",
        "",
        "| model | optimum / Standard | fit | delivered / optimal: median | max | fits > "
        f"{TARGET} | self-check: predicted / optimal, median | fit s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["models"].items():
        for method, r in entry["methods"].items():
            ratios = r["delivered_to_optimal"]
            lines.append(
                f"| {name} | {r['optimal_to_standard']:.3f} | {method} | "
                f"{statistics.median(ratios):.3f} | {max(ratios):.3f} | "
                f"{sum(x > TARGET for x in ratios)} | "
                f"{statistics.median(r['predicted_to_optimal']):.3f} | {r['fit_seconds']:.2f} |"
            )
    step = results["training_step_seconds"]
    default = next(iter(METHODS))
    fit = statistics.median(
        e["methods"][default]["fit_seconds"] for e in results["models"].values()
    )
    lines += [
        "",
        f"Default fit {fit:.2f} s vs a demo training step {step * 1000:.0f} ms: "
        f"{fit / (1000 * step):.2%} of the demo's 1000 steps.",
        "",
        "Counts design (sequences x masks per count; all 5 counts; as many sequences held "
        "out), delivered / optimal:",
        "",
        "| model | design | forward passes | median | max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, entry in results["models"].items():
        for design, ratios in entry["designs"].items():
            sequences, masks = (int(x) for x in design.split(" x "))
            lines.append(
                f"| {name} | {design} | {2 * sequences * 5 * masks} | "
                f"{statistics.median(ratios):.3f} | {max(ratios):.3f} |"
            )
    lines += [
        "",
        "The best 20-bin density (EMA's at convergence), delivered / optimal:",
        "",
        "| model | equal bins | bins equal in sqrt(t) |",
        "| --- | --- | --- |",
    ]
    for name, entry in results["models"].items():
        bins = entry["ema_20_bins"]
        lines.append(f"| {name} | {bins['equal']:.3f} | {bins['sqrt']:.3f} |")
    lines += [
        "",
        "Rate-mode MIRROR, exact S of its own masks: delivered / optimal of the density fitted",
        "to iid masks' S (what `counts` does) and to its own S, both mixed with 0.1 uniform:",
        "",
        "| model | MIRROR optimum / MIRROR uniform | iid masks' density | its own density |",
        "| --- | --- | --- | --- |",
    ]
    for name, entry in results["models"].items():
        m = entry["mirror"]
        lines.append(
            f"| {name} | {m['optimal_to_uniform']:.3f} | {m['iid_density']:.3f} | "
            f"{m['own_density']:.3f} |"
        )
    lines += [
        "",
        "| model | t | exact S | direct Monte Carlo S +- SE |",
        "| --- | --- | --- | --- |",
    ]
    for name, entry in results["models"].items():
        for t, (exact, mc, se) in entry["check"].items():
            lines.append(f"| {name} | {t} | {exact:.4g} | {mc:.4g} +- {se:.2g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
