"""The `stablemdm variance` experiment (paper.md sections 2 and 3, issue 5): how noisy is a
model's training signal, where does the noise come from, and which estimator buys the most
variance reduction per forward pass.

Three measurements over one model and task, all drawn from generators seeded by the config's
seed, with every estimator built by `run.build_objective` exactly as training builds it:

1. Decomposition. A nested design (I sequences from the train split x J rates from the
   method's density x K masks per rate, `Objective.at_rates`) gives y_ijk, the importance-
   weighted per-sequence loss (`ObjectiveOutput.per_sequence`) or its gradient (flattened,
   a parameter subset, or a seeded Gaussian projection), and `variance.nested_components`
   splits its variance into A (mask), B (rate) and C (data). The ARM (the same network with
   causal attention) goes through the same design: its A and B are 0, its C is the floor.
2. Equal-compute comparison. R independent minibatches of n fresh sequences per method; the
   trace of the covariance of the minibatch loss and gradient, times forward passes
   (`variance.compare_estimators`), against Standard and against the floor C / n.
3. Per-rate curves of the Standard estimator on a grid of t: g(t), v(t), S(t), the P-POTS
   fit, and the integrands a(t), b(t) whose integrals are A and B (see docs/variance.md).

Scheme methods (StraTS, SyRM) couple the rates *across the sequences of a minibatch*; a single
draw has the same distribution as under their base density, so their decomposition is the
base's (reported as `same_as`) and their effect shows only in the comparison.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import ppots
from .config import ConfigError, StableMDMConfig, load_config
from .model import Transformer
from .objective import Objective, ObjectiveOutput
from .run import (
    TensorDataset,
    build_model,
    build_objective,
    build_sampler,
    check_fits,
    encode_split,
    fit_density,
    load_checkpoint,
    load_density,
)
from .samplers import PPOTS, Mirrored, RateSampler, Stratified
from .tasks import get_task
from .tokenizer import CharTokenizer
from .trainer import ema_of, seeded_generator
from .variance import Components, compare_estimators, nested_components
from .variance_output import TERMINAL_WIDTH, print_report, write_report

F64 = torch.float64
REFERENCE = "standard"
# The estimator fields every method starts from, so "standard" means Standard whatever the
# base config says; each method then overrides a few of them.
ESTIMATOR_DEFAULTS: dict[str, Any] = {
    "rate": "t",
    "sampler": "uniform",
    "scheme": "iid",
    "masking": "iid",
    "compute_matched": False,
}
METHODS: dict[str, dict[str, str]] = {
    "standard": {},
    "clipped": {"sampler": "clipped"},
    "ppots": {"sampler": "ppots"},
    "mirror": {"masking": "mirror"},
    "ppots_mirror": {"sampler": "ppots", "masking": "mirror"},
    "strats": {"scheme": "stratified"},
    "ppots_strats": {"sampler": "ppots", "scheme": "stratified"},
    "syrm": {"scheme": "mirrored"},
    "ema": {"sampler": "ema"},
    "isad": {"masking": "isad"},
    "count": {"rate": "count"},
    "count_ppots": {"rate": "count", "sampler": "ppots"},
    "count_mirror": {"rate": "count", "masking": "mirror"},
    "count_ppots_mirror": {"rate": "count", "sampler": "ppots", "masking": "mirror"},
    "count_strats": {"rate": "count", "scheme": "stratified"},
    "count_syrm": {"rate": "count", "scheme": "mirrored"},
}
DEFAULT_METHODS = tuple(
    "standard clipped ppots mirror ppots_mirror strats syrm ema isad count count_ppots_mirror "
    "count_strats".split()
)
# ISAD's raised tokens when the config sets none: the answer delimiter of the task.
ISAD_DEFAULT_TOKENS: dict[str, list[str]] = {
    "chain_sum": ["-"],
    "gsm8k": ["#"],
    "gsm_symbolic": ["#"],
}
FULL_GRADIENT_MAX = 200_000  # more coordinates than this and no --params: project by default
DEFAULT_PROJECTION = 128  # dimensions of the default random projection
PROJECTION_CHUNK = 1 << 22  # entries of one projection block [columns, P] (16 MiB in fp32)
PROJECTION_CACHE = 1 << 26  # keep the projection in memory up to this many entries (256 MiB)
PROJECTION_ROWS = 64  # gradients buffered and projected together (bounds memory and reuse cost)


@dataclass(frozen=True)
class Design:
    """A balanced nested design: I sequences x J rates x K masks (paper.md section 2)."""

    sequences: int
    rates: int
    masks: int

    def check(self, prefix: str) -> None:
        """Raise a ConfigError naming the CLI option when a level has fewer than 2 draws."""
        levels = (
            ("sequences", self.sequences, "data noise C is the spread between sequences"),
            ("rates", self.rates, "rate noise B is the spread between rates of one sequence"),
            ("masks", self.masks, "mask noise A is the spread between masks of one rate"),
        )
        for name, value, why in levels:
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(
                    f"--{prefix}{name} = {value!r}: need at least 2 {name} ({why}); "
                    f"raise --{prefix}{name}"
                )


@dataclass(frozen=True)
class VarianceOptions:
    """What `run_variance` measures and how hard; validated on construction."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    loss_design: Design = Design(32, 8, 8)
    grad_design: Design = Design(8, 4, 4)
    draws: int = 128
    batch: int = 8
    params: str | None = None
    project: int | None = None
    bootstrap: int = 200
    grid: int = 20
    grid_sequences: int = 16
    grid_masks: int = 4
    ema_warmup: int = 256

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(
                f"--methods: unknown method(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"known methods: {', '.join(METHODS)}"
            )
        self.loss_design.check("")
        self.grad_design.check("grad-")
        bounds = (
            ("draws", self.draws, 3, "independent minibatches per method"),
            ("batch", self.batch, 1, "sequences per minibatch"),
            ("grid", self.grid, 2, "rates in the per-rate curves"),
            ("grid-sequences", self.grid_sequences, 2, "sequences in the per-rate curves"),
            ("grid-masks", self.grid_masks, 2, "masks per (sequence, rate) in the curves"),
            ("ema-warmup", self.ema_warmup, 0, "draws the EMA sampler observes first"),
        )
        for name, value, low, what in bounds:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name} ({what}) must be an integer >= {low}, got {value!r}")
        if self.bootstrap < 0 or self.bootstrap == 1:
            raise ConfigError(
                f"--bootstrap must be 0 (off) or >= 2 resamples, got {self.bootstrap}"
            )
        if self.project is not None and self.project < 1:
            raise ConfigError(f"--project must be >= 1 dimensions, got {self.project}")


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


class _Collector:
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


def _rows(data: TensorDataset, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch of `data` rows `index` `[n]` (each tensor `[n, L]`)."""
    return {k: v[index] for k, v in data.tensors.items()}


def _repeat(rows: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """A one-row batch repeated n times `[n, L]`."""
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in rows.items()}


def _density_sampler(sampler: RateSampler) -> RateSampler:
    """The density under a uniform scheme: what one draw's rate is distributed as."""
    return sampler.base if isinstance(sampler, Stratified | Mirrored) else sampler


def _evaluate(
    objective: Objective,
    model: torch.nn.Module,
    rows: dict[str, torch.Tensor],
    r: torch.Tensor,
    weight: torch.Tensor,
    mask_generator: torch.Generator,
) -> ObjectiveOutput:
    """The objective at given rates (an ARM draws no rate or mask and ignores them)."""
    if objective.kind == "arm":
        return objective(model, rows)
    return objective.at_rates(model, rows, r, weight, mask_generator)


def _check_finite(y: torch.Tensor, what: str) -> None:
    """Raise one ConfigError naming the first non-finite observation of a nested design."""
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        first = tuple(int(v) for v in bad.nonzero()[0])
        raise ConfigError(
            f"{what}: {int(bad.sum())} non-finite observation(s), the first at (sequence, rate, "
            f"mask{', coordinate' if y.dim() == 4 else ''}) = {first}; the model's forward pass "
            "overflows or the checkpoint is broken: check it (e.g. `stablemdm eval`) first"
        )


def nested_observations(
    model: torch.nn.Module,
    objective: Objective,
    data: TensorDataset,
    index: torch.Tensor,
    rates: int,
    masks: int,
    seed: int,
    tag: str,
    feature: GradientFeature | None = None,
) -> torch.Tensor:
    """The nested design's observations: per-sequence losses `[I, J, K]` or gradient features
    `[I, J, K, P]` for sequences `index` `[I]` of `data`.

    Sequence i gets J rates iid from the method's density (with their weights) and, per rate,
    K masks from `objective.at_rates` on K copies of the sequence sharing that rate; in count
    mode the rate becomes the count k = ceil(|E| r). Rates and masks come from generators
    seeded by (seed, tag, i). Gradients take one backward per observation.
    """
    density = _density_sampler(objective.sampler)
    I, J, K = len(index), rates, masks
    values = []
    collector = _Collector(feature) if feature is not None else None
    for i in range(I):
        rate_generator = seeded_generator(seed, "nested-rate", tag, i)
        mask_generator = seeded_generator(seed, "nested-mask", tag, i)
        t, w = density.sample(J, rate_generator)  # [J], [J]
        sequence = _rows(data, index[i : i + 1])
        if collector is None:
            with torch.no_grad():
                out = _evaluate(
                    objective,
                    model,
                    _repeat(sequence, J * K),
                    t.repeat_interleave(K),
                    w.repeat_interleave(K),
                    mask_generator,
                )
            values.append(out.per_sequence.detach().to("cpu", F64).view(J, K))
            continue
        rows = _repeat(sequence, K)
        for j in range(J):
            out = _evaluate(objective, model, rows, t[j].expand(K), w[j].expand(K), mask_generator)
            for k in range(K):
                collector.add(feature.gradient(out.per_sequence[k], retain_graph=k + 1 < K))
    y = torch.stack(values) if collector is None else collector.result().view(I, J, K, -1)
    _check_finite(y, f"{tag}: the nested design")
    return y


def decompose(
    model: torch.nn.Module,
    objective: Objective,
    data: TensorDataset,
    index: torch.Tensor,
    design: Design,
    seed: int,
    tag: str,
    feature: GradientFeature | None = None,
    bootstrap: int = 0,
) -> Components:
    """A, B, C (with jackknife SEs and the bootstrap flag) of the per-sequence loss, or of its
    gradient feature, over the first `design.sequences` entries of `index`."""
    if len(index) < design.sequences:
        raise ConfigError(
            f"the design needs {design.sequences} sequences but only {len(index)} were given"
        )
    y = nested_observations(
        model,
        objective,
        data,
        index[: design.sequences],
        design.rates,
        design.masks,
        seed,
        tag,
        feature,
    )
    return nested_components(y, bootstrap=bootstrap, seed=seed)


@contextmanager
def causal(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The same network with causal attention (the ARM baseline) for the duration."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "causal"):
        raise ConfigError(
            f"{type(model).__name__} has no config.causal switch, so its ARM baseline cannot "
            "be evaluated; use a stablemdm Transformer"
        )
    before = config.causal
    config.causal = True
    try:
        yield model
    finally:
        config.causal = before


def warm_ema(
    objective: Objective,
    model: torch.nn.Module,
    data: TensorDataset,
    draws: int,
    batch: int,
    seed: int,
) -> int:
    """Let an EMA sampler observe `draws` draws (in minibatches of `batch`, as the trainer
    feeds it) and refresh its density once; it is then frozen for the measurement. Returns
    the number of draws observed (0 when the sampler is not EMA)."""
    ema = ema_of(objective)
    if ema is None or draws == 0:
        return 0
    data_generator = seeded_generator(seed, "ema-data")
    steps = math.ceil(draws / batch)
    with torch.no_grad():
        for step in range(steps):
            rows = _rows(data, torch.randint(len(data), (batch,), generator=data_generator))
            out = objective(
                model,
                rows,
                seeded_generator(seed, "ema-rate", step),
                seeded_generator(seed, "ema-mask", step),
            )
            ema.observe(out.rate.float().cpu(), out.unweighted.float().cpu())
    ema.refresh()
    return steps * batch


def compare_methods(
    model: torch.nn.Module,
    objectives: Mapping[str, Objective],
    data: TensorDataset,
    draws: int,
    batch: int,
    seed: int,
    feature: GradientFeature | None = None,
    loss_floor: float | None = None,
    grad_floor: float | None = None,
) -> dict[str, list[dict]]:
    """Equal-compute comparison: per method, `draws` independent minibatches of `batch`
    sequences drawn with replacement from `data` (so data noise is included) with fresh rates
    and masks; the minibatch loss `ObjectiveOutput.loss` and its gradient feature go to
    `variance.compare_estimators` with the method's forward passes per minibatch.

    Returns {"loss": rows, "grad": rows} (no "grad" without a feature); `REFERENCE` must be
    among the objectives. Floors are C / batch of the loss and of the gradient.
    """
    losses: dict[str, tuple[torch.Tensor, int]] = {}
    grads: dict[str, tuple[torch.Tensor, int]] = {}
    for name, objective in objectives.items():
        data_generator = seeded_generator(seed, "compare-data", name)
        collector = _Collector(feature) if feature is not None else None
        values, passes = [], set()
        for r in range(draws):
            rows = _rows(data, torch.randint(len(data), (batch,), generator=data_generator))
            with torch.set_grad_enabled(collector is not None):
                out = objective(
                    model,
                    rows,
                    seeded_generator(seed, "compare-rate", name, r),
                    seeded_generator(seed, "compare-mask", name, r),
                )
            values.append(out.loss.detach().to("cpu", F64))
            passes.add(out.forward_passes)
            if collector is not None:
                collector.add(feature.gradient(out.loss, retain_graph=False))
        if len(passes) != 1:
            raise ValueError(f"{name}: forward passes per minibatch varied ({sorted(passes)})")
        values = torch.stack(values)  # [R]
        if not bool(torch.isfinite(values).all()):
            raise ConfigError(
                f"{name}: {int((~torch.isfinite(values)).sum())} of {draws} minibatch losses are "
                "not finite; the model's forward pass overflows: check the checkpoint"
            )
        losses[name] = (values, passes.pop())
        if collector is not None:
            grads[name] = (collector.result(), losses[name][1])  # [R, P]
    result = {"loss": compare_estimators(losses, REFERENCE, loss_floor)}
    if feature is not None:
        result["grad"] = compare_estimators(grads, REFERENCE, grad_floor)
    return result


def rate_curves(
    model: torch.nn.Module,
    objective: Objective,
    data: TensorDataset,
    index: torch.Tensor,
    grid: int,
    masks: int,
    seed: int,
) -> dict[str, Any]:
    """Per-rate curves of the unweighted per-sequence loss on G midpoints t_g, from
    l `[I, G, K]` (sequences `index` x grid x masks; rate-mode `objective`, iid masks):

    g(t) = E[l | t]; v(t) = Var(l | t) over x0 and masks; S(t) = E[l^2 | t];
    a(t) = E_x0[Var_m(l | x0, t)], whose integral over t is A (Standard);
    b(t) = E_x0[(E_m[l | x0, t] - E[l | x0])^2], whose integral is B (Standard), with the
    mask noise of the per-(x0, t) means removed so that it is unbiased on the grid;
    `se_a`, `se_b` are their SEs over sequences, and `integrals` the midpoint-rule integrals
    (A, B, C and total = int S - (int g)^2).
    """
    if objective.rate != "t" or objective.masking != "iid":
        raise ValueError("rate_curves needs a rate-mode objective with iid masks (Standard)")
    I, G, K = len(index), grid, masks
    t = (torch.arange(G, dtype=F64) + 0.5) / G  # [G]
    losses = []
    with torch.no_grad():
        for i in range(I):
            rows = _repeat(_rows(data, index[i : i + 1]), G * K)
            mask_generator = seeded_generator(seed, "curves-mask", i)
            out = objective.at_rates(model, rows, t.repeat_interleave(K), None, mask_generator)
            losses.append(out.unweighted.to("cpu", F64).view(G, K))
    l = torch.stack(losses).numpy()  # [I, G, K]
    _check_finite(torch.from_numpy(l), "per-rate curves")
    S = ppots.second_moment(l)  # [G]
    g = l.mean(axis=(0, 2))  # [G]
    v = l.transpose(1, 0, 2).reshape(G, I * K).var(axis=1, ddof=1)  # [G]
    m = l.mean(axis=2)  # [I, G] E_m[l | x0, t]
    s2 = l.var(axis=2, ddof=1)  # [I, G] Var_m(l | x0, t)
    m_i = m.mean(axis=1, keepdims=True)  # [I, 1] E[l | x0] by the midpoint rule
    noise = ((1.0 - 2.0 / G) * s2 + s2.mean(axis=1, keepdims=True) / G) / K  # [I, G]
    b_terms = (m - m_i) ** 2 - noise  # [I, G]
    C = float(m_i[:, 0].var(ddof=1) - s2.mean(axis=1).mean() / (G * K))
    return {
        "t": t.tolist(),
        "g": g.tolist(),
        "v": v.tolist(),
        "S": S.tolist(),
        "a": s2.mean(axis=0).tolist(),
        "b": b_terms.mean(axis=0).tolist(),
        "se_a": (s2.std(axis=0, ddof=1) / math.sqrt(I)).tolist(),
        "se_b": (b_terms.std(axis=0, ddof=1) / math.sqrt(I)).tolist(),
        "integrals": {
            "A": float(s2.mean()),
            "B": float(b_terms.mean()),
            "C": C,
            "total": float(S.mean() - g.mean() ** 2),
        },
        "sequences": I,
        "masks": K,
    }


def semi_analytic_total(curves: Mapping[str, Any], sampler: RateSampler) -> float:
    """Variance of one draw w(t) l under t ~ p predicted from the grid curves by the midpoint
    rule: int S w^2 p dt - (int g w p dt)^2 (w = 1/p for unbiased samplers, so Standard gives
    int S dt - (E l)^2). Valid for rate-mode estimators with iid masks."""
    t = torch.tensor(curves["t"], dtype=F64)
    p = _density_sampler(sampler).density(t).numpy()
    w = _density_sampler(sampler).weight(t).numpy()
    S, g = np.asarray(curves["S"]), np.asarray(curves["g"])
    return float(np.mean(S * w**2 * p) - np.mean(g * w * p) ** 2)


# --- building the methods ------------------------------------------------------------------


@dataclass
class Method:
    """One configured estimator: its overrides, the resolved config and its Objective."""

    name: str
    overrides: dict[str, Any]
    config: StableMDMConfig
    objective: Objective


def _same_draw(a: Method, b: Method) -> bool:
    """Whether one draw of a and one of b have the same distribution: the same rate mode,
    masking and density (a scheme only couples the draws of a minibatch)."""
    if any(getattr(a.config, f) != getattr(b.config, f) for f in ("rate", "sampler", "masking")):
        return False
    if a.config.sampler in ("uniform", "clipped"):  # both built from the same base fields
        return True
    return _density_sampler(a.objective.sampler) is _density_sampler(b.objective.sampler)


def method_config(
    config: StableMDMConfig, name: str, isad_tokens: Sequence[str] = ()
) -> StableMDMConfig:
    """The base config with the estimator fields reset (`ESTIMATOR_DEFAULTS`) and the method's
    overrides applied; every other field (eps, mix, clip_*, ema_*, ppots_*) is the base's."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    values = {**config.resolved(), **ESTIMATOR_DEFAULTS, **METHODS[name]}
    if values["sampler"] != "ppots":
        values["ppots_file"] = None
    if values["masking"] == "isad" and not values.get("isad_tokens"):
        values["isad_tokens"] = list(isad_tokens)
    try:
        return StableMDMConfig(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method {name} ({METHODS[name]}): {err}") from err


def build_methods(
    config: StableMDMConfig,
    names: Sequence[str],
    model: Transformer,
    task: Any,
    tokenizer: CharTokenizer,
    data: TensorDataset,
    options: VarianceOptions,
    notes: list[str],
) -> dict[str, Method]:
    """Each method's Objective via `run.build_objective`/`build_sampler`, with P-POTS densities
    fitted by `run.fit_density` (or read from `ppots_file`) and EMA warmed up."""
    isad_tokens = config.isad_tokens or ISAD_DEFAULT_TOKENS.get(config.task, [])
    if not config.isad_tokens and isad_tokens and "isad" in names:
        notes.append(f"isad: raises {isad_tokens}, task {config.task}'s default delimiter")
    densities: dict[tuple, PPOTS] = {}
    methods = {}
    for name in names:
        if METHODS[name].get("masking") == "isad" and not isad_tokens:
            notes.append(
                f"{name}: skipped, no ISAD tokens (set isad_tokens=[...]; task {config.task} "
                "has no default answer delimiter)"
            )
            continue
        cfg = method_config(config, name, isad_tokens)
        density = None
        if cfg.sampler == "ppots":
            key = (cfg.rate, cfg.masking)
            if key not in densities:
                if cfg.ppots_file:
                    densities[key] = load_density(cfg.ppots_file)
                else:
                    densities[key] = fit_density(cfg, model, task, tokenizer)
            density = densities[key]
        objective = build_objective(cfg, tokenizer, build_sampler(cfg, density))
        if not objective.sampler.unbiased:
            notes.append(
                f"{name}: biased by design (it estimates the objective restricted to "
                f"[{cfg.clip_low}, {cfg.clip_high}], not the ELBO); a lower variance does not "
                "make it a better ELBO estimator"
            )
        observed = warm_ema(objective, model, data, options.ema_warmup, options.batch, cfg.seed)
        if observed:
            notes.append(
                f"{name}: the EMA density was warmed on {observed} draws (minibatches of "
                f"{options.batch}), refreshed once and then frozen for the measurement"
            )
        methods[name] = Method(name, dict(METHODS[name]), cfg, objective)
    return methods


def load_model(
    config: StableMDMConfig, checkpoint: str | Path | None, task: Any
) -> tuple[Transformer, CharTokenizer]:
    """The checkpoint's model and tokenizer (as an MDM), or the config's model and a fresh
    character tokenizer (`run.build_model`: `init_from` or a seeded initialisation)."""
    if checkpoint is None:
        tokenizer = CharTokenizer()
        return build_model(config, task, tokenizer), tokenizer
    model, tokenizer = load_checkpoint(checkpoint)
    check_fits(model, tokenizer, task, f"--checkpoint {checkpoint}")
    model.config.causal = False
    return model, tokenizer


# --- the experiment ---------------------------------------------------------------------------


def run_variance(
    config: StableMDMConfig,
    options: VarianceOptions,
    checkpoint: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    arm_checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Run the three measurements for `config`'s task and model (or `checkpoint`) and return
    the report (what `write_report` stores as variance.json). `log(str)` reports progress.
    The ARM reference is `arm_checkpoint`, else the same weights with causal attention
    (a like-for-like baseline at initialisation, not for a trained MDM)."""
    say = log or (lambda message: None)
    if config.objective != "mdm":
        raise ConfigError(
            "stablemdm variance measures MDM estimators (the ARM reference is always included): "
            "leave objective=mdm"
        )
    started = time.perf_counter()
    timing: dict[str, float] = {}
    notes: list[str] = []
    seed = config.seed
    if REFERENCE not in options.methods:
        notes.append(f"{REFERENCE}: added, it is the reference of the comparison")
    names = list(dict.fromkeys([REFERENCE, *options.methods]))  # the reference first
    task = get_task(config.task, **config.task_options)
    model, tokenizer = load_model(config, checkpoint, task)
    model.eval()
    if arm_checkpoint is not None:  # checked before any measurement starts
        arm_model, _ = load_checkpoint(arm_checkpoint)
        check_fits(arm_model, tokenizer, task, f"--arm-checkpoint {arm_checkpoint}")
        arm_model.config.causal = True
    data = encode_split(task, tokenizer, "train")
    needed = max(
        options.loss_design.sequences, options.grad_design.sequences, options.grid_sequences
    )
    if len(data) < needed:
        raise ConfigError(
            f"task {config.task}: the train split has {len(data)} sequences but the design "
            f"needs {needed}; lower --sequences/--grad-sequences/--grid-sequences or add data"
        )
    index = torch.randperm(len(data), generator=seeded_generator(seed, "variance-sequences"))
    feature = GradientFeature(model, options.params, options.project, seed)
    if feature.project is not None and options.project is None:
        notes.append(
            f"gradients: {feature.n_coordinates} coordinates, projected to {feature.project} "
            "seeded Gaussian directions (set --params or --project to choose)"
        )

    say("building the estimators")
    methods = build_methods(config, names, model, task, tokenizer, data, options, notes)
    timing["build"] = time.perf_counter() - started

    say(f"per-rate curves ({options.grid} rates)")
    mark = time.perf_counter()
    standard = methods[REFERENCE].objective
    curves = rate_curves(
        model,
        standard,
        data,
        index[: options.grid_sequences],
        options.grid,
        options.grid_masks,
        seed,
    )
    curves["ppots_fit"] = _fit_curve_density(curves, config, notes)
    for method in methods.values():
        if method.config.sampler == "ppots" and method.config.rate == "t":
            sampler = _density_sampler(method.objective.sampler)
            density = sampler.density(torch.tensor(curves["t"], dtype=F64))
            curves["ppots_method_density"] = density.tolist()
            break
    timing["curves"] = time.perf_counter() - mark

    mark = time.perf_counter()
    decomposition = {}
    for method in methods.values():
        same = next((m for m in decomposition if _same_draw(methods[m], method)), None)
        if same is not None:
            decomposition[method.name] = {"same_as": same}
            notes.append(
                f"{method.name}: one draw has the same distribution as under {same} (its "
                "scheme couples rates across a minibatch), so its decomposition is that one; "
                "its effect shows in the comparison"
            )
            continue
        say(f"decomposition: {method.name}")
        decomposition[method.name] = _decompose_method(
            model, method.objective, data, index, options, feature, seed, method.name
        )
        iid_rate = method.config.rate == "t" and method.config.masking == "iid"
        decomposition[method.name]["semi_analytic_total"] = (
            semi_analytic_total(curves, method.objective.sampler) if iid_rate else None
        )
    say("decomposition: arm")
    arm_objective = Objective(mask_token_id=tokenizer.mask_token_id, kind="arm")
    if arm_checkpoint is None:
        if checkpoint is not None or config.init_from:
            notes.append(
                "arm: the MDM's own weights with causal attention; for a trained model this is "
                "not a trained ARM (pass --arm-checkpoint for one)"
            )
        with causal(model):
            arm = _decompose_method(
                model, arm_objective, data, index, options, feature, seed, "arm"
            )
    else:
        arm_feature = GradientFeature(arm_model.eval(), options.params, options.project, seed)
        arm = _decompose_method(
            arm_model, arm_objective, data, index, options, arm_feature, seed, "arm"
        )
    timing["decomposition"] = time.perf_counter() - mark

    say(f"comparison: {options.draws} minibatches of {options.batch} per method")
    mark = time.perf_counter()
    reference = decomposition[REFERENCE]
    loss_floor = _floor(reference["loss"]["C"], options.batch, "loss", notes)
    grad_floor = _floor(reference["grad"]["C"], options.batch, "gradient", notes)
    comparison = compare_methods(
        model,
        {name: m.objective for name, m in methods.items()},
        data,
        options.draws,
        options.batch,
        seed,
        feature,
        loss_floor,
        grad_floor,
    )
    comparison["floor"] = {"loss": loss_floor, "grad": grad_floor}
    comparison["arm_floor"] = {
        "loss": arm["loss"]["C"] / options.batch,
        "grad": arm["grad"]["C"] / options.batch,
    }
    timing["comparison"] = time.perf_counter() - mark
    timing["total"] = time.perf_counter() - started

    unstable = sorted(
        f"{name} {what}"
        for name, entry in [*decomposition.items(), ("arm", arm)]
        for what in ("loss", "grad")
        if entry.get(what, {}).get("unstable")
    )
    return {
        "config": config.resolved(),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "options": _options_dict(options),
        "feature": feature.describe(),
        "methods": {name: m.overrides for name, m in methods.items()},
        "forward_passes": {row["name"]: row["forward_passes"] for row in comparison["loss"]},
        "decomposition": decomposition,
        "arm": arm,
        "curves": curves,
        "comparison": comparison,
        "unstable": unstable,
        "heavy_tail_warning": _heavy_tail_warning(unstable, config.eps),
        "notes": notes,
        "timing_s": timing,
    }


def _decompose_method(
    model: torch.nn.Module,
    objective: Objective,
    data: TensorDataset,
    index: torch.Tensor,
    options: VarianceOptions,
    feature: GradientFeature,
    seed: int,
    name: str,
) -> dict[str, Any]:
    """Loss and gradient components of one estimator as JSON-ready dicts."""
    loss = decompose(
        model,
        objective,
        data,
        index,
        options.loss_design,
        seed,
        f"{name}/loss",
        bootstrap=options.bootstrap,
    )
    grad = decompose(
        model,
        objective,
        data,
        index,
        options.grad_design,
        seed,
        f"{name}/grad",
        feature,
        bootstrap=options.bootstrap,
    )
    return {"loss": loss.to_dict(), "grad": grad.to_dict()}


def _fit_curve_density(
    curves: Mapping[str, Any], config: StableMDMConfig, notes: list[str]
) -> dict[str, Any] | None:
    """The P-POTS density fitted to the curves' S(t) (`PPOTS.from_second_moment`) on the grid,
    with the optimal density sqrt(S) / int sqrt(S) and its best-case second-moment ratio."""
    t, S = np.asarray(curves["t"]), np.asarray(curves["S"])
    try:
        fitted = PPOTS.from_second_moment(t, S, method=config.ppots_method, mix=config.mix)
    except ValueError as err:
        notes.append(f"per-rate curves: no P-POTS fit ({err})")
        return None
    root = np.sqrt(S)
    return {
        "method": config.ppots_method,
        "mix": config.mix,
        "density": fitted.density(torch.tensor(t, dtype=F64)).tolist(),
        "optimal": (root / root.mean()).tolist(),
        "optimal_second_moment_ratio": float(root.mean() ** 2 / S.mean()),
    }


def _floor(C: float, batch: int, what: str, notes: list[str]) -> float | None:
    """The data-noise floor C / n of a minibatch, or None (with a note) when C <= 0."""
    if C > 0:
        return C / batch
    notes.append(f"{what}: Standard's C estimate is {C:.3g} <= 0, so no floor is reported")
    return None


def _heavy_tail_warning(unstable: Sequence[str], eps: float) -> str | None:
    """The caveat printed when the bootstrap flags any estimate."""
    if not unstable:
        return None
    return (
        f"unstable estimates ({', '.join(unstable)}): the single-draw MDM loss is heavy-tailed "
        f"(the 1/p_mask(t) weight reaches 1/eps = {1 / eps:.0f} near t = 0, and P-POTS adds "
        "1/p(t)), so a few draws can dominate A and B; raise --sequences/--rates/--masks, or "
        "read these numbers as orders of magnitude"
    )


def _options_dict(options: VarianceOptions) -> dict[str, Any]:
    out = asdict(options)
    out["methods"] = list(options.methods)
    return out


# --- command line ---------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `variance` verb on the main parser's subparsers."""
    parser = subparsers.add_parser(
        "variance",
        help="decompose a model's training noise into A/B/C and compare estimators",
        description="Measure, for the configured model (or --checkpoint) and task: (1) the "
        "variance of one draw of the per-sequence loss and gradient split into A (mask), "
        "B (rate) and C (data) for each method and for the ARM, (2) the variance of the "
        "minibatch estimate at equal compute, against Standard and the data-noise floor, "
        "(3) per-rate curves g, v, S and the P-POTS fit. Writes variance.json, variance.md "
        "and PNG plots to --output. See docs/variance.md.",
    )
    parser.add_argument(
        "--config", metavar="RECIPE", help="flat YAML recipe (task, model, eps, mix, ...)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="model folder (Transformer.save_pretrained; its tokenizer too if present); "
        "default: the config's model (init_from, else a seeded fresh initialisation)",
    )
    parser.add_argument(
        "--methods",
        metavar="LIST",
        default=",".join(DEFAULT_METHODS),
        help=f"comma list of methods (default: %(default)s; known: {', '.join(METHODS)}); "
        "standard is always added",
    )
    d = VarianceOptions()
    integers = (
        ("--sequences", d.loss_design.sequences, "loss design: sequences I"),
        ("--rates", d.loss_design.rates, "loss design: rates J per sequence"),
        ("--masks", d.loss_design.masks, "loss design: masks K per rate"),
        ("--grad-sequences", d.grad_design.sequences, "gradient design: sequences"),
        ("--grad-rates", d.grad_design.rates, "gradient design: rates per sequence"),
        ("--grad-masks", d.grad_design.masks, "gradient design: masks per rate (a backward each)"),
        ("--draws", d.draws, "comparison: independent minibatches per method"),
        ("--batch", d.batch, "comparison: sequences per minibatch n"),
        ("--bootstrap", d.bootstrap, "bootstrap resamples flagging unstable A/B/C, 0 = off"),
        ("--grid", d.grid, "per-rate curves: midpoints of t"),
        ("--grid-sequences", d.grid_sequences, "per-rate curves: sequences"),
        ("--grid-masks", d.grid_masks, "per-rate curves: masks per (sequence, t)"),
        ("--ema-warmup", d.ema_warmup, "draws the EMA sampler observes before it is frozen"),
    )
    for flag, default, help_ in integers:
        parser.add_argument(
            flag, type=int, default=default, metavar="N", help=f"{help_} (default {default})"
        )
    parser.add_argument(
        "--params",
        metavar="REGEX",
        help="gradient of the parameters whose names match REGEX (re.search), e.g. 'lm_head'; "
        f"default all, projected to {DEFAULT_PROJECTION} dims above {FULL_GRADIENT_MAX} "
        "coordinates",
    )
    parser.add_argument(
        "--project",
        type=int,
        metavar="P",
        help="project the gradient onto P seeded Gaussian directions (traces stay unbiased)",
    )
    parser.add_argument(
        "--arm-checkpoint",
        metavar="DIR",
        help="a trained ARM of the same size for the reference C (default: the model's own "
        "weights with causal attention, a like-for-like baseline only at initialisation)",
    )
    parser.add_argument(
        "--output",
        default="runs/variance",
        metavar="DIR",
        help="report folder (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, help="seed of every draw and of a fresh model (default: the config's)"
    )
    return parser


def options_from_args(args: argparse.Namespace) -> VarianceOptions:
    """The `VarianceOptions` the command-line arguments describe."""
    return VarianceOptions(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        loss_design=Design(args.sequences, args.rates, args.masks),
        grad_design=Design(args.grad_sequences, args.grad_rates, args.grad_masks),
        draws=args.draws,
        batch=args.batch,
        params=args.params,
        project=args.project,
        bootstrap=args.bootstrap,
        grid=args.grid,
        grid_sequences=args.grid_sequences,
        grid_masks=args.grid_masks,
        ema_warmup=args.ema_warmup,
    )


def run_cli(args: argparse.Namespace) -> int:
    """`stablemdm variance`: run, print the tables, write the report; returns the exit code."""
    from rich.console import Console

    options = options_from_args(args)
    overrides = [*args.overrides, *([f"seed={args.seed}"] if args.seed is not None else [])]
    config = load_config(args.config, overrides)
    console = Console() if sys.stdout.isatty() else Console(width=TERMINAL_WIDTH)
    report = run_variance(
        config,
        options,
        args.checkpoint,
        log=lambda m: console.log(m),
        arm_checkpoint=args.arm_checkpoint,
    )
    print_report(report, console)
    paths = write_report(report, args.output)
    console.print(f"report in {paths[0].parent} ({report['timing_s']['total']:.0f} s)")
    return 0
