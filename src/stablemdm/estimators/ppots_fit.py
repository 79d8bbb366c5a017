"""Estimating and fitting the P-POTS density p*(t) proportional to sqrt(S(t)), S(t) = E[l^2 | t]
(paper.md section 3), and checking the fit.

Three methods (`FitDesign.method`): "counts" (the default) measures S per mask count and maps
it to t exactly (`ppots_counts`), so p = sqrt(S) needs no fitted family; "family" and "grid"
estimate S on a grid of rates equally spaced in sqrt(t) and fit the paper's smooth family by
KL or smooth it with a kernel. Every fit is checked on held-out sequences: the second moment
it predicts relative to Standard and to the optimum (`predicted_ratios`); a fit no better
than Standard by two standard errors of the check falls back to the uniform
(`checked_density`). In count mode the check sums over counts, as the estimator draws them.

Densities here are unnormalised numpy functions of t; `ppots.PPOTS.from_function`
tabulates them into a sampler.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from .blocks import blocks_per_row
from .ppots import PPOTS
from .ppots_counts import CountMoments, measure_count_moments

LOG_SCALE_BOUND = 20.0  # |log a|, |log b|, |log A| <= this during the fit


EXPONENT_MAX = 20.0  # r, q, m in [1, EXPONENT_MAX] and k in [0, EXPONENT_MAX] during the fit


POSITIVE_FLOOR = 1e-6  # the smoothed density is at least this times its largest grid value


LITTLE_TO_GAIN = 0.98  # an optimum above this x Standard's second moment gains little


QUADRATURE_CELLS = 1 << 14  # cells of the integrals over t (equal in sqrt(t), `sqrt_cells`)


# A fit is kept only when its held-out ratio to Standard lies this many standard errors below
# 1: a gain the self-check cannot tell from its own noise would flip between refits.
FALLBACK_Z = 2.0


# ... and at least this far below 1 (0.1% of Standard's second moment): a fit that is the
# uniform up to rounding, or a gain too small for any run to notice, would otherwise be kept
# or dropped by noise at each refit, and a kept one brings its importance weights for nothing.
MIN_GAIN = 1e-3


def second_moment(losses: torch.Tensor | np.ndarray) -> np.ndarray:
    """S `[J]` = mean over sequences i and masks k of l_ijk^2 from UNWEIGHTED losses `[I, J, K]`
    at grid rate j.

    Squaring each draw before averaging keeps the between-sequence spread at fixed t in S;
    the authors' code omits it.
    """
    if isinstance(losses, torch.Tensor):
        losses = losses.detach().cpu().double().numpy()
    l = np.asarray(losses, dtype=np.float64)
    if l.ndim != 3 or 0 in l.shape:
        raise ValueError(
            f"losses must be a non-empty [sequences, rates, masks] array, got shape {l.shape}"
        )
    if not np.isfinite(l).all():
        raise ValueError("losses contain NaN or inf: check the model's forward passes")
    return (l**2).mean(axis=(0, 2))


@dataclass(frozen=True)
class FamilyParams:
    """Parameters of p(t) proportional to sqrt(a t^r + b (1-t)^q + (A exp(k t^m))^2),
    with a, b, A > 0; r, q, m >= 1; k >= 0 (paper.md section 3)."""

    a: float
    b: float
    A: float
    r: float
    q: float
    k: float
    m: float

    def __post_init__(self) -> None:
        values = asdict(self)
        if not all(np.isfinite(v) for v in values.values()):
            raise ValueError(f"family parameters must be finite, got {values}")
        if min(self.a, self.b, self.A) <= 0 or min(self.r, self.q, self.m) < 1 or self.k < 0:
            raise ValueError(f"need a, b, A > 0; r, q, m >= 1; k >= 0; got {values}")

    def to_dict(self) -> dict[str, float]:
        """Plain floats, JSON-ready."""
        return {name: float(v) for name, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FamilyParams:
        """Rebuild from `to_dict()`, naming any missing or unknown field."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping) or set(data) != names:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                f"family parameters need exactly the fields {sorted(names)}, got {got}"
            )
        return cls(**{name: float(data[name]) for name in names})


def family_density(t: np.ndarray, params: FamilyParams) -> np.ndarray:
    """Unnormalised sqrt(a t^r + b (1-t)^q + (A exp(k t^m))^2) at t in [0, 1]."""
    t = np.asarray(t, dtype=np.float64)
    p = params
    return np.sqrt(p.a * t**p.r + p.b * (1.0 - t) ** p.q + (p.A * np.exp(p.k * t**p.m)) ** 2)


def _check_grid(grid: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a grid estimate: increasing rates in (0, 1] and finite S >= 0, not all zero."""
    grid, S = np.asarray(grid, dtype=np.float64), np.asarray(S, dtype=np.float64)
    if grid.ndim != 1 or S.shape != grid.shape or grid.size < 2:
        raise ValueError(
            f"grid and S must be 1-D of equal length >= 2, got {grid.shape}, {S.shape}"
        )
    if not (np.all(np.diff(grid) > 0) and grid[0] > 0 and grid[-1] <= 1):
        raise ValueError("grid rates must be strictly increasing and lie in (0, 1]")
    if not np.isfinite(S).all() or (S < 0).any() or not (S > 0).any():
        raise ValueError("S must be finite and >= 0 with at least one positive value")
    return grid, S


def _cell_widths(grid: np.ndarray) -> np.ndarray:
    """Quadrature weights `[J]`: the widths of the cells [0, midpoints..., 1] around each rate."""
    edges = np.concatenate([[0.0], 0.5 * (grid[1:] + grid[:-1]), [1.0]])
    return np.diff(edges)


def _kl_inputs(grid: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, log cell widths, p_hat as grid probabilities) `[J]` each, for `_family_kl`."""
    grid, S = _check_grid(grid, S)
    w = _cell_widths(grid)
    target = w * np.sqrt(S)
    return grid, np.log(w), target / target.sum()


def _family_kl(
    x: np.ndarray, grid: np.ndarray, log_w: np.ndarray, target: np.ndarray
) -> tuple[float, np.ndarray]:
    """KL(p_hat || p_theta) on the grid and its gradient `[7]` in x = (log a, log b, log A,
    r, q, k, m); log p = LSE(terms) / 2, so d KL = sum_j (pi_j - p_hat_j) d log p_j."""
    la, lb, lA, r, q, k, m = x
    interior = grid < 1
    log_t = np.log(grid)
    log1m = np.log1p(-np.where(interior, grid, 0.0))  # 0 at t = 1, where the b term is off
    t_m = grid**m
    b_term = np.where(interior, lb + q * log1m, -np.inf)
    terms = np.stack([la + r * log_t, b_term, 2 * lA + 2 * k * t_m])  # [3, J]
    log_pi = log_w + 0.5 * logsumexp(terms, axis=0)  # [J]
    log_pi = log_pi - logsumexp(log_pi)
    pos = target > 0
    kl = float(np.sum(target[pos] * (np.log(target[pos]) - log_pi[pos])))
    s = softmax(terms, axis=0)  # [3, J] share of each term
    dlogp = 0.5 * np.stack(
        [
            s[0],
            s[1],
            2 * s[2],
            s[0] * log_t,
            s[1] * log1m,
            2 * s[2] * t_m,
            2 * s[2] * k * t_m * log_t,
        ]
    )  # [7, J]
    return kl, dlogp @ (np.exp(log_pi) - target)


def fit_family(grid: np.ndarray, S: np.ndarray, n_starts: int = 8, seed: int = 0) -> FamilyParams:
    """Fit the smooth family to p_hat proportional to sqrt(S) on the grid by minimising
    KL(p_hat || p_theta), both normalised by the grid's cell-width quadrature.

    Multi-start L-BFGS-B (analytic gradients) from seeded random starts over
    (log a, log b, log A, r, q, k, m) with box bounds; returns the best fit. The overall
    scale of (a, b, A^2) does not change the density, so only the density is identified.
    """
    if n_starts < 1:
        raise ValueError(f"n_starts must be >= 1, got {n_starts}")
    args = _kl_inputs(grid, S)
    s, e = LOG_SCALE_BOUND, EXPONENT_MAX
    bounds = [(-s, s)] * 3 + [(1.0, e), (1.0, e), (0.0, e), (1.0, e)]
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_starts):
        x0 = np.concatenate([rng.uniform(-2, 2, 3), rng.uniform(1, 5, 2), rng.uniform(0, 3, 2)])
        x0[6] += 1.0  # m in [1, 4)
        res = minimize(
            _family_kl,
            x0,
            args=args,
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10},
        )
        if best is None or res.fun < best.fun:
            best = res
    la, lb, lA, r, q, k, m = best.x
    return FamilyParams(*(float(v) for v in (np.exp(la), np.exp(lb), np.exp(lA), r, q, k, m)))


def family_kl(grid: np.ndarray, S: np.ndarray, params: FamilyParams) -> float:
    """KL(p_hat || p_theta) on the grid that `fit_family` minimises (for reporting fits)."""
    p = params
    x = np.array([np.log(p.a), np.log(p.b), np.log(p.A), p.r, p.q, p.k, p.m])
    return _family_kl(x, *_kl_inputs(grid, S))[0]


def smoothed_grid_density(
    grid: np.ndarray, S: np.ndarray, bandwidth: float = 0.05
) -> Callable[[np.ndarray], np.ndarray]:
    """Non-parametric alternative: Gaussian-kernel (Nadaraya-Watson) smoothing of sqrt(S) over
    the grid, reflected at 0 and 1, as a function of any t; strictly positive."""
    grid, S = _check_grid(grid, S)
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    y = np.sqrt(S)
    points = np.concatenate([grid, -grid, 2.0 - grid])  # [3J] with the reflections
    values = np.tile(y, 3)  # [3J]
    floor = POSITIVE_FLOOR * y.max()

    def density(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        logk = -0.5 * ((t[..., None] - points) / bandwidth) ** 2  # [..., 3J]
        k = np.exp(logk - logk.max(axis=-1, keepdims=True))
        return np.maximum((k * values).sum(axis=-1) / k.sum(axis=-1), floor)

    return density


def rate_grid(n: int) -> np.ndarray:
    """n rates ((j + 1/2) / n)^2 `[n]`: equally spaced in sqrt(t), so a grid estimate of S
    resolves t -> 0, where S(t) grows like 1/t and holds much of its integral."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return ((np.arange(n, dtype=np.float64) + 0.5) / n) ** 2


def sqrt_cells(n: int = QUADRATURE_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature on (0, 1): the midpoints t `[n]` of n cells equal in u = sqrt(t) and their
    weights dt = 2u du `[n]` (summing to 1). Resolves S ~ 1/t at t -> 0; exact for densities
    piecewise constant on bins equal in sqrt(t) whose count divides n (`rates.sqrt_edges`)."""
    u = (np.arange(n, dtype=np.float64) + 0.5) / n
    return u**2, 2.0 * u / n


def interpolated_root(grid: np.ndarray, S: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """sqrt(S) as a function of any t: linear in sqrt(t) between the grid rates, constant
    beyond the first and last; strictly positive (floored like `smoothed_grid_density`)."""
    grid, S = _check_grid(grid, S)
    root = np.sqrt(S)
    floor = POSITIVE_FLOOR * root.max()

    def density(t: np.ndarray) -> np.ndarray:
        u = np.sqrt(np.asarray(t, dtype=np.float64))
        return np.maximum(np.interp(u, np.sqrt(grid), root), floor)

    return density


def importance_second_moment(
    S_fn: Callable[[np.ndarray], np.ndarray],
    density_fn: Callable[[np.ndarray], np.ndarray],
    n: int = QUADRATURE_CELLS,
) -> float:
    """int_0^1 S(t) / p(t) dt: the second moment of the estimator l / p(t) under t ~ p, for a
    normalised density p (`sqrt_cells` quadrature on n cells). Its variance is this minus
    (E l)^2."""
    t, w = sqrt_cells(n)
    return float(np.sum(w * np.asarray(S_fn(t)) / np.asarray(density_fn(t))))


def optimal_variance_ratio(
    S_fn: Callable[[np.ndarray], np.ndarray], n: int = QUADRATURE_CELLS
) -> float:
    """Second moment of the estimator under p* = sqrt(S) / int sqrt(S) over that under the
    uniform: (int sqrt S)^2 / int S <= 1 (`sqrt_cells` quadrature on n cells)."""
    t, w = sqrt_cells(n)
    s = np.asarray(S_fn(t), dtype=np.float64)
    return float(np.sum(w * np.sqrt(s)) ** 2 / np.sum(w * s))


def predicted_ratios(t: np.ndarray, w: np.ndarray, S: np.ndarray, density: np.ndarray) -> dict:
    """The self-check of a fitted density p `[n]` from an independent estimate of S at rates t
    with quadrature weights w (`[n]`), S `[n]` or per sequence `[I, n]`: int S/p over
    Standard's int S (`ratio_to_standard`, < 1 is a gain) with its standard error over the
    sequences (`ratio_se`), over the optimum (int sqrt S)^2 (`ratio_to_optimal`, >= 1), and the
    optimum over Standard (`optimal_ratio`). Pooled over processes."""
    S = np.atleast_2d(np.asarray(S, dtype=np.float64))  # [I, n]
    optimal = float(np.sum(w * np.sqrt(_pooled(S.mean(axis=0)))) ** 2)
    return _ratios(S @ w, S @ (w / density), optimal)


def _ratios(standard: np.ndarray, fitted: np.ndarray, optimal: float) -> dict:
    """The self-check from each sequence's second moment `[I]` under Standard and under the
    fit, pooled over processes (each holds as many sequences), and the optimum's: the ratios
    and the standard error of ratio_to_standard, a ratio of means (delta method; 0 for one
    sequence)."""
    n = len(standard) * _world_size()
    moments = np.array(
        [standard.mean(), fitted.mean(), (standard**2).mean(), (fitted**2).mean()]
        + [(standard * fitted).mean()]
    )
    s, f, ss, ff, sf = (float(m) for m in _pooled(moments))  # plain floats: saved in states
    ratio = f / s
    spread = max(ff - 2 * ratio * sf + ratio**2 * ss, 0.0) * n / (n - 1) if n > 1 else 0.0
    return {
        "ratio_to_standard": ratio,
        "ratio_se": math.sqrt(spread / n) / s,
        "ratio_to_optimal": f / optimal,
        "optimal_ratio": optimal / s,
    }


def _grad_norms_sq(values: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """||d values_b / d params||^2 for each entry of `values` `[N]` (one backward each)."""
    out = torch.empty(len(values), dtype=torch.float64)
    for b in range(len(values)):
        grads = torch.autograd.grad(values[b], params, retain_graph=b + 1 < len(values))
        out[b] = sum(float(g.double().pow(2).sum()) for g in grads)
    return out


def grid_second_moment(
    objective: Any,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    grid: np.ndarray,
    n_masks: int,
    generator: torch.Generator,
    target: str = "loss",
    params: list[torch.Tensor] | None = None,
) -> np.ndarray:
    """S on a grid `[J]` from the nested design (batch sequences x grid rates x n_masks masks):
    the second moment of the unweighted loss (`target="loss"`) or of its gradient norm over
    `params` (`target="grad"`, the quantity the gradient variance depends on). Works in rate
    and count mode (the objective's `at_rates` interprets the grid)."""
    return second_moment(
        grid_values(objective, model, batch, grid, n_masks, generator, target, params)
    )


def grid_values(
    objective: Any,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    grid: np.ndarray,
    n_masks: int,
    generator: torch.Generator,
    target: str = "loss",
    params: list[torch.Tensor] | None = None,
) -> np.ndarray:
    """The values `[I, J, K]` whose second moment `grid_second_moment` is (see there). For
    block diffusion (`objective.kind == "block"`) the units I are the blocks of the batch
    (`block_grid_values`)."""
    if target not in ("loss", "grad"):
        raise ValueError(f"P-POTS target must be 'loss' or 'grad', got {target!r}")
    if target == "grad" and not params:
        raise ValueError("P-POTS target 'grad' needs a non-empty parameter list")
    n = batch["input_ids"].shape[0]
    repeated = {k: v.repeat(n_masks, *([1] * (v.dim() - 1))) for k, v in batch.items()}  # [K*I, L]
    if objective.kind == "block":
        if target == "grad":
            raise ValueError(
                "P-POTS for blocks fits the loss's second moment per block: use ppots_target=loss"
            )
        return block_grid_values(objective, model, repeated, grid, n_masks, generator)
    values = np.empty((n, len(grid), n_masks))
    for j, t in enumerate(grid):
        r = torch.full((n * n_masks,), float(t))
        with torch.set_grad_enabled(target == "grad"):
            out = objective.at_rates(model, repeated, r, mask_generator=generator)
            if target == "grad":
                y = _grad_norms_sq(out.per_sequence, params).sqrt()
            else:
                y = out.per_sequence.detach().double().cpu()
        values[:, j, :] = y.view(n_masks, n).T.numpy()
    return values


def block_grid_values(
    objective: Any,
    model: torch.nn.Module,
    repeated: dict[str, torch.Tensor],
    grid: np.ndarray,
    n_masks: int,
    generator: torch.Generator,
) -> np.ndarray:
    """Block diffusion's grid values `[U, J, K]`: every block of every sequence at rate t,
    each block's unweighted term (its part of the sequence's loss) for U = the batch's blocks,
    so that S(t) is pooled over block positions. Blocks draw independent rates, so the
    sequence's variance is the sum of its blocks' and the optimal density is proportional to
    sqrt of the pooled S (`repeated`: the batch repeated `n_masks` times)."""
    n, length = repeated["input_ids"].shape
    nb = blocks_per_row(length, objective.block_size)
    values = []
    for t in grid:
        r = torch.full((n, nb), float(t))
        with torch.no_grad():
            out = objective.at_block_rates(model, repeated, r, mask_generator=generator)
        values.append(out.unweighted.double().cpu().view(n_masks, -1).T.numpy())  # [U, K]
    return np.stack(values, axis=1)  # [U, J, K]


def _pooled(values: np.ndarray) -> np.ndarray:
    """The mean over processes of per-process estimates `[n]` (itself with one process), so
    every process fits and checks the same density."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    pooled = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(pooled)
    return (pooled / dist.get_world_size()).numpy()


def _target(model: torch.nn.Module, target: str, params: str):
    """The parameters for `target="grad"` (None for "loss"), named in an error if none match."""
    import re

    if target not in ("loss", "grad"):
        raise ValueError(f"P-POTS target must be 'loss' or 'grad', got {target!r}")
    if target == "loss":
        return None
    chosen = [p for name, p in model.named_parameters() if re.search(params, name)]
    if not chosen:
        names = ", ".join(name for name, _ in list(model.named_parameters())[:6])
        raise ValueError(f"ppots_params {params!r} matches no parameter (some names: {names})")
    return chosen


@dataclass(frozen=True)
class FitDesign:
    """How S is estimated and the density fitted: `method` "counts" (`ppots_counts`, at
    `counts` mask-count levels per sequence, p = sqrt(S) itself), "family" or "grid" (on
    `rate_grid(rates)`, the paper's family or kernel smoothing); `masks` masks per point,
    `mix` the uniform's share of the density."""

    method: str = "counts"
    counts: int = 16
    rates: int = 24
    masks: int = 2
    mix: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in ("counts", "family", "grid"):
            raise ValueError(
                f"P-POTS method must be 'counts', 'family' or 'grid', got {self.method!r}"
            )

    def describe(self) -> dict[str, Any]:
        """The design's points and masks, as stored in a density's `source`."""
        points = {"counts": self.counts} if self.method == "counts" else {"rates": self.rates}
        return {**points, "masks": self.masks}


@dataclass(frozen=True)
class _Estimate:
    """One estimate of S on a batch (this process's sequences): rates t and quadrature weights
    w `[n]` for integrals over t, S per sequence as a function `[I, len(x)]` (the counts
    estimate at any t, a grid estimate only at its rates t), and the counts estimate itself."""

    t: np.ndarray
    w: np.ndarray
    each: Callable[[np.ndarray], np.ndarray]
    counts: CountMoments | None

    def S(self, x: np.ndarray) -> np.ndarray:
        """S at rates x `[len(x)]`: the mean over sequences, pooled over processes."""
        return _pooled(self.each(x).mean(axis=0))


def _estimate(
    objective: Any,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    design: FitDesign,
    generator: torch.Generator,
    chosen: list[torch.Tensor] | None,
) -> _Estimate:
    """One estimate of S on `batch` by the design's method (`_Estimate`)."""
    if design.method == "counts":
        value = None if chosen is None else (lambda u: _grad_norms_sq(u, chosen).sqrt())
        moments = measure_count_moments(
            objective, model, batch, design.counts, design.masks, generator, value
        )
        t, w = sqrt_cells()
        return _Estimate(t, w, moments.S_each, moments)
    grid = rate_grid(design.rates)
    target = "loss" if chosen is None else "grad"
    values = grid_values(objective, model, batch, grid, design.masks, generator, target, chosen)
    second_moment(values)  # validates them
    each = (values**2).mean(axis=2)  # [I, J]
    return _Estimate(grid, _cell_widths(grid), lambda x: each, None)


def density_from_second_moment(
    grid: Any, S: Any, method: str = "family", mix: float = 0.05, n_bins: int = 1024
) -> PPOTS:
    """A P-POTS density from S estimated on a grid of rates: the paper's smooth family
    ("family"), a kernel-smoothed grid ("grid"), or sqrt(S) itself interpolated between the
    rates ("counts", the density model of the counts estimate), tabulated."""
    grid, S = np.asarray(grid, dtype=np.float64), np.asarray(S, dtype=np.float64)
    if method == "family":
        params = fit_family(grid, S)
        fn = lambda t: family_density(t, params)  # noqa: E731
        source = {"method": "family", "params": params.to_dict()}
    elif method == "grid":
        fn = smoothed_grid_density(grid, S)
        source = {"method": "grid"}
    elif method == "counts":
        fn = interpolated_root(grid, S)
        source = {"method": "counts"}
    else:
        raise ValueError(f"PPOTS method must be 'counts', 'family' or 'grid', got {method!r}")
    source.update(grid=grid.tolist(), S=S.tolist())
    return PPOTS.from_function(fn, n_bins=n_bins, mix=mix, source=source)


def fit_ppots(
    objective: Any,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    check_batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    design: FitDesign = FitDesign(),
    target: str = "loss",
    params: str = "",
) -> Any:
    """Estimate S(t) for this model on `batch`, fit the P-POTS density (mixed with the
    uniform) and check it on the held-out `check_batch` (`checked_density`). In a
    multi-process run the estimates are averaged over processes, so every process samples
    from the same density. `params` is a regex of parameter names for `target="grad"`."""
    chosen = _target(model, target, params)
    was_training = model.training
    model.eval()
    try:
        fit = _estimate(objective, model, batch, design, generator, chosen)
        held = _estimate(objective, model, check_batch, design, generator, chosen)
    finally:
        model.train(was_training)
    if design.method == "counts":
        density = PPOTS.from_function(lambda x: np.sqrt(fit.S(x)), mix=design.mix, source={})
        shown = fit.t[:: len(fit.t) // 64]  # [64] for inspection
        density.source.update(method="counts", grid=shown.tolist(), S=fit.S(shown).tolist())
    else:
        density = density_from_second_moment(
            fit.t, fit.S(fit.t), method=design.method, mix=design.mix
        )
    world = _world_size()
    density.source.update(
        target=target,
        sequences=world * len(batch["input_ids"]),
        held_out=world * len(check_batch["input_ids"]),
        **design.describe(),
    )
    return checked_density(density, held.t, held.w, held.each(held.t), held.counts)


def _world_size() -> int:
    """Processes in this run (1 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def checked_density(
    density: Any, t: np.ndarray, w: np.ndarray, S: np.ndarray, counts: CountMoments | None = None
) -> Any:
    """Attach the held-out self-check (`predicted_ratios` of S `[n]` or per sequence `[I, n]`
    at rates t with weights w) to the density. In count mode (`counts` of a count-mode
    objective) the estimator draws counts, so its second moments are sums over counts
    (`CountMoments.count_mode_moments`), not integrals over t. A density not predicted to beat
    Standard by FALLBACK_Z standard errors (and MIN_GAIN) is replaced by the uniform, with one
    warning: a fit the check cannot tell from Standard would otherwise flip between refits."""
    x = torch.as_tensor(t, dtype=torch.float64)
    if counts is not None and counts.rate == "count":
        cdf = lambda u: density.cdf(torch.as_tensor(u, dtype=torch.float64)).numpy()  # noqa: E731
        S2 = np.atleast_2d(np.asarray(S, dtype=np.float64))
        optimal = float(np.sum(w * np.sqrt(_pooled(S2.mean(axis=0)))) ** 2)
        check = _ratios(*counts.count_mode_moments(cdf), optimal)
    else:
        check = predicted_ratios(t, w, S, density.density(x).numpy())
    margin = max(FALLBACK_Z * check["ratio_se"], MIN_GAIN)
    if check["ratio_to_standard"] < 1.0 - margin:
        density.check = {**check, "fallback": False}
        return density
    why = _fallback_reason(check, (density.source or {}).get("method"))
    warnings.warn(
        f"P-POTS: on held-out sequences the fitted density predicts "
        f"{check['ratio_to_standard']:.4f} +- {check['ratio_se']:.4f} x Standard's second "
        f"moment, not clearly better than Standard (by {FALLBACK_Z:g} standard errors); "
        f"falling back to the uniform ({why})",
        stacklevel=2,
    )
    return PPOTS.uniform(
        source={**(density.source or {}), "fallback": True}, check={**check, "fallback": True}
    )


def _fallback_reason(check: Mapping[str, float], method: str | None) -> str:
    """Why a fit may be no better than Standard, and what to change."""
    if check["optimal_ratio"] > LITTLE_TO_GAIN:
        return (
            f"even the optimum is {check['optimal_ratio']:.4f} x Standard's: there is little "
            "to gain for this model"
        )
    fix = "raise ppots_sequences or ppots_masks"
    return f"the estimate is too noisy: {fix}" + ("" if method == "counts" else " or use counts")


def describe_fit(density: Any) -> str:
    """One line on a fitted density: its design and held-out self-check."""
    source, check = density.source or {}, density.check
    kind = "counts" if "counts" in source else "rates"
    design = (
        f"{source.get('method')}, {source.get('sequences')} sequences x {source.get(kind)} "
        f"{kind} x {source.get('masks')} masks"
    )
    if check is None:
        return f"P-POTS density ({design}), no self-check"
    se = f" +- {check['ratio_se']:.3f}" if "ratio_se" in check else ""
    line = (
        f"P-POTS density ({design}): on {source.get('held_out')} held-out sequences its "
        f"second moment is {check['ratio_to_standard']:.3f}{se} x Standard's and "
        f"{check['ratio_to_optimal']:.3f} x the optimum's ({check['optimal_ratio']:.3f} x "
        "Standard's)"
    )
    return line + ("; fell back to the uniform" if check.get("fallback") else "")
