"""Estimating and fitting the P-POTS density p*(t) proportional to sqrt(S(t)), S(t) = E[l^2 | t]
(paper.md section 3): the grid estimate of S, the paper's smooth family fitted by KL, a
non-parametric smoothed alternative, and the variance the theory predicts.

Densities here are unnormalised numpy functions of t; `samplers.PPOTS.from_function`
tabulates them into a sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

LOG_SCALE_BOUND = 20.0  # |log a|, |log b|, |log A| <= this during the fit
EXPONENT_MAX = 20.0  # r, q, m in [1, EXPONENT_MAX] and k in [0, EXPONENT_MAX] during the fit
POSITIVE_FLOOR = 1e-6  # the smoothed density is at least this times its largest grid value


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


def _midpoints(n: int) -> np.ndarray:
    """n midpoints of equal cells of (0, 1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return (np.arange(n, dtype=np.float64) + 0.5) / n


def importance_second_moment(
    S_fn: Callable[[np.ndarray], np.ndarray],
    density_fn: Callable[[np.ndarray], np.ndarray],
    n: int = 4096,
) -> float:
    """int_0^1 S(t) / p(t) dt: the second moment of the estimator l / p(t) under t ~ p, for a
    normalised density p (midpoint rule on n cells; exact in p for piecewise densities on
    bins that divide the cells). Its variance is this minus (E l)^2."""
    t = _midpoints(n)
    return float(np.mean(np.asarray(S_fn(t)) / np.asarray(density_fn(t))))


def optimal_variance_ratio(S_fn: Callable[[np.ndarray], np.ndarray], n: int = 4096) -> float:
    """Second moment of the estimator under p* = sqrt(S) / int sqrt(S) over that under the
    uniform: (int sqrt S)^2 / int S <= 1 (midpoint rule on n cells)."""
    s = np.asarray(S_fn(_midpoints(n)), dtype=np.float64)
    return float(np.mean(np.sqrt(s)) ** 2 / np.mean(s))


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
    if target not in ("loss", "grad"):
        raise ValueError(f"P-POTS target must be 'loss' or 'grad', got {target!r}")
    if target == "grad" and not params:
        raise ValueError("P-POTS target 'grad' needs a non-empty parameter list")
    n = batch["input_ids"].shape[0]
    repeated = {k: v.repeat(n_masks, *([1] * (v.dim() - 1))) for k, v in batch.items()}  # [K*I, L]
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
    return second_moment(values)


def fit_ppots(
    objective: Any,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    n_rates: int,
    n_masks: int,
    generator: torch.Generator,
    method: str = "family",
    target: str = "loss",
    params: str = "",
    mix: float = 0.1,
) -> Any:
    """Estimate S(t) on `n_rates` midpoints for this model and batch and fit the P-POTS
    density (`method` "family" or "grid"), mixed with the uniform. In a multi-process run
    the per-rate sums are pooled across processes, so every process samples from the same
    density. `params` is a regex of parameter names for `target="grad"`."""
    import re

    import torch.distributed as dist

    from .samplers import PPOTS

    grid = _midpoints(n_rates)
    chosen = None
    if target == "grad":
        chosen = [p for name, p in model.named_parameters() if re.search(params, name)]
        if not chosen:
            names = ", ".join(name for name, _ in list(model.named_parameters())[:6])
            raise ValueError(f"ppots_params {params!r} matches no parameter (some names: {names})")
    was_training = model.training
    model.eval()
    try:
        S = grid_second_moment(objective, model, batch, grid, n_masks, generator, target, chosen)
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        pooled = torch.tensor(S, dtype=torch.float64)
        dist.all_reduce(pooled)
        S = (pooled / dist.get_world_size()).numpy()
    density = PPOTS.from_second_moment(grid, S, method=method, mix=mix)
    density.source = {
        **(density.source or {}),
        "target": target,
        "grid": grid.tolist(),
        "S": S.tolist(),
    }
    return density
