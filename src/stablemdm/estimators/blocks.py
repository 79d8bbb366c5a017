"""Block diffusion's objective (BD3-LM, Arriola et al. 2025), as pure math.

The response is cut into blocks of `block_size` positions from its first position (a last
block may be shorter); the prompt is block 0, clean context for every response block. Each
block j draws its own rate (or count) and its own mask, and the model predicts its masked
tokens from the noised block and the clean blocks before it, in ONE forward pass over
`[noised | clean]` (the attention rule is `models.blocks.block_diffusion_mask`, applied by the
model to the `block_ids` it is given). Per sequence, in rate mode,

    l = (1/N) sum_j w_j * sum_{i in block j, masked} CE_i / p_j,   p_j = p_mask(t_j),

and in count mode p_j = k_j / |E_j| (k_j masked of the block's |E_j| eligible positions) and
w_j = 1 / (|E_j| q(k_j)): each block's term is the full-canvas MDM estimator of that block
given the clean blocks before it. `Objective(kind="block")` composes these pieces.
"""

from __future__ import annotations

import math

import torch

from .counts import counts_from_rates
from .losses import Loss, Model, logits_of, token_nll
from .masking import apply_mask, bernoulli_mask, grouped_subset_mask
from .rates import RateSampler


def response_blocks(eligible: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block index `[B, L]` of each position: 0 before the row's first eligible position (the
    prompt), then 1, 2, ... for each `block_size` positions from there to the end of the row."""
    length = eligible.shape[1]
    start = torch.where(eligible.any(dim=1), eligible.long().argmax(dim=1), length)  # [B]
    offset = torch.arange(length, device=eligible.device)[None, :] - start[:, None]  # [B, L]
    return torch.where(offset >= 0, offset.div(block_size, rounding_mode="floor") + 1, 0)


def blocks_per_row(length: int, block_size: int) -> int:
    """The number of response blocks drawn for rows of `length` positions: the most a row can
    have, so that every row and every process draws the same number of rates."""
    return math.ceil(length / block_size)


def block_sums(values: torch.Tensor, block_ids: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Per-block sums `[B, n_blocks]` of `values` `[B, L]` (the prompt, block 0, left out)."""
    out = torch.zeros(values.shape[0], n_blocks + 1, dtype=values.dtype, device=values.device)
    return out.scatter_add_(1, block_ids, values)[:, 1:]


def spread(per_block: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Each position's block value `[B, L]` from `per_block` `[B, nb]` (0 on the prompt)."""
    padded = torch.cat([torch.zeros_like(per_block[:, :1]), per_block], dim=1)  # [B, nb + 1]
    return padded.gather(1, block_ids)


def block_rate_masks(
    eligible: torch.Tensor,
    block_ids: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rate mode: mask each eligible token with its block's probability p `[B, nb]`. One
    uniform per position, as `iid_mask` draws: one block spanning the response gives its mask."""
    return bernoulli_mask(eligible, spread(p, block_ids), generator)


def block_count_masks(
    eligible: torch.Tensor,
    block_ids: torch.Tensor,
    sampler: RateSampler,
    r: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count mode per block: k_j = ceil(|E_j| r_j) of the block's |E_j| eligible positions, a
    uniform k_j-subset of them; returns (mask `[B, L]`, ELBO factor k/|E_j|, reported rate
    (k - 1/2)/|E_j|, weight 1 / (|E_j| q(k))), each per block `[B, nb]` (a block with no
    eligible position masks nothing and weighs 1)."""
    n = block_sums(eligible.long(), block_ids, r.shape[1]).clamp(min=1)  # [B, nb]
    k, weight = counts_from_rates(sampler, r.flatten(), n.flatten())
    k, weight = k.view_as(n), weight.view_as(n)
    with_prompt = torch.cat([torch.zeros_like(k[:, :1]), k], dim=1)  # [B, nb + 1]
    mask = grouped_subset_mask(eligible, block_ids, with_prompt, generator)
    return mask, k / n, (k - 0.5) / n, weight


def block_loss(
    model: Model,
    x0: torch.Tensor,
    eligible: torch.Tensor,
    mask: torch.Tensor,
    block_ids: torch.Tensor,
    p: torch.Tensor,
    mask_token_id: int,
    attention_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    normalizer: torch.Tensor | None = None,
) -> tuple[Loss, torch.Tensor]:
    """The block-diffusion loss of given masks, in one forward pass over `[x_t | x0]`:

        l_b = (1/N_b) sum_j weight_bj * sum_{i in block j, masked} CE_i / p_bj

    with `p` and `weight` per block `[B, nb]` and N as in `mdm_loss` (default |E_b|).
    Returns the loss (its token pieces on the noised half) and each block's unweighted term
    `[B, nb]` (its part of l_b before `weight`)."""
    xt = apply_mask(x0, mask, mask_token_id)  # [B, L]
    both = torch.cat([xt, x0], dim=1)  # [B, 2L]: noised | clean
    attention = None if attention_mask is None else torch.cat([attention_mask] * 2, dim=1)
    logits = logits_of(model, both, attention, block_ids=block_ids)[:, : x0.shape[1]]
    scored = mask & eligible
    nll = token_nll(logits, x0) * scored  # [B, L]
    n = eligible.sum(dim=1).clamp(min=1) if normalizer is None else normalizer  # [B]
    per_block = block_sums(nll, block_ids, p.shape[1]) / (n[:, None] * p)  # [B, nb]
    weighted = per_block if weight is None else per_block * weight
    per_sequence = weighted.sum(dim=1)
    return Loss(per_sequence.mean(), per_sequence, nll, scored), per_block
