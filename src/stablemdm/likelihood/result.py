"""What an estimate returns: the log-likelihood with its standard error and what it cost
(`Likelihood`), and for the choices of one question, each choice's and the gap between the
two best (`Choices`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Likelihood:
    """log p(continuation | context) estimated as the mean of `draws` independent draws of
    the ELBO (nats; an ARM's is exact, with `se` 0), its standard error, the sequence forward
    passes it took (a P-POTS fit's included) and the `estimator` that drew it."""

    value: float
    se: float
    passes: int
    draws: int
    estimator: str


@dataclass(frozen=True)
class Choices:
    """The continuations of one question: each one's `Likelihood` (in the order given), the
    `best` one's index, and the `gap` between the two best log-likelihoods with its standard
    error `gap_se` (NaN with one choice); with common random numbers the gap is estimated
    draw by draw, so its error is smaller than the two errors together."""

    results: tuple[Likelihood, ...]
    best: int
    gap: float
    gap_se: float

    @property
    def passes(self) -> int:
        """The forward passes of the whole question."""
        return sum(r.passes for r in self.results)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """The mean of independent draws `[R]` and its standard error (sample standard deviation
    over sqrt(R)); the error is NaN with fewer than two draws."""
    values = values.double()
    n = values.numel()
    se = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    return float(values.mean()), se


def top_two(values: torch.Tensor) -> tuple[int, int]:
    """The indices of the two largest means of draws `[C, R]` (C >= 2)."""
    order = torch.argsort(values.double().mean(dim=1), descending=True)
    return int(order[0]), int(order[1])


def choices_of(values: torch.Tensor, passes: list[int], estimator: str) -> Choices:
    """Summarise draws `[C, R]` (the same draws for each choice under common random numbers)."""
    results = []
    for row, spent in zip(values, passes, strict=True):
        mean, se = mean_se(row)
        results.append(Likelihood(mean, se, spent, row.numel(), estimator))
    if len(results) == 1:
        return Choices(tuple(results), 0, math.nan, math.nan)
    best, second = top_two(values)
    gap, gap_se = mean_se(values[best] - values[second])
    return Choices(tuple(results), best, gap, gap_se)
