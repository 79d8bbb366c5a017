"""The exact ELBO of a short continuation, by enumerating every mask pattern: the value each
estimator is unbiased for, and the reference its error is measured against."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from math import comb

import torch

from ..errors import ConfigError
from ..estimators.losses import Model, conditions_on_t
from ..estimators.rates import F64
from .schemes import Draw
from .values import draw_values

MAX_EXACT_LENGTH = 16  # 2^16 - 1 patterns: beyond this the enumeration costs too many passes


ROWS_PER_CALL = 512  # mask patterns through the model in one call


def mask_patterns(length: int) -> torch.Tensor:
    """Every non-empty mask pattern of L positions `[2^L - 1, L]` (bool)."""
    grid = itertools.product((False, True), repeat=length)
    return torch.tensor(list(grid), dtype=torch.bool)[1:]


def exact_elbo(
    model: Model,
    context: Sequence[int],
    continuation: Sequence[int],
    mask_token_id: int,
) -> float:
    """ELBO = -sum over non-empty M of sum_{i in M} CE_i / (|M| C(L, |M|)): the count form of
    paper.md section 3 (for each k, the mean over k-subsets weighted 1/k), one forward pass
    per pattern. A model that is given t has no count form, hence no such sum."""
    length = len(continuation)
    if not 1 <= length <= MAX_EXACT_LENGTH:
        raise ConfigError(
            f"likelihood: the exact ELBO enumerates 2^L mask patterns; L={length} must lie in "
            f"1..{MAX_EXACT_LENGTH}"
        )
    if conditions_on_t(model):
        raise ConfigError(
            "likelihood: the exact ELBO integrates t out, but this model conditions on t"
        )
    patterns = mask_patterns(length)  # [P, L]
    k = patterns.sum(dim=1)  # [P]
    weight = 1.0 / (k * torch.tensor([comb(length, int(i)) for i in k])).to(F64)
    total = 0.0
    for start in range(0, len(patterns), ROWS_PER_CALL):
        rows = slice(start, start + ROWS_PER_CALL)
        ones = torch.ones(len(k[rows]), dtype=F64)
        draw = Draw((patterns[rows],), ones, weight[rows], None)
        total += float(draw_values(model, context, continuation, draw, mask_token_id).sum())
    return total
