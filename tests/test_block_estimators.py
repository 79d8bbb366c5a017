"""Every estimator per block (issue 25, item 2): MIRROR's copy beside one clean context, ISAD's
per-block likelihood ratio, StraTS over all blocks of the batch or within each sequence, SyRM,
the P-POTS/EMA density form, and count mode composed with them; each unbiased for the block
ELBO computed by exact enumeration (test_block_objective's tiny case)."""

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_block_objective import (  # noqa: F401  (tiny is a fixture)
    BLOCK,
    MASK,
    _batch,
    _gens,
    _model,
    _rule,
    exact_count,
    exact_rate,
    tiny,
)
from test_trainer import SMALL

from stablemdm.errors import ConfigError
from stablemdm.estimators.blocks import block_loss, response_blocks
from stablemdm.estimators.masking import grouped_mirror_subset_masks
from stablemdm.estimators.objective import Objective
from stablemdm.estimators.ppots_fit import grid_values
from stablemdm.estimators.rates import PiecewiseDensity, Uniform
from stablemdm.estimators.registry import BLOCK_ONLY_METHODS
from stablemdm.estimators.stratified import Stratified, StratifiedRows
from stablemdm.estimators.syrm import Mirrored
from stablemdm.models.blocks import block_diffusion_mask
from stablemdm.training.auto import candidate_config, candidate_names
from stablemdm.training.compute import step_passes
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

# --- MIRROR's layout: [noised | mirror | clean] in one pass -----------------------------------


def test_two_noised_copies_each_see_only_their_own_block_and_the_clean_context():
    ids = response_blocks(_batch()["eligible"], 2)
    real = _batch()["attention_mask"]
    mask = block_diffusion_mask(ids, torch.cat([real] * 3, dim=1), noised=2)[:, 0]  # [2, 27, 27]
    length = ids.shape[1]
    for b, q, k in itertools.product(range(2), range(3 * length), range(3 * length)):
        qc, kc = q // length == 2, k // length == 2
        same_copy = q // length == k // length or qc or kc
        expected = same_copy and _rule(int(ids[b, q % length]), int(ids[b, k % length]), qc, kc)
        expected = (expected and bool(real[b, k % length])) or q == k
        assert bool(mask[b, q, k]) == expected, (b, q, k)


def test_mirror_in_one_pass_scores_what_two_separate_passes_score():
    batch, model = _batch(), _model()
    ids = response_blocks(batch["eligible"], 2)
    g = torch.Generator().manual_seed(3)
    m1 = (torch.rand(ids.shape, generator=g) < 0.5) & batch["eligible"]
    m2 = ~m1 & batch["eligible"]
    p = torch.full((2, 5), 0.5)
    args = (model, batch["input_ids"], batch["eligible"])
    rest = (ids, p, MASK, batch["attention_mask"])
    with torch.no_grad():
        one_pass, per_block = block_loss(*args, (m1, m2), *rest)
        a, block_a = block_loss(*args, m1, *rest)
        b, block_b = block_loss(*args, m2, *rest)
    torch.testing.assert_close(per_block, (block_a + block_b) / 2)
    torch.testing.assert_close(one_pass.per_sequence, (a.per_sequence + b.per_sequence) / 2)


def test_block_mirror_masks_are_complementary_per_block_and_count_two_passes():
    batch = _batch()
    objective = Objective(MASK, kind="block", block_size=2, masking="mirror")
    out = objective(_model(), batch, *_gens())
    assert out.forward_passes == 2 * len(batch["input_ids"])
    eligible = batch["eligible"]
    groups = response_blocks(eligible, 2)
    k = torch.tensor([[0, 1, 2, 1, 0, 0], [0, 2, 1, 0, 0, 0]])  # within each block's size
    sizes = torch.zeros_like(k).scatter_add_(1, groups, eligible.long())
    low, high = grouped_mirror_subset_masks(eligible, groups, k, torch.Generator().manual_seed(1))
    for mask in (low, high):  # k_j of each block's eligible positions
        assert torch.equal(torch.zeros_like(k).scatter_add_(1, groups, mask.long()), k)
    assert not (low & high & (2 * k <= sizes).gather(1, groups)).any()  # 2 k_j <= |E_j|
    assert (low | high).sum() < low.sum() + high.sum()  # a block masked whole is in both


# --- unbiasedness: every estimator against the exact block ELBO --------------------------------


def _density() -> PiecewiseDensity:
    """A non-uniform density in the form P-POTS and EMA are stored (weighted by 1/density)."""
    return PiecewiseDensity([4.0, 2.0, 1.0, 0.5, 0.5], mix=0.2)


RATE_CASES = {
    "mirror": dict(masking="mirror"),
    "isad": dict(masking="isad"),
    "strats_batch": dict(sampler=Stratified()),
    "strats_rows": dict(sampler=StratifiedRows()),
    "syrm": dict(sampler=Mirrored()),
    "density": dict(sampler=_density()),
    "density_strats_rows_mirror": dict(sampler=StratifiedRows(_density()), masking="mirror"),
}


COUNT_CASES = {
    "count_mirror": dict(masking="mirror"),
    "count_strats_rows": dict(sampler=StratifiedRows()),
    "count_density_mirror": dict(sampler=_density(), masking="mirror"),
}


def _mean_and_se(objective, model, batch, draws=100, rows=64) -> tuple[float, float]:
    big = {k: v.repeat(rows, 1) for k, v in batch.items()}
    gens = _gens(6)
    with torch.no_grad():
        values = np.array([objective(model, big, *gens).loss.item() for _ in range(draws)])
    assert values.std() > 0
    return values.mean(), values.std(ddof=1) / math.sqrt(draws)


@pytest.mark.parametrize("case", sorted(RATE_CASES))
def test_every_rate_mode_block_estimator_is_unbiased(tiny, case):  # noqa: F811
    model, batch = tiny[0], tiny[1]
    special = (int(batch["input_ids"][0, 3]),)  # a response token ISAD raises
    options = dict(isad_token_ids=special, isad_delta=0.3) if case == "isad" else {}
    objective = Objective(
        MASK, kind="block", block_size=BLOCK, eps=0.01, **RATE_CASES[case], **options
    )
    mean, se = _mean_and_se(objective, model, batch)
    assert abs(mean - exact_rate(tiny, 0.01)) < 5 * se


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_every_count_mode_block_estimator_is_unbiased(tiny, case):  # noqa: F811
    model, batch = tiny[0], tiny[1]
    objective = Objective(MASK, kind="block", block_size=BLOCK, rate="count", **COUNT_CASES[case])
    mean, se = _mean_and_se(objective, model, batch)
    assert abs(mean - exact_count(tiny)) < 5 * se


# --- StraTS over blocks -----------------------------------------------------------------------


def test_stratified_rows_give_each_sequence_one_rate_per_stratum_of_the_cdf():
    density = _density()
    t, w = StratifiedRows(density).sample_rows(50, 4, torch.Generator().manual_seed(0))
    strata = torch.sort((density.cdf(t.flatten()).view(50, 4) * 4).floor(), dim=1).values
    assert torch.equal(strata, torch.arange(4.0, dtype=strata.dtype).expand(50, 4))
    torch.testing.assert_close(w, 1 / density.density(t.flatten()).view(50, 4))


def test_joint_stratification_covers_every_stratum_of_the_batchs_blocks():
    t, _ = Stratified(Uniform()).sample_rows(6, 4, torch.Generator().manual_seed(0))
    assert torch.equal(torch.sort((t.flatten() * 24).floor()).values, torch.arange(24.0).double())
    rows = (t * 4).floor()  # joint strata: a row need not cover the range
    assert any(len(set(r.tolist())) < 4 for r in rows)


def test_block_rates_are_drawn_in_rows_sliced_by_process():
    objective = Objective(MASK, kind="block", block_size=2, sampler=StratifiedRows())
    batch = _batch()
    whole, _ = objective.draw_block_rates(batch, torch.Generator().manual_seed(1), 0, 1, 4)
    part, _ = objective.draw_block_rates(batch, torch.Generator().manual_seed(1), 1, 2, 2)
    assert whole.shape == (2, 5) and part.shape == (2, 5)
    full, _ = StratifiedRows().sample_rows(4, 5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(part, full[2:4])


# --- what a block config accepts ----------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        ["masking=mirror"],
        ["masking=isad", "isad_tokens=['-']"],
        ["scheme=stratified"],
        ["scheme=stratified_rows"],
        ["scheme=mirrored"],
        ["sampler=ema"],
        ["rate=count", "masking=mirror", "scheme=stratified_rows"],
    ],
)
def test_block_configs_take_the_built_estimators(extra):
    config = load_config(None, ["objective=block", "block_size=4", *extra])
    assert config.block_size == 4


def test_stratified_rows_need_blocks():
    with pytest.raises(ConfigError, match="needs objective=block"):
        load_config(None, ["scheme=stratified_rows"])


def test_compute_matched_block_mirror_is_mirror_on_half_the_batch_at_standards_passes():
    """compute_matched on blocks: MIRROR's two copies of the first half of the sequences, the
    same draws as MIRROR on that half, counting Standard's passes (one per sequence)."""
    batch = {k: torch.cat([v, v]) for k, v in _batch().items()}  # 4 sequences
    half = {k: v[:2] for k, v in batch.items()}
    mirror = dict(kind="block", block_size=2, masking="mirror")
    matched = Objective(MASK, compute_matched=True, **mirror)(_model(), batch, *_gens())
    plain = Objective(MASK, **mirror)(_model(), half, *_gens())
    standard = Objective(MASK, kind="block", block_size=2)(_model(), batch, *_gens())
    assert matched.forward_passes == standard.forward_passes == 4
    assert torch.equal(matched.per_sequence, plain.per_sequence)
    assert torch.equal(matched.rate, plain.rate)


def test_a_block_run_trains_with_mirror_ema_and_stratified_rows(tmp_path):
    extra = ["masking=mirror", "sampler=ema", "scheme=stratified_rows", "max_steps=2"]
    config = load_config(
        None, [*SMALL, f"output_dir={tmp_path / 'r'}", "objective=block", "block_size=4", *extra]
    )
    train(config)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(x["loss"]) for x in lines if "loss" in x)


# --- P-POTS over blocks -------------------------------------------------------------------------


def test_ppots_grid_values_are_each_blocks_term_pooled_over_block_positions():
    batch, model = _batch(), _model()
    objective = Objective(MASK, kind="block", block_size=2)
    grid = np.array([0.3, 0.8])
    values = grid_values(objective, model, batch, grid, 3, torch.Generator().manual_seed(0))
    assert values.shape == (3 + 2, 2, 3)  # the batch's blocks x rates x masks
    g = torch.Generator().manual_seed(0)
    repeated = {k: v.repeat(3, 1) for k, v in batch.items()}
    with torch.no_grad():
        out = objective.at_block_rates(model, repeated, torch.full((6, 5), 0.3), None, g)
    np.testing.assert_allclose(values[:, 0, :], out.unweighted.view(3, 5).T.double().numpy())


@pytest.mark.filterwarnings("ignore:P-POTS")  # a tiny fit may fall back to the uniform
def test_a_block_run_fits_ppots_pooled_over_blocks_and_refuses_the_counts_fit(tmp_path):
    fit = ["sampler=ppots", "ppots_method=grid", "ppots_rates=4", "ppots_sequences=4"]
    config = load_config(
        None,
        [*SMALL, f"output_dir={tmp_path / 'r'}", "objective=block", "block_size=4", *fit,
         "ppots_masks=1", "max_steps=1"],
    )  # fmt: skip
    train(config)
    assert (tmp_path / "r" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="ppots_method=grid"):
        load_config(None, ["objective=block", "block_size=4", "sampler=ppots"])


# --- estimator=auto ------------------------------------------------------------------------------


def test_auto_on_blocks_includes_the_block_candidates_and_the_full_canvas_does_not():
    model, tokenizer = _model(), SimpleNamespace(token_id=lambda token, where: 3)
    block = load_config(None, ["objective=block", "block_size=4", "estimator=auto",
                               "ppots_method=grid"])  # fmt: skip
    names = candidate_names(block, model, tokenizer)[0]
    assert {"strats_rows", "count_strats_rows", "ppots_strats_rows", "mirror"} <= set(names)
    mirror = candidate_config(block, "mirror", [])  # at Standard's passes, as on the canvas
    assert mirror.compute_matched and step_passes(mirror) == step_passes(block)
    canvas = load_config(None, ["estimator=auto"])
    assert not set(candidate_names(canvas, model, tokenizer)[0]) & set(BLOCK_ONLY_METHODS)
    with pytest.raises(ConfigError, match="ppots_method=grid"):
        load_config(None, ["objective=block", "block_size=4", "estimator=auto"])
    only = ["objective=block", "block_size=4", "estimator=auto", "auto_candidates=[mirror]"]
    assert load_config(None, only).auto_candidates == ["mirror"]
