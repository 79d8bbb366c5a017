"""The P-POTS density (paper.md section 3): a piecewise-constant p(t) proportional to
sqrt(S(t)), saved as JSON with the fit's provenance and self-check. How it is fitted is
`ppots_fit` (rates) and `ppots_counts` (counts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .rates import F64, PiecewiseDensity, _check_keys, _stored_density, sqrt_edges

FUNCTION_POINTS_PER_BIN = 8  # PPOTS.from_function averages the function over this many points


class PPOTS(PiecewiseDensity):
    """P-POTS: t ~ p proportional to sqrt(S(t)), S(t) = E[l^2 | t], mixed with the uniform
    (paper.md section 3). Built from a fitted density (see `ppots_fit`); `source` records how,
    `check` the fit's held-out self-check (predicted second moments, see
    `ppots_fit.checked_density`).
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
