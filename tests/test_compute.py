"""Compute accounting (`training.compute`): a run's counted passes equal what an independently
instrumented model saw (Standard, MIRROR, estimator=auto, P-POTS with refits, evaluation
apart), a resumed run reports the uninterrupted run's counts, and estimator=auto charged its
measurements spends Standard's compute within one step (`auto_budget`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_trainer import SMALL as TRAINER_SMALL
from test_trainer import _Kill

from stablemdm.errors import ConfigError
from stablemdm.models import Transformer
from stablemdm.training.auto import charged_plan
from stablemdm.training.compute import PHASES
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

SMALL = [*TRAINER_SMALL, "max_steps=12", "save_steps=4", "ppots_sequences=3", "ppots_counts=4"]
# auto with a P-POTS and an EMA candidate: its measurements, fits and EMA all run
AUTO = [
    "estimator=auto",
    "auto_candidates=[standard, count_ppots_mirror, ema]",
    "auto_every=3",
    "auto_draws=3",
    "auto_batch=2",
    "max_steps=24",  # Standard's budget: auto charged trains 8 steps, measuring at 0, 3, 6
]
STEP = 2 * 8  # one Standard step: 8 sequences forward and backward


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one torch thread is fastest and bitwise reproducible."""


class _Rows(torch.autograd.Function):
    """Identity on the logits whose backward counts the rows it carries (the instrument)."""

    @staticmethod
    def forward(ctx, logits, seen, rows):
        ctx.seen, ctx.rows = seen, rows
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        ctx.seen["backward"] += ctx.rows
        return grad, None, None


@pytest.fixture
def instrumented(monkeypatch) -> dict[str, int]:
    """Every built-in model's forward calls counted independently of training.compute:
    the rows of each call and of each backward pass through its logits."""
    seen = {"forward": 0, "backward": 0}
    forward = Transformer.forward

    def counted(self, input_ids, *args, **kwargs):
        out = forward(self, input_ids, *args, **kwargs)
        seen["forward"] += input_ids.shape[0]
        return _Rows.apply(out, seen, input_ids.shape[0]) if out.requires_grad else out

    monkeypatch.setattr(Transformer, "forward", counted)
    return seen


def _compute(folder: Path) -> dict:
    return json.loads((folder / "compute.json").read_text())


def _run(tmp_path: Path, name: str, *extra: str, callbacks=None, resume=False) -> dict:
    config = load_config(None, [*SMALL, *extra, f"output_dir={tmp_path / name}"])
    train(config, resume=resume, callbacks=callbacks)
    return _compute(tmp_path / name)


@pytest.mark.parametrize(
    ("method", "expect"),
    [
        ([], {"train": 12 * 8}),
        (["masking=mirror"], {"train": 2 * 12 * 8}),
        (["sampler=ppots", "ppots_refit_steps=4"], {"train": 12 * 8}),
        ([*AUTO, "auto_budget=extra"], {"train": 24 * 8}),
        (AUTO, {}),
        (["eval_strategy=steps", "eval_steps=6", "eval_accuracy=true", "eval_limit=4"], {}),
    ],
    ids=["standard", "mirror", "ppots_refits", "auto_extra", "auto_charged", "evaluated"],
)
def test_counted_passes_equal_an_instrumented_models_calls(tmp_path, instrumented, method, expect):
    """Every forward and backward pass the model makes is counted once, in some phase: the
    totals over phases equal the instrument's; training passes are the batch's (twice for
    MIRROR); only auto measures, only P-POTS fits (forward only), only evaluation evaluates."""
    out = _run(tmp_path, "run", *method)
    phases = out["phases"]
    for kind in ("forward", "backward"):
        assert sum(phases[p][kind] for p in PHASES) == instrumented[kind] > 0, kind
    assert phases["train"]["forward"] == phases["train"]["backward"]
    for name, forward in expect.items():
        assert phases[name]["forward"] == forward
    assert phases["other"]["forward"] == 0  # nothing escaped the phases
    auto, fitting = "estimator=auto" in method, any("ppots" in m for m in method)
    assert (phases["auto"]["forward"] > 0) == auto
    assert (phases["ppots_fit"]["forward"] > 0) == (auto or fitting)
    assert phases["ppots_fit"]["backward"] == 0  # the fit's target is the loss
    assert (phases["eval"]["forward"] > 0) == ("eval_accuracy=true" in method)
    seen = instrumented["forward"] + instrumented["backward"]
    assert out["evaluation"] == phases["eval"]["forward"] + phases["eval"]["backward"]
    assert out["total"] == out["training"] + out["overhead"] == seen - out["evaluation"]


def test_metrics_lines_carry_the_running_counts(tmp_path):
    """Each training line of metrics.jsonl has the passes counted so far per phase; the last
    one's are compute.json's."""
    out = _run(tmp_path, "run", "sampler=ppots", "ppots_refit_steps=4")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in lines if "loss" in r]
    assert [r["compute/train"] for r in training] == [STEP * s for s in range(1, 13)]
    fits = [r["compute/ppots_fit"] for r in training]
    assert fits == [fits[0] * (1 + s // 4) for s in range(1, 13)]  # the fit, then 3 refits
    assert training[-1]["compute/total"] == out["total"]
    assert training[-1]["compute/overhead"] == out["overhead"] == fits[-1]


@pytest.mark.parametrize("method", [["sampler=ppots", "ppots_refit_steps=4"], AUTO])
def test_a_resumed_run_reports_the_uninterrupted_runs_counts(tmp_path, method):
    """Killed between checkpoints and resumed, a run (P-POTS refitted at its checkpoint
    steps; auto charged, measuring at others) counts what the uninterrupted one counted, at
    the end and on every metrics line."""
    full = _run(tmp_path, "full", *method)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "cut", *method, callbacks=[_Kill(7)])
    assert _run(tmp_path, "cut", *method, resume=True) == full
    lines = [
        {r["step"]: r.get("compute/total") for r in map(json.loads, f.read_text().splitlines())}
        for f in (tmp_path / "full" / "metrics.jsonl", tmp_path / "cut" / "metrics.jsonl")
    ]
    assert lines[0] == lines[1]


def test_auto_charged_spends_standards_compute_within_one_step(tmp_path, capsys):
    """auto_budget=charged (the default): measurements and fits come out of Standard's
    budget, so auto trains fewer steps and its counted total is Standard's within one step;
    the run is finished at its planned end; auto_budget=extra trains every step on top."""
    standard = _run(tmp_path, "standard", "max_steps=24")
    charged = _run(tmp_path, "charged", *AUTO)
    assert standard["overhead"] == 0 and charged["overhead"] > 0
    assert 0 <= standard["total"] - charged["total"] < STEP
    plan = charged["plan"]
    assert plan["budget"] == standard["total"] and plan["steps"] < 24
    assert charged["training"] == plan["steps"] * STEP
    assert "against Standard's" in capsys.readouterr().out
    again = load_config(None, [*SMALL, *AUTO, f"output_dir={tmp_path / 'charged'}"])
    assert not train(again, resume=True).trained  # finished at its planned step
    extra = _run(tmp_path, "extra", *AUTO, "auto_budget=extra")
    assert extra["training"] == standard["total"] and extra["total"] > standard["total"]


def test_block_auto_choosing_mirror_spends_standards_compute_within_one_step(tmp_path):
    """On blocks too: a MIRROR candidate is compute-matched (two copies of half the
    sequences), so a charged block run that trains with it ends at block Standard's total."""
    block = ["objective=block", "block_size=2"]
    standard = _run(tmp_path, "standard", *block, "max_steps=24")
    auto = [*AUTO[:1], "auto_candidates=[mirror]", *AUTO[2:]]
    charged = _run(tmp_path, "charged", *block, *auto)
    assert 0 <= standard["total"] - charged["total"] < STEP
    assert charged["training"] == charged["plan"]["steps"] * STEP


def test_the_charged_plan_spends_the_budget_within_one_step():
    """`charged_plan` on random budgets: S steps and m measurements (at 0, every, ... before
    step S) fit in the budget with less than one step left, and no further measurement of
    the schedule would have left room for the steps after it."""
    rng = random.Random(0)
    for _ in range(2000):
        step, measurement, every = rng.randint(1, 50), rng.randint(1, 500), rng.randint(1, 20)
        budget = rng.randint(measurement + step, 5000)
        steps, m = charged_plan(budget, step, measurement, every)
        assert 0 <= budget - steps * step - m * measurement < step
        assert (m - 1) * every < steps and steps >= 1
        assert (budget - (m + 1) * measurement) // step <= m * every  # the next would not fit
    with pytest.raises(ConfigError, match="one measurement counted 90 passes"):
        charged_plan(100, 16, 90, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["max_steps=-1"], "auto_budget=charged plans its steps within max_steps"),
        (["auto_budget=some"], "auto_budget"),
    ],
)
def test_bad_budgets_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, ["estimator=auto", *overrides, f"output_dir={tmp_path}"])
    assert "\n" not in str(err.value)
