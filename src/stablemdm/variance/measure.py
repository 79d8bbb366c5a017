"""Measurement primitives of the `stablemdm variance` experiment (paper.md section 2): the
gradient observation (`GradientFeature`, from `estimators.selection`), the nested design and
its observations (`nested_observations`, `decompose`), the equal-compute comparison and its
recommendation (`compare_methods`, with `estimator: auto`'s selection rule), the per-rate
curves (`rate_curves`) and the semi-analytic cross-check. Pure PyTorch over a model, an
`Objective` and encoded data; `inputs` builds the methods and `report` runs them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..estimators import ppots_fit as ppots
from ..estimators.objective import Objective, ObjectiveOutput
from ..estimators.rates import RateSampler
from ..estimators.selection import (  # noqa: F401  re-exported for the command and report
    DEFAULT_PROJECTION,
    FULL_GRADIENT_MAX,
    MARGIN,
    Collector,
    GradientFeature,
    MinibatchDraws,
    choose,
    compare_estimators,
    minibatch_draws,
)
from ..estimators.stratified import Stratified
from ..estimators.syrm import Mirrored
from ..models.hf import adapter_spec, as_arm
from ..rng import seeded_generator
from ..training.datasets import TensorDataset
from ..training.trainer import ema_of
from .blocks import block_rate_draws, blocks_of_rows
from .decompose import Components, nested_components

F64 = torch.float64


REFERENCE = "standard"  # the estimator every other one is compared with


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


def _rows(data: TensorDataset, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch of `data` rows `index` `[n]` (each tensor `[n, L]`)."""
    return {k: v[index] for k, v in data.tensors.items()}


def _repeat(rows: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """A one-row batch repeated n times `[n, L]`."""
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in rows.items()}


def density_sampler(sampler: RateSampler) -> RateSampler:
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
    """The objective at given rates, `[n]` or per block `[n, nb]` (an ARM draws no rate or
    mask and ignores them)."""
    if objective.kind == "arm":
        return objective(model, rows)
    if objective.kind == "block":
        return objective.at_block_rates(model, rows, r, weight, mask_generator)
    return objective.at_rates(model, rows, r, weight, mask_generator)


def sequence_draws(
    objective: Objective, data: TensorDataset, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n independent draws of one sequence's rates and weights: `[n]` from the method's density,
    or for block diffusion `[n, nb]`, a row of block rates each (`blocks.block_rate_draws`)."""
    if objective.kind == "block":
        return block_rate_draws(objective, data.tensors["input_ids"].shape[1], n, generator)
    return density_sampler(objective.sampler).sample(n, generator)


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

    Sequence i gets J rates iid from the method's density (with their weights; for block
    diffusion J rows of block rates, `sequence_draws`) and, per rate, K masks from the
    objective on K copies of the sequence sharing that rate; in count mode the rate becomes
    the count k = ceil(|E| r). Rates and masks come from generators seeded by (seed, tag, i).
    Gradients take one backward per observation.
    """
    I, J, K = len(index), rates, masks
    values = []
    collector = Collector(feature) if feature is not None else None
    for i in range(I):
        rate_generator = seeded_generator(seed, "nested-rate", tag, i)
        mask_generator = seeded_generator(seed, "nested-mask", tag, i)
        t, w = sequence_draws(objective, data, J, rate_generator)  # [J] or [J, nb]
        sequence = _rows(data, index[i : i + 1])
        if collector is None:
            with torch.no_grad():
                out = _evaluate(
                    objective,
                    model,
                    _repeat(sequence, J * K),
                    t.repeat_interleave(K, dim=0),
                    w.repeat_interleave(K, dim=0),
                    mask_generator,
                )
            values.append(out.per_sequence.detach().to("cpu", F64).view(J, K))
            continue
        rows = _repeat(sequence, K)
        for j in range(J):
            r, weight = (v[j].expand(K, *v.shape[1:]) for v in (t, w))
            out = _evaluate(objective, model, rows, r, weight, mask_generator)
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
    """The same network with causal attention (the ARM baseline) for the duration: the
    built-in transformer's switch, or an adapted Hugging Face causal LM as it was."""
    config = getattr(model, "config", None)
    if adapter_spec(model) is not None:
        with as_arm(model):
            yield model
        return
    if config is None or not hasattr(config, "causal"):
        raise ConfigError(
            f"{type(model).__name__} has no causal form, so its ARM baseline cannot be "
            "evaluated; pass --arm-checkpoint"
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
) -> dict[str, Any]:
    """Equal-compute comparison: per method, `draws` independent minibatches of `batch`
    sequences drawn with replacement from `data` (so data noise is included) with fresh rates
    and masks (`selection.minibatch_draws`); the minibatch loss and its gradient feature go
    to `compare_estimators` with the method's forward passes per minibatch.

    Returns {"loss": rows, "grad": rows, "batch_equivalent": ..., "recommendation": ...}
    (no "grad" or "batch_equivalent" without a feature); `REFERENCE` must be among the
    objectives. Floors are C / batch of the loss and of the gradient. The recommendation is
    `estimator: auto`'s rule (`recommend`).
    """
    measured: dict[str, MinibatchDraws] = {}
    for name, objective in objectives.items():
        data_generator = seeded_generator(seed, "compare-data", name)
        batches = (
            _rows(data, torch.randint(len(data), (batch,), generator=data_generator))
            for _ in range(draws)
        )
        out = minibatch_draws(
            model,
            objective,
            batches,
            lambda r, name=name: (
                seeded_generator(seed, "compare-rate", name, r),
                seeded_generator(seed, "compare-mask", name, r),
            ),
            feature,
        )
        if not bool(torch.isfinite(out.loss).all()):
            raise ConfigError(
                f"{name}: {int((~torch.isfinite(out.loss)).sum())} of {draws} minibatch losses "
                "are not finite; the model's forward pass overflows: check the checkpoint"
            )
        measured[name] = out
    losses = {name: (m.loss, m.forward_passes) for name, m in measured.items()}
    result: dict[str, Any] = {"loss": compare_estimators(losses, REFERENCE, loss_floor)}
    if feature is not None:
        grads = {name: (m.grad, m.forward_passes) for name, m in measured.items()}
        result["grad"] = compare_estimators(grads, REFERENCE, grad_floor)
        result["batch_equivalent"] = batch_equivalents(result["grad"], batch)
    unbiased = [name for name, objective in objectives.items() if objective.sampler.unbiased]
    result["recommendation"] = recommend(grads if feature is not None else losses, unbiased)
    return result


def batch_equivalents(grad_rows: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Per method, from the gradient rows of `compare_estimators` at `batch` sequences: its
    batch equivalent (Standard's gradient variance per sequence forward pass / this one's,
    with its delta-method SE: how many Standard sequences one sequence of it is worth at equal
    compute), that variance per sequence-pass and the passes per sequence."""
    return {
        row["name"]: {
            "value": row["ratio_to_reference"],
            "se": row["ratio_se"],
            "variance_per_sequence_pass": row["variance_x_passes"],
            "passes_per_sequence": row["forward_passes"] / batch,
        }
        for row in grad_rows
    }


def recommend(
    results: Mapping[str, tuple[torch.Tensor, int]], unbiased: list[str]
) -> dict[str, Any]:
    """What `estimator: auto` would train with on this evidence, as at its first measurement:
    `selection.choose` over the unbiased methods (a biased one estimates another objective),
    with the chosen one's difference to Standard and its SE."""
    kept = {name: results[name] for name in unbiased}
    choice = choose(kept, None, MARGIN, REFERENCE)
    return {**choice.to_dict(), "margin": MARGIN, "candidates": list(kept)}


def rate_curves(
    model: torch.nn.Module,
    objective: Objective,
    data: TensorDataset,
    index: torch.Tensor,
    grid: int,
    masks: int,
    seed: int,
) -> dict[str, Any]:
    """Per-rate curves (`curve_statistics`) of the unweighted per-sequence loss on G
    midpoints t_g, from l `[I, G, K]`: sequences `index` x grid x masks, for a rate-mode
    `objective` with iid masks (Standard); for block diffusion, per block (`_block_curves`)."""
    if objective.rate != "t" or objective.masking != "iid":
        raise ValueError("rate_curves needs a rate-mode objective with iid masks (Standard)")
    I, G, K = len(index), grid, masks
    t = (torch.arange(G, dtype=F64) + 0.5) / G  # [G]
    if objective.kind == "block":
        return _block_curves(model, objective, _rows(data, index), t, K, seed)
    losses = []
    with torch.no_grad():
        for i in range(I):
            rows = _repeat(_rows(data, index[i : i + 1]), G * K)
            mask_generator = seeded_generator(seed, "curves-mask", i)
            out = objective.at_rates(model, rows, t.repeat_interleave(K), None, mask_generator)
            losses.append(out.unweighted.to("cpu", F64).view(G, K))
    l = torch.stack(losses).numpy()  # [I, G, K]
    _check_finite(torch.from_numpy(l), "per-rate curves")
    return {"t": t.tolist(), **curve_statistics(l)}


def curve_statistics(l: np.ndarray) -> dict[str, Any]:
    """Per-rate statistics of losses l `[I, G, K]` (sequences x grid rates x masks):

    g(t) = E[l | t]; v(t) = Var(l | t) over x0 and masks; S(t) = E[l^2 | t];
    a(t) = E_x0[Var_m(l | x0, t)], whose integral over t is A (Standard);
    b(t) = E_x0[(E_m[l | x0, t] - E[l | x0])^2], whose integral is B (Standard), with the
    mask noise of the per-(x0, t) means removed so that it is unbiased on the grid;
    `se_a`, `se_b` are their SEs over sequences; `m` `[I, G]` the per-sequence means (for
    `semi_analytic_total`), and `integrals` the midpoint-rule integrals A, B, C and
    total = int S - (E l)^2, with (E l)^2 estimated without bias (the plug-in square of the
    mean is high by Var(mean) = Var_i(m_i) / I, which would make the total low by about C / I);
    the total then equals A + B + C exactly.
    """
    I, G, K = l.shape
    S = ppots.second_moment(l)  # [G]
    g = l.mean(axis=(0, 2))  # [G]
    v = l.transpose(1, 0, 2).reshape(G, I * K).var(axis=1, ddof=1)  # [G]
    m = l.mean(axis=2)  # [I, G] E_m[l | x0, t]
    s2 = l.var(axis=2, ddof=1)  # [I, G] Var_m(l | x0, t)
    m_i = m.mean(axis=1, keepdims=True)  # [I, 1] E[l | x0] by the midpoint rule
    b_terms = rate_terms(l)  # [I, G]
    C = float(m_i[:, 0].var(ddof=1) - s2.mean(axis=1).mean() / (G * K))
    square_of_mean = float(m_i.mean() ** 2 - m_i[:, 0].var(ddof=1) / I)  # unbiased (E l)^2
    return {
        "g": g.tolist(),
        "v": v.tolist(),
        "S": S.tolist(),
        "a": s2.mean(axis=0).tolist(),
        "b": b_terms.mean(axis=0).tolist(),
        "se_a": (s2.std(axis=0, ddof=1) / math.sqrt(I)).tolist(),
        "se_b": (b_terms.std(axis=0, ddof=1) / math.sqrt(I)).tolist(),
        "m": m.tolist(),
        "integrals": {
            "A": float(s2.mean()),
            "B": float(b_terms.mean()),
            "C": C,
            "total": float(S.mean() - square_of_mean),
        },
        "sequences": I,
        "masks": K,
    }


def rate_terms(l: np.ndarray) -> np.ndarray:
    """Each unit's b(t) term `[I, G]` from losses l `[I, G, K]`: (E_m[l | x0, t] - E[l | x0])^2
    with the mask noise of both means removed, so that it is unbiased on the grid."""
    G, K = l.shape[1:]
    m = l.mean(axis=2)  # [I, G]
    s2 = l.var(axis=2, ddof=1)  # [I, G]
    noise = ((1.0 - 2.0 / G) * s2 + s2.mean(axis=1, keepdims=True) / G) / K  # [I, G]
    return (m - m.mean(axis=1, keepdims=True)) ** 2 - noise


def _block_curves(
    model: torch.nn.Module,
    objective: Objective,
    rows: dict[str, torch.Tensor],
    t: torch.Tensor,
    K: int,
    seed: int,
) -> dict[str, Any]:
    """`rate_curves` for block diffusion: every block of the I `rows` at each grid rate t `[G]`,
    K masks (`ppots_fit.block_grid_values`: a block's unweighted term). g, v, S are
    per block, pooled over block positions (the S that P-POTS for blocks fits). A block's term
    depends on its own rate and mask only, and blocks draw them independently, so a sequence's
    A and B are its blocks' sums: a(t) and C come from the sequences' summed terms (masks are
    independent across blocks), b(t) sums each block's own term, and total = A + B + C."""
    I, G = len(rows["input_ids"]), len(t)
    repeated = {k: v.repeat(K, *([1] * (v.dim() - 1))) for k, v in rows.items()}  # [K I, L]
    generator = seeded_generator(seed, "curves-mask")
    units = ppots.block_grid_values(objective, model, repeated, t.numpy(), K, generator)
    _check_finite(torch.from_numpy(units), "per-rate curves")  # [U, G, K]
    owner = np.repeat(np.arange(I), blocks_of_rows(rows["eligible"], objective.block_size))
    summed, b_terms = np.zeros((I, G, K)), np.zeros((I, G))
    np.add.at(summed, owner, units)
    np.add.at(b_terms, owner, rate_terms(units))
    curves, pooled = curve_statistics(summed), curve_statistics(units)
    integrals = {**curves["integrals"], "B": float(b_terms.mean())}
    integrals["total"] = integrals["A"] + integrals["B"] + integrals["C"]
    return curves | {
        "t": t.tolist(),
        **{key: pooled[key] for key in ("g", "v", "S")},
        "b": b_terms.mean(axis=0).tolist(),
        "se_b": (b_terms.std(axis=0, ddof=1) / math.sqrt(I)).tolist(),
        "integrals": integrals,
        "blocks": len(units),
    }


def semi_analytic_total(curves: Mapping[str, Any], sampler: RateSampler) -> float:
    """Variance of one draw w(t) l under t ~ p predicted from the grid curves by the midpoint
    rule: int S w^2 p dt - (int g w p dt)^2 (w = 1/p for unbiased samplers, so Standard gives
    int S dt - (E l)^2), the square estimated without bias from the per-sequence means
    (`curve_statistics`). Valid for rate-mode estimators with iid masks."""
    t = torch.tensor(curves["t"], dtype=F64)
    p = density_sampler(sampler).density(t).numpy()
    w = density_sampler(sampler).weight(t).numpy()
    S, m = np.asarray(curves["S"]), np.asarray(curves["m"])  # [G], [I, G]
    y = (m * w * p).mean(axis=1)  # [I] each sequence's int g w p dt
    square = y.mean() ** 2 - y.var(ddof=1) / len(y)
    return float(np.mean(S * w**2 * p) - square)
