"""The counts estimate of S(t) = E[l^2 | t] for P-POTS (this project's, paper.md section 3).

For a model that does not see t, a rate-t mask is a uniform random k-subset once its count
k ~ Binomial(|E|, p_mask(t)) is drawn, and l = T / (N p_mask(t)) with T the summed masked
cross-entropy. So with u = |E| T / (N k), the unweighted count-mode loss at count k,

    S(t) = E_x0[ sum_{k=1..|E|} Binom(k; |E|, p) E[u^2 | x0, k] (k / (|E| p))^2 ],  p = p_mask(t)

exactly. Measuring M(x0, k) = E[u^2 | x0, k] at a few counts per sequence therefore gives
S at every t at once, with the exact small-t form S ~ M(x0, 1) / (|E| p) (no empty masks,
no rare large draws), and smooth in t. In count mode S at rate r is M(x0, ceil(|E| r)).
Counts between the measured ones are interpolated linearly in 1/k (exact when the masked
tokens' losses do not depend on each other: M = a + b/k). In count mode the estimator's second
moment under a density is a sum over counts (`count_mode_moments`), not an integral over t.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import binom

from .losses import conditions_on_t
from .rates import Uniform

ROWS_PER_FORWARD = 512  # sequence copies evaluated together


def count_levels(n_eligible: int, n_levels: int) -> np.ndarray:
    """The counts k at which a sequence with `n_eligible` eligible tokens is measured: every
    k in 1..|E| when |E| <= n_levels, else n_levels counts spaced geometrically from 1 to |E|
    (rounded, distinct), so that k = 1, which sets S near t = 0, is always among them."""
    if n_eligible < 1 or n_levels < 2:
        raise ValueError(f"need |E| >= 1 and >= 2 levels, got {n_eligible}, {n_levels}")
    if n_eligible <= n_levels:
        return np.arange(1, n_eligible + 1)
    return np.unique(np.round(np.geomspace(1, n_eligible, n_levels)).astype(int))


@dataclass(frozen=True)
class CountMoments:
    """Measured second moments M(x0_i, k) `[P]` at (sequence, count) pairs `[P]`, for
    sequences with `eligible` `[I]` eligible tokens; `rate` says how S is read from them."""

    sequence: np.ndarray
    count: np.ndarray
    moment: np.ndarray
    eligible: np.ndarray
    rate: str
    eps: float

    def _moments_of(self, i: int) -> np.ndarray:
        """M(x0_i, k) for k = 1..|E_i| `[|E_i|]`, interpolated linearly in 1/k between the
        measured counts."""
        k = np.arange(1, int(self.eligible[i]) + 1)
        own = self.sequence == i
        levels, moments = self.count[own], self.moment[own]
        order = np.argsort(1.0 / levels)
        return np.interp(1.0 / k, 1.0 / levels[order], moments[order])

    def S_each(self, t: np.ndarray) -> np.ndarray:
        """S at rates t `[T]` in (0, 1] for each sequence `[I, T]`: the binomial mixture over
        counts in rate mode, the measured moment of the count ceil(|E| t) in count mode."""
        t = np.asarray(t, dtype=np.float64).ravel()
        out = np.zeros((len(self.eligible), t.size))
        p = (1.0 - self.eps) * t + self.eps
        for n in np.unique(self.eligible):
            rows = np.flatnonzero(self.eligible == n)
            m = np.stack([self._moments_of(i) for i in rows])  # [R, n]
            k = np.arange(1, n + 1)
            if self.rate == "count":
                out[rows] = m[:, np.clip(np.ceil(n * t).astype(int), 1, n) - 1]
            else:
                mix = binom.pmf(k[None, :], n, p[:, None])  # [T, n]
                out[rows] = (mix @ (m * k**2).T).T / (n * p) ** 2
        return out

    def S(self, t: np.ndarray) -> np.ndarray:
        """S at rates t `[T]`: the mean of `S_each` over the sequences."""
        return self.S_each(t).mean(axis=0)

    def count_mode_moments(self, cdf: Any) -> tuple[np.ndarray, np.ndarray]:
        """The second moment of the count-mode estimator for each sequence `[I]`, summed over
        its counts (exact: a count k is drawn with q(k) = cdf(k/|E|) - cdf((k-1)/|E|) and
        weighted 1 / (|E| q(k))): under Standard, (1/|E|) sum_k M(x0, k); under the density
        whose CDF is `cdf` (numpy in, numpy out), (1/|E|^2) sum_k M(x0, k) / q(k)."""
        standard, fitted = np.empty(len(self.eligible)), np.empty(len(self.eligible))
        for i, n in enumerate(self.eligible):
            m, edges = self._moments_of(i), np.arange(n + 1) / n
            q = np.diff(np.asarray(cdf(edges), dtype=np.float64))  # [n]
            standard[i], fitted[i] = m.sum() / n, (m / q).sum() / n**2
        return standard, fitted


def count_objective(objective: Any) -> Any:
    """The count-mode objective whose per-sequence loss is u at a given count: the
    objective itself in count mode; in rate mode its iid-mask form (MIRROR and ISAD couple
    or tilt the masks, so their S is approximated by that of iid masks). Every sequence it is
    given is used (`compute_matched` only halves training batches)."""
    masking = objective.masking if objective.rate == "count" else "iid"
    return dataclasses.replace(
        objective, rate="count", masking=masking, sampler=Uniform(), compute_matched=False
    )


def measure_count_moments(
    objective: Any,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    n_levels: int,
    n_masks: int,
    generator: torch.Generator,
    value: Any = None,
) -> CountMoments:
    """M(x0, k) for each sequence of `batch` at its `count_levels`, each from `n_masks`
    k-subset masks: the mean of value(u)^2, where `value` maps the per-row losses u `[R]` to
    what S is the second moment of (default: u itself; e.g. gradient norms)."""
    if conditions_on_t(model) or objective.kind == "block":
        raise ValueError(
            "ppots_method=counts integrates t out of one mask per sequence, but this model "
            "conditions on t or draws a rate per block; use ppots_method=family or grid"
        )
    counting = count_objective(objective)
    eligible = batch["eligible"].sum(dim=1).cpu().numpy()  # [I]
    pairs = [(i, k) for i, n in enumerate(eligible) for k in count_levels(int(n), n_levels)]
    sequence = np.array([i for i, _ in pairs])  # [P]
    count = np.array([k for _, k in pairs])  # [P]
    rows = np.repeat(sequence, n_masks)  # [R]
    rate = (np.repeat(count, n_masks) - 0.5) / eligible[rows]  # [R] maps to exactly k
    y = []
    for start in range(0, len(rows), ROWS_PER_FORWARD):
        index = torch.as_tensor(rows[start : start + ROWS_PER_FORWARD])
        chunk = {key: v[index.to(v.device)] for key, v in batch.items()}
        r = torch.as_tensor(rate[start : start + ROWS_PER_FORWARD], dtype=torch.float64)
        with torch.set_grad_enabled(value is not None):
            out = counting.at_rates(model, chunk, r, mask_generator=generator)
            if value is None:
                y.append(out.unweighted.double().cpu())
            else:  # the weight is 1 / (|E| q(k)) = 1 under the uniform q; dividing keeps grads
                y.append(value(out.per_sequence / out.weight).detach().double().cpu())
    squares = (torch.cat(y) ** 2).view(len(pairs), n_masks).mean(dim=1).numpy()  # [P]
    if not np.isfinite(squares).all():
        raise ValueError("the counts estimate is not finite: check the model's forward passes")
    return CountMoments(sequence, count, squares, eligible, objective.rate, objective.eps)
