"""`stablemdm variance` on block diffusion (issue 25, item 3): one draw's rates are a vector of
block rates; one block spanning the response is the full-canvas split for the same draws; the
split's total is the variance of independent draws; the block per-rate curves integrate to the
nested split; count mode's one-position blocks have no mask or rate noise; the command end to
end on a block config and on a block checkpoint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_block_objective import MASK, _batch, _model
from test_block_runs import _config
from test_variance_hf import DESIGN

from stablemdm.cli import main
from stablemdm.estimators.objective import Objective
from stablemdm.estimators.rates import Clipped, Uniform
from stablemdm.estimators.stratified import Stratified, StratifiedRows
from stablemdm.training.datasets import TensorDataset
from stablemdm.training.run import train
from stablemdm.variance.blocks import block_rate_draws, row_sampler
from stablemdm.variance.decompose import nested_components
from stablemdm.variance.measure import nested_observations, rate_curves

LENGTH = 8
BLOCK = ["objective=block", "block_size=4"]
SIZE = ["task=chain_sum", "task_options={n_train: 40, n_test: 4}", "model_preset=tiny"]
SMALL_MODEL = ["d_model=32", "n_layers=1", "n_heads=2"]


@pytest.fixture(scope="module")
def data() -> TensorDataset:
    """24 prompt-free rows of 8 tokens, the last of some rows padding (lengths 6 to 8)."""
    rows = [_batch(prompts=(0,), responses=(6 + i % 3,), length=LENGTH, seed=i) for i in range(24)]
    return TensorDataset({k: torch.cat([r[k] for r in rows]) for k in rows[0]})


def _observe(objective, data, design=(12, 4, 4), seed=3):
    model, (I, J, K) = _model(), design
    return nested_observations(model, objective, data, torch.arange(I), J, K, seed, "loss")


def test_one_block_spanning_the_response_is_the_full_canvas_split_for_the_same_draws(data):
    """No prompt: the noised half sees what the full-canvas MDM sees, so every observation
    of the nested design, and hence A, B and C, are the full canvas's."""
    block = _observe(Objective(MASK, kind="block", block_size=LENGTH), data)
    full = _observe(Objective(MASK), data)
    torch.testing.assert_close(block, full, rtol=1e-5, atol=1e-6)  # float32 attention
    assert block.std(dim=(1, 2)).min() > 0  # the rates and masks vary


def test_a_row_of_block_rates_is_drawn_as_training_draws_one_sequence():
    assert isinstance(row_sampler(Stratified(Uniform())), Uniform)  # couples sequences
    within = StratifiedRows(Uniform())
    assert row_sampler(within) is within
    objective = Objective(MASK, kind="block", block_size=2, sampler=within)
    t, w = block_rate_draws(objective, LENGTH, 50, torch.Generator().manual_seed(0))
    assert t.shape == w.shape == (50, 4)
    strata = (t * 4).floor().sort(dim=1).values  # one rate per stratum in every row
    assert torch.equal(strata, torch.arange(4.0, dtype=t.dtype).expand(50, 4))


def test_the_split_of_block_rates_adds_up_to_the_variance_of_independent_draws(data):
    """total = A + B + C of the nested design against the plain variance of single draws
    (a fresh sequence, row of block rates and masks each), within their standard errors."""
    objective = Objective(MASK, kind="block", block_size=2, sampler=Clipped(0.2, 0.8))
    split = nested_components(_observe(objective, data, (24, 6, 6)))
    model, generator = _model(), torch.Generator().manual_seed(11)
    picks = torch.randint(len(data), (4000,), generator=generator)
    rows = {k: v[picks] for k, v in data.tensors.items()}
    with torch.no_grad():
        single = objective(model, rows, generator, generator).per_sequence.double()
    direct = single.var().item()
    se_direct = direct * math.sqrt(2 / (len(single) - 1))  # about Gaussian: a loose bound
    assert split.A > 0
    assert abs(split.total - direct) < 3 * math.hypot(split.se_total, se_direct)


def test_block_curves_integrate_to_the_nested_split(data):
    """A and B summed over a sequence's blocks (independent rates and masks), C from its
    summed terms: the curves' integrals agree with the nested design's A, B and C."""
    objective = Objective(MASK, kind="block", block_size=2)
    curves = rate_curves(_model(), objective, data, torch.arange(24), 24, 6, seed=5)
    split = nested_components(_observe(objective, data, (24, 8, 6)))
    assert curves["blocks"] == sum(math.ceil((6 + i % 3) / 2) for i in range(24))
    for name in ("A", "B", "C"):
        se = getattr(split, f"se_{name}")
        assert abs(curves["integrals"][name] - getattr(split, name)) < 4 * se + 0.1 * abs(
            getattr(split, name)
        ), name
    assert len(curves["S"]) == len(curves["b"]) == 24


def test_count_mode_one_position_blocks_have_no_mask_or_rate_noise(data):
    """block_size=1 in count mode masks each one-position block whole, whatever its rate:
    the loss is next-token prediction, so A = B = 0 and only the data noise C is left."""
    objective = Objective(MASK, kind="block", block_size=1, rate="count")
    split = nested_components(_observe(objective, data))
    assert split.C > 0
    assert abs(split.A) < 1e-9 * split.C and abs(split.B) < 1e-9 * split.C
    rate_mode = nested_components(_observe(Objective(MASK, kind="block", block_size=1), data))
    assert rate_mode.A > 0.1 * rate_mode.total  # rate mode's masks do vary


def _report(folder) -> dict:
    return json.loads((folder / "variance.json").read_text())


def test_variance_on_a_block_config_measures_each_block_method(tmp_path):
    methods = "--methods=standard,strats,strats_rows,count,mirror"
    argv = ["variance", *SIZE, *SMALL_MODEL, *BLOCK, *DESIGN, methods, f"--output={tmp_path}"]
    assert main(argv) == 0
    report = _report(tmp_path)
    decomposition = report["decomposition"]
    assert decomposition["strats"] == {"same_as": "standard"}  # couples sequences only
    assert "same_as" not in decomposition["strats_rows"]  # couples one sequence's blocks
    assert decomposition["strats_rows"]["loss"]["B"] != decomposition["standard"]["loss"]["B"]
    assert {row["name"] for row in report["comparison"]["grad"]} == {
        "standard",
        "strats",
        "strats_rows",
        "count",
        "mirror",
    }
    assert report["curves"]["blocks"] > 0 and report["config"]["block_size"] == 4


def test_variance_of_a_block_checkpoint_and_the_arm_refusal(tmp_path, capsys):
    train(_config(tmp_path, "run", "max_steps=2", "save_steps=2"))
    out = tmp_path / "v"
    argv = ["variance", f"--checkpoint={tmp_path / 'run'}", *DESIGN, f"--output={out}"]
    assert main(argv) == 0
    report = _report(out)
    assert (report["config"]["objective"], report["config"]["block_size"]) == ("block", 4)
    assert np.isfinite(report["decomposition"]["standard"]["grad"]["total"])
    assert main(["variance", *SIZE, "objective=arm", f"--output={tmp_path / 'a'}"]) == 2
    assert "set objective=mdm or objective=block" in capsys.readouterr().err
