"""Per-sequence losses: the MDM estimator's expectation, its handling of empty masks, and the
ARM loss's shift and eligibility."""

import math

import torch

from stablemdm.estimators import masking
from stablemdm.estimators.losses import arm_loss, mdm_loss

V = 37
MASK = 1


class Uniform(torch.nn.Module):
    """Uniform logits: every masked token costs exactly log V."""

    def forward(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, V)


class HFStyle(torch.nn.Module):
    """Returns an object with `.logits`, like a Hugging Face model."""

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, V)})()


def _batch(b: int, l: int = 24):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(4, V, (b, l), generator=g)
    eligible = torch.zeros(b, l, dtype=torch.bool)
    eligible[:, 6:20] = True
    return x0, eligible


def test_mdm_loss_monte_carlo_mean_is_log_v():
    """E_{t,m}[l] = log V for uniform logits (the ELBO weight 1/p_mask undoes the rate)."""
    g = torch.Generator().manual_seed(1)
    x0, eligible = _batch(20_000)
    t = torch.rand(len(x0), generator=g)
    p = masking.p_mask(t)
    mask = masking.iid_mask(eligible, p, g)
    out = mdm_loss(Uniform(), x0, eligible, mask, p, MASK)
    se = out.per_sequence.std().item() / math.sqrt(len(x0))
    assert abs(out.loss.item() - math.log(V)) < 5 * se


def test_empty_mask_counts_as_zero_and_stays_in_the_mean():
    x0, eligible = _batch(2)
    mask = eligible.clone()
    mask[1] = False
    p = torch.tensor([1.0, 0.5])
    out = mdm_loss(Uniform(), x0, eligible, mask, p, MASK)
    assert out.per_sequence[1] == 0
    assert out.loss.item() == (out.per_sequence[0] / 2).item()
    assert math.isclose(out.per_sequence[0].item(), math.log(V), rel_tol=1e-6)


def test_weight_and_hf_outputs():
    x0, eligible = _batch(3)
    p = torch.full((3,), 0.5)
    mask = eligible.clone()
    plain = mdm_loss(Uniform(), x0, eligible, mask, p, MASK)
    weighted = mdm_loss(
        HFStyle(), x0, eligible, mask, p, MASK, weight=torch.tensor([1.0, 2.0, 0.0])
    )
    torch.testing.assert_close(
        weighted.per_sequence, plain.per_sequence * torch.tensor([1.0, 2.0, 0.0])
    )


def test_mdm_loss_sees_masked_input_and_scores_only_masked_eligible():
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            seen["x"] = input_ids.clone()
            return torch.zeros(*input_ids.shape, V)

    x0, eligible = _batch(2)
    mask = torch.zeros_like(eligible)
    mask[:, 7] = True
    out = mdm_loss(Spy(), x0, eligible, mask, torch.ones(2), MASK)
    assert (seen["x"][:, 7] == MASK).all() and (seen["x"][:, 8] == x0[:, 8]).all()
    assert torch.equal(out.scored, mask)


def test_arm_loss_predicts_next_token_over_eligible_only():
    class Oracle(torch.nn.Module):
        """Causal oracle: at position i, put all mass on token x0[i+1]."""

        def __init__(self, x0):
            super().__init__()
            self.x0 = x0

        def forward(self, input_ids, attention_mask=None):
            logits = torch.full((*input_ids.shape, V), -30.0)
            nxt = torch.roll(self.x0, -1, dims=1)
            logits.scatter_(2, nxt[..., None], 30.0)
            return logits

    x0, eligible = _batch(4)
    assert arm_loss(Oracle(x0), x0, eligible).loss.item() < 1e-6
    out = arm_loss(Uniform(), x0, eligible)
    torch.testing.assert_close(out.per_sequence, torch.full((4,), math.log(V)))
    assert torch.equal(out.scored, eligible)  # eligible starts at 6 > 0, so nothing is lost


def test_hugging_face_models_fit_as_they_are():
    """A randomly initialised transformers model (no download) trains and decodes through the
    same objective and decoder: `model(input_ids=..., attention_mask=...).logits`."""
    from transformers import BertConfig, BertForMaskedLM

    from stablemdm.estimators.objective import Objective
    from stablemdm.evaluation.decoding import generate_mdm

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = BertForMaskedLM(config)
    x0, eligible = _batch(4)
    batch = {"input_ids": x0, "eligible": eligible, "attention_mask": torch.ones_like(eligible)}
    g = torch.Generator().manual_seed(0)
    out = Objective(MASK, masking="mirror", rate="count")(model, batch, g, g)
    out.loss.backward()
    assert (
        torch.isfinite(out.loss) and model.bert.embeddings.word_embeddings.weight.grad is not None
    )
    decoded = generate_mdm(
        model,
        [[5, 6, 3]],
        mask_token_id=MASK,
        eos_token_id=2,
        pad_token_id=0,
        gen_length=4,
        steps=4,
        block_length=2,
    )
    assert len(decoded) == 1 and all(t not in (MASK, 0) for t in decoded[0])
