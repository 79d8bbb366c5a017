"""The block-diffusion attention mask (BD3-LM, Arriola et al. 2025, its `block_diff_mask`).

Block diffusion trains on the noised sequence and the clean one side by side, `[noised |
clean]` (2L positions, the clean half at the same positions as the noised half), in one
forward pass (MIRROR adds its mirrored copy: `[noised | mirror | clean]`, 3L).
`block_diffusion_mask` states the whole rule; the built-in transformer (and any adapter of
another network) builds its attention from it and nothing else.
"""

from __future__ import annotations

import torch


def block_diffusion_mask(
    block_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, noised: int = 1
) -> torch.Tensor:
    """Boolean SDPA mask `[B, 1, Q, Q]` (True: may attend) for `block_ids` `[B, L]`, the block
    index of each position (the prompt is block 0, the clean context of every response block).

    With `noised` = c >= 1 noised copies the input is `[noised_1 | ... | noised_c | clean]`
    (Q = (c + 1) L; c = 1 is BD3-LM's `[noised | clean]`, c = 2 MIRROR's mirrored copy beside
    it, sharing one clean context) and

    - a noised token attends to the noised tokens of its own block in its own copy
      (bidirectionally) and to the clean tokens of every earlier block;
    - a clean token attends to the clean tokens of its own and every earlier block;
    - no clean token attends to a noised one, and no copy to another.

    With `noised=0` (or False) the input is one sequence (Q = L) read by the clean rule: the
    view a decoder has of earlier clean blocks and the block it is denoising (BD3-LM's
    sampling mask). `attention_mask` `[B, Q]` (1: real token) removes padding keys; each query
    keeps its own key, so a padded query still attends to something (no NaN rows).
    """
    copies = int(noised)
    query, key = block_ids[:, :, None], block_ids[:, None, :]  # [B, L, 1], [B, 1, L]
    up_to = key <= query  # [B, L, L] clean -> clean: block-causal
    none = torch.zeros_like(up_to)
    rows = [
        torch.cat([key == query if c == a else none for c in range(copies)] + [key < query], 2)
        for a in range(copies)
    ]  # noised copy a: [B, L, Q]
    allowed = torch.cat(rows + [torch.cat([none] * copies + [up_to], dim=2)], dim=1)  # [B, Q, Q]
    size = allowed.shape[-1]
    if attention_mask is not None:
        if attention_mask.shape != allowed.shape[:2]:
            raise ValueError(
                f"block_diffusion_mask: attention_mask shape {tuple(attention_mask.shape)} must "
                f"be {tuple(allowed.shape[:2])} (batch, {copies + 1} x the blocks' length)"
            )
        allowed = allowed & attention_mask.bool()[:, None, :]
    eye = torch.eye(size, dtype=torch.bool, device=block_ids.device)
    return (allowed | eye)[:, None]  # [B, 1, Q, Q]
