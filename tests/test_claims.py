"""Equal compute in the study: `standard_matched` (Standard at the most expensive method's
training compute) in every shipped study with a two-pass method, a baseline and never the
headline; the report answers the paper's three claims against it and against Standard, names
the equal-compute comparison first, and says "at Standard's compute" only within 5% of
Standard's counted compute; a miniature study end to end (auto trains its planned steps and
is evaluated at the same fractions of them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stablemdm.cli import main
from stablemdm.errors import ConfigError
from stablemdm.study.claims import compute_phrase
from stablemdm.study.command import study_path
from stablemdm.study.report import build_report, markdown
from stablemdm.study.spec import METHODS, load_study

SHIPPED = Path(__file__).parents[1] / "src" / "stablemdm" / "studies"


def _two_pass(name: str, overrides: dict | None) -> bool:
    fields = {**METHODS.get(name, {}), **(overrides or {})}
    return fields.get("masking") == "mirror" and not fields.get("compute_matched")


def test_every_shipped_study_with_a_two_pass_method_carries_standard_matched():
    for path in sorted(SHIPPED.glob("*.yaml")):
        methods = yaml.safe_load(path.read_text())["methods"]
        entries = (
            methods.items()
            if isinstance(methods, dict)
            else [next(iter(m.items())) if isinstance(m, dict) else (m, None) for m in methods]
        )
        if any(_two_pass(name, overrides) for name, overrides in entries):
            assert "standard_matched" in dict(entries), path.name


def test_standard_matched_runs_standard_at_the_most_expensive_methods_compute(tmp_path):
    """By batch (the default: 2 x 64 for P-POTS+MIRROR's two passes), by steps when asked or
    when the batch cannot carry the ratio; its own overrides kept; a study where nothing
    costs more than Standard refuses it in one line."""
    out = [f"output_dir={tmp_path}"]
    demo = load_study(study_path("demo"), out)
    assert demo.methods["standard_matched"] == {"per_device_train_batch_size": 128}
    config = demo.run_config("mini_sudoku", "standard_matched", 42)
    assert (config.per_device_train_batch_size, config.max_steps, config.sampler) == (
        128,
        250,
        "uniform",
    )
    steps = load_study(study_path("demo"), [*out, "matched_by=steps"])
    assert steps.methods["standard_matched"] == {"max_steps": 500}
    assert steps.run_config("mini_sudoku", "standard_matched", 42).save_steps == 500
    assert steps.eval_steps(500) == [125, 250, 500] and steps.eval_steps() == [62, 125, 250]
    tuned = "methods=[standard, mirror, {standard_matched: {learning_rate: 0.001}}]"
    tuned = load_study(study_path("demo"), [*out, tuned]).methods["standard_matched"]
    assert tuned == {"per_device_train_batch_size": 128, "learning_rate": 0.001}
    odd = ["methods=[standard, {longer: {max_steps: 375}}, standard_matched]"]
    odd = load_study(study_path("demo"), [*out, *odd, "train.per_device_train_batch_size=63"])
    assert odd.methods["standard_matched"] == {"max_steps": 375}  # 63 x 1.5 is no batch
    for bad, message in (
        ("methods=[standard, count, standard_matched]", "none costs more than Standard"),
        ("matched_by=rows", "matched_by must be one of batch, steps"),
        ("methods={standard_matched: {sampler: ppots}}", "changes what 'standard_matched' means"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            load_study(study_path("demo"), [*out, bad])
        assert "\n" not in str(err.value)


def _result(method: str, seed: int, accuracy: float, total: int) -> dict:
    """A synthetic result.json: one evaluation, counted compute `total` (passes)."""
    return {
        "task": "t",
        "method": method,
        "seed": seed,
        "evaluations": [{"step": 10, "accuracy": accuracy}],
        "train_seconds": 1.0,
        "steps": 10,
        "sequences_per_step": 128 if method == "standard_matched" else 64,
        "compute": {"total": total, "training": total, "overhead": 0},
    }


# method: (accuracy per seed 1, 2, 3; counted compute), Standard's is 1000 passes
RUNS = {
    "standard_matched": ((0.50, 0.52, 0.60), 2000),
    "standard": ((0.40, 0.45, 0.50), 1000),
    "ppots_mirror": ((0.55, 0.56, 0.64), 2040),
    "count": ((0.48, 0.53, 0.57), 1060),  # 6% above Standard's: not at its compute
    "auto": ((0.47, 0.52, 0.58), 1030),  # 3% above: at Standard's compute
}


def _report(methods: list[str]) -> dict:
    results = [
        _result(m, seed, acc, RUNS[m][1])
        for m in methods
        for seed, acc in zip((1, 2, 3), RUNS[m][0], strict=True)
    ]
    return build_report("s", results, [10])


def _row(text: str, method: str, table: int) -> list[str]:
    """The cells of `method`'s row in the `table`-th table of the report."""
    tables = [b for b in text.split("\n\n") if b.startswith("| method |")]
    line = next(x for x in tables[table].splitlines() if x.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_a_headline_at_standards_compute_is_compared_with_standard_first():
    """A headline method at Standard's compute (auto here): Standard is its equal-compute
    reference, named first; standard_matched follows with its own compute."""
    report = _report(["standard", "standard_matched", "auto"])
    opening = markdown(report).split("\n\n")[1]
    assert opening.startswith(
        "On t after 10 steps, auto (at Standard's compute) scored 52.3% against Standard's "
        "45.0% (the same compute): "
    )
    assert "; against standard_matched's 54.0% (at 2.00x Standard's compute): " in opening
    assert "equal-compute" not in opening


def test_the_claims_are_answered_against_the_equal_compute_standard_first():
    """standard_matched listed first is still a baseline: the headline is P-POTS+MIRROR, and
    its opening sentence names the equal-compute comparison before Standard; the claims
    table answers each claim against both (differences, spreads, worst above best)."""
    report = _report(list(RUNS))
    task = report["tasks"]["t"]
    assert task["findings"]["method"] == "ppots_mirror"
    point = task["by_step"]["10"]
    assert point["paired_to_matched"]["ppots_mirror"]["mean"] == pytest.approx(0.13 / 3)
    assert point["paired_to_standard"]["ppots_mirror"]["mean"] == pytest.approx(0.4 / 3)
    text = markdown(report)
    opening = text.split("\n\n")[1]
    assert opening.startswith(
        "On t after 10 steps, ppots_mirror (at 2.04x Standard's compute) scored 58.3% against "
        "the equal-compute Standard's 54.0% (standard_matched, at 2.00x Standard's compute): "
        "+4.3 points (95% CI "
    )
    assert opening.index("equal-compute Standard's") < opening.index("against Standard's 45.0%")
    header = next(x for x in text.splitlines() if x.startswith("| method | vs standard_matched"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method",
        "vs standard_matched (95% CI)",
        "vs Standard (95% CI)",
        "std / standard_matched's",
        "std / Standard's",
        "worst > best standard_matched",
        "worst > best Standard",
        "worst > best Clipped",
    ]
    row = _row(text, "ppots_mirror", 1)
    assert row[1].startswith("+4.3 [") and row[2].startswith("+13.3 [")
    assert row[3] == "0.93" and row[4] == "0.99"  # seed stds 0.0493 / 0.0529, / 0.0500
    assert row[5:] == ["no", "yes", "-"]


def test_at_standards_compute_is_said_only_within_five_percent_of_it():
    """From the counts: auto at 1.03x is at Standard's compute, count at 1.06x is not, in the
    cost table and in an opening sentence about either."""
    text = markdown(_report(list(RUNS)))
    column = 3  # "at Standard's compute"
    assert [_row(text, m, 2)[column] for m in RUNS] == ["no", "yes", "no", "no", "yes"]
    assert [_row(text, m, 2)[2] for m in RUNS] == ["2.00", "1.00", "2.04", "1.06", "1.03"]
    for method, phrase in (("auto", "at Standard's compute"), ("count", "at 1.06x Standard's")):
        opening = markdown(_report([method, "standard"])).split("\n\n")[1]
        assert opening.startswith(f"On t after 10 steps, {method} ({phrase}")
        assert "the study has no equal-compute Standard (standard_matched)" in opening
    assert compute_phrase(None) == "compute not counted"


def test_a_miniature_study_trains_auto_to_its_plan_and_standard_matched_at_twice_the_batch(
    tmp_path,
):
    """End to end: auto (charged) trains the steps its plan leaves and is decoded at the
    study's fractions of them; standard_matched trains MIRROR's forward passes with twice the
    batch; the report's tables hold both comparisons and the counted compute."""
    out = tmp_path / "study"
    auto = "{auto: {estimator: auto, auto_candidates: [standard, count], auto_draws: 3, "
    auto += "auto_batch: 2, auto_every: 2}}"
    args = [
        "study", "--config", "demo", f"output_dir={out}", "tasks=[chain_sum]", "seeds=[3]",
        f"methods=[standard, mirror, standard_matched, {auto}]", "eval_points=[0.5,1.0]",
        "eval_limit=2", "variance_draws=0", "task_options={chain_sum: {n_train: 200, n_test: 4}}",
        "train.max_steps=8", "train.per_device_train_batch_size=8", "train.d_model=32",
        "train.n_layers=1", "train.logging_steps=1",
    ]  # fmt: skip
    assert main(args) == 0
    runs = {
        m: json.loads((out / "chain_sum" / m / "seed-3" / "result.json").read_text())
        for m in ("standard", "mirror", "standard_matched", "auto")
    }
    # 8 x 16 passes; one measurement 2 x 3 x 2 x 2 = 24: 5 steps and measurements at 0 and 2
    plan = runs["auto"]["compute"]["plan"]
    assert (plan["steps"], plan["measurements"], runs["auto"]["steps"]) == (5, 2, 5)
    assert [(e["step"], e["trained_step"]) for e in runs["auto"]["evaluations"]] == [(4, 2), (8, 5)]
    assert runs["auto"]["compute"]["total"] == runs["standard"]["compute"]["total"]  # 5x16+2x24
    matched = runs["standard_matched"]
    assert (matched["sequences_per_step"], matched["steps"]) == (16, 8)
    assert matched["compute"]["total"] == runs["mirror"]["compute"]["total"] == 2 * 8 * 16
    cost = json.loads((out / "report.json").read_text())["tasks"]["chain_sum"]["cost"]
    assert cost["auto"]["compute"]["at_standard_compute"]
    assert cost["standard_matched"]["compute"]["x_standard"] == 2.0
    assert "| vs standard_matched (95% CI) |" in (out / "report.md").read_text()
