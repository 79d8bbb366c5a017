"""SyRM (this project's definition, paper.md section 3): antithetic rate pairs u and 1 - u in
the base density's CDF space."""

from __future__ import annotations

import torch

from .rates import F64, RateScheme, _check_generator, _check_n


class Mirrored(RateScheme):
    """SyRM (this project's definition, paper.md section 3): antithetic uniforms in adjacent
    pairs (u, 1 - u), mirrored in the base's CDF space; with n odd the last one is iid."""

    name = "syrm"

    def uniforms(self, n: int, generator: torch.Generator) -> torch.Tensor:
        _check_generator(generator)
        _check_n(n)
        u = torch.rand(n // 2 + n % 2, generator=generator, dtype=F64, device=generator.device)
        pairs = torch.stack([u[: n // 2], 1.0 - u[: n // 2]], dim=1).flatten()  # [2 (n // 2)]
        return torch.cat([pairs, u[n // 2 :]])  # [n]
