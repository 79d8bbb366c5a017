"""Block-by-block decoding of a block-diffusion model over a KV cache (BD3-LM's and Fast-dLLM
v2's decoder), on the built-in transformer.

The prompt is run once and its keys and values cached. Each block of `block_size` masks is
then denoised over its own positions only, attending to the cache (the prompt and every
finished block) and bidirectionally to itself, with the full-canvas decoder's unmasking rule
(`unmasking`); once clean it is run once more and its keys and values appended. A row whose
block holds `<eos>` is finished and leaves the batch (its rows of the cache dropped), so the
work follows the output's length and `gen_length` is only a cap. Prompts of different
lengths are right-padded: their padding keys are marked not real in the cache and each row's
blocks keep its own RoPE positions (prompt length + offset), as in the uncached decoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.kv_cache import KVCache
from ..models.transformer import Transformer
from .unmasking import ban, banned_ids, reveal, unmask_schedule


def decode_cached(
    model: Transformer,
    prompts: torch.Tensor,
    prompt_len: torch.Tensor,
    *,
    gen_length: int,
    steps_per_block: int,
    mask_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    allowed: Callable[[int], torch.Tensor] | None = None,
    **rule,
) -> torch.Tensor:
    """The canvas `[B, gen_length]` decoded after the right-padded `prompts` `[B, P]` of
    lengths `prompt_len` `[B]`, block by block in the model's `block_size`, `steps_per_block`
    calls a block; `pad_token_id` past a finished row's last block. `allowed`: the canvas
    constraint of `decoding._canvas_allowed`; `rule`: `reveal`'s remasking, temperature and
    generator."""
    size = int(model.config.block_size)
    device = prompts.device
    out = torch.full((prompts.shape[0], gen_length), pad_token_id, device=device)
    rows = torch.arange(prompts.shape[0], device=device)  # the unfinished rows of `out`
    cache = KVCache.empty(prompts.shape[0], device)
    at = torch.arange(prompts.shape[1], device=device).expand_as(prompts)  # [B, P]
    model.forward_cached(prompts, at, cache, valid=at < prompt_len[:, None], store=True)
    banned = banned_ids(mask_token_id, pad_token_id, eos_token_id)
    for start in range(0, gen_length, size):
        span = slice(start, min(start + size, gen_length))
        offsets = torch.arange(span.start, span.stop, device=device)  # [Lb]
        positions = prompt_len[rows, None] + offsets  # [A, Lb]: each row's own positions
        limit = None if allowed is None else allowed(model.config.vocab_size)[span]
        block = torch.full_like(positions, mask_token_id)  # [A, Lb]
        for n_unmask in (k for k in unmask_schedule(block.shape[1], steps_per_block) if k > 0):
            logits = ban(model.forward_cached(block, positions, cache), banned, limit)
            block = reveal(logits, block, n_unmask, mask_token_id=mask_token_id, **rule)
        out[rows, span] = block
        going = ~(block == eos_token_id).any(dim=1)  # [A]
        if span.stop == gen_length or not bool(going.any()):
            break
        rows, cache = rows[going], cache.keep(going)
        model.forward_cached(block[going], positions[going], cache, store=True)
    return out
