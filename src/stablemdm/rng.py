"""Seeded randomness in one place: every generator the library draws from is derived from the
run's seed and a key naming its purpose, so draws are reproducible and independent."""

from __future__ import annotations

import hashlib

import torch


def seeded_generator(seed: int, *key: object) -> torch.Generator:
    """A CPU generator whose seed is a stable hash of (seed, *key)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *key))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
