"""benchmarks/likelihood.py (issue 26, item 3) at a tiny size: its measurement runs, and on
one-token choices, where every count-mode draw is the exact log-likelihood, each count-mode
estimator agrees with the exact answer on every seed, with and without common random numbers;
its questions are cut from the held-out fables as written."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from stablemdm.data.tokenizer import CharTokenizer
from stablemdm.models import ModelConfig, Transformer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("likelihood")


def _untrained(tokenizer: CharTokenizer) -> Transformer:
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=16,
        n_layers=1,
        n_heads=2,
        mask_token_id=tokenizer.mask_token_id,
    )
    return Transformer(config, generator=torch.Generator().manual_seed(0)).eval()


def test_count_mode_agrees_with_the_exact_answer_on_one_token_choices(bench):
    tokenizer = CharTokenizer()
    model = _untrained(tokenizer)
    items = [
        (tokenizer.encode(context), [tokenizer.encode(c) for c in "abc"], 0)
        for context in ("the fox", "a crow sat", "moral:")
    ]
    exact = bench.exact_answers(model, items, tokenizer.mask_token_id)
    assert None not in exact
    rows = []
    for estimator in ("llada", "count_mirror"):
        for crn in (True, False):
            rows.append(bench.measure(model, items, exact, estimator, crn, seeds=2, target=0.1))
            assert rows[-1]["agreement_with_exact"] == 1
            assert rows[-1]["answer_changes_with_seed"] == 0
            assert rows[-1]["accuracy_sd_over_seeds"] == 0
            assert rows[-1]["passes_per_choice_to_target"] == 0  # every draw exact: no error
    table = bench.table(rows, 0.1, len(items), 2, len(items))
    assert "| `count_mirror` | no |" in table and "| `llada` | yes |" in table
    assert f"exact ({len(items)} of {len(items)} questions)" in table


def test_questions_are_cut_from_the_held_out_documents_as_written(bench):
    """Context and true next word read as a stretch of a held-out document, separators (the
    newline before "Moral:") included; every choice starts with that separator."""
    tokenizer = CharTokenizer()
    task = bench.get_task("text", train=str(bench.CORPUS), max_length=bench.MAX_LENGTH)
    documents = list(task.documents("test"))
    items = bench.questions(tokenizer, 60, seed=0)
    newlines = 0
    for context, choices, answer in items:
        text = tokenizer.decode(context + choices[answer])
        assert any(text in d for d in documents), text
        assert len({tokenizer.decode(c[:1]) for c in choices}) == 1
        newlines += "\n" in text
    assert newlines > 0  # the check above met a line break


def test_adaptive_check_stops_at_the_target_or_at_the_cap(bench):
    """The adaptive check spends the cap where the target is out of reach and one batch where
    any error meets it."""
    tokenizer = CharTokenizer()
    model = _untrained(tokenizer)
    items = [
        (tokenizer.encode(context), [tokenizer.encode(c) for c in ("ab", "ba", "cd")], 0)
        for context in ("the fox", "a crow")
    ]
    unreachable = bench.adaptive_check(model, items, "count_mirror", 1e-9, cap=64)
    assert unreachable["adaptive_passes_per_choice"] == 64
    assert unreachable["stopped_at_cap"] == len(items)
    easy = bench.adaptive_check(model, items, "count_mirror", 1e3, cap=64)
    assert easy["adaptive_passes_per_choice"] == 32 and easy["stopped_at_cap"] == 0
    assert unreachable["projected_passes_per_choice"] > 64  # the projection agrees: past the cap
