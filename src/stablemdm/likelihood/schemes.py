"""The estimators of the ELBO log-likelihood: how each draws its rates or mask counts, its
masks and its weights (paper.md sections 1 and 3; LLaDA's evaluator, `eval_llada.py`).

For a continuation of L tokens after a context, with CE_i the cross-entropy of token i when
the masked set is M (the context always visible),

    log p(continuation | context) >= ELBO = - sum_{k=1..L} (1/k) E_{|M| = k}[ sum_{i in M} CE_i ]

(E_{|M| = k}: the mean over the uniform k-subsets M of the continuation's positions)

and every estimator here is unbiased for it (paper.md section 3, "Counts instead of rates"):

- `standard`: t ~ U(0, 1), each token masked with p = t (eps = 0), value -(1/t) sum_M CE_i;
- `llada`: LLaDA's scheme: one k_1 ~ U{1..L} per batch of n copies, the copies' counts
  k_1, k_1 + L/n, k_1 + 2L/n, ... rounded and wrapped into 1..L (stratified), a uniform
  k-subset each, value -(L/k) sum_M CE_i; the batch mean is one draw;
- `count_mirror`: k ~ U{1..L} per pair, MIRROR's k smallest and k largest of one set of
  per-token uniforms, the pair's mean of -(L/k) sum_M CE_i;
- `ppots_count`: k ~ q(k) from a P-POTS density over the count, value -sum_M CE_i / (k q(k)).

A block-diffusion model's ELBO is the sum of its blocks' ELBOs, each block given the clean
blocks before it (`likelihood.blocks`); each scheme's block form (`block_rates`,
`draw_blocks`) draws the same things per block: a rate, a count, LLaDA's stratified counts or
a MIRROR pair within each block, at the block's own length.

Each scheme draws with one generator: its rates first, then one uniform per position `[n,
Lmax]`, so the same generator state gives every choice of a question the same draws
(common random numbers, see `sampling`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..estimators.blocks import block_count_masks, block_rate_masks
from ..estimators.counts import counts_from_rates
from ..estimators.masking import iid_mask, mirror_subset_masks, p_mask, subset_mask
from ..estimators.rates import F64, RateSampler, Uniform

ESTIMATORS = ("standard", "llada", "count_mirror", "ppots_count")


@dataclass(frozen=True)
class Draw:
    """One batch of draws for one continuation: `masks` (one `[n, Lmax]`, or a MIRROR pair),
    the ELBO factor `p` `[n]` (t, or k/L), the importance `weight` `[n]`, and `t` `[n]` for a
    model that is given the rate (None in count mode). In block form `p` and `weight` are per
    block `[n, nb]` (t_j, or k_j / L_j) and `t` is None."""

    masks: tuple[torch.Tensor, ...]
    p: torch.Tensor
    weight: torch.Tensor
    t: torch.Tensor | None


def llada_counts(first: int, length: int, n: int) -> torch.Tensor:
    """LLaDA's stratified counts `[n]` for a batch of n copies of an L-token continuation:
    first + round(j L / n) for j = 0..n-1, wrapped into 1..L.

    LLaDA's code rounds with `torch.round` (halves to even), which at a tie (j L / n ending in
    .5) maps two first counts to one and makes that copy's count non-uniform; here halves
    round up, so every copy's count is uniform on 1..L (the same counts away from ties)."""
    j = torch.arange(n, dtype=torch.long)
    offset = torch.div(2 * j * length + n, 2 * n, rounding_mode="floor")  # round(j L / n)
    return (first - 1 + offset) % length + 1


class Scheme:
    """One estimator: `rates` draws a batch's rates (count mode: rates whose cell
    ceil(L r) is the count), `draw` its masks, factors and weights."""

    name: ClassVar[str] = ""
    rows_per_copy: ClassVar[int] = 1  # forward passes per copy (a MIRROR pair takes two)
    stratified: ClassVar[bool] = False  # a batch's copies are dependent: its mean is one draw
    counts: ClassVar[bool] = True  # count mode (t integrated out)

    def __init__(self, sampler: RateSampler | None = None) -> None:
        self.sampler = Uniform() if sampler is None else sampler

    def rates(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """The rates `[n]` (float64) of n copies of an L-token continuation."""
        return self.sampler.sample(n, generator)[0]

    def draw(
        self, eligible: torch.Tensor, length: int, r: torch.Tensor, generator: torch.Generator
    ) -> Draw:
        """Count mode: k = ceil(L r) with its weight 1 / (L q(k)), and k-subset masks of the
        continuation's positions `eligible` `[n, Lmax]`."""
        n = torch.full(r.shape, length, dtype=torch.long)
        k, weight = counts_from_rates(self.sampler, r, n)  # [n], [n]
        if self.rows_per_copy == 2:
            masks = mirror_subset_masks(eligible, k.to(eligible.device), generator)
        else:
            masks = (subset_mask(eligible, k.to(eligible.device), generator),)
        return Draw(masks, k.to(F64) / length, weight, None)

    def block_rates(
        self, n: int, lengths: Sequence[int], generator: torch.Generator
    ) -> torch.Tensor:
        """The rates `[n, nb]` of n copies of a continuation whose blocks hold `lengths`
        tokens: each block's drawn as `rates` draws a continuation's, one block after another."""
        return torch.stack([self.rates(n, length, generator) for length in lengths], dim=1)

    def draw_blocks(
        self,
        eligible: torch.Tensor,
        block_ids: torch.Tensor,
        r: torch.Tensor,
        generator: torch.Generator,
    ) -> Draw:
        """Count mode per block: k_j = ceil(L_j r_j) of block j's L_j positions, weight
        1 / (L_j q(k_j)), a uniform k_j-subset of the block (MIRROR's pair within each block)
        from one uniform per position of `eligible` `[n, Lmax]` (`block_ids` its blocks)."""
        mirror = self.rows_per_copy == 2
        masks, p, _, weight = block_count_masks(
            eligible, block_ids, self.sampler, r, generator, mirror=mirror
        )
        return Draw(masks, p.to(F64), weight, None)


class Standard(Scheme):
    """Standard: t ~ U(0, 1), iid masks with p_mask(t) at eps = 0 (the ELBO itself, as LLaDA's
    evaluator sets `sampling_eps = 0`); its 1/t weight makes the variance grow like
    log(1/t_min) near t = 0, which count mode removes."""

    name = "standard"
    counts = False

    def draw(
        self, eligible: torch.Tensor, length: int, r: torch.Tensor, generator: torch.Generator
    ) -> Draw:
        p = p_mask(r, 0.0)  # [n]
        mask = iid_mask(eligible, p.to(eligible.device), generator)
        return Draw((mask,), p, self.sampler.weight(r), r)

    def draw_blocks(
        self,
        eligible: torch.Tensor,
        block_ids: torch.Tensor,
        r: torch.Tensor,
        generator: torch.Generator,
    ) -> Draw:
        """Each block j's tokens masked iid with p = t_j (eps = 0), weight 1 / density(t_j)."""
        p = p_mask(r, 0.0)  # [n, nb]
        (mask,) = block_rate_masks(eligible, block_ids, p.to(eligible.device), generator)
        return Draw((mask,), p, self.sampler.weight(r.flatten()).view_as(r), None)


class LLaDA(Scheme):
    """LLaDA's evaluator: counts stratified across each batch (`llada_counts`), uniform
    k-subsets, weight L/k."""

    name = "llada"
    stratified = True

    def rates(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        u = float(self.sampler.uniforms(1, generator)[0])  # k_1 = ceil(L u) ~ U{1..L}
        first = min(max(math.ceil(u * length), 1), length)
        return (llada_counts(first, length, n).to(F64) - 0.5) / length


class CountMirror(Scheme):
    """Count mode with MIRROR pairs: k ~ U{1..L}, the k smallest and the k largest of one set
    of per-token uniforms (disjoint when 2k <= L)."""

    name = "count_mirror"
    rows_per_copy = 2


class PPOTSCount(Scheme):
    """P-POTS over the count: k drawn from a density's discretisation q(k), weight
    1 / (L q(k))."""

    name = "ppots_count"


SCHEMES: dict[str, type[Scheme]] = {
    cls.name: cls for cls in (Standard, LLaDA, CountMirror, PPOTSCount)
}


def scheme_class(name: str) -> type[Scheme]:
    """The class of estimator `name`, one of ESTIMATORS."""
    if name not in SCHEMES:
        raise ConfigError(
            f"likelihood: estimator {name!r} is unknown; use one of {', '.join(ESTIMATORS)}"
        )
    return SCHEMES[name]


def make_scheme(name: str, density: RateSampler | None = None) -> Scheme:
    """The estimator `name` (one of ESTIMATORS); `density` is P-POTS's, for `ppots_count`."""
    cls = scheme_class(name)
    if (density is not None) != (name == "ppots_count"):
        raise ConfigError(
            f"likelihood: a density is only used by estimator 'ppots_count' (estimator {name!r}, "
            f"density {'given' if density is not None else 'missing'})"
        )
    if density is not None and (not isinstance(density, RateSampler) or not density.unbiased):
        raise ConfigError(
            "likelihood: the ppots_count density must be an unbiased RateSampler "
            "(e.g. a PPOTS density), not a clipped one"
        )
    return cls(density)
