"""StraTS (paper.md section 3): one rate per stratum of [0, 1), composed with any base density
by stratifying the uniforms before its inverse CDF; over the whole batch (`Stratified`, for
block diffusion every block of the batch jointly, as BD3-LM's `antithetic_sampling`) or within
each row of draws (`StratifiedRows`: each sequence's blocks)."""

from __future__ import annotations

import torch

from .rates import F64, RateScheme, _check_generator, _check_n


class Stratified(RateScheme):
    """StraTS: exactly one uniform per stratum [i/n, (i+1)/n), in random order; through the
    base's icdf this stratifies its CDF space (P-POTS + StraTS), paper.md section 3.

    The trainer draws the rates of a whole optimizer step (every process and micro-batch) with
    one generator shared by all ranks and hands each micro-batch of each rank its slice, so
    the strata cover the global batch (`trainer.rate_slice`); a short last micro-batch of an
    epoch takes part of its slice (`Objective.draw_rates`), so no stratum is drawn twice.
    """

    name = "strats"

    def uniforms(self, n: int, generator: torch.Generator) -> torch.Tensor:
        _check_generator(generator)
        _check_n(n)
        order = torch.randperm(n, generator=generator, device=generator.device)  # [n]
        u = torch.rand(n, generator=generator, dtype=F64, device=generator.device)  # [n]
        return (order.to(F64) + u) / n


class StratifiedRows(Stratified):
    """StraTS within each sequence (block diffusion): its nb blocks draw their nb uniforms from
    the nb strata [i/nb, (i+1)/nb), in random order, so every sequence covers the rate range;
    through the base's icdf this stratifies its CDF space (P-POTS). A sequence of one draw (the
    full canvas) is iid."""

    name = "strats_rows"

    def uniforms(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.row_uniforms(n, 1, generator).flatten()

    def row_uniforms(self, rows: int, per_row: int, generator: torch.Generator) -> torch.Tensor:
        _check_generator(generator)
        _check_n(rows * per_row)
        device = generator.device
        keys = torch.rand(rows, per_row, generator=generator, dtype=F64, device=device)
        order = keys.argsort(dim=1)  # [rows, per_row]: a random permutation per row
        u = torch.rand(rows, per_row, generator=generator, dtype=F64, device=device)
        return (order.to(F64) + u) / per_row
