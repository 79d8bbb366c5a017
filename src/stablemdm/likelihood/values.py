"""Where the model is called: the ELBO log-likelihood value of each drawn copy of a
continuation (through `estimators.losses.mdm_loss`), and an ARM's exact log-likelihood
(through `arm_loss`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..estimators.losses import Model, arm_loss, mdm_loss, unwrap
from .schemes import Draw


def model_device(model: Model) -> torch.device:
    """The device of the model's first parameter (the CPU for a parameterless callable)."""
    parameters = getattr(unwrap(model), "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def context_rows(context: Sequence[int], continuation: Sequence[int], n: int, device: torch.device):
    """x0 `[n, C + L]` (context then continuation, repeated) and the continuation's
    positions `[n, C + L]` (what is masked and scored)."""
    x0 = torch.tensor([*context, *continuation], device=device).expand(n, -1)
    eligible = torch.zeros(x0.shape, dtype=torch.bool, device=device)
    eligible[:, len(context) :] = True
    return x0, eligible


@torch.no_grad()
def draw_values(
    model: Model,
    context: Sequence[int],
    continuation: Sequence[int],
    draw: Draw,
    mask_token_id: int,
) -> torch.Tensor:
    """Each copy's estimate `[n]` (float64, CPU) of the ELBO log-likelihood:
    -weight * sum_{i in M} CE_i / p, averaged over a MIRROR pair's two masks. All masks of the
    batch go through the model in one call."""
    n, m, c = draw.p.shape[0], len(draw.masks), len(context)
    device = model_device(model)
    x0, eligible = context_rows(context, continuation, n * m, device)
    mask = torch.zeros_like(eligible)
    mask[:, c:] = torch.cat(draw.masks).to(device)[:, : len(continuation)]
    t = None if draw.t is None else draw.t.repeat(m).float().to(device)
    loss = mdm_loss(
        model,
        x0,
        eligible,
        mask,
        draw.p.repeat(m).float().to(device),
        mask_token_id,
        normalizer=torch.ones(n * m, device=device),  # the sum over tokens, not the mean
        t=t,
    )
    per_copy = loss.per_sequence.double().cpu().view(m, n).mean(dim=0)  # [n]
    return -per_copy * draw.weight.double().cpu()


@torch.no_grad()
def arm_loglikelihood(model: Model, context: Sequence[int], continuation: Sequence[int]) -> float:
    """An ARM's exact log p(continuation | context): the next-token log-probabilities of the
    continuation's tokens, summed (one forward pass)."""
    x0, eligible = context_rows(context, continuation, 1, model_device(model))
    loss = arm_loss(model, x0, eligible, normalizer=torch.ones(1, device=x0.device))
    return -float(loss.per_sequence[0])
