"""Block diffusion in the `stablemdm variance` experiment (issue 25): one draw of a sequence's
rates is the vector of its block rates, drawn jointly as training draws one row of them, so
B (the rate noise) is the noise of the whole vector."""

from __future__ import annotations

import torch

from ..estimators.blocks import block_sums, blocks_per_row, response_blocks
from ..estimators.objective import Objective
from ..estimators.rates import RateSampler
from ..estimators.stratified import Stratified, StratifiedRows

# schemes that couple the block rates of one sequence, so that one draw of it differs from
# its density's iid draw: StraTS within each sequence, and SyRM's adjacent pairs (u, 1 - u)
ROW_SCHEMES = frozenset({"stratified_rows", "mirrored"})


def row_sampler(sampler: RateSampler) -> RateSampler:
    """What one sequence's row of block rates is drawn from: a scheme acting within the row
    (`StratifiedRows`, SyRM's pairs) as it is; StraTS over the whole batch (BD3-LM's
    `antithetic_sampling`) by its density, as a full-canvas scheme is (it couples sequences)."""
    if isinstance(sampler, Stratified) and not isinstance(sampler, StratifiedRows):
        return sampler.base
    return sampler


def block_rate_draws(
    objective: Objective, length: int, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n independent draws of one sequence's block rates and weights `[n, nb]` (nb blocks of
    rows `length` long), each a row as `row_sampler` draws it (SyRM with an odd nb: the row
    at an even position of a batch, its last block's partner left free)."""
    nb = blocks_per_row(length, objective.block_size)
    sampler = row_sampler(objective.sampler)
    rows = [sampler.sample_rows(1, nb, generator) for _ in range(n)]
    return torch.cat([t for t, _ in rows]), torch.cat([w for _, w in rows])


def blocks_of_rows(eligible: torch.Tensor, block_size: int) -> torch.Tensor:
    """The number of response blocks holding an eligible token in each row `[B]`: the blocks
    an `ObjectiveOutput` of block diffusion reports, row by row."""
    nb = blocks_per_row(eligible.shape[1], block_size)
    ids = response_blocks(eligible, block_size)
    return (block_sums(eligible.long(), ids, nb) > 0).sum(dim=1)
