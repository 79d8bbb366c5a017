"""StraTS (paper.md section 3): one rate per stratum of [0, 1), composed with any base density
by stratifying the uniforms before its inverse CDF."""

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
