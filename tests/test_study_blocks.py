"""The shipped block-diffusion study (`studies/blocks.yaml`) end to end in miniature: every
method trains, is decoded over its own objective and measured; block MIRROR counts two
sequence passes per sequence (its two noised copies), so `standard_matched` trains Standard
at twice the batch, and its compute-matched form counts Standard's; every evaluation
records its decoding speed and the report's cost table shows it."""

from __future__ import annotations

import json

import pytest
import yaml

from stablemdm.cli import main
from stablemdm.study.command import study_path

STEPS, BATCH = 8, 8
MINI = [
    "seeds=[3]",
    "eval_points=[0.5,1.0]",
    "eval_limit=2",
    "variance_draws=3",
    "task_options={mini_sudoku: {n_train: 200, n_test: 2, min_empty: 4, max_empty: 8}}",
    f"train.max_steps={STEPS}",
    f"train.per_device_train_batch_size={BATCH}",
    "train.d_model=32",
    "train.n_layers=1",
    "train.logging_steps=1",
    "train.warmup_steps=0",
    # auto measures two candidates (one P-POTS, so the shipped ppots_method is used), on top
    "train.auto_draws=3",
    "train.auto_batch=2",
    "train.auto_every=4",
    "train.auto_candidates=[standard,ppots_strats_rows]",
    "train.auto_budget=extra",
    "train.ppots_sequences=2",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The shipped blocks study run once in miniature (on one torch thread, as it sets):
    its folder."""
    out = tmp_path_factory.mktemp("blocks") / "study"
    assert main(["study", "--config", "blocks", f"output_dir={out}", *MINI]) == 0
    return out


def _result(out, method: str) -> dict:
    return json.loads((out / "mini_sudoku" / method / "seed-3" / "result.json").read_text())


def test_every_method_of_the_blocks_study_runs_as_its_own_objective(study):
    methods = [
        next(iter(m)) if isinstance(m, dict) else m
        for m in yaml.safe_load(study_path("blocks").read_text())["methods"]
    ]
    assert {"arm", "standard", "standard_matched"} < set(methods)
    for size in (4, 8):
        run = study / "mini_sudoku" / f"block{size}_count" / "seed-3"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert (config["objective"], config["block_size"], config["rate"]) == (
            "block",
            size,
            "count",
        )
    for method in methods:
        result = _result(study, method)
        assert [e["step"] for e in result["evaluations"]] == [STEPS // 2, STEPS]
        noise = result["estimator_noise"]
        assert noise["own"]["grad"] > 0
        # a block run's common checkpoint would be the full-canvas Standard's: not measured
        assert (noise["common"] is None) == (method.startswith("block") or method == "arm")


def test_block_mirror_counts_two_passes_per_sequence_and_standard_matched_matches_it(study):
    """Counted training passes (forward plus backward): one per sequence for a block step
    over [noised | clean], two for MIRROR's [noised | mirror | clean], as its estimator
    charges the noise, and one for its compute-matched form (half the sequences);
    standard_matched trains Standard at twice the batch to match the two-pass form."""
    one_pass = 2 * STEPS * BATCH
    for size in (4, 8):
        assert _result(study, f"block{size}_standard")["compute"]["training"] == one_pass
        assert _result(study, f"block{size}_ppots_mirror")["compute"]["training"] == 2 * one_pass
        matched = _result(study, f"block{size}_ppots_mirror_matched")
        assert matched["compute"]["training"] == one_pass  # two copies of half the sequences
    matched = _result(study, "standard_matched")
    assert (matched["sequences_per_step"], matched["compute"]["training"]) == (
        2 * BATCH,
        2 * one_pass,
    )


def test_each_evaluation_records_its_decoding_speed_and_the_cost_table_shows_it(study):
    for method in ("arm", "standard", "block4_standard", "block8_auto"):
        for point in _result(study, method)["evaluations"]:
            assert point["output_tokens"] > 0 and point["decode_cpu_seconds"] > 0
            assert point["tokens_per_s"] == pytest.approx(
                point["output_tokens"] / point["decode_seconds"]
            )
    cost = json.loads((study / "report.json").read_text())["tasks"]["mini_sudoku"]["cost"]
    final = _result(study, "block4_count")["evaluations"][-1]["tokens_per_s"]
    assert cost["block4_count"]["decode_tokens_per_s"] == pytest.approx(final)
    report = (study / "report.md").read_text()
    assert "| train s | decode tokens/s |" in report
    assert f"| {cost['block4_count']['decode_tokens_per_s']:.0f} |" in report
