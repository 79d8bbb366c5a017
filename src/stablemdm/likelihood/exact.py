"""The exact ELBO of a short continuation, by enumerating every mask pattern: the value each
estimator is unbiased for, and the reference its error is measured against. A block-diffusion
model's is the sum of its blocks' exact ELBOs, each block enumerated given the clean blocks
before it (`blocks`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from math import comb

import torch

from ..errors import ConfigError
from ..estimators.losses import Model, conditions_on_t
from ..estimators.rates import F64
from .blocks import block_lengths, block_terms
from .schemes import Draw
from .values import draw_values

MAX_EXACT_LENGTH = 16  # 2^16 - 1 patterns: beyond this the enumeration costs too many passes


ROWS_PER_CALL = 512  # mask patterns through the model in one call


def mask_patterns(length: int) -> torch.Tensor:
    """Every non-empty mask pattern of L positions `[2^L - 1, L]` (bool)."""
    grid = itertools.product((False, True), repeat=length)
    return torch.tensor(list(grid), dtype=torch.bool)[1:]


def _pattern_weights(patterns: torch.Tensor) -> torch.Tensor:
    """The weight 1 / (|M| C(L, |M|)) `[P]` of each pattern `[P, L]` in the count-form sum."""
    k = patterns.sum(dim=1)  # [P]
    return 1.0 / (k * torch.tensor([comb(patterns.shape[1], int(i)) for i in k])).to(F64)


def exact_elbo(
    model: Model,
    context: Sequence[int],
    continuation: Sequence[int],
    mask_token_id: int,
    block_size: int | None = None,
) -> float:
    """ELBO = -sum over non-empty M of sum_{i in M} CE_i / (|M| C(L, |M|)): the count form of
    paper.md section 3 (for each k, the mean over k-subsets weighted 1/k), one forward pass
    per pattern. A model that is given t has no count form, hence no such sum. With
    `block_size`, the block ELBO: that sum for each block given the clean blocks before it,
    every block's patterns side by side (one pass per pattern of the longest block)."""
    longest = min(len(continuation), block_size or len(continuation))
    if not 1 <= longest <= MAX_EXACT_LENGTH:
        raise ConfigError(
            f"likelihood: the exact ELBO enumerates 2^L mask patterns; L={longest} (the "
            f"longest block) must lie in 1..{MAX_EXACT_LENGTH}"
        )
    if conditions_on_t(model):
        raise ConfigError(
            "likelihood: the exact ELBO integrates t out, but this model conditions on t"
        )
    if block_size is None:
        patterns = mask_patterns(len(continuation))  # [P, L]
        weight = _pattern_weights(patterns)  # [P]
    else:
        patterns, weight = _block_patterns(block_lengths(len(continuation), block_size))
    total = 0.0
    for start in range(0, len(patterns), ROWS_PER_CALL):
        rows = slice(start, start + ROWS_PER_CALL)
        ones = torch.ones(weight[rows].shape, dtype=F64)
        draw = Draw((patterns[rows],), ones, weight[rows], None)
        if block_size is None:
            values = draw_values(model, context, continuation, draw, mask_token_id)
        else:
            values = -block_terms(model, context, continuation, draw, mask_token_id, block_size)
        total += float(values.sum())
    return total


def _block_patterns(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block's mask patterns side by side: row j masks pattern j of each block that has
    one, `[P, L]` with P the longest block's count, and each block's weight in row j `[P, nb]`
    (0 where the block has no j-th pattern)."""
    each = [mask_patterns(n) for n in lengths]
    rows = max(len(p) for p in each)
    patterns = torch.zeros(rows, sum(lengths), dtype=torch.bool)
    weight = torch.zeros(rows, len(lengths), dtype=F64)
    start = 0
    for j, block in enumerate(each):
        patterns[: len(block), start : start + block.shape[1]] = block
        weight[: len(block), j] = _pattern_weights(block)
        start += block.shape[1]
    return patterns, weight
