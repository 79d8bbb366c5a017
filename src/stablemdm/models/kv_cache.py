"""The KV cache of block-diffusion decoding (BD3-LM, Fast-dLLM v2): the keys and values of
every clean position decoded so far (the prompt, then each finished block), per layer.

A block model's clean positions attend only to clean positions of their own and earlier
blocks (`blocks.block_diffusion_mask`), so once a block is clean its keys and values never
change: computed once, they serve every later block. Rows keep their own RoPE positions, so
prompts of different lengths sit in one cache with padding keys marked not real (`valid`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Per layer, keys and values `[B, H, S, Dh]` (already rotated), and which of the S
    cached positions are real tokens `valid` `[B, S]`; empty (S = 0) until the prompt."""

    valid: torch.Tensor
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def empty(cls, batch: int, device: torch.device | str = "cpu") -> KVCache:
        """A cache of `batch` rows holding nothing yet."""
        return cls(valid=torch.zeros(batch, 0, dtype=torch.bool, device=device))

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer `index`'s cached keys and values, or None while the cache is empty."""
        return (self.keys[index], self.values[index]) if self.keys else None

    def append(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor
    ) -> None:
        """Add a clean chunk's keys and values (one `[B, H, Lc, Dh]` per layer) and which of
        its Lc positions are real `[B, Lc]`."""
        if self.keys:
            keys = [torch.cat(pair, dim=2) for pair in zip(self.keys, keys, strict=True)]
            values = [torch.cat(pair, dim=2) for pair in zip(self.values, values, strict=True)]
        self.keys, self.values = keys, values
        self.valid = torch.cat([self.valid, valid.bool()], dim=1)

    def keep(self, rows: torch.Tensor) -> KVCache:
        """The cache of the rows `rows` only (a boolean `[B]` or indices): finished rows leave
        the batch."""
        return KVCache(
            valid=self.valid[rows],
            keys=[k[rows] for k in self.keys],
            values=[v[rows] for v in self.values],
        )
