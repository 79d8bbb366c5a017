"""Rate samplers: the density of the masking rate t and how its uniforms are drawn (paper.md
section 3).

A sampler is a density on (0, 1] (`density`, `cdf`, `icdf`, exact inverses of each other)
plus a *uniform scheme* (`uniforms`: iid, stratified or mirrored) whose uniforms go through
the inverse CDF. `sample(n, generator)` returns `(t, weight)` with weight = 1 / density(t),
the density the draw actually came from, so `E[weight * f(t)] = int_0^1 f(t) dt` for every
unbiased sampler, even while EMA or a P-POTS refit changes the density during training.

All arithmetic is float64 (t, weights, densities) so the weight is the exact reciprocal of
the density used; callers cast as they need. Draws happen on the generator's device.

Adaptive samplers (EMA) learn from the unweighted per-sequence loss: the trainer calls
`sampler.observe(t, loss)` for every micro-batch and `sampler.step()` after each optimizer
step; both are no-ops for the other samplers, and the scheme wrappers forward them to their
base.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

U_MIN = 1e-12  # uniforms are clamped to [U_MIN, 1] so that icdf never returns t = 0
NORMALISATION_TOL = 1e-6  # a stored density must integrate to 1 within this
FUNCTION_POINTS_PER_BIN = 8  # PPOTS.from_function averages the function over this many points
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


class PPOTS(PiecewiseDensity):
    """P-POTS: t ~ p proportional to sqrt(S(t)), S(t) = E[l^2 | t], mixed with the uniform
    (paper.md section 3). Built from a fitted density (see `ppots.py`); `source` records how,
    `check` the fit's held-out self-check (predicted second moments, see `ppots.self_check`).
    """

    name = "ppots"

    def __init__(
        self,
        heights: Any,
        mix: float = 0.05,
        source: Mapping[str, Any] | None = None,
        edges: Any = None,
        check: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(heights, mix, edges)
        self.source = _optional_dict(source, "source")
        self.check = _optional_dict(check, "check")

    @classmethod
    def from_function(
        cls,
        fn: Any,
        n_bins: int = 1024,
        mix: float = 0.05,
        source: Mapping[str, Any] | None = None,
    ) -> PPOTS:
        """Tabulate an unnormalised density fn(t: ndarray) -> ndarray by its mean over each of
        `n_bins` bins equal in sqrt(t) (`sqrt_edges`), from FUNCTION_POINTS_PER_BIN midpoints
        per bin, so t = 0 is never evaluated."""
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"PPOTS.from_function: n_bins must be an integer >= 1, got {n_bins!r}")
        edges = sqrt_edges(n_bins).numpy()
        m = FUNCTION_POINTS_PER_BIN
        offsets = (np.arange(m, dtype=np.float64) + 0.5) / m  # [m]
        t = (edges[:-1, None] + np.diff(edges)[:, None] * offsets).ravel()  # [n_bins * m]
        values = np.asarray(fn(t), dtype=np.float64)
        if values.shape != t.shape:
            raise ValueError(
                f"PPOTS.from_function: fn returned shape {values.shape}, expected {t.shape}"
            )
        return cls(values.reshape(n_bins, m).mean(axis=1), mix, source, edges)

    @classmethod
    def from_second_moment(
        cls,
        grid: Any,
        S: Any,
        method: str = "family",
        mix: float = 0.05,
        n_bins: int = 1024,
    ) -> PPOTS:
        """A density from S estimated on a grid of rates: the paper's smooth family ("family"),
        a kernel-smoothed grid ("grid"), or sqrt(S) itself interpolated between the rates
        ("counts", the density model of the counts estimate), tabulated (see `ppots.py`)."""
        from . import ppots

        grid, S = np.asarray(grid, dtype=np.float64), np.asarray(S, dtype=np.float64)
        if method == "family":
            params = ppots.fit_family(grid, S)
            fn = lambda t: ppots.family_density(t, params)  # noqa: E731
            source = {"method": "family", "params": params.to_dict()}
        elif method == "grid":
            fn = ppots.smoothed_grid_density(grid, S)
            source = {"method": "grid"}
        elif method == "counts":
            fn = ppots.interpolated_root(grid, S)
            source = {"method": "counts"}
        else:
            raise ValueError(f"PPOTS method must be 'counts', 'family' or 'grid', got {method!r}")
        source.update(grid=grid.tolist(), S=S.tolist())
        return cls.from_function(fn, n_bins=n_bins, mix=mix, source=source)

    @classmethod
    def uniform(
        cls, source: Mapping[str, Any] | None = None, check: Mapping[str, Any] | None = None
    ) -> PPOTS:
        """The uniform density in P-POTS form (weights 1): what a failed fit falls back to."""
        return cls(torch.ones(1, dtype=F64), 1.0, source, check=check)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: bin heights and edges, mix, the fit's source and self-check."""
        return {
            "heights": self.heights.tolist(),
            "edges": self.edges.tolist(),
            "mix": self.mix,
            "source": self.source,
            "check": self.check,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PPOTS:
        """Rebuild from `to_dict()`, checking the fields and that the density integrates to 1
        (files written before edges and the self-check existed load with equal bins)."""
        _check_keys(data, {"heights", "mix"}, {"edges", "source", "check"}, "P-POTS file")
        sampler = cls.__new__(cls)
        sampler._set_density(*_stored_density(data, "P-POTS file"))
        sampler.source = _optional_dict(data.get("source"), "P-POTS file: 'source'")
        sampler.check = _optional_dict(data.get("check"), "P-POTS file: 'check'")
        return sampler

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "source": self.source, "check": self.check}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_keys(state, {"heights", "mix"}, {"edges", "source", "check"}, "PPOTS")
        self._set_density(*_stored_density(state, "PPOTS"))
        self.source = _optional_dict(state.get("source"), "PPOTS: 'source'")
        self.check = _optional_dict(state.get("check"), "PPOTS: 'check'")


def _optional_dict(value: Any, what: str) -> dict[str, Any] | None:
    """A copy of an optional mapping (None stays None); anything else is an error."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict or null, got {type(value).__name__}")
    return dict(value)


class EMA(PiecewiseDensity):
    """Adaptive P-POTS (this project's definition, paper.md section 3): per-bin exponential
    moving averages of E[l^2] of the unweighted loss; every `refresh_every` steps the density
    becomes sqrt(moment) per bin, mixed with the uniform.

    The bins are equal in sqrt(t) (`sqrt_edges`), so they resolve t -> 0 where S(t) grows
    like 1/t. `observe` collects the draws of the current optimizer step (every micro-batch
    and process) and `step` folds their per-bin mean into the averages, so the decay applies
    once per optimizer step. Each draw is weighted by the density it came from, so the
    estimator stays unbiased through refreshes. In count mode observe the rate (k - 1/2) / L
    of a count k.
    """

    name = "ema"

    def __init__(
        self, n_bins: int = 20, decay: float = 0.9, refresh_every: int = 50, mix: float = 0.1
    ) -> None:
        for label, value in (("n_bins", n_bins), ("refresh_every", refresh_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EMA {label} must be an integer >= 1, got {value!r}")
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay!r}")
        super().__init__(torch.ones(n_bins, dtype=F64), mix, sqrt_edges(n_bins))
        self.decay, self.refresh_every = float(decay), refresh_every
        self.moments = torch.zeros(n_bins, dtype=F64)  # [n_bins] EMA of l^2
        self.counts = torch.zeros(n_bins, dtype=torch.long)  # [n_bins] observations so far
        self.pending_sums = torch.zeros(n_bins, dtype=F64)  # [n_bins] l^2 of this step
        self.pending_counts = torch.zeros(n_bins, dtype=torch.long)  # [n_bins] draws this step
        self.steps = 0

    def observe(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Collect this step's unweighted losses `[n]` at rates t `[n]` per bin."""
        t, loss = _as_f64(t.detach()).cpu().flatten(), _as_f64(loss.detach()).cpu().flatten()
        if t.shape != loss.shape:
            raise ValueError(f"EMA.observe: t {tuple(t.shape)} and loss {tuple(loss.shape)} differ")
        if not torch.isfinite(loss).all():
            raise ValueError("EMA.observe: the loss is not finite (the run has diverged)")
        j = self._bin(t.clamp(0.0, 1.0))  # [n]
        self.pending_counts += torch.bincount(j, minlength=self.n_bins)
        self.pending_sums.index_add_(0, j, loss**2)

    def _fold(self) -> None:
        """Fold the collected per-bin mean l^2 into each bin's EMA (first observation: set it)."""
        n = self.pending_counts
        seen = n > 0
        batch = self.pending_sums[seen] / n[seen]
        old = self.moments[seen]
        fresh = self.counts[seen] == 0
        self.moments[seen] = torch.where(fresh, batch, self.decay * old + (1 - self.decay) * batch)
        self.counts += n
        self.pending_sums = torch.zeros_like(self.pending_sums)
        self.pending_counts = torch.zeros_like(self.pending_counts)

    def step(self) -> None:
        """End one optimizer step: fold its draws in; refresh every `refresh_every` steps."""
        self._fold()
        self.steps += 1
        if self.steps % self.refresh_every == 0:
            self.refresh()

    def refresh(self) -> None:
        """Fold in what was collected; then density heights = sqrt(moment) per observed bin,
        the mean of those elsewhere; uniform before any (non-zero) observation."""
        self._fold()
        seen = self.counts > 0
        h = torch.ones(self.n_bins, dtype=F64)
        root = self.moments.sqrt()
        if seen.any() and root[seen].sum() > 0:
            h = torch.where(seen, root, root[seen].mean())
        self._set_density(h / (h * torch.diff(self.edges)).sum(), self.mix, self.edges)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "decay": self.decay,
            "refresh_every": self.refresh_every,
            "moments": self.moments.clone(),
            "counts": self.counts.clone(),
            "pending_sums": self.pending_sums.clone(),
            "pending_counts": self.pending_counts.clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = {"heights", "mix", "decay", "refresh_every", "moments", "counts", "steps"}
        _check_keys(state, keys, {"edges", "pending_sums", "pending_counts"}, "EMA")
        zeros = torch.zeros(self.n_bins)
        moments = torch.as_tensor(state["moments"]).to(F64).cpu()
        counts = torch.as_tensor(state["counts"]).long().cpu()
        pending_sums = torch.as_tensor(state.get("pending_sums", zeros)).to(F64).cpu()
        pending_counts = torch.as_tensor(state.get("pending_counts", zeros)).long().cpu()
        if any(x.shape != (self.n_bins,) for x in (moments, counts, pending_sums, pending_counts)):
            raise ValueError(
                f"EMA state has {moments.numel()} bins but this sampler has {self.n_bins}: "
                "build it with the same n_bins"
            )
        if state["decay"] != self.decay or state["refresh_every"] != self.refresh_every:
            raise ValueError(
                f"EMA state has decay={state['decay']}, refresh_every={state['refresh_every']}; "
                f"this sampler has {self.decay}, {self.refresh_every}: use the same options"
            )
        h, mix, edges = _stored_density(state, "EMA")
        if not torch.equal(edges, self.edges):
            raise ValueError(
                "EMA state has other bin edges than this sampler's (bins equal in sqrt(t)); "
                "it was written by an older stablemdm with equal bins: start the run afresh"
            )
        self._set_density(h, mix, edges)
        self.moments, self.counts, self.steps = moments, counts, int(state["steps"])
        self.pending_sums, self.pending_counts = pending_sums, pending_counts


class _Scheme(RateSampler):
    """A uniform scheme around a base sampler: density, cdf, icdf, weights, state and
    adaptation are the base's, so the scheme acts in the base's CDF space."""

    def __init__(self, base: RateSampler | None = None) -> None:
        base = Uniform() if base is None else base
        if not isinstance(base, RateSampler):
            raise ValueError(
                f"{type(self).__name__} wraps a RateSampler, got {type(base).__name__}"
            )
        if isinstance(base, _Scheme):
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


class Stratified(_Scheme):
    """StraTS: exactly one uniform per stratum [i/n, (i+1)/n), in random order; through the
    base's icdf this stratifies its CDF space (P-POTS + StraTS), paper.md section 3.

    The trainer draws the rates of a whole optimizer step (every process and micro-batch) with
    one generator shared by all ranks and hands each micro-batch of each rank its slice, so
    the strata cover the global batch (`trainer.rate_slice`).
    """

    name = "strats"

    def uniforms(self, n: int, generator: torch.Generator) -> torch.Tensor:
        _check_generator(generator)
        _check_n(n)
        order = torch.randperm(n, generator=generator, device=generator.device)  # [n]
        u = torch.rand(n, generator=generator, dtype=F64, device=generator.device)  # [n]
        return (order.to(F64) + u) / n


class Mirrored(_Scheme):
    """SyRM (this project's definition, paper.md section 3): antithetic uniforms in adjacent
    pairs (u, 1 - u), mirrored in the base's CDF space; with n odd the last one is iid."""

    name = "syrm"

    def uniforms(self, n: int, generator: torch.Generator) -> torch.Tensor:
        _check_generator(generator)
        _check_n(n)
        u = torch.rand(n // 2 + n % 2, generator=generator, dtype=F64, device=generator.device)
        pairs = torch.stack([u[: n // 2], 1.0 - u[: n // 2]], dim=1).flatten()  # [2 (n // 2)]
        return torch.cat([pairs, u[n // 2 :]])  # [n]


SAMPLERS: dict[str, type[RateSampler]] = {
    cls.name: cls for cls in (Uniform, Clipped, PPOTS, EMA, Stratified, Mirrored)
}
SCHEMES: dict[str, type[_Scheme] | None] = {
    "iid": None,
    "stratified": Stratified,
    "mirrored": Mirrored,
}


def make_sampler(name: str, **options: Any) -> RateSampler:
    """Build a registered sampler by its paper name with keyword options."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(sorted(SAMPLERS))}")
    cls = SAMPLERS[name]
    params = inspect.signature(cls).parameters
    unknown = set(options) - set(params)
    if unknown:
        raise ValueError(
            f"sampler {name!r} has no option(s) {sorted(unknown)}; its options: {sorted(params)}"
        )
    missing = [
        p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in options
    ]
    if missing:
        raise ValueError(f"sampler {name!r} needs option(s) {missing}")
    return cls(**options)


def with_scheme(base: RateSampler, scheme: str) -> RateSampler:
    """Draw `base`'s density with a uniform scheme: "iid", "stratified" or "mirrored"."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    if isinstance(base, _Scheme):
        raise ValueError(
            f"{type(base).__name__} already has a uniform scheme; pass the density sampler it wraps"
        )
    wrapper = SCHEMES[scheme]
    return base if wrapper is None else wrapper(base)


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
