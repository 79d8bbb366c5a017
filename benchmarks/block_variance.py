"""Block diffusion's rate schemes and P-POTS forms, measured on a small trained model (issue 25).

A tiny transformer is trained with the block objective (Standard) on a synthetic task (the
response is the prompt sorted), then

1. StraTS over blocks: the minibatch gradient variance (trace of its covariance over R
   independent draws on the same sequences, `selection.minibatch_variance`) of independent
   rates, BD3-LM's joint stratification over every block of the batch (`scheme=stratified`)
   and stratification within each sequence (`scheme=stratified_rows`), each one pass per
   sequence (equal compute), as ratios to independent rates with their SE;
2. P-POTS pooled over block positions against one density per block position: S_j(t) of each
   block position j from the grid estimate on one half of the sequences (`block_grid_values`),
   the densities fitted there (sqrt of S, mixed with the uniform), and the second moment
   sum_j int S_j / p_j predicted on the other, held-out half, as a ratio to the uniform's.

    .venv/bin/python benchmarks/block_variance.py            # block size 4, about a minute on CPU
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from stablemdm.estimators.objective import Objective
from stablemdm.estimators.ppots_fit import block_grid_values, rate_grid
from stablemdm.estimators.rates import Uniform
from stablemdm.estimators.selection import (
    GradientFeature,
    compare_estimators,
    minibatch_draws,
)
from stablemdm.estimators.stratified import Stratified, StratifiedRows
from stablemdm.models import ModelConfig, Transformer

MASK, VOCAB, PROMPT, RESPONSE = 1, 16, 8, 16


def sorted_task(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows of a random prompt of PROMPT tokens and a response of the prompt sorted, twice."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, VOCAB, (n, PROMPT), generator=g)
    response = prompt.sort(dim=1).values.repeat(1, RESPONSE // PROMPT)
    eligible = torch.zeros(n, PROMPT + RESPONSE, dtype=torch.bool)
    eligible[:, PROMPT:] = True
    return {"input_ids": torch.cat([prompt, response], dim=1), "eligible": eligible}


def trained_model(block_size: int, steps: int, seed: int = 0) -> Transformer:
    """A tiny transformer trained `steps` Adam steps with the block objective (Standard)."""
    config = ModelConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, mask_token_id=MASK
    )
    model = Transformer(config, generator=torch.Generator().manual_seed(seed))
    objective = Objective(MASK, kind="block", block_size=block_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gens = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for step in range(steps):
        loss = objective(model, sorted_task(64, 1000 + step), *gens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def strats_rows(model: Transformer, block_size: int, draws: int, batch: int) -> list[dict]:
    """Gradient variance of each rate scheme over `draws` minibatches of the same sequences."""
    data = sorted_task(batch, 7)
    feature = GradientFeature(model, None, None, 0)
    results = {}
    for name, sampler in (
        ("independent", Uniform()),
        ("joint over the batch (BD3-LM)", Stratified()),
        ("within each sequence", StratifiedRows()),
    ):
        objective = Objective(MASK, kind="block", block_size=block_size, sampler=sampler)

        def generators(r: int) -> tuple[torch.Generator, torch.Generator]:
            return torch.Generator().manual_seed(10 + r), torch.Generator().manual_seed(5000 + r)

        out = minibatch_draws(model, objective, [data] * draws, generators, feature)
        results[name] = (out.grad, out.forward_passes)
    return compare_estimators(results, reference="independent")


def ppots_forms(model: Transformer, block_size: int, sequences: int, rates: int) -> dict:
    """Held-out second moment of P-POTS pooled and per block position, each over the uniform."""
    objective = Objective(MASK, kind="block", block_size=block_size)
    grid = rate_grid(rates)
    widths = np.diff(np.concatenate([[0.0], (grid[1:] * grid[:-1]) ** 0.5, [1.0]]))
    nb = RESPONSE // block_size

    def S(seed: int) -> np.ndarray:  # [nb, J]: S_j(t) per block position
        batch = {k: v.repeat(2, 1) for k, v in sorted_task(sequences, seed).items()}  # 2 masks
        values = block_grid_values(objective, model, batch, grid, 2, torch.Generator())
        return (values**2).mean(axis=2).reshape(sequences, nb, -1).mean(axis=0)

    fit, held = S(11), S(12)

    def density(s: np.ndarray) -> np.ndarray:  # sqrt(S) mixed with the uniform, normalised
        root = np.sqrt(s) / np.sum(widths * np.sqrt(s))
        return 0.1 + 0.9 * root

    uniform = float(np.sum(widths * held))
    pooled = float(np.sum(widths * held / density(fit.mean(axis=0))))
    per_position = float(sum(np.sum(widths * held[j] / density(fit[j])) for j in range(nb)))
    return {"pooled": pooled / uniform, "per block position": per_position / uniform}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = trained_model(args.block_size, args.train_steps)
    print(f"block_size {args.block_size}, {args.train_steps} training steps, batch {args.batch}")
    print("| rate scheme | gradient variance | SE | independent / scheme (> 1: lower) | SE |")
    print("| --- | --- | --- | --- | --- |")
    for row in strats_rows(model, args.block_size, args.draws, args.batch):
        print(
            f"| {row['name']} | {row['variance']:.4g} | {row['se']:.2g} | "
            f"{row['ratio_to_reference']:.3f} | {row['ratio_se']:.3f} |"
        )
    ratios = ppots_forms(model, args.block_size, 64, 16)
    print("| P-POTS form | held-out second moment / uniform's |")
    print("| --- | --- |")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()
