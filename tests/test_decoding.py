"""Tests for stablemdm.evaluation.decoding with stand-in models (no dependency on models/)."""

from __future__ import annotations

import math

import pytest
import torch

from stablemdm.evaluation.decoding import generate, generate_arm, generate_mdm, unmask_schedule

PAD, MASK, EOS, SEP = 0, 1, 2, 3
VOCAB = 12  # letters are 4..11
SPECIAL = dict(mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD)
PEAK = 20.0


class TableModel(torch.nn.Module):
    """Logits peaked (height PEAK) on `table[b, i]` at each position i, whatever the input;
    `decoy` puts an even higher logit on that token everywhere (to check it is never chosen).
    Records every call's inputs and whether it ran in eval mode."""

    def __init__(self, table: torch.Tensor, decoy: int | None = None):
        super().__init__()
        self.table = table
        self.decoy = decoy
        self.inputs: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.modes: list[bool] = []

    def forward(self, input_ids, attention_mask):
        self.inputs.append(input_ids.clone())
        self.masks.append(attention_mask.clone())
        self.modes.append(self.training)
        b, l = input_ids.shape
        logits = torch.zeros(b, l, VOCAB)  # [B, L, V]
        logits.scatter_(2, self.table[:, :l, None], PEAK)
        if self.decoy is not None:
            logits[..., self.decoy] = PEAK + 5.0
        return logits


def mdm_oracle_table(prompts, canvases) -> torch.Tensor:
    """Row b predicts canvases[b][j] at position len(prompts[b]) + j, a letter elsewhere."""
    width = max(len(p) for p in prompts) + len(canvases[0])
    table = torch.full((len(prompts), width), 4, dtype=torch.long)  # [B, L]
    for b, (p, c) in enumerate(zip(prompts, canvases, strict=True)):
        table[b, len(p) : len(p) + len(c)] = torch.tensor(c)
    return table


def eos_filled(response: list[int], gen_length: int) -> list[int]:
    return response + [EOS] * (gen_length - len(response))


PROMPTS = [[5, 6, SEP], [7, SEP], [4, 5, 6, 7, 8, SEP]]
RESPONSES = [[9, 10, 11], [4, 4, 5, 6, 7, 8, 9], []]


@pytest.mark.parametrize("block_length", [1, 4, 8])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mdm_oracle_reproduces_gold(block_length, remasking, temperature):
    gen_length = 8
    canvases = [eos_filled(r, gen_length) for r in RESPONSES]
    model = TableModel(mdm_oracle_table(PROMPTS, canvases))
    out = generate_mdm(
        model,
        PROMPTS,
        **SPECIAL,
        gen_length=gen_length,
        steps=gen_length,
        block_length=block_length,
        remasking=remasking,
        temperature=temperature,
        generator=torch.Generator().manual_seed(0),
    )
    assert out == RESPONSES


def test_mdm_attention_mask_and_layout():
    gen_length = 4
    canvases = [eos_filled(r[:gen_length], gen_length) for r in RESPONSES]
    model = TableModel(mdm_oracle_table(PROMPTS, canvases))
    generate_mdm(model, PROMPTS, **SPECIAL, gen_length=gen_length, steps=4, block_length=4)
    x, attention = model.inputs[0], model.masks[0]
    assert x.shape == (3, 6 + gen_length)
    for b, prompt in enumerate(PROMPTS):
        p = len(prompt)
        assert x[b, :p].tolist() == prompt
        assert x[b, p : p + gen_length].tolist() == [MASK] * gen_length
        assert (x[b, p + gen_length :] == PAD).all()
        assert attention[b].tolist() == [True] * (p + gen_length) + [False] * (6 - p)


def test_mdm_never_chooses_mask_or_pad():
    gen_length = 8
    canvases = [eos_filled(r, gen_length) for r in RESPONSES]
    for decoy in (MASK, PAD):
        model = TableModel(mdm_oracle_table(PROMPTS, canvases), decoy=decoy)
        out = generate_mdm(model, PROMPTS, **SPECIAL, gen_length=8, steps=8, block_length=4)
        assert out == RESPONSES


def test_eval_mode_and_restore():
    model = TableModel(mdm_oracle_table([[SEP]], [[EOS] * 4]))
    model.train()
    generate_mdm(model, [[SEP]], **SPECIAL, gen_length=4, steps=4, block_length=4)
    assert model.modes and not any(model.modes)
    assert model.training
    model.eval()
    generate_arm(model, [[SEP]], eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=2)
    assert not model.training


class RampModel(torch.nn.Module):
    """Always predicts letter 4; its logit grows (sign=+1) or shrinks (sign=-1) with position,
    so the confidence is monotone in position. Never predicts eos (no early stop)."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign
        self.inputs: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask):
        self.inputs.append(input_ids.clone())
        b, l = input_ids.shape
        logits = torch.zeros(b, l, VOCAB)  # [B, L, V]
        logits[..., EOS] = -1e4
        logits[..., 4] = 10.0 + self.sign * torch.arange(l, dtype=torch.float32) / 4.0
        return logits


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_low_confidence_unmasks_most_confident_first(sign):
    gen_length, block_length = 8, 4
    prompts = [[5, SEP], [5, 6, 7, SEP]]
    model = RampModel(sign)
    generate_mdm(
        model,
        prompts,
        **SPECIAL,
        gen_length=gen_length,
        steps=gen_length,
        block_length=block_length,
    )
    assert len(model.inputs) == gen_length
    for call in range(1, gen_length):
        before, after = model.inputs[call - 1], model.inputs[call]
        block = (call - 1) // block_length
        for b, prompt in enumerate(prompts):
            start = len(prompt) + block * block_length
            masked = [i for i in range(start, start + block_length) if before[b, i] == MASK]
            changed = (before[b] != after[b]).nonzero().flatten().tolist()
            assert changed == [max(masked) if sign > 0 else min(masked)]


@pytest.mark.parametrize("n_masked", [1, 5, 8, 13, 32])
@pytest.mark.parametrize("steps", [1, 3, 4, 7, 32])
def test_unmask_schedule_is_even(n_masked, steps):
    counts = unmask_schedule(n_masked, steps)
    assert len(counts) == steps
    assert sum(counts) == n_masked
    assert max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("steps", [2, 6, 8, 12])
def test_mdm_unmask_counts_per_iteration(steps):
    gen_length, block_length = 12, 6
    model = RampModel(1.0)
    out = generate_mdm(
        model, [[SEP]], **SPECIAL, gen_length=gen_length, steps=steps, block_length=block_length
    )
    assert MASK not in out[0] and len(out[0]) == gen_length
    n_masks = [int((x == MASK).sum()) for x in model.inputs] + [0]
    unmasked = [n_masks[i] - n_masks[i + 1] for i in range(len(n_masks) - 1)]
    per_block = steps // 2
    assert unmasked == 2 * unmask_schedule(block_length, per_block)
    for block in (unmasked[:per_block], unmasked[per_block:]):
        assert sum(block) == block_length and max(block) - min(block) <= 1


def test_mdm_stops_at_eos_and_early():
    gen_length, block_length = 16, 4
    prompts = [[5, SEP], [6, 7, SEP]]
    canvases = [
        [8, 9, EOS, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11, 4, 5, 6],  # tokens after eos are dropped
        eos_filled([4, 5, 6, 7, 8], gen_length),  # eos in block 1
    ]
    model = TableModel(mdm_oracle_table(prompts, canvases))
    out = generate_mdm(
        model, prompts, **SPECIAL, gen_length=gen_length, steps=16, block_length=block_length
    )
    assert out == [[8, 9], [4, 5, 6, 7, 8]]
    assert len(model.inputs) == 2 * 4  # two blocks of four iterations, not four blocks

    canvases[1] = [4] * gen_length  # no eos: every block runs, the whole canvas is returned
    model = TableModel(mdm_oracle_table(prompts, canvases))
    out = generate_mdm(
        model, prompts, **SPECIAL, gen_length=gen_length, steps=16, block_length=block_length
    )
    assert out == [[8, 9], [4] * gen_length]
    assert len(model.inputs) == 16


class FixedDistribution(torch.nn.Module):
    """The same logits at every position: log-probabilities `log_p` over the letters."""

    def __init__(self, log_p: torch.Tensor):
        super().__init__()
        self.log_p = log_p

    def forward(self, input_ids, attention_mask):
        b, l = input_ids.shape
        return self.log_p.expand(b, l, VOCAB)


def assert_frequencies(tokens: list[int], probs: torch.Tensor) -> None:
    """Empirical token frequencies within 5 standard errors of `probs`."""
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB).double()
    for v in range(VOCAB):
        p = float(probs[v])
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(counts[v] / n - p) <= 5 * se + 1e-12, (v, counts[v] / n, p)


def letter_logits() -> torch.Tensor:
    logits = torch.full((VOCAB,), -1e4)  # special tokens: effectively zero probability
    logits[4:] = torch.linspace(0.0, 2.0, VOCAB - 4)
    logits[MASK] = logits[PAD] = 5.0  # would dominate if they were not excluded
    return logits


def test_mdm_sampling_follows_softmax_with_random_remasking():
    logits, temperature = letter_logits(), 0.7
    allowed = logits.clone()
    allowed[MASK] = allowed[PAD] = float("-inf")
    probs = (allowed / temperature).softmax(-1)
    out = generate_mdm(
        FixedDistribution(logits),
        [[SEP]] * 40,
        **SPECIAL,
        gen_length=32,
        steps=32,
        block_length=8,
        remasking="random",
        temperature=temperature,
        generator=torch.Generator().manual_seed(1),
    )
    assert_frequencies([t for row in out for t in row], probs)


def test_sampling_is_repeatable_with_the_seed():
    model = FixedDistribution(letter_logits())
    kwargs = dict(gen_length=16, steps=16, block_length=4, temperature=1.0)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate_mdm(model, [[SEP]] * 4, **SPECIAL, **kwargs, generator=g)

    assert run(3) == run(3)
    assert run(3) != run(4)


def arm_oracle_table(prompts, responses, max_new_tokens) -> torch.Tensor:
    """Causal oracle: position i predicts token i + 1 of prompt + response + [eos]."""
    width = max(len(p) for p in prompts) + max_new_tokens
    table = torch.full((len(prompts), width), EOS, dtype=torch.long)  # [B, L]
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        targets = (p + r + [EOS])[1 : width + 1]
        table[b, : len(targets)] = torch.tensor(targets)
    return table


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_arm_oracle_reproduces_gold(temperature):
    max_new_tokens = 10
    model = TableModel(arm_oracle_table(PROMPTS, RESPONSES, max_new_tokens))
    out = generate_arm(
        model,
        PROMPTS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        generator=torch.Generator().manual_seed(0),
    )
    assert out == RESPONSES
    assert len(model.inputs) == max(len(r) for r in RESPONSES) + 1  # stops once all hit eos
    first = model.masks[0]
    for b, prompt in enumerate(PROMPTS):
        assert first[b].tolist() == [i < len(prompt) for i in range(first.shape[1])]


def test_arm_stops_at_max_new_tokens_and_skips_pad():
    responses = [[4, 5, 6, 7, 8, 9], [10]]
    prompts = [[5, SEP], [6, 7, 8, SEP]]
    table = arm_oracle_table(prompts, responses, 6)
    model = TableModel(table, decoy=PAD)
    out = generate_arm(model, prompts, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=4)
    assert out == [[4, 5, 6, 7], [10]]
    assert len(model.inputs) == 4


def test_arm_sampling_follows_softmax():
    logits, temperature = letter_logits(), 0.5
    allowed = logits.clone()
    allowed[PAD] = float("-inf")
    probs = (allowed / temperature).softmax(-1)
    out = generate_arm(
        FixedDistribution(logits),
        [[SEP], [4, SEP]] * 20,
        eos_token_id=EOS,
        pad_token_id=PAD,
        max_new_tokens=40,
        temperature=temperature,
        generator=torch.Generator().manual_seed(2),
    )
    assert_frequencies([t for row in out for t in row], probs)


def test_generate_dispatches():
    gen_length = 8
    canvases = [eos_filled(r, gen_length) for r in RESPONSES]
    model = TableModel(mdm_oracle_table(PROMPTS, canvases))
    out = generate(
        model, PROMPTS, objective="mdm", **SPECIAL, gen_length=8, steps=8, block_length=8
    )
    assert out == RESPONSES
    model = TableModel(arm_oracle_table(PROMPTS, RESPONSES, 8))
    out = generate(
        model, PROMPTS, objective="arm", eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=8
    )
    assert out == RESPONSES
    assert (
        generate(model, [], objective="arm", eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=8)
        == []
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(block_length=3), "does not divide gen_length"),
        (dict(steps=6), "not a multiple of the number of blocks"),
        (dict(remasking="top_k"), "unknown remasking"),
        (dict(temperature=-1.0), "negative"),
        (dict(temperature=1.0, generator=None), "generator"),
        (dict(remasking="random", generator=None), "generator"),
        (dict(gen_length=0), "positive"),
    ],
)
def test_mdm_rejects_bad_options(overrides, message):
    options = dict(gen_length=8, steps=8, block_length=2, generator=torch.Generator())
    options.update(overrides)
    model = RampModel(1.0)
    with pytest.raises(ValueError, match=message):
        generate_mdm(model, [[SEP]], **SPECIAL, **options)
    assert model.inputs == []


def test_rejects_unknown_objective_and_empty_prompt():
    with pytest.raises(ValueError, match="'mdm', 'arm'"):
        generate(RampModel(1.0), [[SEP]], objective="ar")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_arm(
            RampModel(1.0), [[SEP], []], eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=2
        )


class NextLetter(torch.nn.Module):
    """A causal stand-in that sees at most `context` positions (like a model with a position
    table of that size) and predicts, at each position, the letter after the one there."""

    def __init__(self, context: int):
        super().__init__()
        self.context = context
        self.inputs: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask):
        if input_ids.shape[1] > self.context:
            raise ValueError(f"{input_ids.shape[1]} positions exceed the context {self.context}")
        self.inputs.append(input_ids.clone())
        self.masks.append(attention_mask.clone())
        following = (input_ids - 4 + 1) % (VOCAB - 4) + 4  # [B, L]
        return torch.nn.functional.one_hot(following, VOCAB).float() * PEAK


def test_arm_generates_past_its_context_on_a_window_of_the_latest_tokens():
    prompts, context, new = [[4], [6, 7, 8]], 5, 12
    model = NextLetter(context)
    out = generate_arm(
        model,
        prompts,
        eos_token_id=EOS,
        pad_token_id=PAD,
        max_new_tokens=new,
        context_length=context,
    )
    letters = VOCAB - 4
    assert out == [[(p[-1] - 4 + i) % letters + 4 for i in range(1, new + 1)] for p in prompts]
    assert max(x.shape[1] for x in model.inputs) == context
    whole = [p + o for p, o in zip(prompts, out, strict=True)]
    last, mask = model.inputs[-1], model.masks[-1]  # the window of the last new token
    for b, row in enumerate(whole):
        seen = last[b][mask[b]].tolist()
        assert seen == row[-context - 1 : -1]  # the latest tokens before the last one


def test_arm_without_a_context_length_gives_the_model_the_whole_prefix():
    model = NextLetter(context=3)
    with pytest.raises(ValueError, match="exceed the context 3"):
        generate_arm(model, [[4]], eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=4)
