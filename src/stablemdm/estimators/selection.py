"""Which estimator to train with: the variance of the minibatch gradient of each candidate
at equal compute, and the rule that picks one (`estimator: auto`, `stablemdm variance`).

One observation of a candidate is the gradient of its minibatch loss (`ObjectiveOutput.loss`)
on one minibatch, reduced to a seeded Gaussian projection (`GradientFeature`). R such
observations give the trace of the covariance of the minibatch gradient and its jackknife SE
(`minibatch_variance`); times the forward passes of a minibatch it is the variance per unit
of compute (`compare_estimators`, lower is better). `choose` takes the lowest at the first
measurement and then keeps the incumbent unless another candidate is lower by more than
`MARGIN` standard errors of the difference (`paired_difference`, valid for draws that share
their minibatches and for independent ones).
Pure PyTorch/NumPy over a model, objectives and batches: no trainer, CLI or file I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..rng import seeded_generator
from .objective import Objective, ObjectiveOutput

F64 = torch.float64


FULL_GRADIENT_MAX = 200_000  # more coordinates than this and no params regex: project


DEFAULT_PROJECTION = 128  # dimensions of the default random projection


PROJECTION_CHUNK = 1 << 22  # entries of one projection block [columns, P] (16 MiB in fp32)


PROJECTION_CACHE = 1 << 26  # keep the projection in memory up to this many entries (256 MiB)


PROJECTION_ROWS = 64  # gradients buffered and projected together (bounds memory and reuse cost)


# A candidate displaces the incumbent only when lower by more than MARGIN standard errors of
# the difference of variance x forward passes (docs/methods.md, "estimator: auto").
MARGIN = 2.0


Draws = np.ndarray | torch.Tensor


class GradientFeature:
    """What one gradient observation is: the flattened gradient of the chosen parameters
    (`params`, a regex searched in parameter names; all by default), or its projection
    G g with a seeded Gaussian G `[P, D]` of variance 1/P (E[G^T G] = I, so every covariance
    trace is preserved in expectation and all methods share the same G).

    G is drawn block by block of columns (`PROJECTION_CHUNK` entries) from generators seeded by
    (seed, "projection", block), so it is reproducible and never materialised whole when it
    has more than `PROJECTION_CACHE` entries; smaller ones are kept after the first use.
    """

    def __init__(
        self, model: torch.nn.Module, params: str | None, project: int | None, seed: int
    ) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if params is not None:
            try:
                pattern = re.compile(params)
            except re.error as err:
                raise ConfigError(
                    f"--params {params!r} is not a valid regular expression ({err})"
                ) from None
            chosen = [(n, p) for n, p in named if pattern.search(n)]
            if not chosen:
                some = ", ".join(n for n, _ in named[:8])
                raise ConfigError(
                    f"--params {params!r} matches no parameter; the model has {len(named)} "
                    f"parameter tensors, e.g. {some}"
                )
            named = chosen
        self.params = [p for _, p in named]
        self.n_coordinates = sum(p.numel() for p in self.params)
        if project is None and params is None and self.n_coordinates > FULL_GRADIENT_MAX:
            project = DEFAULT_PROJECTION
        self.project = project
        self.pattern = params
        self.seed = seed
        self._cache: list[tuple[int, torch.Tensor]] | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary of the feature."""
        return {
            "params": self.pattern or "all",
            "tensors": len(self.params),
            "coordinates": self.n_coordinates,
            "projection": self.project,
        }

    def gradient(self, value: torch.Tensor, retain_graph: bool) -> torch.Tensor:
        """The flattened fp32 CPU gradient `[D]` of the scalar `value`."""
        grads = torch.autograd.grad(
            value, self.params, retain_graph=retain_graph, allow_unused=True
        )
        flat = [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, self.params, strict=True)
        ]
        return torch.cat(flat).float().cpu()  # [D]

    def reduce(self, rows: torch.Tensor) -> torch.Tensor:
        """Observations `[N, P]` from flat gradients `[N, D]` (identity without projection)."""
        if self.project is None:
            return rows
        out = torch.zeros(rows.shape[0], self.project)  # [N, P]
        for start, block in self._blocks():
            out += rows[:, start : start + block.shape[0]] @ block
        return out

    def _blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first column, G^T block `[columns, P]`) over the columns of G."""
        if self._cache is not None:
            yield from self._cache
            return
        width = max(1, PROJECTION_CHUNK // self.project)
        keep = self.n_coordinates * self.project <= PROJECTION_CACHE
        blocks = []
        for index, start in enumerate(range(0, self.n_coordinates, width)):
            columns = min(width, self.n_coordinates - start)
            generator = seeded_generator(self.seed, "projection", self.project, index)
            block = torch.randn(columns, self.project, generator=generator)  # [columns, P]
            block /= math.sqrt(self.project)
            if keep:
                blocks.append((start, block))
            yield start, block
        if keep:
            self._cache = blocks


class Collector:
    """Collects flat gradients one at a time and reduces them in blocks of PROJECTION_ROWS."""

    def __init__(self, feature: GradientFeature) -> None:
        self.feature = feature
        self.pending: list[torch.Tensor] = []
        self.done: list[torch.Tensor] = []

    def add(self, flat: torch.Tensor) -> None:
        self.pending.append(flat)
        if len(self.pending) >= PROJECTION_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.done.append(self.feature.reduce(torch.stack(self.pending)))  # [N, P]
            self.pending = []

    def result(self) -> torch.Tensor:
        """All observations so far `[N, P]`."""
        self._flush()
        return torch.cat(self.done)


@dataclass
class MinibatchDraws:
    """R independent minibatch estimates of one estimator: the losses `[R]` (float64), the
    gradient features `[R, P]` (None when not asked for) and the forward passes of one."""

    loss: torch.Tensor
    grad: torch.Tensor | None
    forward_passes: int

    def finite(self) -> bool:
        """Whether every loss and gradient observation is finite."""
        grad_ok = self.grad is None or bool(torch.isfinite(self.grad).all())
        return bool(torch.isfinite(self.loss).all()) and grad_ok


def minibatch_draws(
    model: torch.nn.Module,
    objective: Objective,
    batches: Iterable[dict[str, torch.Tensor]],
    generators: Callable[[int], tuple[torch.Generator, torch.Generator]],
    feature: GradientFeature | None = None,
    observe: Callable[[ObjectiveOutput], None] | None = None,
) -> MinibatchDraws:
    """Evaluate `objective` once per batch r with the (rate, mask) generators
    `generators(r)`; keep the minibatch loss and, with a `feature`, its gradient feature (one
    backward each). `observe(out)` sees every output (e.g. to feed an EMA sampler)."""
    collector = Collector(feature) if feature is not None else None
    losses, passes = [], set()
    for r, batch in enumerate(batches):
        with torch.set_grad_enabled(collector is not None):
            out = objective(model, batch, *generators(r))
        losses.append(out.loss.detach().to("cpu", F64))
        passes.add(out.forward_passes)
        if collector is not None:
            collector.add(feature.gradient(out.loss, retain_graph=False))
        if observe is not None:
            observe(out)
    if len(passes) != 1:
        raise ValueError(f"forward passes per minibatch varied ({sorted(passes)})")
    grad = collector.result() if collector is not None else None
    return MinibatchDraws(torch.stack(losses), grad, passes.pop())


def _centred_squares(draws: Draws) -> np.ndarray:
    """z_r = |d_r - mean d|^2 `[R]` of R draws `[R]` or `[R, P]`, in float64."""
    if isinstance(draws, torch.Tensor):
        draws = draws.detach().to(device="cpu", dtype=torch.float64).numpy()
    d = np.asarray(draws, dtype=np.float64).reshape(len(draws), -1)  # [R, P]
    return ((d - d.mean(axis=0)) ** 2).sum(axis=1)


def _check_draws(draws: Draws, what: str) -> int:
    """Validate R draws `[R]` or `[R, P]` (R >= 3, all finite) and return R."""
    if draws.ndim not in (1, 2):
        raise ValueError(
            f"{what}: draws must have shape [R] or [R, P] (R independent minibatch "
            f"estimates), got shape {tuple(draws.shape)}"
        )
    R = int(draws.shape[0])
    if R < 3:
        raise ValueError(
            f"{what}: need at least 3 independent draws for a variance and its SE, got R = {R}"
        )
    finite = torch.isfinite(draws) if isinstance(draws, torch.Tensor) else np.isfinite(draws)
    if not bool(finite.all()):
        bad = ~finite
        where = bad.nonzero() if isinstance(bad, torch.Tensor) else np.argwhere(bad)
        raise ValueError(
            f"{what}: draws: {int(bad.sum())} non-finite value(s) (NaN or inf), the first at "
            f"index {tuple(int(v) for v in where[0])}; drop or recompute those draws before "
            "estimating variances"
        )
    return R


def _jackknife_se(z: np.ndarray) -> float:
    """Delete-one jackknife SE of sum(z) / (R - 1) for z_r = |d_r - mean|^2 (closed form)."""
    R = len(z)
    return float(np.sqrt(R / ((R - 1) * (R - 2) ** 2) * ((z - z.mean()) ** 2).sum()))


def minibatch_variance(draws: Draws) -> tuple[float, float]:
    """Trace of the sample covariance of R independent estimates `[R, P]` (or `[R]`) and its SE.

    With z_r = |d_r - mean|^2 the trace is T = sum_r z_r / (R - 1). The SE is the delete-one
    jackknife over draws, which for T has the closed form
    SE^2 = R / ((R - 1) (R - 2)^2) * sum_r (z_r - mean z)^2 (about Var(z) / R for large R).
    """
    if not isinstance(draws, torch.Tensor):
        draws = np.asarray(draws)
    R = _check_draws(draws, "minibatch_variance")
    z = _centred_squares(draws)
    return float(z.sum() / (R - 1)), _jackknife_se(z)


def paired_difference(a: Draws, passes_a: int, b: Draws, passes_b: int) -> tuple[float, float]:
    """(V_a - V_b, its SE) for V = forward passes x `minibatch_variance`, from the same
    number R of draws of each. Deleting draw r from both changes each T linearly in its own
    z_r, so the jackknife SE of the difference has the closed form of `minibatch_variance`
    applied to passes_a z_a - passes_b z_b. It holds when the draws of a and b share their
    minibatches (common data: a smaller SE) and when they are independent."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} draws against {len(b)}; need as many")
    R = _check_draws(a, "paired_difference")
    _check_draws(b, "paired_difference")
    delta = passes_a * _centred_squares(a) - passes_b * _centred_squares(b)  # [R]
    return float(delta.sum() / (R - 1)), _jackknife_se(delta)


@dataclass(frozen=True)
class EstimatorCost:
    """Variance of one minibatch gradient (or loss) estimate and its price in forward passes.

    `variance` is the trace of the covariance of one minibatch estimate over repeated
    independent draws, `se` its standard error, `efficiency` = variance * forward_passes
    (lower is better: the variance per unit of compute).
    """

    name: str
    variance: float
    se: float
    forward_passes: int
    efficiency: float


def compare_estimators(
    results: Mapping[str, tuple[Draws, int]],
    reference: str = "standard",
    floor: float | None = None,
) -> list[dict]:
    """Rank estimators by variance * forward passes per minibatch (lower first).

    `results` maps name -> (draws `[R, P]` or `[R]`, forward passes per draw). Each row has
    name, variance, se, forward_passes, variance_x_passes, ratio_to_reference (reference
    variance*passes / this variance*passes, > 1 = more efficient) with its delta-method SE
    ratio_se (`ratio_with_se`, independent draws assumed), and, when `floor` (C / n_sequences,
    the data-noise floor an ARM would see) is given, gap_to_floor = variance / floor.
    variance_x_passes is the variance per sequence forward pass (a minibatch of n sequences
    averages n of them), so for gradient draws against Standard, ratio_to_reference is the
    estimator's batch equivalent: the Standard sequences one of its sequences is worth per
    forward pass (> 1: it beats a bigger batch; < 1: a bigger batch is cheaper).
    """
    if reference not in results:
        raise ValueError(
            f"compare_estimators: unknown reference {reference!r}; estimators are: "
            f"{', '.join(sorted(results)) or '(none)'}"
        )
    if floor is not None and not floor > 0:
        raise ValueError(f"compare_estimators: floor must be > 0 (C / n_sequences), got {floor}")
    costs = {}
    shapes = {}
    for name, (draws, passes) in results.items():
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(
                f"compare_estimators: forward passes for {name!r} must be a positive int, "
                f"got {passes!r}"
            )
        shapes[name] = tuple(draws.shape[1:])
        variance, se = minibatch_variance(draws)
        costs[name] = EstimatorCost(name, variance, se, passes, variance * passes)
    if len(set(shapes.values())) > 1:
        raise ValueError(
            "compare_estimators: all estimators must estimate the same quantity, but the "
            f"per-draw shapes differ: {shapes}"
        )
    ref = costs[reference]
    rows = []
    for cost in sorted(costs.values(), key=lambda c: c.efficiency):
        ratio, ratio_se = ratio_with_se(
            ref.efficiency,
            ref.se * ref.forward_passes,
            cost.efficiency,
            cost.se * cost.forward_passes,
        )
        row = {
            "name": cost.name,
            "variance": cost.variance,
            "se": cost.se,
            "forward_passes": cost.forward_passes,
            "variance_x_passes": cost.efficiency,
            "ratio_to_reference": ratio,
            "ratio_se": 0.0 if cost is ref else ratio_se,
        }
        if floor is not None:
            row["gap_to_floor"] = cost.variance / floor
        rows.append(row)
    return rows


def ratio_with_se(
    reference: float, reference_se: float, value: float, value_se: float
) -> tuple[float, float]:
    """reference / value and its delta-method SE, ratio x hypot of the relative SEs, for two
    independent estimates (conservative when they share draws and err alike). A value of 0
    gives an infinite ratio."""
    ratio = reference / value if value > 0 else math.inf
    rel_ref = reference_se / reference if reference > 0 else math.inf
    rel_value = value_se / value if value > 0 else math.inf
    return ratio, ratio * float(np.hypot(rel_ref, rel_value))


@dataclass(frozen=True)
class Choice:
    """The outcome of `choose`: train with `name`; `incumbent` is what was trained before
    (None at the first measurement), `best` the lowest measured; `difference` and
    `difference_se` are the incumbent's (else Standard's) variance x passes minus the chosen
    one's and its SE (None when nothing was compared)."""

    name: str
    incumbent: str | None
    best: str
    switched: bool
    difference: float | None
    difference_se: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain (JSON-ready) dict."""
        return dict(self.__dict__)


def _versus(
    results: Mapping[str, tuple[Draws, int]], V: Mapping[str, float], name: str, other: str
) -> tuple[float, float, str]:
    """(V_other - V_name, its SE, "x times other's ..., lower by z SE") for the reasons."""
    d, se = paired_difference(*results[other], *results[name])
    z = d / se if se > 0 else (math.inf if d > 0 else 0.0)
    return d, se, f"{V[name] / V[other]:.3g} x {other}'s variance x passes, lower by {z:.2g} SE"


def choose(
    results: Mapping[str, tuple[Draws, int]],
    incumbent: str | None,
    margin: float = MARGIN,
    reference: str = "standard",
) -> Choice:
    """The estimator to train with, from R draws per candidate (name -> (draws, passes)).
    With no incumbent (the first measurement), the lowest variance x passes. Otherwise the
    lowest among the candidates below the incumbent's by more than `margin` SEs of the
    difference (`paired_difference`), else the incumbent; an incumbent that could not be
    measured gives way to the lowest. Reasons compare with `reference` when there is no
    incumbent to compare with."""
    if not results:
        raise ValueError("choose: no candidate was measured")
    V = {n: p * minibatch_variance(d)[0] for n, (d, p) in results.items()}
    best = min(V, key=V.get)
    if incumbent is None or incumbent not in results:
        why = "the lowest" if incumbent is None else f"{incumbent} could not be measured"
        if reference in results and best != reference:
            d, se, versus = _versus(results, V, best, reference)
            return Choice(best, incumbent, best, incumbent is not None, d, se, f"{why}: {versus}")
        return Choice(best, incumbent, best, incumbent is not None, None, None, why)
    better = {}
    for name in results:
        if name != incumbent:
            d, se, versus = _versus(results, V, name, incumbent)
            if d > margin * se:
                better[name] = (d, se, versus)
    if better:
        name = min(better, key=V.get)
        d, se, versus = better[name]
        return Choice(name, incumbent, best, True, d, se, f"{versus} (margin {margin:g})")
    if best == incumbent:
        return Choice(incumbent, incumbent, best, False, None, None, "it is the lowest")
    d, se, versus = _versus(results, V, best, incumbent)
    why = f"the lowest, {best}, is {versus}, within the margin {margin:g}"
    return Choice(incumbent, incumbent, best, False, d, se, why)
