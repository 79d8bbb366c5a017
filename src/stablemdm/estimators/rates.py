"""Rate samplers (paper.md section 3): the base `RateSampler` (draws t, weights 1/p(t)), the
uniform (Standard), Clipped, piecewise-constant densities, and the base of the schemes that
couple the rates of a batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

U_MIN = 1e-12  # uniforms are clamped to [U_MIN, 1] so that icdf never returns t = 0


NORMALISATION_TOL = 1e-6  # a stored density must integrate to 1 within this


F64 = torch.float64


def _check_generator(generator: torch.Generator) -> None:
    """Reject a missing generator: every draw must come from an explicit one."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"samplers need an explicit torch.Generator, got {type(generator).__name__}"
        )


def _check_n(n: int) -> None:
    """Reject a negative or non-integer draw count."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of draws n must be an integer >= 0, got {n!r}")


def _check_mix(mix: float) -> float:
    """The mixture weight lambda of the uniform must lie in (0, 1] (weights <= 1/lambda)."""
    if isinstance(mix, bool) or not isinstance(mix, int | float) or not 0.0 < mix <= 1.0:
        raise ValueError(
            f"mix (lambda) = {mix!r} is outside (0, 1]: it is the uniform's share of the "
            "density and bounds the weights by 1/mix; use e.g. 0.05"
        )
    return float(mix)


def _check_keys(
    state: Mapping[str, Any], required: set[str], optional: set[str], owner: str
) -> None:
    """Reject a state dict with missing or unknown keys, naming them."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{owner}: expected a dict, got {type(state).__name__}")
    missing = required - set(state)
    unknown = set(state) - required - optional
    if missing or unknown:
        raise ValueError(
            f"{owner}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}; "
            f"expected {sorted(required | optional)}"
        )


def _as_f64(x: torch.Tensor | float) -> torch.Tensor:
    """Any tensor or number as float64 (keeping the tensor's device)."""
    return torch.as_tensor(x).to(F64)


class RateSampler:
    """Base sampler: the uniform on (0, 1] with iid uniforms; subclasses change the density
    (`density`, `cdf`, `icdf`) or the uniform scheme (`uniforms`)."""

    name: ClassVar[str] = ""
    unbiased: bool = True

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """Density of t `[n]` (0 outside [0, 1])."""
        t = _as_f64(t)
        return ((t >= 0) & (t <= 1)).to(F64)

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """P(T <= t) `[n]`."""
        return _as_f64(t).clamp(0.0, 1.0)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse of `cdf` on [0, 1] `[n]`."""
        return _as_f64(u).clamp(0.0, 1.0)

    def uniforms(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The uniform scheme: n iid U(0, 1) draws `[n]`."""
        _check_generator(generator)
        _check_n(n)
        return torch.rand(n, generator=generator, dtype=F64, device=generator.device)

    def row_uniforms(self, rows: int, per_row: int, generator: torch.Generator) -> torch.Tensor:
        """Uniforms `[rows, per_row]` for rows of draws (block diffusion: a row per sequence, a
        draw per block): the scheme's `rows * per_row` uniforms in row-major order, unless a
        scheme couples the draws of each row (`StratifiedRows`)."""
        return self.uniforms(rows * per_row, generator).view(rows, per_row)

    def sample_rows(
        self, rows: int, per_row: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`sample` for rows of draws: rates and weights `[rows, per_row]` (`row_uniforms`)."""
        u = self.row_uniforms(rows, per_row, generator).clamp(U_MIN, 1.0)  # [rows, per_row]
        t = self.icdf(u.flatten())
        return t.view_as(u), self.weight(t).view_as(u)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Importance weight `[n]` of each t: 1 / density(t), or 1 for a biased sampler."""
        if not self.unbiased:
            return torch.ones_like(_as_f64(t))
        return 1.0 / self.density(t)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n rates t in (0, 1] `[n]` and their weights `[n]` (float64, generator device)."""
        u = self.uniforms(n, generator).clamp(U_MIN, 1.0)  # [n]
        t = self.icdf(u)  # [n]
        return t, self.weight(t)

    def observe(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Record the unweighted per-sequence losses `[n]` seen at rates t `[n]` (no-op here)."""

    def step(self) -> None:
        """Count one optimizer step (no-op here)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume drawing exactly as before."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""
        _check_keys(state, set(), set(), type(self).__name__)


class Uniform(RateSampler):
    """Standard: t ~ U(0, 1], weight 1 (paper.md section 3, baselines)."""

    name = "uniform"


class Clipped(RateSampler):
    """Clipped baseline: t ~ U[low, high], weight 1 (after BD3-LM).

    BIASED by design: it estimates the objective restricted to [low, high] (the average of
    E[l | t] over that interval), not the ELBO; `sample_counts` keeps weight 1 too.
    """

    name = "clipped"
    unbiased = False

    def __init__(self, low: float, high: float) -> None:
        self._set(low, high)

    def _set(self, low: float, high: float) -> None:
        """Validate and store the interval."""
        if not (isinstance(low, int | float) and isinstance(high, int | float)):
            raise ValueError(f"Clipped needs numbers low and high, got {low!r}, {high!r}")
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"Clipped needs 0 <= low < high <= 1, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)

    def density(self, t: torch.Tensor) -> torch.Tensor:
        t = _as_f64(t)
        inside = (t >= self.low) & (t <= self.high)
        return inside.to(F64) / (self.high - self.low)

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        return ((_as_f64(t) - self.low) / (self.high - self.low)).clamp(0.0, 1.0)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        return self.low + _as_f64(u).clamp(0.0, 1.0) * (self.high - self.low)

    def state_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_keys(state, {"low", "high"}, set(), "Clipped")
        self._set(state["low"], state["high"])


def _heights_array(heights: Any, owner: str) -> torch.Tensor:
    """Validate bin heights: a non-empty 1-D sequence of finite numbers >= 0, not all zero."""
    try:
        h = torch.as_tensor(np.asarray(heights, dtype=np.float64)).to(F64).cpu()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: heights must be a list of numbers ({err})") from None
    if h.dim() != 1 or h.numel() == 0:
        raise ValueError(
            f"{owner}: heights must be a 1-D list with at least one bin, got shape {tuple(h.shape)}"
        )
    if not torch.isfinite(h).all() or (h < 0).any():
        raise ValueError(f"{owner}: heights must be finite and >= 0")
    if not (h > 0).any():
        raise ValueError(f"{owner}: heights are all zero, which is not a density")
    return h


def equal_edges(n_bins: int) -> torch.Tensor:
    """Edges `[n_bins + 1]` of n equal-width bins of [0, 1]."""
    return torch.arange(n_bins + 1, dtype=F64) / n_bins


def sqrt_edges(n_bins: int) -> torch.Tensor:
    """Edges (j / n)^2 `[n_bins + 1]`: bins equal in sqrt(t), narrow near t = 0 where S(t) grows
    like 1/t and p* like t^(-1/2), so each bin holds about the same share of p* there."""
    return equal_edges(n_bins) ** 2


def _edges_array(edges: Any, n_bins: int, owner: str) -> torch.Tensor:
    """Validate bin edges: n_bins + 1 strictly increasing numbers from exactly 0 to exactly 1."""
    try:
        e = torch.as_tensor(np.asarray(edges, dtype=np.float64)).to(F64).cpu()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{owner}: edges must be a list of numbers ({err})") from None
    if e.shape != (n_bins + 1,):
        raise ValueError(
            f"{owner}: {n_bins} bins need {n_bins + 1} edges, got shape {tuple(e.shape)}"
        )
    if e[0] != 0 or e[-1] != 1 or not (torch.diff(e) > 0).all():
        raise ValueError(f"{owner}: edges must increase strictly from 0 to 1")
    return e


class PiecewiseDensity(RateSampler):
    """Piecewise-constant density on bins [e_j, e_{j+1}) of (0, 1] (equal widths unless `edges`
    are given) mixed with the uniform: density = mix + (1 - mix) h[bin], h normalised so that
    sum_j h_j (e_{j+1} - e_j) = 1.

    Its cdf is piecewise linear and `icdf` inverts it exactly, so weights 1/density are exact
    and bounded by 1/mix. P-POTS and EMA are stored in this form.
    """

    def __init__(self, heights: Any, mix: float, edges: Any = None) -> None:
        owner = type(self).__name__
        h = _heights_array(heights, owner)
        e = equal_edges(h.numel()) if edges is None else _edges_array(edges, h.numel(), owner)
        self._set_density(h / (h * torch.diff(e)).sum(), _check_mix(mix), e)

    def _set_density(self, h: torch.Tensor, mix: float, edges: torch.Tensor) -> None:
        """Install normalised heights h `[n_bins]` on `edges` `[n_bins + 1]` and derive the
        density and cdf knots."""
        self.mix = mix
        self.heights = h.to(F64).cpu()  # [n_bins], integrates to 1 over the bins
        self.edges = edges.to(F64).cpu()  # [n_bins + 1]
        d = mix + (1.0 - mix) * self.heights  # [n_bins]
        mass = torch.cumsum(d * torch.diff(self.edges), 0)
        knots = torch.cat([torch.zeros(1, dtype=F64), mass])  # [n_bins + 1]
        self._bin_density = d / knots[-1]  # exact normalisation: cdf(1) == 1
        self._knots = knots / knots[-1]

    @property
    def n_bins(self) -> int:
        """Number of bins."""
        return self.heights.numel()

    def _bin(self, t: torch.Tensor) -> torch.Tensor:
        """Bin index `[n]` of each t in [0, 1] (t = 1 goes to the last bin)."""
        inner = self.edges[1:-1].to(t.device)
        return torch.searchsorted(inner, t.contiguous(), right=True)

    def density(self, t: torch.Tensor) -> torch.Tensor:
        t = _as_f64(t)
        d = self._bin_density.to(t.device)[self._bin(t.clamp(0.0, 1.0))]  # [n]
        return torch.where((t >= 0) & (t <= 1), d, torch.zeros_like(d))

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        t = _as_f64(t).clamp(0.0, 1.0)
        j = self._bin(t)  # [n]
        knots, d = self._knots.to(t.device), self._bin_density.to(t.device)
        c = (knots[j] + (t - self.edges.to(t.device)[j]) * d[j]).clamp(0.0, 1.0)
        return torch.where(t >= 1.0, torch.ones_like(c), c)  # exactly 1 at t = 1

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        u = _as_f64(u).clamp(0.0, 1.0)
        knots, d = self._knots.to(u.device), self._bin_density.to(u.device)
        edges = self.edges.to(u.device)
        j = torch.searchsorted(knots[1:], u.contiguous(), right=True).clamp(max=self.n_bins - 1)
        t = edges[j] + (u - knots[j]) / d[j]  # [n]
        return torch.minimum(t.clamp(min=0.0), edges[j + 1])

    def state_dict(self) -> dict[str, Any]:
        return {"heights": self.heights.clone(), "mix": self.mix, "edges": self.edges.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_keys(state, {"heights", "mix"}, {"edges"}, type(self).__name__)
        self._set_density(*_stored_density(state, type(self).__name__))


def _stored_density(
    state: Mapping[str, Any], owner: str
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(heights, mix, edges) of a stored density, checked to integrate to 1; a state without
    edges (written before bins could be unequal) has equal bins."""
    h = _heights_array(state["heights"], owner)
    edges = state.get("edges")
    e = equal_edges(h.numel()) if edges is None else _edges_array(edges, h.numel(), owner)
    integral = (h * torch.diff(e)).sum().item()
    if abs(integral - 1.0) > NORMALISATION_TOL:
        raise ValueError(
            f"{owner}: the density integrates to {integral:.9g}, not 1 (tolerance "
            f"{NORMALISATION_TOL}); its heights times the bin widths must sum to 1"
        )
    return h, _check_mix(state["mix"]), e


class RateScheme(RateSampler):
    """A uniform scheme around a base sampler: density, cdf, icdf, weights, state and
    adaptation are the base's, so the scheme acts in the base's CDF space."""

    def __init__(self, base: RateSampler | None = None) -> None:
        base = Uniform() if base is None else base
        if not isinstance(base, RateSampler):
            raise ValueError(
                f"{type(self).__name__} wraps a RateSampler, got {type(base).__name__}"
            )
        if isinstance(base, RateScheme):
            raise ValueError(
                f"{type(self).__name__} cannot wrap {type(base).__name__}: one sampler has one "
                "uniform scheme (iid, stratified or mirrored); wrap the density sampler directly"
            )
        self.base = base

    @property
    def unbiased(self) -> bool:  # type: ignore[override]
        return self.base.unbiased

    def density(self, t: torch.Tensor) -> torch.Tensor:
        return self.base.density(t)

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        return self.base.cdf(t)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        return self.base.icdf(u)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return self.base.weight(t)

    def observe(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        self.base.observe(t, loss)

    def step(self) -> None:
        self.base.step()

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.base.load_state_dict(state)
