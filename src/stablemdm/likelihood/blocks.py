"""The ELBO of a block-diffusion model (BD3-LM, Arriola et al. 2025): the continuation is cut
into blocks as `objective=block` training and block decoding cut a response
(`estimators.blocks.response_blocks`: `block_size` tokens from its first, a last block maybe
shorter; the context is block 0, always clean), and

    log p(continuation | context) >= sum_j ELBO_j,

ELBO_j the masked-diffusion ELBO of block j given the context and the clean blocks before it.
One forward pass over `[noised | clean]` (MIRROR's pair: `[noised | mirror | clean]`) scores
every block of a copy at once, each at its own rate or count, as training does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..estimators.blocks import block_loss, blocks_per_row, response_blocks
from ..estimators.losses import Model
from .schemes import Draw, Scheme
from .values import context_rows, model_device


def block_lengths(length: int, block_size: int) -> list[int]:
    """The tokens of each block of an L-token continuation: `block_size` each, the last the
    rest."""
    return [min(block_size, length - start) for start in range(0, length, block_size)]


@torch.no_grad()
def block_terms(
    model: Model,
    context: Sequence[int],
    continuation: Sequence[int],
    draw: Draw,
    mask_token_id: int,
    block_size: int,
) -> torch.Tensor:
    """Each copy's weighted block terms `[n, nb]` (float64, CPU): weight_j * sum_{i in block
    j, masked} CE_i / p_j (a MIRROR pair's mean), from one forward pass over the copies'
    `[noised | clean]`; `draw` holds masks `[n, >= L]` and `p`, `weight` `[n, >= nb]`."""
    n, c, length = draw.p.shape[0], len(context), len(continuation)
    device = model_device(model)
    x0, eligible = context_rows(context, continuation, n, device)
    masks = []
    for drawn in draw.masks:
        mask = torch.zeros_like(eligible)
        mask[:, c:] = drawn.to(device)[:, :length]
        masks.append(mask)
    nb = blocks_per_row(length, block_size)
    _, per_block = block_loss(
        model,
        x0,
        eligible,
        tuple(masks),
        response_blocks(eligible, block_size),
        draw.p[:, :nb].to(device),
        mask_token_id,
        normalizer=torch.ones(n, device=device),  # the sum over tokens, not the mean
    )
    return per_block.double().cpu() * draw.weight[:, :nb].double().cpu()


def block_copy_values(
    model: Model,
    scheme: Scheme,
    context: Sequence[int],
    continuation: Sequence[int],
    eligible: torch.Tensor,
    generator: torch.Generator,
    mask_token_id: int,
    block_size: int,
) -> torch.Tensor:
    """Each copy's estimate `[n]` of the block ELBO: the scheme's draw in every block of the
    continuation's positions `eligible` `[n, Lmax]` (Lmax: the question's longest). Rates are
    drawn for the longest continuation's blocks (a missing block at `block_size`), so every
    choice consumes the generator alike and common random numbers share rates and masks."""
    own = block_lengths(len(continuation), block_size)
    wanted = blocks_per_row(eligible.shape[1], block_size)
    lengths = own + [block_size] * (wanted - len(own))
    r = scheme.block_rates(eligible.shape[0], lengths, generator)  # [n, nb_max]
    draw = scheme.draw_blocks(eligible, response_blocks(eligible, block_size), r, generator)
    terms = block_terms(model, context, continuation, draw, mask_token_id, block_size)
    return -terms.sum(dim=1)
