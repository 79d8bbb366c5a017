"""The forward (masking) process of paper.md sections 1 and 3.

Every function is pure: it takes the eligible positions and an explicit generator and
returns boolean masks `[B, L]` that are True only on eligible positions.
"""

from __future__ import annotations

import torch

DEFAULT_EPS = 1e-3


def p_mask(t: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Per-token masking probability p_mask(t) = (1 - eps) t + eps (paper.md section 1)."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1), got {eps}")
    return (1.0 - eps) * t + eps


def _uniforms(eligible: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One U(0,1) draw per position `[B, L]`, drawn on the generator's device (so a CPU
    generator gives the same draws whatever device the batch is on), then moved."""
    device = generator.device if generator is not None else eligible.device
    return torch.rand(eligible.shape, generator=generator, device=device).to(eligible.device)


def iid_mask(
    eligible: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mask each eligible token independently with its sequence's probability p `[B]`."""
    u = _uniforms(eligible, generator)  # [B, L]
    return (u < p[:, None]) & eligible


def mirror_masks(
    eligible: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MIRROR: complementary masks m1 = {u < p}, m2 = {u > 1 - p} from one uniform per token.

    Each is marginally Bernoulli(p); per token Cov(m1, m2) = max(0, 2p - 1) - p^2 <= 0.
    p is per sequence `[B]` or per position `[B, L]` (block diffusion).
    """
    u = _uniforms(eligible, generator)  # [B, L]
    p = _per_position(p, eligible)
    return (u < p) & eligible, (u > 1.0 - p) & eligible


def _eligible_ranks(eligible: torch.Tensor, u: torch.Tensor, descending: bool) -> torch.Tensor:
    """Rank `[B, L]` of each eligible position's uniform among its row's eligible uniforms."""
    fill = float("inf") if not descending else float("-inf")
    keys = torch.where(eligible, u, torch.full_like(u, fill))
    order = torch.argsort(keys, dim=1, descending=descending)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(u.shape[1], device=u.device).expand_as(order))
    return ranks


def subset_mask(
    eligible: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Count mode: mask a uniformly random k-subset `[B]` of each row's eligible positions."""
    u = _uniforms(eligible, generator)
    return (_eligible_ranks(eligible, u, descending=False) < k[:, None]) & eligible


def grouped_subset_mask(
    eligible: torch.Tensor,
    groups: torch.Tensor,
    k: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Count mode per group (block diffusion's blocks): mask a uniformly random `k[b, g]`-subset
    of the eligible positions of each group g of each row; `groups` `[B, L]` holds ids in
    0..G-1 and `k` is `[B, G]`. With one group it draws `subset_mask`'s mask."""
    return _lowest_in_groups(eligible, groups, _uniforms(eligible, generator), k)


def grouped_mirror_subset_masks(
    eligible: torch.Tensor,
    groups: torch.Tensor,
    k: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count-mode MIRROR per group: the `k[b, g]` smallest and the `k[b, g]` largest of one set
    of per-token uniforms in each group (`mirror_subset_masks` group by group)."""
    u = _uniforms(eligible, generator)
    return _lowest_in_groups(eligible, groups, u, k), _lowest_in_groups(eligible, groups, -u, k)


def _lowest_in_groups(
    eligible: torch.Tensor, groups: torch.Tensor, u: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """The eligible positions whose `u` `[B, L]` (in (-1, 1)) is among the `k[b, g]` smallest
    of their group g."""
    ranks = _eligible_ranks(eligible, 2 * groups.double() + u.double(), descending=False)
    counts = torch.zeros(k.shape, dtype=torch.long, device=k.device)
    counts.scatter_add_(1, groups, eligible.long())  # [B, G] eligible positions per group
    before = (counts.cumsum(dim=1) - counts).gather(1, groups)  # [B, L] in earlier groups
    return (ranks - before < k.gather(1, groups)) & eligible


def mirror_subset_masks(
    eligible: torch.Tensor, k: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count-mode MIRROR: the k smallest and the k largest of one set of per-token uniforms.

    Each is a uniform k-subset; they are disjoint when 2k <= |E| (paper.md section 3).
    """
    u = _uniforms(eligible, generator)
    k = k[:, None]
    low = (_eligible_ranks(eligible, u, descending=False) < k) & eligible
    high = (_eligible_ranks(eligible, u, descending=True) < k) & eligible
    return low, high


def isad_probabilities(
    eligible: torch.Tensor,
    special: torch.Tensor,
    p: torch.Tensor,
    delta: float,
    q_max: float,
) -> torch.Tensor:
    """ISAD proposal: per-token masking probability `[B, L]`, q = min(p + delta, q_max) on
    eligible `special` tokens and p elsewhere (this project's definition, paper.md section 3);
    p is per sequence `[B]` or per position `[B, L]` (block diffusion's rate of each block).

    q_max < 1 keeps every mask pattern reachable, so the likelihood ratio can correct the bias.
    """
    if delta < 0:
        raise ValueError(f"ISAD delta must be >= 0, got {delta}")
    if not 0.0 < q_max < 1.0:
        raise ValueError(f"ISAD q_max must lie in (0, 1), got {q_max}")
    p = _per_position(p, eligible)  # [B, L]
    raised = torch.clamp(p + delta, max=q_max).maximum(p)
    return torch.where(special & eligible, raised, p)


def bernoulli_mask(
    eligible: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mask each eligible token independently with its own probability q `[B, L]`."""
    return (_uniforms(eligible, generator) < q) & eligible


def isad_log_ratio(
    mask: torch.Tensor, eligible: torch.Tensor, p: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """Exact log likelihood ratio `[B]` of a mask pattern, target Bernoulli(p) over proposal
    Bernoulli(q), summed over eligible positions (positions with q == p contribute 0)."""
    return isad_log_ratio_terms(mask, eligible, p, q).sum(dim=1)


def isad_log_ratio_terms(
    mask: torch.Tensor, eligible: torch.Tensor, p: torch.Tensor, q: torch.Tensor
) -> torch.Tensor:
    """Each position's term `[B, L]` of `isad_log_ratio` (p `[B]` or `[B, L]`), so that block
    diffusion can sum it block by block."""
    p = _per_position(p, q)
    ratio = torch.where(mask, torch.log(p) - torch.log(q), torch.log1p(-p) - torch.log1p(-q))
    return torch.where(eligible & (q != p), ratio, torch.zeros_like(ratio))


def _per_position(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A probability per sequence `[B]` or per position `[B, L]` as `[B, L]`."""
    return p if p.dim() == 2 else p[:, None].expand_as(like)


def apply_mask(x0: torch.Tensor, mask: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """x_t: replace masked positions of x0 `[B, L]` with the [MASK] token."""
    return torch.where(mask, torch.full_like(x0, mask_token_id), x0)
