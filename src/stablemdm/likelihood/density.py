"""P-POTS over the count for evaluation (paper.md section 3): a density whose count law is
q(k) proportional to sqrt(E[l^2 | k]), measured cheaply on the continuations themselves with
the training fit's counts estimate (`estimators.ppots_counts`); for a block-diffusion model,
E[l_j^2 | k] of each block's term, pooled over the blocks (each block then draws its count
from q at its own length)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..estimators.blocks import response_blocks
from ..estimators.losses import Model
from ..estimators.objective import Objective
from ..estimators.ppots import PPOTS
from ..estimators.ppots_counts import CountMoments, count_levels, measure_count_moments
from ..estimators.rates import F64
from .blocks import block_lengths, block_terms
from .schemes import Scheme
from .values import model_device

DENSITY_BINS = 256  # bins of the tabulated density (equal in sqrt(t), fine near t = 0)


FIT_LEVELS = 4  # counts measured per continuation (k = 1 among them)


FIT_MASKS = 2  # masks per measured count


def fit_passes(
    lengths: Sequence[int],
    n_levels: int = FIT_LEVELS,
    n_masks: int = FIT_MASKS,
    block_size: int | None = None,
) -> list[int]:
    """The forward passes `fit_count_density` spends on each continuation (in block form,
    one pass measures every block at once: as many as the longest block's counts)."""
    longest = [min(length, block_size or length) for length in lengths]
    return [len(count_levels(n, n_levels)) * n_masks for n in longest]


def _padded(context: Sequence[int], continuations: Sequence[Sequence[int]], pad: int, device):
    """The continuations after the context as one batch `[C, T]`, right-padded (`pad`, outside
    the attention mask): `input_ids`, `attention_mask`, `eligible`."""
    width = len(context) + max(len(c) for c in continuations)
    ids = torch.full((len(continuations), width), pad, dtype=torch.long)
    eligible = torch.zeros(ids.shape, dtype=torch.bool)
    attention = torch.zeros(ids.shape, dtype=torch.bool)
    for i, cont in enumerate(continuations):
        end = len(context) + len(cont)
        ids[i, :end] = torch.tensor([*context, *cont])
        eligible[i, len(context) : end] = True
        attention[i, :end] = True
    return {
        "input_ids": ids.to(device),
        "attention_mask": attention.to(device),
        "eligible": eligible.to(device),
    }


@torch.no_grad()
def fit_count_density(
    model: Model,
    context: Sequence[int],
    continuations: Sequence[Sequence[int]],
    mask_token_id: int,
    generator: torch.Generator,
    n_levels: int = FIT_LEVELS,
    n_masks: int = FIT_MASKS,
    mix: float = 0.05,
    block_size: int | None = None,
) -> PPOTS:
    """The P-POTS density for `ppots_count`: E[l^2 | k] measured at `n_levels` counts
    (`count_levels`: k = 1 always among them) with `n_masks` masks each per continuation (per
    block of `block_size` for a block-diffusion model), pooled over the continuations, its
    square root tabulated and mixed with the uniform (`mix` bounds the weights by 1/mix).
    Costs `fit_passes` forward passes. Fit it once on a few questions and pass it on to spread
    that cost."""
    if block_size is not None:
        moments = _block_moments(
            model, context, continuations, mask_token_id, generator, block_size, n_levels, n_masks
        )
    else:
        batch = _padded(context, continuations, mask_token_id, model_device(model))
        objective = Objective(mask_token_id, rate="count")
        moments = measure_count_moments(objective, model, batch, n_levels, n_masks, generator)
    if not (moments.moment > 0).any():  # a model that is certain of every token
        return PPOTS.uniform(source={"method": "likelihood counts", "fallback": "zero moments"})
    return PPOTS.from_function(
        lambda t: np.sqrt(moments.S(t)),
        n_bins=DENSITY_BINS,
        mix=mix,
        source={"method": "likelihood counts", "levels": n_levels, "masks": n_masks},
    )


def _block_moments(
    model, context, continuations, mask_token_id, generator, block_size, n_levels, n_masks
) -> CountMoments:
    """M(block, k) = E[u^2 | k] of each block's count-mode term u (its masked CE sum times
    L_j / k) at the block's `count_levels`, `n_masks` masks each; pass a measures the a-th
    level of every block at once (a block with fewer levels is not recorded there)."""
    block, count, moment, sizes = [], [], [], []
    for continuation in continuations:
        lengths = block_lengths(len(continuation), block_size)
        levels = [count_levels(n, n_levels) for n in lengths]
        eligible = torch.ones(n_masks, len(continuation), dtype=torch.bool)
        for a in range(max(len(ks) for ks in levels)):
            k = torch.tensor([ks[min(a, len(ks) - 1)] for ks in levels], dtype=F64)
            r = ((k - 0.5) / torch.tensor(lengths, dtype=F64)).expand(n_masks, -1)
            ids = response_blocks(eligible, block_size)
            draw = Scheme().draw_blocks(eligible, ids, r, generator)  # uniform q: weight 1
            terms = block_terms(model, context, continuation, draw, mask_token_id, block_size)
            for j, ks in enumerate(levels):
                if a < len(ks):
                    block.append(len(sizes) + j)
                    count.append(int(ks[a]))
                    moment.append(float((terms[:, j] ** 2).mean()))
        sizes.extend(lengths)
    return CountMoments(
        np.array(block), np.array(count), np.array(moment), np.array(sizes), "count", 0.0
    )
