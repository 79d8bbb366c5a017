"""The likelihood of a block-diffusion model (stablemdm.likelihood.blocks, docs/likelihood.md
"Block diffusion"): the exact block ELBO is the sum of each block's enumeration given the clean
blocks before it (read off the decoder's block-causal view), every estimator is unbiased for it
(by enumeration and by Monte Carlo), block_size=1 is the model's autoregressive likelihood on
every count draw, one block spanning the continuation is the full-canvas ELBO, one forward
pass scores every block of a batch, and common random numbers and adaptive stopping hold."""

import math

import pytest
import torch
from numpy.polynomial.legendre import leggauss
from test_likelihood import _count_law
from test_likelihood import _transformer as mdm_transformer

from stablemdm.errors import ConfigError
from stablemdm.estimators.blocks import response_blocks
from stablemdm.likelihood import (
    ESTIMATORS,
    Budget,
    exact_elbo,
    fit_count_density,
    loglikelihood,
    loglikelihood_choices,
)
from stablemdm.likelihood.blocks import block_lengths, block_terms
from stablemdm.likelihood.density import fit_passes
from stablemdm.likelihood.exact import mask_patterns
from stablemdm.likelihood.schemes import Draw, make_scheme
from stablemdm.models import ModelConfig, Transformer

MASK, V = 1, 12
CONTEXT, CONTINUATION = [4, 5, 6], [7, 8, 9, 10, 11]  # blocks of 3: 3 + 2 tokens
BLOCK = 3
COUNT_ESTIMATORS = [e for e in ESTIMATORS if e != "standard"]


def _transformer(block_size: int | None = BLOCK) -> Transformer:
    """test_likelihood's tiny MDM (weights scaled up), declared trained as block diffusion."""
    model = mdm_transformer(causal=False)
    model.config.block_size = block_size
    return model


@pytest.fixture(scope="module")
def block_mdm():
    return _transformer()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _density(model, continuation=CONTINUATION):
    return fit_count_density(model, CONTEXT, [continuation], MASK, _gen(5), block_size=BLOCK)


def _decoder_view_ce(model, context, continuation, start, pattern) -> float:
    """sum of CE over the masked tokens of the block at `start` (`pattern` its mask), read as the
    block decoder reads it: the context and the earlier blocks clean, this block noised, later
    blocks absent, one sequence under the block-causal rule."""
    end = start + len(pattern)
    x0 = torch.tensor([*context, *continuation[:end]])
    eligible = torch.arange(len(x0)) >= len(context)
    mask = torch.zeros(len(x0), dtype=torch.bool)
    mask[len(context) + start : len(context) + end] = pattern
    ids = response_blocks(eligible[None], BLOCK)
    with torch.no_grad():
        logits = model(torch.where(mask, MASK, x0)[None], block_ids=ids)[0].double()
    ce = -torch.log_softmax(logits, dim=-1).gather(1, x0[:, None]).squeeze(1)
    return float(ce[mask].sum())


def test_exact_block_elbo_is_each_blocks_enumeration_in_the_decoders_view(block_mdm):
    """-sum_j sum_M CE(M) / (|M| C(L_j, |M|)) over each block's patterns, every block given the
    clean blocks before it: the decoder's view, not the [noised | clean] pass."""
    want, start = 0.0, 0
    for length in block_lengths(len(CONTINUATION), BLOCK):
        for pattern in mask_patterns(length):
            k = int(pattern.sum())
            ce = _decoder_view_ce(block_mdm, CONTEXT, CONTINUATION, start, pattern)
            want -= ce / (k * math.comb(length, k))
        start += length
    got = exact_elbo(block_mdm, CONTEXT, CONTINUATION, MASK, block_size=BLOCK)
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(got - exact_elbo(block_mdm, CONTEXT, CONTINUATION, MASK)) > 1e-3  # not the canvas


def _block_term(model, scheme, j: int, r: float, patterns: torch.Tensor) -> torch.Tensor:
    """Block j's weighted term `[P]` for each of its mask `patterns`, at rate (or count) r in
    block j, with the scheme's own factor and weight (`draw_blocks`)."""
    lengths = block_lengths(len(CONTINUATION), BLOCK)
    eligible = torch.ones(1, len(CONTINUATION), dtype=torch.bool)
    rates = torch.full((1, len(lengths)), 0.5, dtype=torch.float64)
    rates[0, j] = r
    d = scheme.draw_blocks(eligible, response_blocks(eligible, BLOCK), rates, _gen())
    masks = torch.zeros(len(patterns), len(CONTINUATION), dtype=torch.bool)
    masks[:, j * BLOCK : j * BLOCK + lengths[j]] = patterns
    ones = torch.ones(len(patterns), 1, dtype=torch.float64)
    draw = Draw((masks,), d.p * ones, d.weight * ones, None)
    return block_terms(model, CONTEXT, CONTINUATION, draw, MASK, BLOCK)[:, j]


def _block_expectation(model, scheme, j: int, length: int) -> float:
    """E[block j's term] by enumeration: over its count law (or t, by Gauss-Legendre, exact:
    a polynomial of degree L_j - 1 after the 1/t) and every pattern of its tokens."""
    patterns = mask_patterns(length)
    k = patterns.sum(dim=1).double()
    if scheme.name == "standard":
        nodes, weights = leggauss(8)
        return sum(
            w
            * float(
                (x**k * (1 - x) ** (length - k) * _block_term(model, scheme, j, x, patterns)).sum()
            )
            for x, w in zip((nodes + 1) / 2, weights / 2, strict=True)
        )
    total = 0.0
    for count, p_k in enumerate(_count_law(scheme, length).tolist(), start=1):
        subsets = patterns[k == count]  # every k-subset, equally likely
        total += p_k * float(_block_term(model, scheme, j, (count - 0.5) / length, subsets).mean())
    return total


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_each_estimator_is_unbiased_for_the_block_elbo_by_enumeration(block_mdm, estimator):
    """The value is the sum of the blocks' terms, each drawn at its own rate or count: its
    expectation, block by block over the scheme's law at the block's length, is the exact
    block ELBO."""
    density = _density(block_mdm) if estimator == "ppots_count" else None
    scheme = make_scheme(estimator, density)
    lengths = block_lengths(len(CONTINUATION), BLOCK)
    expectation = -sum(_block_expectation(block_mdm, scheme, j, n) for j, n in enumerate(lengths))
    exact = exact_elbo(block_mdm, CONTEXT, CONTINUATION, MASK, block_size=BLOCK)
    assert expectation == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_each_estimator_mean_is_the_exact_block_elbo(block_mdm, estimator):
    """End to end on a model that declares its block size (draws, masks, weights, the one
    pass): within four standard errors; a P-POTS fit's passes are charged."""
    budget = Budget(batch_size=64, max_passes=2048)
    r = loglikelihood(
        block_mdm, CONTEXT, CONTINUATION, generator=_gen(), estimator=estimator, budget=budget
    )
    exact = exact_elbo(block_mdm, CONTEXT, CONTINUATION, MASK, block_size=BLOCK)
    assert r.se > 0 and abs(r.value - exact) < 4 * r.se
    fitted = fit_passes([len(CONTINUATION)], block_size=BLOCK)[0]
    assert r.passes == 2048 + (fitted if estimator == "ppots_count" else 0)


def _block_causal_ar(model, context, continuation) -> float:
    """sum_i log p(x_i | context, x_<i) with x_i masked in its own block of one: the model's
    autoregressive view when every block holds one token."""
    total = 0.0
    for i, token in enumerate(continuation):
        x = torch.tensor([[*context, *continuation[:i], MASK]])
        ids = response_blocks(torch.arange(x.shape[1])[None] >= len(context), 1)
        with torch.no_grad():
            logits = model(x, block_ids=ids)[0, -1].double()
        total += float(torch.log_softmax(logits, dim=-1)[token])
    return total


@pytest.mark.parametrize("estimator", COUNT_ESTIMATORS)
def test_block_size_one_is_the_autoregressive_likelihood_on_every_count_draw(block_mdm, estimator):
    want = _block_causal_ar(block_mdm, CONTEXT, CONTINUATION)
    r = loglikelihood(
        block_mdm, CONTEXT, CONTINUATION, generator=_gen(), estimator=estimator, block_size=1
    )
    assert r.se == 0.0 and r.value == pytest.approx(want, abs=1e-4)
    exact = exact_elbo(block_mdm, CONTEXT, CONTINUATION, MASK, block_size=1)
    assert exact == pytest.approx(want, abs=1e-4)


def test_block_size_one_is_the_autoregressive_likelihood_in_the_mean_in_rate_mode(block_mdm):
    budget = Budget(batch_size=256, max_passes=4096)
    r = loglikelihood(
        block_mdm,
        CONTEXT,
        CONTINUATION,
        generator=_gen(),
        estimator="standard",
        budget=budget,
        block_size=1,
    )
    want = _block_causal_ar(block_mdm, CONTEXT, CONTINUATION)
    assert r.se > 0 and abs(r.value - want) < 4 * r.se


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_one_block_spanning_the_continuation_is_the_full_canvas_elbo(estimator):
    """No context: the noised block sees what the full-canvas MDM sees, so the exact values
    agree, and each estimator's draws (same generator, same density) give the same value."""
    model = _transformer(block_size=None)
    density = fit_count_density(model, [], [CONTINUATION], MASK, _gen(5))
    density = density if estimator == "ppots_count" else None
    span = len(CONTINUATION)
    canvas = exact_elbo(model, [], CONTINUATION, MASK)
    assert exact_elbo(model, [], CONTINUATION, MASK, block_size=span) == pytest.approx(canvas)
    common = dict(estimator=estimator, budget=Budget(8, 32), density=density)
    full = loglikelihood(model, [], CONTINUATION, generator=_gen(), **common)
    block = loglikelihood(model, [], CONTINUATION, generator=_gen(), block_size=span, **common)
    assert block.value == pytest.approx(full.value, rel=1e-5)
    assert block.se == pytest.approx(full.se, rel=1e-4)


@pytest.mark.parametrize(("estimator", "rows", "copies"), [("llada", 8, 2), ("count_mirror", 4, 3)])
def test_one_forward_pass_scores_every_block_of_a_batch(block_mdm, estimator, rows, copies):
    """A batch of 8 passes is one call: 8 rows of [noised | clean], or MIRROR's 4 pairs as
    [noised | mirror | clean] sharing one clean context (counted as 8 passes)."""
    shapes = []
    hook = block_mdm.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        r = loglikelihood(
            block_mdm,
            CONTEXT,
            CONTINUATION,
            generator=_gen(),
            estimator=estimator,
            budget=Budget(8, 16, min_draws=2),
        )
    finally:
        hook.remove()
    width = len(CONTEXT) + len(CONTINUATION)
    assert shapes == [(rows, copies * width)] * 2 and r.passes == 16


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_common_random_numbers_give_identical_choices_identical_block_draws(block_mdm, estimator):
    """The same rates and masks in every block for every choice: two equal choices have a gap of
    exactly 0 under common random numbers, and not without them."""
    density = _density(block_mdm) if estimator == "ppots_count" else None
    choices = [CONTINUATION, list(CONTINUATION), [7, 8, 9, 3]]
    common = dict(estimator=estimator, budget=Budget(8, 32), density=density)
    shared = loglikelihood_choices(block_mdm, CONTEXT, choices, generator=_gen(), **common)
    alone = loglikelihood_choices(
        block_mdm, CONTEXT, choices, generator=_gen(), crn=False, **common
    )
    assert shared.results[0].value == shared.results[1].value
    assert alone.results[0].value != alone.results[1].value


def test_adaptive_block_sampling_stops_at_its_target(block_mdm):
    target = 0.05
    budget = Budget(batch_size=8, max_passes=4096, target_se=target)
    r = loglikelihood(
        block_mdm, CONTEXT, CONTINUATION, generator=_gen(), estimator="count_mirror", budget=budget
    )
    assert r.se <= target and r.draws >= 8 and 8 < r.passes < 4096


def test_a_block_model_is_scored_in_its_own_blocks_unless_told(block_mdm):
    kwargs = dict(generator=_gen(), estimator="llada", budget=Budget(8, 16))
    auto = loglikelihood(block_mdm, CONTEXT, CONTINUATION, **kwargs)
    kwargs["generator"] = _gen()
    told = loglikelihood(block_mdm, CONTEXT, CONTINUATION, block_size=BLOCK, **kwargs)
    kwargs["generator"] = _gen()
    canvas = loglikelihood(block_mdm, CONTEXT, CONTINUATION, kind="mdm", **kwargs)
    assert auto == told and canvas.value != auto.value


class _GivenT(torch.nn.Module):
    conditions_on_t = True
    config = ModelConfig(vocab_size=V, mask_token_id=MASK, block_size=2)

    def forward(self, input_ids, attention_mask=None, t=None, block_ids=None):
        return torch.zeros(*input_ids.shape, V)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="block"), "declares none"),
        (dict(kind="mdm", block_size=2), "is for kind='block'"),
        (dict(block_size=0), "must be an int >= 1"),
    ],
)
def test_bad_block_input_is_one_config_error_line(kwargs, match):
    model = _transformer(block_size=None)
    with pytest.raises(ConfigError, match=match) as err:
        loglikelihood(model, CONTEXT, CONTINUATION, generator=_gen(), **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="conditions on one t"):
        loglikelihood(_GivenT(), CONTEXT, [7], generator=_gen(), estimator="standard")
    with pytest.raises(ConfigError, match="the longest block"):
        exact_elbo(model, [], [7] * 17, MASK, block_size=17)
