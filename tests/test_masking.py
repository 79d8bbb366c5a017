"""The forward process: masks respect eligibility, have the right rates and correlations, and
ISAD's likelihood ratio corrects its proposal exactly."""

import itertools
import math

import pytest
import torch

from stablemdm.estimators import masking


def _eligible(b: int = 64, l: int = 40) -> torch.Tensor:
    """Rows with a prompt (first 10), a response of varying length, then padding."""
    e = torch.zeros(b, l, dtype=torch.bool)
    for i in range(b):
        e[i, 10 : 10 + 5 + i % 25] = True
    return e


def test_p_mask_endpoints_and_validation():
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(masking.p_mask(t, 1e-3), torch.tensor([1e-3, 0.5005, 1.0]))
    with pytest.raises(ValueError, match="eps"):
        masking.p_mask(t, 1.0)


@pytest.mark.parametrize("draw", ["iid", "mirror", "subset", "mirror_subset"])
def test_masks_never_touch_prompt_or_padding(draw):
    g = torch.Generator().manual_seed(0)
    e = _eligible()
    p = torch.rand(e.shape[0], generator=g)
    k = torch.clamp((e.sum(1) * p).long(), min=1)
    masks = {
        "iid": lambda: (masking.iid_mask(e, p, g),),
        "mirror": lambda: masking.mirror_masks(e, p, g),
        "subset": lambda: (masking.subset_mask(e, k, g),),
        "mirror_subset": lambda: masking.mirror_subset_masks(e, k, g),
    }[draw]()
    for m in masks:
        assert not (m & ~e).any()


def test_empirical_rate_matches_p_mask():
    g = torch.Generator().manual_seed(1)
    e = torch.ones(2000, 50, dtype=torch.bool)
    t = torch.rand(2000, generator=g)
    p = masking.p_mask(t)
    m = masking.iid_mask(e, p, g).float()
    # per sequence, the masked fraction has variance p(1-p)/50; pool a z-score over sequences
    z = (m.mean(1) - p) / torch.sqrt(p * (1 - p) / 50)
    assert abs(z.mean().item()) < 5 / math.sqrt(2000)
    assert abs(z.var().item() - 1.0) < 0.15  # var of a sample variance of 2000 ~ 0.03


@pytest.mark.parametrize("p", [0.2, 0.5, 0.7, 0.95])
def test_mirror_marginals_and_covariance(p):
    g = torch.Generator().manual_seed(2)
    n = 200_000
    e = torch.ones(n, 1, dtype=torch.bool)
    m1, m2 = masking.mirror_masks(e, torch.full((n,), p), g)
    m1, m2 = m1.double().squeeze(1), m2.double().squeeze(1)
    se = math.sqrt(p * (1 - p) / n)
    assert abs(m1.mean().item() - p) < 5 * se
    assert abs(m2.mean().item() - p) < 5 * se
    cov = (m1 * m2).mean().item() - m1.mean().item() * m2.mean().item()
    truth = max(0.0, 2 * p - 1) - p * p
    se_cov = (m1 * m2 - p * p).std().item() / math.sqrt(n) + 2 * se
    assert abs(cov - truth) < 5 * se_cov
    if p <= 0.5:
        assert not (m1.bool() & m2.bool()).any()  # disjoint below one half


def test_subset_masks_have_exactly_k_and_are_uniform():
    g = torch.Generator().manual_seed(3)
    e = torch.zeros(30_000, 8, dtype=torch.bool)
    e[:, 2:7] = True  # 5 eligible positions
    k = torch.full((30_000,), 2)
    m = masking.subset_mask(e, k, g)
    assert (m.sum(1) == 2).all()
    freq = m[:, 2:7].double().mean(0)  # each position masked with probability 2/5
    assert (abs(freq - 0.4) < 5 * math.sqrt(0.24 / 30_000)).all()
    low, high = masking.mirror_subset_masks(e, k, g)
    assert (low.sum(1) == 2).all() and (high.sum(1) == 2).all()
    assert not (low & high).any()  # 2k <= |E|: disjoint


def _toy_context_model(x: torch.Tensor) -> torch.Tensor:
    """A loss that depends on the whole masked context, so per-token corrections are wrong."""
    masked = (x == 1).float()  # [B, L]
    return masked[:, 0] * (1 + 3 * masked[:, 1]) + masked[:, 2] * (2 - masked[:, 3]) + masked[:, 1]


def test_isad_likelihood_ratio_is_exact_by_enumeration():
    """E_q[l * LR] equals E_p[l] exactly, summing over all 2^L mask patterns."""
    l_len = 4
    e = torch.ones(1, l_len, dtype=torch.bool)
    special = torch.tensor([[False, True, False, True]])
    p = torch.tensor([0.3], dtype=torch.float64)
    q = masking.isad_probabilities(e, special, p, delta=0.4, q_max=0.9)
    assert torch.allclose(q, torch.tensor([[0.3, 0.7, 0.3, 0.7]], dtype=torch.float64))
    exact_p = exact_q = naive = 0.0
    for bits in itertools.product([0, 1], repeat=l_len):
        mask = torch.tensor([bits], dtype=torch.bool)
        x = torch.where(mask, torch.ones(1, l_len, dtype=torch.long), torch.full((1, l_len), 5))
        loss = _toy_context_model(x).item()
        prob_p = torch.where(mask, p[:, None], 1 - p[:, None]).prod().item()
        prob_q = torch.where(mask, q, 1 - q).prod().item()
        lr = math.exp(masking.isad_log_ratio(mask, e, p, q).item())
        exact_p += prob_p * loss
        exact_q += prob_q * loss * lr
        naive += prob_q * loss  # the uncorrected proposal: biased
    assert exact_q == pytest.approx(exact_p, rel=1e-12)
    assert abs(naive - exact_p) > 0.1


def test_isad_validation():
    e = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="q_max"):
        masking.isad_probabilities(e, e, torch.tensor([0.5]), 0.2, 1.0)
    with pytest.raises(ValueError, match="delta"):
        masking.isad_probabilities(e, e, torch.tensor([0.5]), -0.1, 0.9)
