"""The multi-seed study: statistics on known inputs, validation before training, and a
miniature study end to end (report structure, resume that skips finished runs)."""

import json
import shutil

import numpy as np
import pytest
from scipy import stats as scipy_stats

from stablemdm.cli import main
from stablemdm.config import ConfigError
from stablemdm.study.command import study_path
from stablemdm.study.spec import load_study
from stablemdm.study.stats import paired_difference, summary, worst_above_best

MINI = [
    "output_dir={out}",
    "seeds=[3,4]",
    "methods=[standard,count_ppots_mirror_matched]",
    "eval_points=[0.5,1.0]",
    "eval_limit=4",
    "variance_draws=3",
    "task_options={{chain_sum: {{n_train: 200, n_test: 8}}}}",
    "train.max_steps=4",
    "train.per_device_train_batch_size=8",
    "train.d_model=32",
    "train.n_layers=1",
    "train.logging_steps=1",
    "train.ppots_sequences=3",
    "train.ppots_rates=4",
    "train.ppots_masks=2",
]


def test_summary_and_paired_difference_on_known_values():
    method = {1: 0.50, 2: 0.60, 3: 0.70}
    baseline = {1: 0.40, 2: 0.45, 3: 0.65, 9: 0.99}  # seed 9 has no pair: ignored
    assert summary(method) == pytest.approx(
        {"mean": 0.6, "std": np.std([0.5, 0.6, 0.7], ddof=1), "min": 0.5, "max": 0.7}
    )
    d = np.array([0.10, 0.15, 0.05])
    half = scipy_stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    out = paired_difference(method, baseline)
    assert out["n"] == 3 and out["mean"] == pytest.approx(0.1)
    assert (out["low"], out["high"]) == pytest.approx((0.1 - half, 0.1 + half))
    assert paired_difference({1: 0.5}, {1: 0.25}) == {
        "n": 1,
        "mean": 0.25,
        "low": None,
        "high": None,
    }
    assert summary({1: 0.3})["std"] is None
    assert worst_above_best({1: 0.7, 2: 0.8}, {1: 0.6, 2: 0.69})
    assert not worst_above_best({1: 0.7, 2: 0.8}, {1: 0.6, 2: 0.7})
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({1: 0.5}, {2: 0.5})


@pytest.mark.parametrize(
    "override,message",
    [
        ("seeds=[1,1]", "duplicate seeds"),
        ("methods=[standard,nope]", "unknown method 'nope'"),
        ("tasks=[nope]", "unknown task"),
        ("eval_points=[0,1]", "eval_points"),
        ("train.seed=3", "sets per run"),
        ("train.masking=bogus", "masking must be one of"),
        ("colour=red", "unknown study field"),
    ],
)
def test_bad_study_files_fail_before_training(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_study(study_path("demo"), [f"output_dir={tmp_path}", override])
    assert not any(tmp_path.iterdir())


def test_every_shipped_study_validates(tmp_path):
    for name in ("demo", "cpu", "screen", "gpu"):
        spec = load_study(study_path(name), [f"output_dir={tmp_path / name}"])
        assert len(spec.seeds) >= 3 and spec.methods


def test_a_base_of_another_architecture_is_refused(tmp_path):
    base = tmp_path / "chain_sum" / "base-mdm"
    base.mkdir(parents=True)
    (base / "config.yaml").write_text("model_preset: small\n")
    with pytest.raises(ConfigError, match="different architecture"):
        load_study(study_path("demo"), [f"output_dir={tmp_path}", "base={max_steps: 2}"])


def test_a_miniature_study_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "--config", "demo", *(o.format(out=out) for o in MINI)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| standard | " in printed and "vs Standard (95% CI)" in printed
    report = json.loads((out / "report.json").read_text())
    task = report["tasks"]["chain_sum"]
    assert task["steps"] == [2, 4]
    assert set(task["table"]) == {"standard", "count_ppots_mirror_matched"}
    row = task["table"]["count_ppots_mirror_matched"]
    assert set(row["per_seed"]) == {"3", "4"} and {"mean", "std", "min", "max"} <= set(row)
    assert task["paired_to_standard"]["count_ppots_mirror_matched"]["n"] == 2
    assert set(task["accuracy_by_step"]) == {"2", "4"}
    for name in ("report.md", "chain_sum-seeds.png", "chain_sum-tokens.png", "chain_sum-loss.png"):
        assert (out / name).is_file()
    run = out / "chain_sum" / "standard" / "seed-3"
    assert {"eval-2.jsonl", "eval-4.jsonl", "result.json"} <= {p.name for p in run.iterdir()}

    kept = (out / "chain_sum" / "standard" / "seed-4" / "result.json").read_text()
    shutil.rmtree(run)  # lose one run: only it is trained again
    assert main(args) == 0
    log = capsys.readouterr().err
    assert log.count("done already") == 3 and "standard/seed-3: accuracy" in log
    assert (out / "chain_sum" / "standard" / "seed-4" / "result.json").read_text() == kept
    assert json.loads((out / "report.json").read_text())["tasks"]["chain_sum"]["table"]
