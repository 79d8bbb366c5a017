"""The block-diffusion attention mask (BD3-LM, Arriola et al. 2025, its `block_diff_mask`).

Block diffusion trains on the noised sequence and the clean one side by side, `[noised |
clean]` (2L positions, the clean half at the same positions as the noised half), in one
forward pass. `block_diffusion_mask` states the whole rule; the built-in transformer (and any
adapter of another network) builds its attention from it and nothing else.
"""

from __future__ import annotations

import torch


def block_diffusion_mask(
    block_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, noised: bool = True
) -> torch.Tensor:
    """Boolean SDPA mask `[B, 1, Q, Q]` (True: may attend) for `block_ids` `[B, L]`, the block
    index of each position (the prompt is block 0, the clean context of every response block).

    With `noised` the input is `[noised | clean]` (Q = 2L) and

    - a noised token attends to the noised tokens of its own block (bidirectionally) and to
      the clean tokens of every earlier block;
    - a clean token attends to the clean tokens of its own and every earlier block;
    - no clean token attends to a noised one.

    Without it the input is one sequence (Q = L) read by the clean rule: the view a decoder
    has of earlier clean blocks and the block it is denoising (BD3-LM's sampling mask).
    `attention_mask` `[B, Q]` (1: real token) removes padding keys; each query keeps its own
    key, so a padded query still attends to something (no NaN rows).
    """
    query, key = block_ids[:, :, None], block_ids[:, None, :]  # [B, L, 1], [B, 1, L]
    up_to = key <= query  # [B, L, L] clean -> clean: block-causal
    if noised:
        rows_noised = torch.cat([key == query, key < query], dim=2)  # [B, L, 2L]
        rows_clean = torch.cat([torch.zeros_like(up_to), up_to], dim=2)  # [B, L, 2L]
        allowed = torch.cat([rows_noised, rows_clean], dim=1)  # [B, 2L, 2L]
    else:
        allowed = up_to
    size = allowed.shape[-1]
    if attention_mask is not None:
        if attention_mask.shape != allowed.shape[:2]:
            raise ValueError(
                f"block_diffusion_mask: attention_mask shape {tuple(attention_mask.shape)} must "
                f"be {tuple(allowed.shape[:2])} (batch, {'2 x ' if noised else ''}blocks' length)"
            )
        allowed = allowed & attention_mask.bool()[:, None, :]
    eye = torch.eye(size, dtype=torch.bool, device=block_ids.device)
    return (allowed | eye)[:, None]  # [B, 1, Q, Q]
