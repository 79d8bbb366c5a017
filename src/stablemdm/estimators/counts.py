"""Count mode (this project's addition, paper.md section 3): the number k of masked eligible
tokens, with the rate integrated out; its law under any rate sampler, and draws of k."""

from __future__ import annotations

import torch

from .rates import F64, U_MIN, RateSampler


def _count_probability(sampler: RateSampler, k: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """q(k) = cdf(k/L) - cdf((k-1)/L) `[B]`: the sampler's density discretised onto counts."""
    return sampler.cdf(k / L) - sampler.cdf((k - 1) / L)


def count_probabilities(sampler: RateSampler, L: int) -> torch.Tensor:
    """q(k) for k = 1..L `[L]` (what `sample_counts` draws k from); sums to 1."""
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"the number of eligible tokens L must be an integer >= 1, got {L!r}")
    k = torch.arange(1, L + 1, dtype=F64)
    return _count_probability(sampler, k, torch.full_like(k, float(L)))


def sample_counts(
    sampler: RateSampler, n_eligible: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count mode (this project's addition, paper.md section 3): per sequence draw r with the
    sampler's scheme and icdf, k = clamp(ceil(L r), 1, L) with L = n_eligible `[B]`.

    Returns k `[B]` (long) and weight `[B]` = 1 / (L q(k)), so that
    E[weight * g(k)] = (1/L) sum_{k=1..L} g(k); uniform q gives weight 1. A biased sampler
    (Clipped) gets weight 1 and stays biased.
    """
    if n_eligible.dim() != 1:
        raise ValueError(f"n_eligible must be 1-D [B], got shape {tuple(n_eligible.shape)}")
    if (n_eligible < 1).any():
        raise ValueError("count mode needs at least one eligible token in every sequence")
    r = sampler.icdf(sampler.uniforms(n_eligible.numel(), generator).clamp(U_MIN, 1.0))  # [B]
    return counts_from_rates(sampler, r, n_eligible)


def counts_from_rates(
    sampler: RateSampler, r: torch.Tensor, n_eligible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map rates r `[B]` drawn from `sampler` to counts k = clamp(ceil(L r), 1, L) and their
    weights 1 / (L q(k)) (1 for a biased sampler); what `sample_counts` and the objective use."""
    L = n_eligible.to(device=r.device, dtype=F64)  # [B]
    k = torch.minimum(torch.ceil(L * r.to(F64)).clamp(min=1.0), L)  # [B]
    if sampler.unbiased:
        weight = 1.0 / (L * _count_probability(sampler, k, L))
    else:
        weight = torch.ones_like(L)
    return k.long().to(n_eligible.device), weight.to(n_eligible.device)
