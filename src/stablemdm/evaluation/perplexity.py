"""Held-out perplexity of a raw text run: the ELBO of packed rows in bits per token, with
its Monte Carlo standard error, through `stablemdm.likelihood`.

Each row is one continuation with no context, estimated by the count-mode MIRROR estimator
(`count_mirror`; `standard` for a model given t, which count mode cannot integrate out) at
a fixed budget: `BUDGET` spends 16 passes per row (two batches of 4
MIRROR pairs), with no early stop, so every evaluation of a run costs the same. The rows'
estimates are independent, so their errors add in quadrature. The standard error is that of
the Monte Carlo estimate of this held-out set's ELBO (the data are fixed): an ARM's value is
exact and its error 0. An ARM predicts no first token, so each row's first token is its
context and the bits are per predicted token. A block-diffusion model is scored by its block
ELBO (`likelihood.blocks`), each row cut into blocks from its first token as training cuts it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..estimators.losses import conditions_on_t
from ..likelihood import Budget, loglikelihood
from ..likelihood.inputs import Kind, is_arm
from ..rng import seeded_generator

ESTIMATOR = "count_mirror"
BUDGET = Budget(batch_size=8, max_passes=16, min_draws=2)


@dataclass(frozen=True)
class BitsPerToken:
    """The held-out ELBO as -log2 p per token with its standard error, over
    `tokens` scored tokens in `rows` rows, the forward passes it took and the `estimator`
    ("exact" for an ARM)."""

    bits_per_token: float
    bits_per_token_se: float
    tokens: int
    rows: int
    passes: int
    estimator: str

    def metrics(self) -> dict[str, float]:
        """The values as metrics.jsonl logs them at an evaluation."""
        return {
            "eval_bits_per_token": self.bits_per_token,
            "eval_bits_per_token_se": self.bits_per_token_se,
        }


def heldout_bits(
    model: torch.nn.Module,
    data: Mapping[str, torch.Tensor],
    *,
    seed: int,
    estimator: str | None = None,
    budget: Budget = BUDGET,
    kind: Kind = "auto",
) -> BitsPerToken:
    """Bits per token of the rows of `data` (`input_ids` and `eligible` `[N, L]`, the packed
    layout of `data.packing`); row i draws from seeded_generator(seed, "perplexity", i), so
    an evaluation is the same at any batch order. `estimator`: `ESTIMATOR` by default."""
    arm = is_arm(model, kind)
    estimator = estimator or ("standard" if conditions_on_t(model) else ESTIMATOR)
    total, variance, tokens, passes = 0.0, 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for i, (ids, eligible) in enumerate(zip(data["input_ids"], data["eligible"], strict=True)):
            row = ids[eligible].tolist()
            context, continuation = (row[:1], row[1:]) if arm else ([], row)
            if not continuation:
                continue
            result = loglikelihood(
                model,
                context,
                continuation,
                generator=seeded_generator(seed, "perplexity", i),
                estimator=estimator,
                budget=budget,
                kind=kind,
            )
            total, variance = total + result.value, variance + result.se**2
            tokens, passes = tokens + len(continuation), passes + result.passes
    finally:
        model.train(was_training)
    scale = tokens * math.log(2)
    rows, name = len(data["input_ids"]), "exact" if arm else estimator
    return BitsPerToken(-total / scale, math.sqrt(variance) / scale, tokens, rows, passes, name)
