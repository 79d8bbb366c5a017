"""Block diffusion (issue 25): the attention rule, the transformer's [noised | clean] pass, and
the objective's limits: block_size=1 is next-token prediction, one block spanning the response
is the full-canvas MDM, and rate and count mode are unbiased for the same block ELBO (exact
enumeration on a tiny case)."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.special import beta, betainc, comb

from stablemdm.estimators.blocks import block_loss, blocks_per_row, response_blocks
from stablemdm.estimators.losses import arm_loss
from stablemdm.estimators.masking import grouped_subset_mask, subset_mask
from stablemdm.estimators.objective import Objective
from stablemdm.estimators.rates import Clipped
from stablemdm.models import ModelConfig, Transformer
from stablemdm.models.blocks import block_diffusion_mask

MASK, V = 1, 12


def _model(seed: int = 0, **overrides) -> Transformer:
    values = dict(vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)
    cfg = ModelConfig(**{**values, "mask_token_id": MASK, **overrides})
    return Transformer(cfg, generator=torch.Generator().manual_seed(seed)).eval()


def _batch(prompts=(3, 2), responses=(5, 4), length=9, seed=1) -> dict[str, torch.Tensor]:
    """Rows of a prompt, a response (eligible) and padding (not attended)."""
    n = len(prompts)
    x0 = torch.randint(4, V, (n, length), generator=torch.Generator().manual_seed(seed))
    eligible = torch.zeros(n, length, dtype=torch.bool)
    attention = torch.zeros(n, length, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        eligible[i, p : p + r] = True
        attention[i, : p + r] = True
    return {"input_ids": x0, "eligible": eligible, "attention_mask": attention}


def _gens(seed: int = 2) -> tuple[torch.Generator, torch.Generator]:
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


# --- the attention rule ---------------------------------------------------------------------


def _rule(bq: int, bk: int, q_clean: bool, k_clean: bool) -> bool:
    """The rule in words: a noised token sees its own noised block and earlier clean blocks;
    a clean token sees clean tokens of its own and earlier blocks, never a noised one."""
    if not q_clean:
        return (not k_clean and bk == bq) or (k_clean and bk < bq)
    return k_clean and bk <= bq


def test_mask_states_the_block_diffusion_rule():
    ids = response_blocks(_batch()["eligible"], 2)  # [2, 9]: prompt 0, then blocks of 2
    real = _batch()["attention_mask"]
    mask = block_diffusion_mask(ids, torch.cat([real, real], dim=1))[:, 0]  # [2, 18, 18]
    length = ids.shape[1]
    for b, q, k in itertools.product(range(2), range(2 * length), range(2 * length)):
        qc, kc = q >= length, k >= length
        expected = _rule(int(ids[b, q % length]), int(ids[b, k % length]), qc, kc)
        expected = (expected and bool(real[b, k % length])) or q == k
        assert bool(mask[b, q, k]) == expected, (b, q, k)
    single = block_diffusion_mask(ids, real, noised=False)[:, 0]  # the decoding view
    assert torch.equal(single, mask[:, length:, length:])


def test_response_blocks_start_at_the_response_and_the_last_may_be_short():
    ids = response_blocks(_batch()["eligible"], 2)
    assert ids[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]  # prompt 3, response 5: 2 + 2 + 1
    assert ids[1].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]  # prompt 2, response 4, padding
    assert blocks_per_row(9, 2) == 5 and blocks_per_row(9, 9) == 1


# --- the transformer's pass over [noised | clean] -----------------------------------------


def test_one_block_halves_are_two_full_canvas_passes_at_the_same_positions():
    model = _model()
    x0 = torch.randint(4, V, (2, 8), generator=torch.Generator().manual_seed(3))
    xt = torch.where(torch.rand(2, 8, generator=torch.Generator()) < 0.5, MASK, x0)
    one_block = torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        both = model(torch.cat([xt, x0], dim=1), block_ids=one_block)
        torch.testing.assert_close(both[:, :8], model(xt))
        torch.testing.assert_close(both[:, 8:], model(x0))


def test_a_noised_block_sees_only_itself_and_the_clean_blocks_before_it():
    model, batch = _model(), _batch()
    x0, real = batch["input_ids"], batch["attention_mask"]
    ids = response_blocks(batch["eligible"], 2)
    xt = torch.where(batch["eligible"], MASK, x0)
    attention = torch.cat([real, real], dim=1)
    with torch.no_grad():
        base = model(torch.cat([xt, x0], dim=1), attention, ids)
        for j in range(1, 4):
            block = ids[0] == j  # row 0's block j
            later = torch.cat([ids[0] > j, ids[0] >= j])  # later noised or clean tokens
            earlier_noised = torch.cat([ids[0] < j, torch.zeros_like(block)])
            for hidden in (later, earlier_noised):
                ids_in = torch.cat([xt, x0], dim=1)
                ids_in[0, hidden] = (ids_in[0, hidden] + 1 - 4) % (V - 4) + 4
                out = model(ids_in, attention, ids)
                assert torch.allclose(out[0, :9][block], base[0, :9][block], atol=1e-6), j
            seen = torch.cat([torch.zeros_like(block), ids[0] < j])  # earlier clean tokens
            ids_in = torch.cat([xt, x0], dim=1)
            ids_in[0, seen] = (ids_in[0, seen] + 1 - 4) % (V - 4) + 4
            assert not torch.allclose(
                model(ids_in, attention, ids)[0, :9][block], base[0, :9][block]
            )


def test_the_clean_half_is_the_decoding_view_of_one_sequence():
    model, batch = _model(), _batch()
    x0, real = batch["input_ids"], batch["attention_mask"]
    ids = response_blocks(batch["eligible"], 2)
    with torch.no_grad():
        both = model(torch.cat([x0, x0], dim=1), torch.cat([real, real], dim=1), ids)
        single = model(x0, real, ids)
    assert torch.allclose(both[:, 9:][real], single[real], atol=1e-5)


def test_block_inputs_are_checked():
    ids = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="causal"):
        _model(causal=True)(torch.ones(2, 16, dtype=torch.long), block_ids=ids)
    with pytest.raises(ValueError, match=r"\[B, 2L\]"):
        _model()(torch.ones(2, 12, dtype=torch.long), block_ids=ids)
    with pytest.raises(ValueError, match="block_size"):
        ModelConfig(vocab_size=V, causal=True, block_size=4)


# --- the objective's limits ------------------------------------------------------------------


class LastVisible(torch.nn.Module):
    """A stand-in network that obeys the attention it is given: each position's logits are
    `table[token]` of the latest-position key it may attend to that is not [MASK]. Causal, it
    is a bigram ARM; bidirectional on a full canvas, an MDM of the unmasked context."""

    conditions_on_t = False

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(9))

    def forward(self, input_ids, attention_mask=None, block_ids=None):
        b, q = input_ids.shape
        real = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask
        )
        if block_ids is not None:
            allowed = block_diffusion_mask(block_ids, real, noised=q > block_ids.shape[1])[:, 0]
            pos = torch.arange(q) % block_ids.shape[1]
        else:
            allowed = (
                torch.ones(q, q, dtype=torch.bool).tril()
                if self.causal
                else torch.ones(q, q, dtype=torch.bool)
            )
            allowed = allowed & real[:, None, :].bool()
            pos = torch.arange(q)
        visible = allowed & (input_ids != MASK)[:, None, :]  # [B, Q, Q]
        latest = torch.where(visible, pos.float(), -1.0).argmax(dim=2)  # [B, Q]
        logits = self.table[input_ids.gather(1, latest)]  # [B, Q, V]
        return torch.where(visible.any(dim=2)[..., None], logits, torch.zeros_like(logits))


def test_block_size_one_in_count_mode_is_next_token_prediction_exactly():
    batch = _batch()
    arm = arm_loss(
        LastVisible(causal=True), batch["input_ids"], batch["eligible"], batch["attention_mask"]
    )
    objective = Objective(MASK, kind="block", block_size=1, rate="count")
    out = objective(LastVisible(causal=False), batch, *_gens())
    torch.testing.assert_close(out.per_sequence, arm.per_sequence)


def test_block_size_one_in_rate_mode_is_next_token_prediction_in_expectation():
    batch = _batch()
    arm = arm_loss(
        LastVisible(causal=True), batch["input_ids"], batch["eligible"], batch["attention_mask"]
    )
    big = {k: v.repeat(64, 1) for k, v in batch.items()}
    objective = Objective(MASK, kind="block", block_size=1)
    model, gens = LastVisible(causal=False), _gens()
    draws = np.array([objective(model, big, *gens).loss.item() for _ in range(200)])
    se = draws.std(ddof=1) / math.sqrt(len(draws))
    assert abs(draws.mean() - arm.loss.item()) < 5 * se
    assert draws.std() > 0  # a real Monte Carlo check: the rates and masks vary


@pytest.mark.parametrize("rate", ["t", "count"])
def test_one_block_spanning_the_response_is_the_full_canvas_mdm_for_the_same_draws(rate):
    batch = _batch()
    block = Objective(MASK, kind="block", block_size=9, rate=rate, sampler=Clipped(0.1, 0.9))
    mdm = Objective(MASK, rate=rate, sampler=Clipped(0.1, 0.9))
    model = LastVisible(causal=False)  # with a prompt: given the same model outputs
    torch.testing.assert_close(
        block(model, batch, *_gens()).per_sequence, mdm(model, batch, *_gens()).per_sequence
    )
    no_prompt = _batch(prompts=(0, 0), responses=(9, 7))
    model = _model()  # no prompt: the real network, whose noised half sees what the MDM sees
    with torch.no_grad():
        a = block(model, no_prompt, *_gens()).per_sequence
        b = mdm(model, no_prompt, *_gens()).per_sequence
    torch.testing.assert_close(a, b)


# --- unbiasedness: exact enumeration on a tiny case --------------------------------------------

BLOCK, PROMPT, RESPONSE = 2, 2, 5  # blocks of 2, 2 and 1 (a short last block)


@pytest.fixture(scope="module")
def tiny():
    """Every mask pattern of a 5-token response in blocks of 2: each pattern's per-block
    term (the block's masked CE sum / |E|) from the real network's one [x_t | x0] pass."""
    model = _model(seed=4)
    batch = _batch(prompts=(PROMPT,), responses=(RESPONSE,), length=PROMPT + RESPONSE, seed=5)
    pats = torch.tensor(list(itertools.product([0, 1], repeat=RESPONSE)), dtype=torch.bool)
    mask = torch.zeros(len(pats), PROMPT + RESPONSE, dtype=torch.bool)
    mask[:, PROMPT:] = pats
    many = {k: v.expand(len(pats), -1) for k, v in batch.items()}
    ids = response_blocks(many["eligible"], BLOCK)
    with torch.no_grad():
        _, terms = block_loss(
            model,
            many["input_ids"],
            many["eligible"],
            mask,
            ids,
            torch.ones(len(pats), 3),
            MASK,
            many["attention_mask"],
        )
    sizes = [2, 2, 1]
    masked = np.stack([pats[:, :2].sum(1), pats[:, 2:4].sum(1), pats[:, 4:].sum(1)], axis=1)
    return model, batch, pats, terms.double().numpy(), masked, sizes


def _integral(a, b, eps):
    """The integral over t in (0, 1) of p^a (1 - p)^b, p = (1 - eps) t + eps."""
    return beta(a + 1, b + 1) * (1 - betainc(a + 1, b + 1, eps)) / (1 - eps)


def exact_rate(tiny, eps):
    """E over each block's t ~ U(0, 1) and Bernoulli(p_mask(t)) mask of the block loss."""
    _, _, _, terms, masked, sizes = tiny
    total = 0.0
    for s in range(len(terms)):
        for j, n in enumerate(sizes):
            if masked[s, j] == 0:
                continue
            value = terms[s, j] * _integral(masked[s, j] - 1, n - masked[s, j], eps)
            for i, m in enumerate(sizes):
                if i != j:
                    value *= _integral(masked[s, i], m - masked[s, i], eps)
            total += value
    return total


def exact_count(tiny):
    """E over each block's k ~ U{1..n_j} and uniform k-subset of the count-mode block loss."""
    _, _, _, terms, masked, sizes = tiny
    total = 0.0
    for s in range(len(terms)):
        if (masked[s] == 0).any():
            continue  # count mode masks at least one token of every block
        prob = np.prod([1 / (n * comb(n, k)) for n, k in zip(sizes, masked[s], strict=True)])
        total += prob * sum(terms[s, j] * n / masked[s, j] for j, n in enumerate(sizes))
    return total


def test_a_noised_blocks_term_depends_only_on_its_own_mask(tiny):
    _, _, pats, terms, _, _ = tiny
    for j, cols in enumerate([slice(0, 2), slice(2, 4), slice(4, 5)]):
        for own in {tuple(p[cols].tolist()) for p in pats}:
            same = [i for i, p in enumerate(pats) if tuple(p[cols].tolist()) == own]
            assert np.ptp(terms[same, j]) < 1e-6


def test_rate_and_count_mode_estimate_the_same_block_elbo(tiny):
    assert exact_count(tiny) == pytest.approx(exact_rate(tiny, 0.0), rel=1e-6)


@pytest.mark.parametrize("rate", ["t", "count"])
def test_the_block_objective_is_unbiased(tiny, rate):
    """Monte Carlo mean of the block objective within 5 standard errors of its exact value."""
    model, batch = tiny[0], tiny[1]
    objective = Objective(MASK, kind="block", block_size=BLOCK, rate=rate, eps=0.01)
    exact = exact_count(tiny) if rate == "count" else exact_rate(tiny, 0.01)
    big = {k: v.repeat(128, 1) for k, v in batch.items()}
    gens = _gens(6)
    with torch.no_grad():
        draws = np.array([objective(model, big, *gens).loss.item() for _ in range(120)])
    se = draws.std(ddof=1) / math.sqrt(len(draws))
    assert abs(draws.mean() - exact) < 5 * se


# --- count mode per block and what the objective reports --------------------------------------


def test_grouped_subsets_are_uniform_k_subsets_of_each_block():
    eligible = torch.zeros(1, 6, dtype=torch.bool)
    eligible[0, 1:] = True
    groups = torch.tensor([[0, 1, 1, 1, 2, 2]])
    k = torch.tensor([[0, 2, 1]])
    g = torch.Generator().manual_seed(7)
    seen = {}
    for _ in range(3000):
        m = grouped_subset_mask(eligible, groups, k, g)[0]
        assert m[1:4].sum() == 2 and m[4:].sum() == 1 and not m[0]
        seen[tuple(m.tolist())] = seen.get(tuple(m.tolist()), 0) + 1
    assert len(seen) == 3 * 2 and min(seen.values()) > 3000 / 6 * 0.8
    one = torch.zeros_like(groups)  # one group: subset_mask's own draw
    a = grouped_subset_mask(eligible, one, torch.tensor([[3]]), torch.Generator().manual_seed(8))
    b = subset_mask(eligible, torch.tensor([3]), torch.Generator().manual_seed(8))
    assert torch.equal(a, b)


def test_count_mode_masks_one_to_all_of_each_block_and_reports_per_block():
    batch = _batch()
    objective = Objective(MASK, kind="block", block_size=2, rate="count")
    out = objective(_model(), batch, *_gens())
    assert len(out.rate) == 3 + 2  # row 0: blocks of 2, 2, 1; row 1: 2, 2 (padding is no block)
    assert ((out.rate > 0) & (out.rate < 1)).all() and torch.equal(out.weight, torch.ones(5))
    assert out.forward_passes == 2  # one pass per sequence, over [noised | clean]


def test_block_objective_options_are_checked():
    with pytest.raises(ValueError, match="block_size"):
        Objective(MASK, kind="block")
    with pytest.raises(ValueError, match="block_size"):
        Objective(MASK, block_size=4)
    with pytest.raises(ValueError, match="block_size must be"):
        Objective(MASK, kind="block", block_size=0)
    with pytest.raises(ValueError, match="at_block_rates"):
        Objective(MASK, kind="block", block_size=2).at_rates(_model(), _batch(), torch.rand(2))
