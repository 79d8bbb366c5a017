"""The likelihood API (stablemdm.likelihood, docs/likelihood.md): every estimator is unbiased for
the exact ELBO (by enumeration and by Monte Carlo), a one-token continuation gets its exact
log-likelihood, the reported standard error is the spread of repeated estimates, sampling
stops at its target or its cap, common random numbers shrink the error of a difference,
LLaDA's stratified counts are its code's, an ARM is exact, and bad input is one line."""

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.polynomial.legendre import leggauss

from stablemdm.errors import ConfigError
from stablemdm.estimators.counts import count_probabilities
from stablemdm.likelihood import (
    ESTIMATORS,
    Budget,
    exact_elbo,
    fit_count_density,
    llada_counts,
    loglikelihood,
    loglikelihood_choices,
)
from stablemdm.likelihood.exact import mask_patterns
from stablemdm.likelihood.schemes import Draw, make_scheme
from stablemdm.likelihood.values import draw_values
from stablemdm.models import ModelConfig, Transformer

MASK, V = 1, 12
CONTEXT, CONTINUATION = [4, 5, 6], [7, 8, 9, 10]  # L = 4: 15 mask patterns
COUNT_ESTIMATORS = [e for e in ESTIMATORS if e != "standard"]


def _transformer(causal: bool) -> Transformer:
    """A random tiny transformer, weights scaled up so that each token's loss depends
    strongly on which others are masked."""
    cfg = ModelConfig(
        vocab_size=V,
        d_model=16,
        n_layers=1,
        n_heads=2,
        max_seq_len=16,
        causal=causal,
        mask_token_id=None if causal else MASK,
    )
    model = Transformer(cfg, generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def mdm():
    return _transformer(causal=False)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _density(mdm):
    return fit_count_density(mdm, CONTEXT, [CONTINUATION], MASK, _gen(5))


def _pattern_ce(model, context, continuation, patterns):
    """sum_{i in M} CE_i for each mask pattern `[P, L]`, straight from the model's logits."""
    x0 = torch.tensor([*context, *continuation]).expand(len(patterns), -1)
    mask = torch.zeros(x0.shape, dtype=torch.bool)
    mask[:, len(context) :] = patterns
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.where(mask, MASK, x0)).double(), dim=-1)
    ce = -logp.gather(2, x0[..., None]).squeeze(2)  # [P, C + L]
    return (ce * mask).sum(dim=1)


def test_exact_elbo_is_the_rate_integral_of_the_elbo(mdm):
    """The count-form enumeration equals the ELBO as an integral over t ~ U(0, 1) of
    E_M[(1/t) sum_M CE], with each pattern's probability t^|M| (1-t)^(L-|M|): a polynomial
    of degree L - 1 in t, so Gauss-Legendre quadrature is exact."""
    patterns = mask_patterns(len(CONTINUATION)).double()  # [15, 4]
    s = _pattern_ce(mdm, CONTEXT, CONTINUATION, patterns.bool())
    k, length = patterns.sum(dim=1), len(CONTINUATION)
    nodes, weights = leggauss(8)
    integral = 0.0
    for x, w in zip((nodes + 1) / 2, weights / 2, strict=True):
        prob = x**k * (1 - x) ** (length - k)  # [15]
        integral += w * float((prob * s / x).sum())
    assert exact_elbo(mdm, CONTEXT, CONTINUATION, MASK) == pytest.approx(-integral, rel=1e-6)


def _count_law(scheme, length: int) -> torch.Tensor:
    """P(k) `[L]` of one copy's count as the scheme draws it: LLaDA's averaged over the copies
    of a batch of 3 and over every first count; the others' sampler law."""
    if scheme.name != "llada":
        return count_probabilities(scheme.sampler, length)
    law = torch.zeros(length, dtype=torch.float64)
    for first in range(1, length + 1):
        for k in llada_counts(first, length, 3):
            law[k - 1] += 1.0 / (3 * length)
    return law


def _expectation(mdm, scheme) -> float:
    """E[value] by enumeration: over counts (their law, the scheme's factor and weight) or
    over t (Gauss-Legendre), and over every mask pattern with its probability."""
    length = len(CONTINUATION)
    patterns = mask_patterns(length)  # [15, 4]
    k = patterns.sum(dim=1)
    ones = torch.ones(len(patterns), dtype=torch.float64)
    one_row = torch.ones(1, length, dtype=torch.bool)
    total = 0.0
    if scheme.name == "standard":
        nodes, weights = leggauss(8)
        for x, w in zip((nodes + 1) / 2, weights / 2, strict=True):
            d = scheme.draw(one_row, length, torch.tensor([x], dtype=torch.float64), _gen())
            draw = Draw((patterns,), d.p * ones, d.weight * ones, d.t * ones)
            prob = x**k * (1 - x) ** (length - k)
            total += w * float((prob * draw_values(mdm, CONTEXT, CONTINUATION, draw, MASK)).sum())
        return total
    for count, p_k in enumerate(_count_law(scheme, length).tolist(), start=1):
        r = torch.tensor([(count - 0.5) / length], dtype=torch.float64)
        d = scheme.draw(one_row, length, r, _gen())
        subsets = patterns[k == count]  # every k-subset, equally likely
        n = torch.ones(len(subsets), dtype=torch.float64)
        draw = Draw((subsets,), d.p * n, d.weight * n, None)
        total += p_k * float(draw_values(mdm, CONTEXT, CONTINUATION, draw, MASK).mean())
    return total


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_each_estimator_is_unbiased_by_enumeration(mdm, estimator):
    density = _density(mdm) if estimator == "ppots_count" else None
    scheme = make_scheme(estimator, density)
    exact = exact_elbo(mdm, CONTEXT, CONTINUATION, MASK)
    assert _expectation(mdm, scheme) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_each_estimator_mean_is_the_exact_elbo(mdm, estimator):
    """End to end (draws, masks, weights, the model): within four standard errors."""
    budget = Budget(batch_size=64, max_passes=2048)
    r = loglikelihood(
        mdm, CONTEXT, CONTINUATION, generator=_gen(), estimator=estimator, budget=budget
    )
    exact = exact_elbo(mdm, CONTEXT, CONTINUATION, MASK)
    assert r.se > 0 and abs(r.value - exact) < 4 * r.se


def _one_token_logp(model, context, token) -> float:
    x = torch.tensor([[*context, MASK]])
    with torch.no_grad():
        return float(torch.log_softmax(model(x)[0, -1].double(), dim=-1)[token])


@pytest.mark.parametrize("estimator", COUNT_ESTIMATORS)
def test_one_token_continuation_is_exact_on_every_count_draw(mdm, estimator):
    r = loglikelihood(mdm, CONTEXT, [9], generator=_gen(), estimator=estimator)
    assert r.se == 0.0
    assert r.value == pytest.approx(_one_token_logp(mdm, CONTEXT, 9), abs=1e-5)


def test_one_token_continuation_is_exact_in_the_mean_in_rate_mode(mdm):
    budget = Budget(batch_size=256, max_passes=4096)
    r = loglikelihood(mdm, CONTEXT, [9], generator=_gen(), estimator="standard", budget=budget)
    assert r.se > 0 and abs(r.value - _one_token_logp(mdm, CONTEXT, 9)) < 4 * r.se


@pytest.mark.parametrize("estimator", COUNT_ESTIMATORS)
def test_reported_se_is_the_spread_of_repeated_estimates(mdm, estimator):
    """Over R independent estimates, the mean reported variance se^2 matches the variance of
    the values; the tolerance is three standard errors of that ratio (chi-square, with the
    draws behind each reported se)."""
    density = _density(mdm) if estimator == "ppots_count" else None
    budget, reps = Budget(batch_size=8, max_passes=32), 120
    g = _gen(7)
    runs = [
        loglikelihood(
            mdm,
            CONTEXT,
            CONTINUATION,
            generator=g,
            estimator=estimator,
            budget=budget,
            density=density,
        )
        for _ in range(reps)
    ]
    values = np.array([r.value for r in runs])
    reported = np.mean([r.se**2 for r in runs])
    draws = runs[0].draws
    tolerance = 3 * math.sqrt(2 / (reps - 1) + 2 / (reps * (draws - 1)))
    assert abs(reported / values.var(ddof=1) - 1) < tolerance


def test_adaptive_sampling_stops_at_the_first_batch_that_reaches_the_target(mdm):
    target, budget = 0.05, dict(batch_size=8, max_passes=4096)
    r = loglikelihood(
        mdm,
        CONTEXT,
        CONTINUATION,
        generator=_gen(),
        estimator="count_mirror",
        budget=Budget(**budget, target_se=target),
    )
    assert r.se <= target and r.draws >= 8  # Budget.min_draws
    assert 8 < r.passes < 4096 and r.passes % 8 == 0
    before = loglikelihood(
        mdm,
        CONTEXT,
        CONTINUATION,
        generator=_gen(),
        estimator="count_mirror",
        budget=Budget(batch_size=8, max_passes=r.passes - 8),
    )
    assert before.se > target  # the same draws one batch earlier had not reached it


def test_adaptive_sampling_respects_the_cap(mdm):
    budget = Budget(batch_size=8, max_passes=48, target_se=1e-9)
    r = loglikelihood(
        mdm, CONTEXT, CONTINUATION, generator=_gen(), estimator="llada", budget=budget
    )
    assert r.passes == 48 and r.draws == 6 and r.se > 1e-9


def test_adaptive_choices_stop_on_the_gap_between_the_two_best(mdm):
    """With common random numbers the gap is known long before either value is."""
    target, choices = 0.3, [CONTINUATION, [7, 8, 9, 11], [7, 8, 3, 10]]
    c = loglikelihood_choices(
        mdm,
        CONTEXT,
        choices,
        generator=_gen(),
        estimator="standard",
        budget=Budget(batch_size=16, max_passes=8192, target_se=target),
    )
    assert c.gap_se <= target < min(r.se for r in c.results)
    assert c.passes == sum(r.passes for r in c.results) < 3 * 8192
    values = [r.value for r in c.results]
    assert c.best == int(np.argmax(values))
    assert c.gap == pytest.approx(max(values) - sorted(values)[-2], abs=1e-9)


def test_common_random_numbers_lower_the_variance_of_the_gap(mdm):
    """The same draws for both choices: the gap's variance drops, by more than three
    standard errors of the two variance estimates (chi-square, R draws)."""
    choices = [CONTINUATION, [7, 8, 9, 11]]
    budget = Budget(batch_size=64, max_passes=1024)
    gaps = {
        crn: loglikelihood_choices(
            mdm, CONTEXT, choices, generator=_gen(), estimator="standard", budget=budget, crn=crn
        )
        for crn in (True, False)
    }
    shared, independent = gaps[True].gap_se ** 2, gaps[False].gap_se ** 2
    rel = math.sqrt(2 / (1024 - 1))
    assert shared * (1 + 3 * rel) < independent * (1 - 3 * rel)
    assert gaps[True].results[0].draws == 1024


def llada_code_counts(first: int, length: int, n: int) -> torch.Tensor:
    """LLaDA's `_forward_process` (eval_llada.py), its counts for a first count `first`."""
    x = torch.round(torch.linspace(float(first), first + (n - 1) * (length / n), steps=n)).long()
    return ((x - 1) % length) + 1


def test_llada_counts_are_llada_codes_stratified_counts():
    """The same counts as LLaDA's code wherever j L / n is not a half; at a half LLaDA rounds
    to even, which makes that copy's count non-uniform, and ours rounds up, keeping it uniform."""
    for length, n in itertools.product(range(1, 13), range(1, 17)):
        ties = (2 * torch.arange(n) * length) % (2 * n) == n  # j L / n ends in .5
        ours = torch.stack([llada_counts(f, length, n) for f in range(1, length + 1)])  # [L, n]
        code = torch.stack([llada_code_counts(f, length, n) for f in range(1, length + 1)])
        assert torch.equal(ours[:, ~ties], code[:, ~ties])
        for j in range(n):  # every copy's count is uniform on 1..L
            assert sorted(ours[:, j].tolist()) == list(range(1, length + 1))
        if n % length == 0:  # strata: each count n / L times per batch
            assert (torch.bincount(ours[0], minlength=length + 1)[1:] == n // length).all()
    code = torch.stack([llada_code_counts(f, 5, 32) for f in range(1, 6)])  # j = 16: 5/2
    assert sorted(code[:, 16].tolist()) != [1, 2, 3, 4, 5]


def test_llada_scheme_draws_llada_counts_per_batch():
    scheme = make_scheme("llada")
    r = scheme.rates(8, 5, _gen(3))
    draw = scheme.draw(torch.ones(8, 5, dtype=torch.bool), 5, r, _gen(4))
    counts = (draw.p * 5).round().long()
    assert torch.equal(counts, llada_counts(int(counts[0]), 5, 8))
    assert torch.equal(draw.masks[0].sum(dim=1), counts)
    assert torch.allclose(draw.weight, torch.ones(8, dtype=torch.float64))  # L/k: no other weight


def test_arm_is_exact_with_error_zero():
    arm = _transformer(causal=True)
    x = torch.tensor([[*CONTEXT, *CONTINUATION]])
    with torch.no_grad():
        logp = torch.log_softmax(arm(x)[0, :-1].double(), dim=-1)
    exact = float(logp[len(CONTEXT) - 1 :].gather(1, x[0, len(CONTEXT) :, None]).sum())
    r = loglikelihood(arm, CONTEXT, CONTINUATION, generator=_gen())
    assert (r.se, r.passes, r.draws) == (0.0, 1, 1) and r.value == pytest.approx(exact, abs=1e-5)
    c = loglikelihood_choices(arm, CONTEXT, [CONTINUATION, [7, 3]], generator=_gen())
    assert c.gap_se == 0.0 and c.results[0].value == pytest.approx(exact, abs=1e-5)


def _no_mask_model(input_ids, attention_mask=None):
    return torch.zeros(*input_ids.shape, V)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: loglikelihood(m, CONTEXT, [], generator=_gen()), "continuation 1 of 1 is empty"),
        (lambda m: loglikelihood(_no_mask_model, CONTEXT, [7], generator=_gen()), "mask_token_id"),
        (lambda m: loglikelihood(m, CONTEXT, [7], generator=_gen(), estimator="exact"), "standard"),
        (lambda m: loglikelihood(m, CONTEXT, [7.5], generator=_gen()), "token id"),
        (lambda m: Budget(batch_size=32, max_passes=48), "multiple of batch_size"),
        (
            lambda m: loglikelihood(m, CONTEXT, [7], generator=_gen(), budget=Budget(32, 32)),
            "one independent draw",
        ),
        (
            lambda m: loglikelihood(
                m,
                CONTEXT,
                [7],
                generator=_gen(),
                estimator="count_mirror",
                budget=Budget(batch_size=3, max_passes=9),
            ),
            "even",
        ),
        (
            lambda m: loglikelihood(
                m,
                CONTEXT,
                [7],
                generator=_gen(),
                estimator="llada",
                density=fit_count_density(m, CONTEXT, [[7]], MASK, _gen()),
            ),
            "only used by estimator 'ppots_count'",
        ),
        (lambda m: loglikelihood(_transformer(True), [], [7], generator=_gen()), "context"),
    ],
)
def test_bad_input_is_one_config_error_line(mdm, call, match):
    with pytest.raises(ConfigError, match=match) as err:
        call(mdm)
    assert "\n" not in str(err.value)


def test_docs_example_runs(capsys):
    """docs/likelihood.md's Python block runs as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "likelihood.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(compile(block, "docs/likelihood.md", "exec"), {})
    assert "nats after" in capsys.readouterr().out
