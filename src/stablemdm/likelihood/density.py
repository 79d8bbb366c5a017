"""P-POTS over the count for evaluation (paper.md section 3): a density whose count law is
q(k) proportional to sqrt(E[l^2 | k]), measured cheaply on the continuations themselves with
the training fit's counts estimate (`estimators.ppots_counts`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..estimators.losses import Model
from ..estimators.objective import Objective
from ..estimators.ppots import PPOTS
from ..estimators.ppots_counts import count_levels, measure_count_moments
from .values import model_device

DENSITY_BINS = 256  # bins of the tabulated density (equal in sqrt(t), fine near t = 0)


FIT_LEVELS = 4  # counts measured per continuation (k = 1 among them)


FIT_MASKS = 2  # masks per measured count


def fit_passes(
    lengths: Sequence[int], n_levels: int = FIT_LEVELS, n_masks: int = FIT_MASKS
) -> list[int]:
    """The forward passes `fit_count_density` spends on each continuation."""
    return [len(count_levels(length, n_levels)) * n_masks for length in lengths]


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
) -> PPOTS:
    """The P-POTS density for `ppots_count`: E[l^2 | k] measured at `n_levels` counts
    (`count_levels`: k = 1 always among them) with `n_masks` masks each per continuation,
    pooled over the continuations, its square root tabulated and mixed with the uniform
    (`mix` bounds the weights by 1/mix). Costs `fit_passes` forward passes. Fit it once on a
    few questions and pass it on to spread that cost."""
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
