"""`estimator: auto`: the selection rule, the choice on toys whose best estimator is known, a
switch when the best one changes, unbiased steps, bit-identical choices after a kill and
--resume, the reported cost, the config's one-line errors, and the study method.

Toy for the choice (`ScaledTable`): logits a * T with a fixed table T and one parameter a,
whatever the input, so the gradient of a position's cross-entropy CE_i with respect to a is
a constant u_i = E_softmax[T_i] - T_i[x_i] that depends only on the position's target x_i.
Half the sequences have every target 4, half every target 5.

* Phase A, T[:, 4] = T[:, 5] = 1 (zero elsewhere): every u_i is the same number u, so every
  sequence has the same gradient distribution, E[g | t] = u (no rate noise B, no data noise
  C). Count mode's gradient is the mean of u over the masked positions, u itself: variance 0,
  the known best. Without count mode, compute-matched MIRROR wins. Per rate, one Standard
  draw has variance u^2 (1 - p) / (L p) and the two MIRROR masks have covariance
  u^2 (max(0, 2p - 1) - p^2) / (L p^2); with n sequences against n/2 MIRROR pairs the ratio of
  the minibatch variances is int (1 - p) / p dt / (that + int (max(0, 2p - 1) - p^2) / p^2 dt)
  = 1.0118 / 0.4947 = 2.045 at eps = 0.2 (scipy.integrate.quad).
* Phase B, T[:, 4] = 2, T[:, 5] = -2: the two kinds of sequences have u of opposite signs
  (about -1.2 and 2.8), so the data noise C dominates; MIRROR at equal compute sees half the
  sequences, doubles C / n and loses (about twice Standard's variance).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from transformers import TrainerCallback

from stablemdm.cli import main
from stablemdm.data.tokenizer import CharTokenizer
from stablemdm.errors import ConfigError
from stablemdm.estimators.selection import MARGIN, choose, paired_difference
from stablemdm.models import ModelConfig, Transformer
from stablemdm.rng import seeded_generator
from stablemdm.study.spec import StudySpec, _methods
from stablemdm.training import auto as auto_module
from stablemdm.training.auto import (
    AutoEstimator,
    candidate_config,
    candidate_names,
    measurement_interval,
)
from stablemdm.training.build import build_objective, build_sampler
from stablemdm.training.checkpoints import missing_files
from stablemdm.training.config import StableMDMConfig
from stablemdm.training.datasets import TensorDataset
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

MASK, V, PROMPT, L = 1, 12, 2, 8
TOKENIZER = SimpleNamespace(mask_token_id=MASK)  # all build_objective reads without ISAD


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one torch thread is fastest and bitwise reproducible."""


class ScaledTable(torch.nn.Module):
    """Logits `[B, L, V]` = a * table, ignoring the input (see the module docstring)."""

    def __init__(self, column4: float, column5: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("table", torch.zeros(PROMPT + L, V))
        self.set_phase(column4, column5)

    def set_phase(self, column4: float, column5: float) -> None:
        self.table[:, 4], self.table[:, 5] = column4, column5

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return (self.a * self.table).expand(input_ids.shape[0], -1, -1)


def two_kinds(n: int) -> TensorDataset:
    """n sequences: a 2-token prompt, then 8 eligible targets, all 4 (even rows) or all 5."""
    x0 = torch.full((n, PROMPT + L), 4)
    x0[1::2, PROMPT:] = 5
    x0[:, :PROMPT] = 3
    eligible = (torch.arange(PROMPT + L) >= PROMPT).expand(n, -1).clone()
    return TensorDataset(
        {"input_ids": x0, "attention_mask": torch.ones_like(eligible), "eligible": eligible}
    )


def _auto(tmp_path: Path, model: torch.nn.Module, candidates: str, *extra: str) -> AutoEstimator:
    config = load_config(
        None,
        [
            "estimator=auto",
            f"auto_candidates=[{candidates}]",
            "eps=0.2",
            f"output_dir={tmp_path / 'unused'}",
            *extra,
        ],
    )
    return AutoEstimator(config, model, TOKENIZER, two_kinds(64))


# --- the selection rule ------------------------------------------------------------------------


def _gaussian(scale: float, R: int, g: torch.Generator, common: torch.Tensor | None = None):
    """R draws `[R, 3]` of N(0, scale^2 I), plus `common` (shared noise) when given."""
    draws = torch.randn(R, 3, generator=g, dtype=torch.float64) * scale
    return draws if common is None else draws + common


def test_paired_difference_se_matches_its_spread_with_shared_and_independent_draws():
    """Over 400 replicates the SD of V_a - V_b matches the mean jackknife SE within 15%,
    whether a and b share part of their noise (common data) or not; and its mean is the
    true difference of traces (3 dimensions x (4 - 1) = 9) within 5 SE."""
    g = torch.Generator().manual_seed(0)
    for shared in (False, True):
        diffs, ses = [], []
        for _ in range(400):
            if shared:  # a = own noise (variance 3) + common (1); b = the common part
                common = _gaussian(1.0, 40, g)
                a, b = _gaussian(math.sqrt(3.0), 40, g, common), common
            else:
                a, b = _gaussian(2.0, 40, g), _gaussian(1.0, 40, g)
            d, se = paired_difference(a, 1, b, 1)
            diffs.append(d)
            ses.append(se)
        diffs = np.array(diffs)
        assert abs(diffs.std() / np.mean(ses) - 1.0) < 0.15, shared
        assert abs(diffs.mean() - 9.0) < 5 * diffs.std() / math.sqrt(len(diffs)), shared


def test_choose_switches_beyond_the_margin_and_keeps_the_incumbent_within_it():
    g = torch.Generator().manual_seed(1)
    clear = {
        "standard": (_gaussian(2.0, 200, g), 1),
        "better": (_gaussian(1.0, 200, g), 1),
        "worse": (_gaussian(3.0, 200, g), 1),
    }
    first = choose(clear, None)  # the first measurement: the lowest, compared with Standard
    assert first.name == "better" and not first.switched and first.reason.startswith("the lowest")
    assert first.difference > MARGIN * first.difference_se
    choice = choose(clear, "standard")
    assert choice.switched and choice.name == "better" and choice.best == "better"
    assert choice.difference > MARGIN * choice.difference_se
    # the same noise, priced at twice the forward passes: no longer better at equal compute
    priced = {**clear, "better": (clear["better"][0], 8)}
    assert choose(priced, "standard").name == "standard"
    tied = {"standard": (_gaussian(1.0, 30, g), 1), "same": (_gaussian(1.0, 30, g), 1)}
    kept = choose(tied, "standard")
    assert kept.name == "standard" and not kept.switched
    gone = choose({"better": clear["better"], "worse": clear["worse"]}, "standard")
    assert gone.name == "better" and "could not be measured" in gone.reason


# --- the choice on the toy -------------------------------------------------------------------


def test_auto_picks_the_known_best_estimator(tmp_path):
    """Phase A: count mode (variance 0) among three; compute-matched MIRROR among Standard and
    MIRROR, with the measured ratio to Standard within 5 SE of the closed form 2.045 (module
    docstring). The table shows every candidate at the same forward passes."""
    model = ScaledTable(1.0, 1.0)
    auto = _auto(tmp_path, model, "standard, mirror, count", "auto_draws=200", "auto_batch=8")
    record = auto.measure(0)
    assert record["choice"] == auto.choice == "count" and record["incumbent"] is None
    rows = {row["name"]: row for row in record["table"]}
    assert rows["count"]["variance"] < 1e-9 * rows["standard"]["variance"]  # 0 up to rounding
    assert {row["forward_passes"] for row in record["table"]} == {8}
    assert abs(rows["mirror"]["ratio_to_reference"] - 2.045) < 5 * rows["mirror"]["ratio_se"]
    auto = _auto(tmp_path, model, "standard, mirror", "auto_draws=200", "auto_batch=8")
    assert auto.measure(0)["choice"] == "mirror"
    assert auto.objective.compute_matched and auto.objective.masking == "mirror"


def test_auto_switches_when_the_best_estimator_changes_mid_run(tmp_path):
    """MIRROR while the sequences look alike, Standard once data noise dominates."""
    model = ScaledTable(1.0, 1.0)
    auto = _auto(tmp_path, model, "standard, mirror", "auto_draws=200", "auto_batch=8")
    assert auto.measure(0)["choice"] == "mirror"
    model.set_phase(2.0, -2.0)  # training moved the model: phase B
    record = auto.measure(10)
    assert record["choice"] == "standard" and record["switched"]
    assert record["incumbent"] == "mirror"
    assert [h["choice"] for h in auto.history] == ["mirror", "standard"]
    assert auto.objective.masking == "iid"


# --- unbiased steps ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact_toy():
    """test_objective's toy: a random tiny transformer, two sequences of 5 eligible tokens, and
    the exact rate-mode objective at eps = 0.01 (every mask pattern enumerated)."""
    from test_objective import exact_rate_objective

    cfg = ModelConfig(
        vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, mask_token_id=MASK
    )
    model = Transformer(cfg, generator=torch.Generator().manual_seed(0)).eval()
    x0 = torch.randint(4, V, (2, 8), generator=torch.Generator().manual_seed(1))
    eligible = torch.zeros(2, 8, dtype=torch.bool)
    eligible[:, 3:] = True
    batch = {"input_ids": x0, "eligible": eligible, "attention_mask": torch.ones_like(eligible)}
    return model, batch, exact_rate_objective(model, batch, 0.01)


def _steps(auto: AutoEstimator, batch: dict, steps: int, own_draws: bool) -> tuple[list, list]:
    """Per step: the auto choice (measured every 4 steps from its own generators), then the
    step's loss drawn as the trainer draws it. `own_draws` instead picks, per step, the
    candidate whose loss on the step's own draws is lowest: the selection that must not be
    made."""
    big = {k: v.repeat(32, 1) for k, v in batch.items()}  # 64 sequences per step
    losses, choices = [], []

    def step_loss(objective, s: int) -> float:
        rate, mask = seeded_generator(0, "rate", s), seeded_generator(0, "mask", s, 0, 0)
        with torch.no_grad():
            return objective(auto.model, big, rate, mask).loss.item()

    for s in range(steps):
        if own_draws:
            step = {name: step_loss(o, s) for name, o in auto.objectives.items()}
            choices.append(min(step, key=step.get))
            losses.append(step[choices[-1]])
            continue
        choices.append(auto.measure(s)["choice"] if s % 4 == 0 else auto.choice)
        losses.append(step_loss(auto.objective, s))
    return losses, choices


def test_auto_steps_are_unbiased_and_a_choice_from_the_steps_own_draws_is_not(
    tmp_path, exact_toy, monkeypatch
):
    """Each step trains with one unbiased estimator chosen before it from independent draws,
    so the mean step loss is within 5 SE of the exact objective even when the choice changes
    (margin 0 and three draws per measurement: a noisy, changing choice).
    Picking by the step's own lowest loss is biased low, far beyond 5 SE."""
    model, batch, exact = exact_toy
    monkeypatch.setattr(auto_module, "MARGIN", 0.0)
    config = load_config(
        None,
        [
            "estimator=auto",
            "auto_candidates=[standard, mirror, syrm]",
            "auto_draws=3",
            "auto_batch=2",
            "eps=0.01",
            f"output_dir={tmp_path}",
        ],
    )
    data = TensorDataset({k: v.repeat(4, 1) for k, v in batch.items()})
    auto = AutoEstimator(config, model, TOKENIZER, data)
    losses, choices = _steps(auto, batch, 160, own_draws=False)
    assert len(set(choices)) == 3  # the choice really moves
    se = np.std(losses, ddof=1) / math.sqrt(len(losses))
    assert abs(np.mean(losses) - exact) < 5 * se, (np.mean(losses), exact, se)
    losses, _ = _steps(auto, batch, 160, own_draws=True)
    se = np.std(losses, ddof=1) / math.sqrt(len(losses))
    assert exact - np.mean(losses) > 5 * se


def test_candidates_are_what_the_model_and_task_allow(tmp_path):
    """A model that conditions on t has no count mode; ISAD needs a token the tokenizer has
    (chain_sum's "-"); a listed candidate the model cannot train is a one-line error."""
    seen = ScaledTable(1.0, 1.0)
    seen.conditions_on_t = True
    config = load_config(None, ["estimator=auto", "task=mini_sudoku", f"output_dir={tmp_path}"])
    names, notes = candidate_names(config, seen, TOKENIZER)
    assert not any(n.startswith("count") for n in names) and "isad" not in names
    assert "standard" in names and len(notes) == 2
    chain = load_config(None, ["estimator=auto", f"output_dir={tmp_path}"])
    assert "isad" in candidate_names(chain, ScaledTable(1.0, 1.0), CharTokenizer())[0]
    listed = load_config(
        None, ["estimator=auto", "auto_candidates=[count]", f"output_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="conditions on t"):
        candidate_names(listed, seen, TOKENIZER)


def test_every_candidate_is_built_as_its_method_at_equal_compute(tmp_path):
    """What auto trains with is the method table's estimator, MIRROR compute-matched."""
    config = load_config(None, ["estimator=auto", f"output_dir={tmp_path}"])
    for name, rate, masking in (("count_ppots_mirror", "count", "mirror"), ("syrm", "t", "iid")):
        view = candidate_config(config, name, [])
        assert (view.rate, view.masking, view.estimator) == (rate, masking, "fixed")
        assert view.compute_matched == (masking == "mirror")
    assert config.masking == "iid" and config.estimator == "auto"  # the run's config untouched
    objective = build_objective(view, TOKENIZER, build_sampler(view))
    assert type(objective.sampler).__name__ == "Mirrored"


# --- a training run: kill and resume, the cost, the CLI ------------------------------------------

SMALL = [
    "task=chain_sum",
    "task_options={n_train: 200, n_test: 10}",
    "d_model=32",
    "n_layers=1",
    "per_device_train_batch_size=8",
    "logging_steps=1",
    "disable_tqdm=true",
    "warmup_steps=2",
    "eval_strategy=no",
    "estimator=auto",
    "auto_every=2",
    "auto_draws=3",
    "auto_batch=4",
    "ppots_sequences=3",
    "ppots_counts=4",
    "max_steps=6",
    "save_steps=3",
    "auto_budget=extra",  # measurements on top: these tests are about the choice (see test_compute)
]


class _Kill(TrainerCallback):
    """Stops the process (an exception out of train) after step `at`, once every callback of
    that step's end (auto's measurement among them) has run: before the next step begins.
    Extra callbacks run before the trainer's own, so `on_step_end` would kill it too early."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


def _choices(folder: Path) -> list[dict]:
    """auto.json's history without the timings."""
    history = json.loads((folder / "auto.json").read_text())["history"]
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in history]


def test_choices_are_bit_identical_after_a_kill_and_resume(tmp_path, monkeypatch):
    """Killed after step 6 (its measurement made, checkpoint-5 the latest), resumed: the
    measurement at step 6 is made again from checkpoint-5 and every table, choice, loss and
    weight equals the uninterrupted run's. Margin 0 makes the choice move between
    measurements, so switching, the EMA state and the P-POTS refits are exercised."""
    monkeypatch.setattr(auto_module, "MARGIN", 0.0)
    few = [
        *SMALL,
        "auto_candidates=[standard, ppots, ema, syrm, count_ppots_mirror]",
        "max_steps=8",
        "save_steps=5",
    ]
    train(load_config(None, [*few, f"output_dir={tmp_path / 'full'}"]))
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, [*few, f"output_dir={tmp_path / 'cut'}"]), callbacks=[_Kill(6)])
    assert [h["step"] for h in _choices(tmp_path / "cut")] == [0, 2, 4, 6]
    assert [h["step"] for h in _choices(tmp_path / "cut" / "checkpoint-5")] == [0, 2, 4]
    train(load_config(None, [*few, f"output_dir={tmp_path / 'cut'}"]), resume=True)
    a, b = _choices(tmp_path / "full"), _choices(tmp_path / "cut")
    assert a == b and [h["step"] for h in a] == [0, 2, 4, 6]
    assert len({h["choice"] for h in a}) > 1, a  # it did switch
    records = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("full", "cut")
    ]
    losses = [{r["step"]: (r["loss"], r["estimator"]) for r in rs if "loss" in r} for rs in records]
    assert losses[0] == losses[1]
    x = Transformer.from_pretrained(tmp_path / "full").state_dict()
    y = Transformer.from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_checkpoint_of_an_auto_run_needs_its_auto_json_and_shared_density(tmp_path):
    """--resume refuses an auto checkpoint without auto.json (the choice and its history), or
    without ppots.json when a P-POTS candidate is among its candidates."""
    for candidates, needs_density in (([], True), (["standard", "count"], False)):
        folder = tmp_path / f"checkpoint-{len(candidates)}"
        folder.mkdir()
        saved = {"estimator": "auto", "auto_candidates": candidates}
        (folder / "config.yaml").write_text(yaml.safe_dump(saved))
        missing = missing_files(folder)
        assert "auto.json" in missing and ("ppots.json" in missing) == needs_density


def test_cli_run_prints_the_table_the_choice_and_the_cost(tmp_path, capsys):
    """`stablemdm train ... estimator=auto` end to end: the table and choice on the console,
    the cost in seconds and % of the training time, auto.json with the history and cost, the
    estimator on every metrics line and a record per measurement."""
    out = tmp_path / "run"
    assert main(["train", *SMALL, f"output_dir={out}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("ratio to standard" in line for line in lines)
    assert any(line.startswith(("auto: keeps", "auto: trains with")) for line in lines)
    assert any(
        line.startswith("auto: 3 measurement(s) took") and "% of the training time" in line
        for line in lines
    )
    state = json.loads((out / "auto.json").read_text())
    assert [h["step"] for h in state["history"]] == [0, 2, 4]
    assert state["cost"]["measure_seconds"] > 0 and state["cost"]["train_seconds"] > 0
    assert len(state["candidates"]) == 15  # every unbiased method (ISAD: chain_sum's "-")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["estimator"] in state["candidates"] for r in records)
    measured = [r for r in records if "auto/seconds" in r]
    assert [r["step"] for r in measured] == [0, 2, 4]
    assert all(r["auto/choice"] in state["candidates"] for r in measured)
    assert (out / "checkpoint-6" / "auto.json").is_file() and (out / "ppots.json").is_file()


# --- configuration and the study -----------------------------------------------------------------


def test_the_default_interval_keeps_measurements_to_their_budget(tmp_path):
    """auto_every=0: 15 candidates x 12 minibatches x 32 sequences = 5,760 sequences measured
    against 2% of the 64 trained per step: every 4,500 steps; a set auto_every is kept."""
    demo = ["per_device_train_batch_size=64", f"output_dir={tmp_path}"]
    config = load_config(None, ["estimator=auto", *demo])
    assert config.auto_every == 0 and measurement_interval(config, 15) == 4500
    assert measurement_interval(load_config(None, [*SMALL, f"output_dir={tmp_path}"]), 15) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["estimator=auto", "auto_candidates=[clipped]"], "clipped is biased"),
        (["estimator=auto", "auto_candidates=[count, cont]"], "unknown method 'cont'"),
        (["estimator=auto", "auto_batch=5"], "auto_batch must be even"),
        (["estimator=auto", "auto_draws=2"], "auto_draws must be >= 3"),
        (["estimator=auto", "auto_every=-1"], "auto_every must be >= 0"),
        (["estimator=auto", "task=mini_sudoku", "auto_candidates=[isad]"], "isad needs"),
    ],
)
def test_bad_auto_settings_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [*overrides, f"output_dir={tmp_path}"])
    assert "\n" not in str(err.value)


def test_an_arm_ignores_estimator_auto_with_a_note(tmp_path, capsys):
    """From a recipe or the command line, objective=arm drops estimator=auto (an ARM draws no
    rates or masks) and says so; built directly in Python the combination is refused."""
    config = load_config(None, ["estimator=auto", "objective=arm", f"output_dir={tmp_path}"])
    assert config.estimator == "fixed"
    assert "estimator" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="objective=arm draws no rates"):
        StableMDMConfig(output_dir=str(tmp_path), objective="arm", estimator="auto")


def test_auto_is_a_study_method_of_every_shipped_study(tmp_path):
    shipped = Path(__file__).parents[1] / "src" / "stablemdm" / "studies"
    for path in sorted(shipped.glob("*.yaml")):
        methods = _methods(yaml.safe_load(path.read_text())["methods"], path.name)
        assert any(m.get("estimator") == "auto" for m in methods.values()), path.name
    spec = StudySpec(
        name="t",
        output_dir=str(tmp_path),
        tasks=["chain_sum"],
        seeds=[1],
        methods=_methods(["standard", "auto"], "test"),
        train={"max_steps": 4},
    )
    config = spec.run_config("chain_sum", "auto", 1)
    assert config.estimator == "auto" and config.sampler == "uniform"
    assert spec.run_config("chain_sum", "standard", 1).estimator == "fixed"
