"""The objective: every unbiased configuration estimates the same number, computed exactly by
enumerating every mask pattern of a toy model; count mode equals the Bernoulli-t objective
as eps -> 0; MIRROR and count mode cost and save what they should."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.special import beta, betainc

from stablemdm.estimators.counts import count_probabilities
from stablemdm.estimators.ema import EMA
from stablemdm.estimators.losses import mdm_loss
from stablemdm.estimators.objective import Objective
from stablemdm.estimators.ppots import PPOTS
from stablemdm.estimators.rates import Clipped, Uniform
from stablemdm.estimators.stratified import Stratified
from stablemdm.estimators.syrm import Mirrored
from stablemdm.models import ModelConfig, Transformer

MASK, V, L_ELIG = 1, 12, 5


@pytest.fixture(scope="module")
def toy():
    """A random tiny bidirectional transformer (its losses depend on the whole masked
    context) and two sequences with 5 eligible positions each after a 3-token prompt."""
    cfg = ModelConfig(
        vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, mask_token_id=MASK
    )
    model = Transformer(cfg, generator=torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(4, V, (2, 8), generator=g)
    eligible = torch.zeros(2, 8, dtype=torch.bool)
    eligible[:, 3:] = True
    return model, {
        "input_ids": x0,
        "eligible": eligible,
        "attention_mask": torch.ones_like(eligible),
    }


def _pattern_sums(model, batch):
    """For each sequence and each of the 2^5 mask patterns: (k, sum of CE over masked)."""
    pats = torch.tensor(list(itertools.product([0, 1], repeat=L_ELIG)), dtype=torch.bool)  # [32, 5]
    out = []
    for i in range(2):
        mask = torch.zeros(len(pats), 8, dtype=torch.bool)
        mask[:, 3:] = pats
        x0 = batch["input_ids"][i].expand(len(pats), -1)
        elig = batch["eligible"][i].expand(len(pats), -1)
        with torch.no_grad():
            loss = mdm_loss(model, x0, elig, mask, torch.ones(len(pats)), MASK)
        out.append((pats.sum(1).numpy(), (loss.token_nll.sum(1)).double().numpy()))
    return out


def exact_rate_objective(model, batch, eps):
    """E_{t ~ U(0,1), m ~ Bernoulli(p_mask(t))}[l], batch mean, by enumeration and the
    closed-form integral over t of p^(k-1) (1-p)^(L-k) (incomplete beta)."""
    total = 0.0
    for k, ce in _pattern_sums(model, batch):
        sel = k > 0
        kk = k[sel]
        a, b = kk, L_ELIG - kk + 1
        integral = beta(a, b) * (1 - betainc(a, b, eps)) / (1 - eps)
        total += (integral * ce[sel]).sum() / L_ELIG
    return total / 2


def exact_count_objective(model, batch, objective):
    """E over k ~ q(k) (the sampler's discretised density) and uniform k-subsets of the
    weighted count-mode loss, with the weight taken from the objective's own code path."""
    q = count_probabilities(objective.sampler, L_ELIG).numpy()
    total = 0.0
    for i, (k, ce) in enumerate(_pattern_sums(model, batch)):
        one = {key: v[i : i + 1] for key, v in batch.items()}
        for kk in range(1, L_ELIG + 1):
            r = torch.tensor([(kk - 0.5) / L_ELIG])
            w = objective.at_rates(model, one, r, mask_generator=torch.Generator()).weight.item()
            mean_subset = ce[k == kk].mean() / kk  # l = (1/L) sum CE / (k/L)
            total += q[kk - 1] * w * mean_subset
    return total / 2


def _fitted_ppots():
    return PPOTS.from_function(lambda t: 1 + 6 * (1 - t) ** 3, n_bins=64, mix=0.2)


def _warm_ema():
    ema = EMA(n_bins=8, refresh_every=1, mix=0.2)
    t = torch.linspace(0.05, 0.95, 64, dtype=torch.float64)
    ema.observe(t, 3 * (1 - t) + 0.1)
    ema.step()
    return ema


def test_count_mode_equals_the_bernoulli_t_objective_as_eps_goes_to_zero(toy):
    model, batch = toy
    exact0 = exact_rate_objective(model, batch, 0.0)
    for sampler in (Uniform(), _fitted_ppots()):
        count = Objective(MASK, rate="count", sampler=sampler)
        assert exact_count_objective(model, batch, count) == pytest.approx(exact0, rel=1e-6)
    gaps = [
        abs(exact_rate_objective(model, batch, eps) - exact0) for eps in (1e-1, 1e-2, 1e-3, 1e-5)
    ]
    assert all(gaps[i] > gaps[i + 1] for i in range(len(gaps) - 1))
    assert gaps[-1] < 1e-3 * exact0


CONFIGS = {
    "standard": dict(),
    "ppots": dict(sampler=_fitted_ppots()),
    "strats": dict(sampler=Stratified(Uniform())),
    "syrm": dict(sampler=Mirrored(Uniform())),
    "ppots_strats": dict(sampler=Stratified(_fitted_ppots())),
    "ema": dict(sampler=_warm_ema()),
    "mirror": dict(masking="mirror"),
    "ppots_mirror": dict(sampler=_fitted_ppots(), masking="mirror"),
    "isad": dict(masking="isad", isad_token_ids=(4, 5, 6, 7), isad_delta=0.3, isad_q_max=0.9),
    "count": dict(rate="count"),
    "count_ppots_mirror": dict(rate="count", sampler=_fitted_ppots(), masking="mirror"),
    "count_syrm": dict(rate="count", sampler=Mirrored(Uniform())),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_method_is_unbiased(toy, name):
    """Monte Carlo mean of the batch loss within 5 standard errors of the exact objective
    (rate mode at eps = 0.01, count mode at eps = 0). Each call is one replicate, so the
    within-batch correlations of StraTS, SyRM and MIRROR are accounted for."""
    model, batch = toy
    objective = Objective(MASK, eps=0.01, **CONFIGS[name])
    exact = exact_rate_objective(model, batch, 0.0 if objective.rate == "count" else 0.01)
    big = {k: v.repeat(64, 1) for k, v in batch.items()}  # 128 sequences per replicate
    g_rate, g_mask = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    with torch.no_grad():
        draws = np.array([objective(model, big, g_rate, g_mask).loss.item() for _ in range(150)])
    se = draws.std(ddof=1) / math.sqrt(len(draws))
    assert abs(draws.mean() - exact) < 5 * se


class ContextOracle(torch.nn.Module):
    """Knows the clean tokens; its confidence grows with the visible fraction, so the
    per-token loss falls as t falls, as a trained model's does."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.x0 = x0

    def forward(self, input_ids, attention_mask=None):
        visible = 1 - (input_ids == MASK).float().mean(1, keepdim=True)  # [B, 1]
        logits = torch.zeros(*input_ids.shape, V)
        src = (6 * visible)[..., None].expand(*input_ids.shape, 1)  # [B, L, 1]
        return logits.scatter(2, self.x0[..., None], src)


def test_clipped_is_biased(toy):
    _, batch = toy
    big = {k: v.repeat(64, 1) for k, v in batch.items()}
    model = ContextOracle(big["input_ids"])
    objective = Objective(MASK, sampler=Clipped(0.6, 0.9))
    standard = Objective(MASK)
    g = torch.Generator().manual_seed(4)
    clipped = np.array([objective(model, big, g, g).loss.item() for _ in range(60)])
    plain = np.array([standard(model, big, g, g).loss.item() for _ in range(60)])
    se = math.sqrt(clipped.var(ddof=1) / 60 + plain.var(ddof=1) / 60)
    assert abs(clipped.mean() - plain.mean()) > 10 * se


def test_mirror_costs_two_passes_and_compute_matched_halves_the_sequences(toy):
    model, batch = toy
    big = {k: v.repeat(4, 1) for k, v in batch.items()}
    g = torch.Generator().manual_seed(5)
    assert Objective(MASK)(model, big, g, g).forward_passes == 8
    assert Objective(MASK, masking="mirror")(model, big, g, g).forward_passes == 16
    matched = Objective(MASK, masking="mirror", compute_matched=True)(model, big, g, g)
    assert matched.forward_passes == 8 and len(matched.per_sequence) == 4


def test_count_mode_has_lower_single_draw_variance_than_standard(toy):
    """Rao-Blackwellisation over t (paper.md section 3): the count-mode estimator cannot
    have a larger variance; on this toy model it is much smaller. Variances are compared
    with an F-style margin from their standard errors."""
    model, batch = toy
    big = {k: v.repeat(2000, 1) for k, v in batch.items()}
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        std = Objective(MASK)(model, big, g, g).per_sequence.double()
        cnt = Objective(MASK, rate="count")(model, big, g, g).per_sequence.double()
    n = len(std)
    se_std = std.var().item() * math.sqrt(2 / (n - 1)) * math.sqrt(max(1.0, _kurtosis(std) / 3))
    assert cnt.var().item() < std.var().item() - 4 * se_std


def _kurtosis(x: torch.Tensor) -> float:
    z = (x - x.mean()) / x.std()
    return float((z**4).mean())


def test_objective_rejects_bad_combinations(toy):
    model, batch = toy
    with pytest.raises(ValueError, match="count-mode"):
        Objective(MASK, rate="count", masking="isad", isad_token_ids=(4,))
    with pytest.raises(ValueError, match="at least one ISAD token"):
        Objective(MASK, masking="isad")
    with pytest.raises(ValueError, match="compute_matched"):
        Objective(MASK, compute_matched=True)

    class TimeConditioned(torch.nn.Module):
        conditions_on_t = True

        def forward(self, input_ids, attention_mask=None):
            return torch.zeros(*input_ids.shape, V)

    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="conditions_on_t"):
        Objective(MASK, rate="count")(TimeConditioned(), batch, g, g)


def test_arm_objective_has_no_rates(toy):
    model, batch = toy
    out = Objective(MASK, kind="arm")(model, batch)
    assert out.forward_passes == 2 and torch.equal(out.weight, torch.ones(2))
