"""benchmarks/likelihood.py (issue 26, item 3) at a tiny size: its measurement runs, and on
one-token choices, where every count-mode draw is the exact log-likelihood, each count-mode
estimator agrees with the exact answer on every seed."""

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


def test_count_mode_agrees_with_the_exact_answer_on_one_token_choices(bench):
    tokenizer = CharTokenizer()
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=16,
        n_layers=1,
        n_heads=2,
        mask_token_id=tokenizer.mask_token_id,
    )
    model = Transformer(config, generator=torch.Generator().manual_seed(0)).eval()
    items = [
        (tokenizer.encode(context), [tokenizer.encode(c) for c in "abc"], 0)
        for context in ("the fox", "a crow sat", "moral:")
    ]
    exact = bench.exact_answers(model, items, tokenizer.mask_token_id)
    assert None not in exact
    for estimator in ("llada", "count_mirror"):
        row = bench.measure(model, items, exact, estimator, seeds=2, target=0.1)
        assert row["agreement_with_exact"] == 1 and row["answer_changes_with_seed"] == 0
        assert row["accuracy_sd_over_seeds"] == 0
    assert "| `count_mirror` |" in bench.table([row], 0.1, len(items), 2, len(items))
