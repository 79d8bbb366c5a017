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
from .masking import (
    apply_mask,
    bernoulli_mask,
    grouped_mirror_subset_masks,
    grouped_subset_mask,
    isad_log_ratio_terms,
    isad_probabilities,
    mirror_masks,
)
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
    mirror: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Rate mode: mask each eligible token with its block's probability p `[B, nb]`. One
    uniform per position, as `iid_mask` draws: one block spanning the response gives its mask.
    With `mirror`, MIRROR's pair (u < p, u > 1 - p) from the same uniforms, block by block."""
    per_position = spread(p, block_ids)  # [B, L]
    if mirror:
        return mirror_masks(eligible, per_position, generator)
    return (bernoulli_mask(eligible, per_position, generator),)


def block_isad_masks(
    eligible: torch.Tensor,
    block_ids: torch.Tensor,
    p: torch.Tensor,
    special: torch.Tensor,
    delta: float,
    q_max: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ISAD per block: each eligible `special` token masked with q = min(p_j + delta, q_max),
    the others with p_j; returns the mask and each block's likelihood ratio `[B, nb]` (a block's
    term depends only on its own mask, so it carries only its own positions' ratio)."""
    per_position = spread(p, block_ids)  # [B, L]
    q = isad_probabilities(eligible, special, per_position, delta, q_max)
    mask = bernoulli_mask(eligible, q, generator)
    log_ratio = isad_log_ratio_terms(mask, eligible, per_position, q)  # [B, L]
    return mask, torch.exp(block_sums(log_ratio, block_ids, p.shape[1]))


def block_count_masks(
    eligible: torch.Tensor,
    block_ids: torch.Tensor,
    sampler: RateSampler,
    r: torch.Tensor,
    generator: torch.Generator | None = None,
    mirror: bool = False,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count mode per block: k_j = ceil(|E_j| r_j) of the block's |E_j| eligible positions, a
    uniform k_j-subset of them (with `mirror`, also the mirrored k_j-subset from the same
    uniforms); returns (masks `[B, L]`, ELBO factor k/|E_j|, reported rate (k - 1/2)/|E_j|,
    weight 1 / (|E_j| q(k))), each per block `[B, nb]` (a block with no eligible position
    masks nothing and weighs 1)."""
    n = block_sums(eligible.long(), block_ids, r.shape[1]).clamp(min=1)  # [B, nb]
    k, weight = counts_from_rates(sampler, r.flatten(), n.flatten())
    k, weight = k.view_as(n), weight.view_as(n)
    with_prompt = torch.cat([torch.zeros_like(k[:, :1]), k], dim=1)  # [B, nb + 1]
    if mirror:
        masks = grouped_mirror_subset_masks(eligible, block_ids, with_prompt, generator)
    else:
        masks = (grouped_subset_mask(eligible, block_ids, with_prompt, generator),)
    return masks, k / n, (k - 0.5) / n, weight


def block_loss(
    model: Model,
    x0: torch.Tensor,
    eligible: torch.Tensor,
    masks: torch.Tensor | tuple[torch.Tensor, ...],
    block_ids: torch.Tensor,
    p: torch.Tensor,
    mask_token_id: int,
    attention_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    normalizer: torch.Tensor | None = None,
) -> tuple[Loss, torch.Tensor]:
    """The block-diffusion loss of given masks, in one forward pass over `[x_t | x0]`:

        l_b = (1/N_b) sum_j weight_bj * sum_{i in block j, masked} CE_i / p_bj

    with `p` and `weight` per block `[B, nb]` and N as in `mdm_loss` (default |E_b|). Two
    masks (MIRROR) are scored in the same pass over `[x_t | x_t' | x0]`, sharing the clean
    context, and each block's term is the mean of its two copies'. Returns the loss (its token
    pieces on the noised copies, `[cB, L]`) and each block's unweighted term `[B, nb]` (its
    part of l_b before `weight`)."""
    masks = (masks,) if isinstance(masks, torch.Tensor) else tuple(masks)
    c, (b, length) = len(masks), x0.shape
    noised = [apply_mask(x0, m, mask_token_id) for m in masks]
    both = torch.cat([*noised, x0], dim=1)  # [B, (c + 1) L]: noised copies | clean
    attention = None if attention_mask is None else torch.cat([attention_mask] * (c + 1), dim=1)
    logits = logits_of(model, both, attention, block_ids=block_ids)
    scored = torch.cat([m & eligible for m in masks])  # [cB, L]
    copies = torch.cat([logits[:, i * length : (i + 1) * length] for i in range(c)])
    nll = token_nll(copies, x0.repeat(c, 1)) * scored  # [cB, L]
    n = eligible.sum(dim=1).clamp(min=1) if normalizer is None else normalizer  # [B]
    sums = block_sums(nll, block_ids.repeat(c, 1), p.shape[1]).view(c, b, -1).mean(dim=0)
    per_block = sums / (n[:, None] * p)  # [B, nb]
    weighted = per_block if weight is None else per_block * weight
    per_sequence = weighted.sum(dim=1)
    return Loss(per_sequence.mean(), per_sequence, nll, scored), per_block
