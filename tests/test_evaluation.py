"""Tests for stablemdm.evaluation with a stand-in tokenizer, task and models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from stablemdm.data import Example
from stablemdm.errors import ConfigError
from stablemdm.evaluation.scoring import EvalResult, default_block_length, evaluate

PAD, MASK, EOS, SEP = 0, 1, 2, 3
ALPHABET = "abcdefgh"
VOCAB = 4 + len(ALPHABET)
FIELDS = {"index", "source", "prompt", "output", "extracted", "gold", "correct"}


class StandInTokenizer:
    """Characters of ALPHABET are ids 4..; ids below 4 are the special tokens."""

    pad_token_id, mask_token_id, eos_token_id, sep_token_id = PAD, MASK, EOS, SEP

    def encode(self, text: str, where: str = "text") -> list[int]:
        return [4 + ALPHABET.index(ch) for ch in text]

    def encode_prompt(self, example: Example) -> list[int]:
        return self.encode(example.prompt) + [SEP]

    def encode_response(self, example: Example) -> list[int]:
        return self.encode(example.response) + [EOS]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(ALPHABET[i - 4] for i in ids if i >= 4)


class CopyTask:
    """The response (and answer) is the prompt itself."""

    name = "copy"
    gen_length = 8
    words = ["abc", "h", "gfedcba", "bead", "cafe"]

    def examples(self, split: str) -> list[Example]:
        return [Example(w, w, w, f"copy/{split}:{i}") for i, w in enumerate(self.words)]

    def extract(self, output: str) -> str | None:
        return output.strip() or None

    def score(self, output: str, example: Example) -> bool:
        return self.extract(output) == example.answer


class CopyOracle(torch.nn.Module):
    """Reads each row's prompt (before `<sep>`) and puts peaked logits on the copy, then
    `<eos>`: at canvas position j (MDM), or on the next token (causal, ARM)."""

    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, input_ids, attention_mask):
        b, l = input_ids.shape
        logits = torch.zeros(b, l, VOCAB)  # [B, L, V]
        for row in range(b):
            ids = input_ids[row].tolist()
            sep = ids.index(SEP)
            copy = ids[:sep] + [EOS] * l
            for i in range(sep + (0 if self.causal else 1), l):
                j = i - sep if self.causal else i - sep - 1
                logits[row, i, copy[j]] = 20.0
        return logits


class Constant(torch.nn.Module):
    """Always predicts the letter 'h' (never `<eos>`); counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        b, l = input_ids.shape
        logits = torch.zeros(b, l, VOCAB)  # [B, L, V]
        logits[..., 4 + ALPHABET.index("h")] = 5.0
        return logits


class FlatModel(torch.nn.Module):
    """Equal logits on every letter (none on `<eos>`), so sampled outputs depend on the seed."""

    def forward(self, input_ids, attention_mask):
        b, l = input_ids.shape
        logits = torch.full((b, l, VOCAB), -1e4)  # [B, L, V]
        logits[..., 4:] = 0.0
        return logits


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_oracle_scores_perfectly_and_writes_records(tmp_path, objective):
    task = CopyTask()
    path = tmp_path / "eval" / "records.jsonl"
    result = evaluate(
        CopyOracle(causal=objective == "arm"),
        StandInTokenizer(),
        task,
        objective=objective,
        batch_size=2,
        output_path=path,
    )
    assert isinstance(result, EvalResult)
    assert (result.accuracy, result.n, result.n_correct) == (1.0, 5, 5)
    assert read_records(path) == result.records
    for index, (record, word) in enumerate(zip(result.records, task.words, strict=True)):
        assert set(record) == FIELDS
        assert record == {
            "index": index,
            "source": f"copy/test:{index}",
            "prompt": word,
            "output": word,
            "extracted": word,
            "gold": word,
            "correct": True,
        }


def test_garbage_model_scores_zero_and_uses_default_steps():
    model = Constant()
    task = CopyTask()
    result = evaluate(model, StandInTokenizer(), task, limit=3, batch_size=8)
    assert (result.accuracy, result.n, result.n_correct) == (0.0, 3, 0)
    assert all(r["output"] == "h" * task.gen_length and not r["correct"] for r in result.records)
    assert model.calls == task.gen_length  # steps defaults to gen_length; one batch


def test_limit_batches_and_explicit_settings():
    result = evaluate(
        CopyOracle(causal=False),
        StandInTokenizer(),
        CopyTask(),
        limit=4,
        batch_size=3,
        gen_length=12,
        steps=6,
        block_length=4,
    )
    assert (result.accuracy, result.n) == (1.0, 4)
    assert [r["index"] for r in result.records] == [0, 1, 2, 3]


def test_sampling_evaluation_is_repeatable():
    def run(seed: int) -> list[dict]:
        return evaluate(
            FlatModel(),
            StandInTokenizer(),
            CopyTask(),
            remasking="random",
            temperature=1.0,
            seed=seed,
        ).records

    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize(
    "gen_length, expected", [(128, 32), (32, 32), (8, 8), (48, 24), (40, 20), (33, 11), (37, 1)]
)
def test_default_block_length(gen_length, expected):
    block = default_block_length(gen_length)
    assert block == expected
    assert gen_length % block == 0 and block <= 32


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(objective="diffusion"), "unknown objective"),
        (dict(limit=0), "limit"),
        (dict(batch_size=0), "batch_size"),
        (dict(block_length=3), "does not divide gen_length"),
    ],
)
def test_rejects_bad_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        evaluate(Constant(), StandInTokenizer(), CopyTask(), **overrides)


def test_gold_responses_longer_than_the_canvas_are_counted_in_one_warning(capsys):
    """gen_length=4: 'gfedcba' (7 letters) cannot be written in the canvas, so even the
    oracle misses it; one warning says so before decoding, with the length that fits."""
    result = evaluate(CopyOracle(causal=False), StandInTokenizer(), CopyTask(), gen_length=4)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("stablemdm: warning: 1 of 5 gold responses are longer than the")
    assert "gen_length=4" in line and "needs 8 tokens" in line and "--gen-length" in line
    assert result.n_correct == 4 and not result.records[2]["correct"]
    evaluate(CopyOracle(causal=False), StandInTokenizer(), CopyTask(), gen_length=8)
    assert capsys.readouterr().err == ""


class Positions(Constant):
    """`Constant` with a config that bounds its positions, as a real model's does."""

    def __init__(self, positions: int):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=positions)


def test_a_canvas_longer_than_the_models_positions_is_refused_before_decoding():
    """The longest prompt ('gfedcba' and <sep>: 8 tokens) and a canvas of 8 need 16
    positions; a model with 12 is refused in one line naming the limit and the fix."""
    model = Positions(12)
    with pytest.raises(ConfigError) as err:
        evaluate(model, StandInTokenizer(), CopyTask(), gen_length=8)
    message = str(err.value)
    assert "\n" not in message and model.calls == 0
    assert "need 16 positions, more than the 12 the model has" in message
    assert "max_position_embeddings" in message and "lower --gen-length to 4" in message
    assert evaluate(Positions(16), StandInTokenizer(), CopyTask(), gen_length=8).n == 5
