"""EMA (this project's definition, paper.md section 3): P-POTS refreshed from an exponential
moving average of the per-bin second moment during training, every draw weighted by the
density it came from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .rates import F64, PiecewiseDensity, _as_f64, _check_keys, _stored_density, sqrt_edges


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
