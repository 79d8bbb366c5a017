"""The multi-seed study: statistics on known inputs, validation before training, and a
miniature study end to end (report structure; resume that skips finished runs, continues a
killed one from its checkpoint, restarts one without a checkpoint, and loses nothing)."""

import io
import json
import math
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from stablemdm.cli import main
from stablemdm.errors import ConfigError
from stablemdm.study import noise, runner
from stablemdm.study.command import study_path
from stablemdm.study.progress import StudyProgress
from stablemdm.study.report import build_report, markdown
from stablemdm.study.spec import load_study
from stablemdm.study.stats import paired_difference, summary, worst_above_best
from stablemdm.tasks.registry import get_task
from stablemdm.training.build import build_model, build_sampler
from stablemdm.training.checkpoints import SAMPLER_STATE
from stablemdm.training.datasets import encode_split, resolve_canvas
from stablemdm.training.saved import load_checkpoint

MINI = [
    "tasks=[chain_sum]",
    "seeds=[3,4]",
    "methods=[standard,count_ppots_mirror_matched]",
    "eval_points=[0.5,1.0]",
    "eval_limit=4",
    "variance_draws=3",
    "task_options={chain_sum: {n_train: 200, n_test: 8}}",
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
    assert summary(method) == pytest.approx({"mean": 0.6, "std": 0.1, "min": 0.5, "max": 0.7})
    out = paired_difference(method, baseline)  # differences 0.10, 0.15, 0.05
    assert out["n"] == 3 and out["mean"] == pytest.approx(0.1)
    reference = scipy_stats.ttest_rel([0.5, 0.6, 0.7], [0.4, 0.45, 0.65]).confidence_interval()
    assert (out["low"], out["high"]) == pytest.approx((reference.low, reference.high))
    # by hand: differences 1, 2, 3 have sd 1; t(0.975, df 2) = 4.3027; half = 4.3027 / sqrt(3)
    by_hand = paired_difference({1: 3.0, 2: 5.0, 3: 7.0}, {1: 2.0, 2: 3.0, 3: 4.0})
    assert (by_hand["low"], by_hand["high"]) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-4)
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


def test_the_t_interval_covers_the_true_difference_at_its_level():
    """Monte Carlo: paired Gaussian differences (mean 0.02, sd 0.05, 3 seeds); the 95%
    interval must cover 0.02 in 95% of 4,000 studies, within 4 binomial standard errors."""
    rng = np.random.default_rng(0)
    trials, hits = 4000, 0
    for _ in range(trials):
        d = rng.normal(0.02, 0.05, size=3)
        out = paired_difference(dict(enumerate(d)), dict.fromkeys(range(3), 0.0))
        hits += out["low"] <= 0.02 <= out["high"]
    assert abs(hits / trials - 0.95) < 4 * np.sqrt(0.95 * 0.05 / trials)


@pytest.mark.parametrize(
    "override,message",
    [
        ("seeds=[1,1]", "duplicate seeds"),
        ("seeds=3", "seeds must be a list of integers"),
        ("methods=[standard,nope]", "unknown method 'nope'"),
        ("methods=[a/b]", "folder name"),
        ("tasks=[nope]", "unknown task"),
        ("tasks=chain_sum", "tasks must be a list"),
        ("task_options={chain_sums: {n_train: 10}}", "which is not a task"),
        ("task_options={mini_sudoku: {colour: 1}}", "has no option"),
        ("eval_points=[0,1]", "eval_points"),
        ("eval_points=[0.5,1.5]", "eval_points"),
        ("eval_limit=abc", "eval_limit must be an integer"),
        ("variance_draws=1", "variance_draws"),
        ("variance_draws=2", "variance_draws"),
        ("train.seed=3", "sets per run"),
        ("train.save_steps=3", "sets per run"),
        ("train.sampler=ppots", "which each method sets"),
        ("train.max_steps=0", "max_steps must be a positive"),
        ("train.max_steps=abc", "max_steps must be a positive"),
        ("train.learning_rate=fast", "wrong type"),
        ("train.masking=bogus", "which each method sets"),
        ("methods={mine: {masking: bogus}}", "masking must be one of"),
        ("seeds=[1,-1]", "seeds must be integers in \\[0, 2\\*\\*32\\), got \\[-1\\]"),
        ("methods={standard: {sampler: ppots}}", "changes what 'standard' means"),
        ("methods={ppots_mirror: {masking: iid}}", "changes what 'ppots_mirror' means"),
        ("methods={arm: {objective: mdm}}", "changes what 'arm' means"),
        ("methods=[standard, [x]]", "neither a method name nor one"),
        ("methods=[standard, {a: {}, b: {}}]", "neither a method name nor one"),
        ("methods=[standard, {standard: {}}]", "'standard' is given twice"),
        ("base={max_steps: 2, output_dir: x}", "base sets"),
        ("colour=red", "unknown study field"),
    ],
)
def test_bad_study_files_fail_before_training(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_study(study_path("demo"), [f"output_dir={tmp_path}", override])
    assert not any(tmp_path.iterdir())


def test_a_method_list_may_define_methods_and_table_names_keep_their_meaning(tmp_path):
    """`[name, {name: overrides}]` defines methods inline; a table method may be tuned (mix)
    or restated, never turned into another estimator."""
    spec = load_study(
        study_path("demo"),
        [f"output_dir={tmp_path}", "methods=[standard, {ppots_wide: {sampler: ppots, mix: 0.3}}]"],
    )
    assert spec.methods == {"standard": {}, "ppots_wide": {"sampler": "ppots", "mix": 0.3}}
    tuned = ["methods={ppots: {mix: 0.3}, standard: {sampler: uniform, scheme: iid}}"]
    spec = load_study(study_path("demo"), [f"output_dir={tmp_path}", *tuned])
    assert spec.run_config("chain_sum", "ppots", 1).mix == 0.3
    assert spec.run_config("chain_sum", "standard", 1).sampler == "uniform"


def test_the_demo_verb_runs_the_demo_study_and_reports_errors_in_one_line(tmp_path, capsys):
    assert main(["demo", f"output_dir={tmp_path}", "seeds=[1,1]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "demo.yaml" in err and "duplicate seeds [1]" in err


def test_every_shipped_study_validates(tmp_path):
    small = {"cpu": ["task_options.mini_sudoku.n_train=200"]}  # generating 20,000 takes long
    for name in ("demo", "cpu", "screen", "gpu"):
        spec = load_study(study_path(name), [f"output_dir={tmp_path / name}", *small.get(name, [])])
        assert len(spec.seeds) >= 3 and spec.methods and spec.eval_steps()[-1] == spec.max_steps()
    cpu = load_study(study_path("cpu"), [f"output_dir={tmp_path}", *small["cpu"]])
    assert len(cpu.seeds) >= 5 and len(cpu.tasks) >= 2
    assert {"arm", "standard", "clipped", "count", "ppots_mirror"} <= set(cpu.methods)
    one = load_study(study_path("cpu"), [f"output_dir={tmp_path}", "tasks=[chain_sum]"])
    assert one.tasks == ["chain_sum"]  # the file's mini_sudoku options wait unused


def test_progress_prints_one_line_per_run_with_and_without_bars():
    for live in (False, True):
        stream = io.StringIO()
        with StudyProgress("s", 2, live=live, stream=stream) as progress:
            watch = progress.start_run("t/standard/seed-1", 10)
            watch.on_step_end(None, SimpleNamespace(global_step=5), None)
            progress.phase("decoding step 10")
            result = {"accuracy": 0.25, "evaluations": [{"accuracy": 0.25}], "train_seconds": 3}
            progress.finish_run("t/standard/seed-1", result)
            progress.finish_run("t/standard/seed-2", None)
        lines = stream.getvalue().splitlines()
        assert lines[0].startswith("[1/2] t/standard/seed-1: accuracy 25.0%")
        assert lines[1] == "[2/2] t/standard/seed-2: done already"
        assert len(lines) == 2 or live  # rich draws the bars' last state below the lines


CLOCKED = ("decode_seconds", "decode_cpu_seconds", "tokens_per_s")  # an evaluation's timing


def _without_time(result: dict) -> dict:
    """A result.json without what the clock decides: training time, each decoding's speed."""
    kept = {k: v for k, v in result.items() if k != "train_seconds"}
    evaluations = [{k: v for k, v in e.items() if k not in CLOCKED} for e in kept["evaluations"]]
    return {**kept, "evaluations": evaluations}


@pytest.mark.filterwarnings("ignore:P-POTS")  # a 3 x 4 x 2 fit design is too small to help
def test_a_miniature_study_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "--config", "demo", f"output_dir={out}", *MINI]
    assert main(args) == 0
    printed, log = capsys.readouterr()
    assert "| standard | " in printed and "vs Standard (95% CI)" in printed
    assert "'loss'" not in printed  # the trainer's log lines went to each run's train.log
    lines = log.strip().splitlines()
    assert len([x for x in lines if re.match(r"\[\d/4\] chain_sum/\S+/seed-\d: accuracy", x)]) == 4

    report = json.loads((out / "report.json").read_text())
    task = report["tasks"]["chain_sum"]
    assert task["steps"] == [2, 4] and set(task["by_step"]) == {"2", "4"}
    for point in task["by_step"].values():
        assert list(point["table"]) == ["standard", "count_ppots_mirror_matched"]
        row = point["table"]["count_ppots_mirror_matched"]
        assert set(row["per_seed"]) == {"3", "4"} and {"mean", "std", "min", "max"} <= set(row)
        assert point["paired_to_standard"]["count_ppots_mirror_matched"]["n"] == 2
        assert set(point["claims"]["count_ppots_mirror_matched"]) == {"worst_above_best_standard"}
    cost = task["cost"]["count_ppots_mirror_matched"]
    counted, standard = cost["compute"], task["cost"]["standard"]["compute"]
    # 4 steps of 8 sequences (4 MIRROR pairs), forward and backward; its P-POTS fit on top
    assert counted["training"] == standard["total"] == 4 * 8 * 2 and standard["overhead"] == 0
    assert counted["overhead"] > 0 and counted["x_standard"] > 1.05
    assert not counted["at_standard_compute"] and standard["at_standard_compute"]
    measured = cost["estimator_noise"]
    assert measured["own"]["grad"] > 0 and measured["common"]["grad"] > 0
    equivalent = measured["batch_equivalent"]
    assert equivalent["se"] > 0 and equivalent["seeds"] == [3, 4]
    assert task["cost"]["standard"]["estimator_noise"]["batch_equivalent"]["value"] == 1.0
    assert "| method | 3 | 4 | mean | std | min | max |" in printed.splitlines()
    for name in ("report.md", "chain_sum-seeds.png", "chain_sum-tokens.png", "chain_sum-loss.png"):
        assert (out / name).is_file()
    runs = {(m, s): out / "chain_sum" / m / f"seed-{s}" for m in task["cost"] for s in (3, 4)}
    for folder in runs.values():
        assert {"config.yaml", "metrics.jsonl", "eval-2.jsonl", "eval-4.jsonl", "result.json"} <= {
            p.name for p in folder.iterdir()
        }
    before = {k: json.loads((f / "result.json").read_text()) for k, f in runs.items()}

    deleted, restarted = runs["standard", 3], runs["standard", 4]
    killed, kept = runs["count_ppots_mirror_matched", 3], runs["count_ppots_mirror_matched", 4]
    shutil.rmtree(deleted)  # a run deleted
    for path in [*restarted.glob("checkpoint-*"), restarted / "result.json"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()  # died before its checkpoint
    for path in [killed / "checkpoint-4", *killed.glob("*.safetensors"), killed / "result.json"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()  # killed after checkpoint-2
    kept_text = (kept / "result.json").read_text()
    assert main(args) == 0
    log = capsys.readouterr().err
    assert log.count("done already") == 1 and "count_ppots_mirror_matched/seed-4: done" in log
    assert (kept / "result.json").read_text() == kept_text
    for key, folder in runs.items():  # same machine, same seed: the same run again
        after = json.loads((folder / "result.json").read_text())
        assert _without_time(after) == _without_time(before[key])
    logged = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged.count(3) == 1 and logged.count(2) == 1  # each step logged once
    assert "written after the checkpoint of step 2" in log  # continued from step 2, not restarted
    logged = [json.loads(x)["step"] for x in (restarted / "metrics.jsonl").read_text().splitlines()]
    assert logged.count(3) == 1

    for change, field in (("train.learning_rate=0.01", "learning_rate"), ("eval_points=[1]", "")):
        with pytest.raises(ConfigError, match=f"was run with other settings .{field or 'eval'}"):
            load_study(study_path("demo"), [*args[3:], change])


def test_a_bigger_batch_is_no_better_estimator_in_the_study_report(tmp_path, one_thread):
    """The estimator noise is the gradient's variance per sequence forward pass: on Standard's
    final model, Standard at batch 16 has batch equivalent 1 (on main its loss variance at its
    own batch was half Standard's), the per-sequence figure at batch 8 and 16 agree within
    their SE while the minibatch variance halves, and the report's columns say so. eps = 0.1
    keeps the 1/p_mask(t) tail short, so that the SEs are reliable."""
    doubled = "{standard_2x: {per_device_train_batch_size: 16}}"
    overrides = ["seeds=[3]", f"methods=[standard, {doubled}]", "variance_draws=64"]
    overrides += ["eval_points=[1.0]", "train.max_steps=2", "train.eps=0.1"]
    spec = load_study(study_path("demo"), [f"output_dir={tmp_path}", *MINI, *overrides])
    results, _ = runner.run_study(spec, StudyProgress("s", 2, live=False, stream=io.StringIO()))
    report = build_report("s", results, spec.eval_steps())
    cost = report["tasks"]["chain_sum"]["cost"]
    assert cost["standard_2x"]["estimator_noise"]["batch_equivalent"]["value"] == pytest.approx(1)
    text = markdown(report)
    assert "| batch equivalent on Standard's model |" in text and "| 1.00 ± " in text

    config = spec.run_config("chain_sum", "standard", 3)
    model, tokenizer = load_checkpoint(spec.run_dir("chain_sum", "standard", 3) / "checkpoint-2")
    task = get_task("chain_sum", **config.task_options)
    data = encode_split(task, tokenizer, "train", resolve_canvas(config, task, tokenizer))
    objective = noise.run_objective(config, tokenizer)
    small, large = (noise.per_pass_noise(model, objective, data, 64, 3, n) for n in (8, 16))
    assert abs(small["grad"] - large["grad"]) < 3 * math.hypot(small["grad_se"], large["grad_se"])
    assert small["grad"] / 8 > 1.5 * large["grad"] / 16  # the minibatch variance does halve


def test_a_runs_noise_is_measured_with_the_sampler_its_checkpoint_holds(tmp_path):
    """An EMA run's estimator is the density it learned (its checkpoint's sampler state), not
    the uniform one a fresh EMA sampler starts from."""
    spec = load_study(study_path("demo"), [f"output_dir={tmp_path}", *MINI, "methods=[ema]"])
    config = spec.run_config("chain_sum", "ema", 3)
    _, tokenizer, _ = build_model(config, get_task("chain_sum", **config.task_options))
    learned = build_sampler(config, None)
    learned.observe(torch.tensor([0.02, 0.5, 0.9]), torch.tensor([9.0, 1.0, 0.1]))
    learned.refresh()
    torch.save(learned.state_dict(), tmp_path / SAMPLER_STATE)
    t = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    fresh = noise.run_objective(config, tokenizer).sampler.density(t)
    measured = noise.run_objective(config, tokenizer, tmp_path).sampler.density(t)
    assert torch.equal(measured, learned.density(t)) and not torch.allclose(measured, fresh)


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_study_killed_during_its_final_evaluation_only_evaluates_again(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C while the last checkpoint is decoded: the re-run trains nothing (no step past
    max_steps; weights, checkpoints and metrics.jsonl unchanged), finishes the evaluation and
    reports the training time recorded when the run was trained."""
    out = tmp_path / "study"
    args = ["study", "--config", "demo", f"output_dir={out}", *MINI]
    args += ["seeds=[3]", "methods=[standard]", "variance_draws=3"]
    real = runner.evaluate

    def interrupted_at_the_end(*a, output_path=None, **kw):
        if str(output_path).endswith("eval-4.jsonl"):
            raise KeyboardInterrupt
        return real(*a, output_path=output_path, **kw)

    monkeypatch.setattr(runner, "evaluate", interrupted_at_the_end)
    assert main(args) == 130
    monkeypatch.undo()
    run = out / "chain_sum" / "standard" / "seed-3"
    trained = {k: v for k, v in _files(run).items() if k != "train.log"}
    assert not (run / "result.json").exists() and not (run / "stablemdm.lock").exists()
    assert main(args) == 0
    after = _files(run)
    assert all(after[name] == data for name, data in trained.items())  # nothing retrained
    result = json.loads((run / "result.json").read_text())
    assert [e["step"] for e in result["evaluations"]] == [2, 4]
    assert max(step for step, _ in result["losses"]) == 4
    recorded = json.loads((run / "train_seconds.json").read_text())["train_seconds"]
    assert result["train_seconds"] == round(recorded, 1) > 0
    assert "holds a run that finished at step 4" in capsys.readouterr().err


class _Killed(Exception):
    """Stands for a kill right after a checkpoint was written."""


class _KilledAfter(StudyProgress):
    """Progress whose run callback stops the study once the checkpoint of `step` is written."""

    def __init__(self, step: int) -> None:
        super().__init__("s", 1, live=False, stream=io.StringIO())
        self.kill_at = step

    def start_run(self, label, steps):
        watch = super().start_run(label, steps)
        kill_at = self.kill_at

        def on_save(args, state, control, **kwargs):
            if state.global_step == kill_at:
                raise _Killed

        watch.on_save = on_save
        return watch


def _losses(run) -> list[tuple[int, float]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_a_study_run_stopped_after_a_checkpoint_logs_the_losses_of_an_uninterrupted_one(
    tmp_path, one_thread
):
    """The checkpoint at the first eval point (step 2) falls between log lines (steps 3, 6):
    the resumed run must log the mean over steps 1-3 at step 3, as the uninterrupted one."""
    small = [*MINI, "seeds=[3]", "methods=[standard]", "variance_draws=0"]
    small += ["train.max_steps=6", "eval_points=[0.34,1.0]", "train.logging_steps=3"]
    whole = load_study(study_path("demo"), [f"output_dir={tmp_path / 'whole'}", *small])
    runner.run_study(whole, StudyProgress("s", 1, live=False, stream=io.StringIO()))
    stopped = load_study(study_path("demo"), [f"output_dir={tmp_path / 'stopped'}", *small])
    with pytest.raises(_Killed):
        runner.run_study(stopped, _KilledAfter(2))
    run = stopped.run_dir("chain_sum", "standard", 3)
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]
    runner.run_study(stopped, StudyProgress("s", 1, live=False, stream=io.StringIO()))
    expected = _losses(whole.run_dir("chain_sum", "standard", 3))
    assert [s for s, _ in expected] == [3, 6]
    assert _losses(run) == expected
