"""A study that pretrains a shared base on other data, then fine-tunes it per target: the
mixture task, the overlap and contamination checks, the base cache, the step-0 evaluation,
and the report's opening findings."""

import io
import json
import subprocess
import sys
import threading
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from stablemdm.cli import main
from stablemdm.errors import ConfigError
from stablemdm.study import runner
from stablemdm.study.bases import cache_key, check_data, gap_verdict
from stablemdm.study.command import study_path
from stablemdm.study.progress import StudyProgress
from stablemdm.study.report import build_report, markdown
from stablemdm.study.spec import load_study
from stablemdm.tasks.mixture import prompt_key
from stablemdm.tasks.registry import get_task
from stablemdm.training.lock import claim

SMALL_SUMS = {"task": "chain_sum", "max_terms": 2, "max_digits": 1}  # 200 possible prompts
TARGET = {"chain_sum": {"max_terms": 2, "max_digits": 1, "n_train": 100, "n_test": 20}}
MINI = [
    "tasks=[chain_sum]",
    "seeds=[3]",
    "methods=[arm,standard,count]",
    "eval_points=[1.0]",
    "eval_limit=6",
    "variance_draws=3",
    "train.max_steps=2",
    "train.per_device_train_batch_size=8",
    "train.d_model=32",
    "train.n_layers=1",
    "train.logging_steps=1",
    "task_options={chain_sum: {n_train: 200, n_test: 8}}",
    "base={max_steps: 3, data: {parts: [{task: countdown, n_train: 60, n_test: 4}], "
    "exclude: [chain_sum]}}",
]


def test_a_mixture_trains_on_every_part_and_scores_each_test_item_by_its_own_part():
    mixture = get_task(
        "mixture",
        parts=[
            {"task": "countdown", "n_train": 30, "n_test": 5},
            {**SMALL_SUMS, "n_train": 300, "n_test": 5},
        ],
    )
    countdown = get_task("countdown", n_train=30, n_test=5)
    assert len(mixture.examples("train")) == 30 + 300 and mixture.excluded == 0
    test = mixture.examples("test")
    assert len(test) == 10 and all(mixture.score(e.response, e) for e in test)
    # a countdown expression scores on a countdown item, not as a sum's answer
    assert not mixture.score(test[0].response, test[-1])
    assert mixture.max_length == max(
        countdown.max_length,
        get_task("chain_sum", max_terms=2, max_digits=1, n_train=300, n_test=5).max_length,
    )
    with pytest.raises(ValueError, match="tokens of its own cannot be mixed"):
        get_task("mixture", parts=["digits_t2i"])
    with pytest.raises(ValueError, match="mixture part 0 nope: unknown task"):
        get_task("mixture", parts=["nope"])


def test_exclude_removes_every_test_prompt_of_a_target_from_the_base_data():
    part = {**SMALL_SUMS, "seed": 7, "n_train": 500, "n_test": 5}
    target = get_task("chain_sum", **TARGET["chain_sum"])
    plain = get_task("mixture", parts=[part])
    shared = {e.prompt for e in target.examples("test")} & {
        e.prompt for e in plain.examples("train")
    }
    assert shared  # the part's 500 draws from 200 prompts meet the 20 test prompts
    clean = get_task(
        "mixture", parts=[part], exclude=[{"task": "chain_sum", **TARGET["chain_sum"]}]
    )
    assert clean.excluded == len([e for e in plain.examples("train") if e.prompt in shared])
    assert not shared & {e.prompt for e in clean.examples("train")}


def test_base_data_holding_a_target_test_item_is_refused_naming_the_fix():
    data = {"parts": [{**SMALL_SUMS, "seed": 7, "n_train": 500, "n_test": 5}]}
    with pytest.raises(ConfigError, match=r"test items of target chain_sum .*base.data.exclude"):
        check_data(data, TARGET, None, "s.yaml")
    excluded = {**data, "exclude": [{"task": "chain_sum", **TARGET["chain_sum"]}]}
    assert check_data(excluded, TARGET, None, "s.yaml").excluded > 0
    with pytest.raises(ConfigError, match="needs max_length .* longer than the base's 5"):
        check_data(excluded, TARGET, 5, "s.yaml")


def test_base_data_derived_from_a_target_test_set_is_refused():
    data = {"parts": [{"task": "gsm_symbolic", "n_train": 5, "n_test": 2}], "exclude": ["gsm8k"]}
    with pytest.raises(ValueError, match="derived from gsm8k's test items"):
        get_task("mixture", **data)
    with pytest.raises(ConfigError, match="part gsm_symbolic is derived from the test items"):
        check_data({"parts": data["parts"]}, {"gsm8k": {}}, None, "s.yaml")


def test_study_validation_refuses_bad_base_specs(tmp_path):
    base = f"output_dir={tmp_path}"
    bad = {
        "base={data: {parts: [countdown], extra: 1}}": "unknown key",
        "base={data: [countdown]}": "must be a mapping with parts",
        "base={mdm: 3}": "base.mdm and base.arm must be mappings",
        "base={arm: {sampler: ppots}}": "base sets",
        "base={mdm: {d_model: 64}}": "base.mdm sets .'d_model'.; both bases share",
        "base={arm: {seed: 3}}": "base.arm sets .'seed'.",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_study(study_path("demo"), [base, override])


def test_bases_are_cached_by_spec_and_shared_across_targets(tmp_path, base_cache):
    spec = load_study(study_path("demo"), [f"output_dir={tmp_path}", *MINI])
    mdm = spec.base_config("chain_sum", "mdm")
    assert mdm.task == "mixture" and mdm.objective == "mdm" and mdm.seed == 0
    assert mdm.max_length >= get_task("chain_sum", n_train=200, n_test=8).max_length
    assert mdm.output_dir.startswith(str(base_cache))
    arm = spec.base_config("chain_sum", "arm")
    assert (arm.max_steps, arm.per_device_train_batch_size) == (3, 8)  # the same budget
    assert spec.run_config("chain_sum", "standard", 3).init_from == mdm.output_dir
    other = load_study(study_path("demo"), [f"output_dir={tmp_path / 'o'}", *MINI, "seeds=[9]"])
    assert other.base_dir("chain_sum", "mdm") == spec.base_dir("chain_sum", "mdm")
    longer = load_study(
        study_path("demo"), [f"output_dir={tmp_path}", *MINI, "base.mdm={max_steps: 6}"]
    )
    assert longer.base_dir("chain_sum", "mdm") != spec.base_dir("chain_sum", "mdm")
    assert longer.base_dir("chain_sum", "arm") == spec.base_dir("chain_sum", "arm")
    assert longer.base_config("chain_sum", "mdm").max_steps == 6


@pytest.mark.filterwarnings("ignore:P-POTS")
def test_a_miniature_finetune_study_pretrains_evaluates_at_step_zero_and_reuses(
    tmp_path, capsys, base_cache
):
    assert main(["study", "--config", "demo", f"output_dir={tmp_path / 'a'}", *MINI]) == 0
    printed, log = capsys.readouterr()
    assert "base-mdm (mixture-mdm-" in log and "pretraining 3 steps" in log
    bases = sorted(p.name for p in base_cache.iterdir() if p.is_dir())
    assert len(bases) == 2 and all(b.startswith("mixture-") for b in bases)
    weights = {b: (base_cache / b / "model.safetensors").stat().st_mtime_ns for b in bases}
    for b in bases:  # each base folder says what it was trained on, and is named by its hash
        record = json.loads((base_cache / b / "trained_on.json").read_text())
        assert b.endswith(cache_key(record)) and record["stablemdm"] == version("stablemdm")
        assert record["data"]["train"]["examples"] > 0 and record["config"]["max_steps"] == 3
    for objective in ("mdm", "arm"):
        at_zero = json.loads((tmp_path / "a" / "chain_sum" / f"base-{objective}.json").read_text())
        assert at_zero["n"] == 6 and 0 <= at_zero["accuracy"] <= 1
        assert at_zero["base_steps"] == 3 and at_zero["base_task"] == "mixture"
    report = json.loads((tmp_path / "a" / "report.json").read_text())["tasks"]["chain_sum"]
    assert report["bases"]["equal_budget"] and "verdict" in report["bases"]
    assert "the shared bases at step 0" in printed and "equal pretraining budgets" in printed
    assert printed.splitlines()[2].startswith(
        "On chain_sum after 2 steps, count (at Standard's compute)"
    )

    # another study with the same base spec trains no base
    assert main(["study", "--config", "demo", f"output_dir={tmp_path / 'b'}", *MINI]) == 0
    log = capsys.readouterr().err
    assert "cached, reused" in log and "pretraining" not in log
    assert weights == {b: (base_cache / b / "model.safetensors").stat().st_mtime_ns for b in bases}


def _noise(own: float, common: float | None) -> dict:
    """A run's measured estimator noise (study.noise) with SEs a tenth of each figure."""

    def at(g: float | None) -> dict | None:
        return None if g is None else {"grad": g, "grad_se": g / 10, "loss": 1.0, "loss_se": 0.1}

    return {"draws": 32, "batch": 16, "split": "train", "own": at(own), "common": at(common)}


def test_the_report_opens_with_three_findings_and_says_when_bases_are_far_apart():
    results = [
        {
            "task": "t",
            "method": m,
            "seed": s,
            "evaluations": [{"step": 10, "accuracy": acc + 0.01 * s}],
            "forward_tokens_per_step": 100,
            "train_seconds": 1.0,
            "estimator_noise": noise,
        }
        for m, acc, noise in (
            ("arm", 0.5, _noise(0.01, None)),
            ("standard", 0.2, _noise(0.04, 0.04)),
            ("ppots", 0.3, _noise(0.01, 0.02)),
        )
        for s in (1, 2, 3)
    ]
    base = {"task": "t", "base_steps": 5, "base_sequences": 40, "base_task": "mixture"}
    bases = [
        {**base, "objective": "mdm", "accuracy": 0.10, "train_seconds": 2.0},
        {**base, "objective": "arm", "accuracy": 0.30, "train_seconds": 2.0},
    ]
    report = build_report("s", results, [10], bases)
    text = markdown(report).splitlines()
    assert text[2] == (
        "On t after 10 steps, ppots (compute not counted) scored 32.0% against Standard's "
        "22.0%: +10.0 points (95% CI [10.0, 10.0] over 3 seeds); the study has no equal-compute "
        "Standard (standard_matched). Its seed spread (std) was 1.0 points, against Standard's "
        "1.0, the ARM's 1.0. On Standard's final models one sequence of its "
        "gradient estimator was worth 2.00 ± 0.16 Standard sequences per forward pass (its batch "
        "equivalent): it buys more than a bigger Standard batch at the same compute."
    )
    assert "far apart: the MDM base is 20.0 points weaker" in "\n".join(text)
    assert "(base.mdm.max_steps=...) or the ARM base shorter" in "\n".join(text)
    assert "(equal pretraining budgets)" in "\n".join(text)
    bases[1] = {**bases[1], "base_sequences": 8, "accuracy": 0.12}
    text = markdown(build_report("s", results, [10], bases))
    assert "UNEQUAL pretraining budgets" in text and "+2.0 points, close" in text
    assert gap_verdict(0.30, 0.33).startswith("close")


def test_a_claim_is_exclusive_across_processes_and_released_when_its_holder_dies(tmp_path):
    path = tmp_path / "base.claim"
    code = (  # another process holding a flock on the file, as claim() takes it
        "import fcntl, sys, time\nf = open(sys.argv[1], 'w')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
        "print(True, flush=True)\ntime.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "True\n"
        with claim(path, wait=False) as mine:
            assert not mine
    finally:
        holder.kill()
        holder.wait()
    with claim(path, wait=True) as mine:  # the killed holder's flock went with it
        assert mine


def test_a_base_another_process_pretrains_is_left_to_it_and_waited_for(tmp_path, monkeypatch):
    spec = load_study(study_path("demo"), [f"output_dir={tmp_path}", *MINI])
    busy = Path(spec.base_dir("chain_sum", "mdm"))
    taken, release = threading.Event(), threading.Event()

    def other_process():  # holds the MDM base's claim, finishes that base, lets go
        with claim(busy.parent / f".{busy.name}.claim", wait=False):
            taken.set()
            release.wait(10)
            busy.mkdir(parents=True)
            (busy / "model.safetensors").write_text("pretrained elsewhere")

    trained = []

    def train(config, callbacks):
        trained.append(config.objective)
        release.set()  # the other process ends while this one pretrains the ARM base
        Path(config.output_dir).mkdir(parents=True)
        (Path(config.output_dir) / "model.safetensors").write_text("weights")
        return 1.0

    monkeypatch.setattr(runner, "_train", train)
    other = threading.Thread(target=other_process)
    other.start()
    taken.wait(10)
    stream = io.StringIO()
    with StudyProgress("s", 1, live=False, stream=stream) as progress:
        runner.train_bases(spec, progress)
    other.join()
    assert trained == ["arm"]  # the busy MDM base was neither trained twice nor deleted
    said = stream.getvalue()
    assert "another process is pretraining it; waiting" in said and "cached, reused" in said
    assert (busy / "model.safetensors").read_text() == "pretrained elsewhere"


def test_the_shipped_finetune_studies_exclude_their_targets_and_validate(tmp_path):
    small = [  # the shipped mixtures generate tens of thousands of items: checked as written
        "base.data={parts: [{task: countdown, n_train: 50, n_test: 4}], "
        "exclude: [chain_sum, mini_sudoku]}",
        "task_options.mini_sudoku.n_train=200",
    ]
    for name in ("finetune", "finetune_gpu"):
        written = yaml.safe_load(study_path(name).read_text())
        assert set(written["base"]["data"]["exclude"]) >= set(written["tasks"])
        assert not {p["task"] for p in written["base"]["data"]["parts"]} & {"gsm_symbolic"}
        spec = load_study(study_path(name), [f"output_dir={tmp_path / name}", *small])
        assert len(spec.tasks) >= 2 and {"arm", "standard", "clipped", "count"} <= set(spec.methods)
        mdm, arm = (spec.base_config(spec.tasks[0], o) for o in ("mdm", "arm"))
        assert (mdm.max_steps, mdm.per_device_train_batch_size, mdm.model_preset) == (
            arm.max_steps,
            arm.per_device_train_batch_size,
            arm.model_preset,
        )
    assert len(load_study(study_path("finetune"), [f"output_dir={tmp_path}", *small]).seeds) == 5


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _sums(first: int, n: int) -> list[dict]:
    """n addition items `i+first` (i = 0..n-1), as examples/jsonl holds them."""
    return [
        {"prompt": f"{i}+{first}", "response": f"{i}+{first}={i + first} #### {i + first}"}
        for i in range(n)
    ]


OWN_TARGET = [  # a study on JSONL files at paths relative to the project folder
    "tasks=[jsonl]",
    "seeds=[1]",
    "methods=[standard]",
    "task_options={jsonl: {train: data/train.jsonl, test: data/test.jsonl}}",
]


def test_a_base_is_keyed_on_the_contents_of_its_data_not_their_paths(tmp_path, monkeypatch):
    """Two projects with different data/train.jsonl under the same relative path, and one
    file edited: each gets a base of its own (a base of its own data, and one on a mixture
    with a JSONL part)."""
    mixture = "base={max_steps: 3, data: {parts: [{task: jsonl, train: data/train.jsonl, "
    mixture += "test: data/test.jsonl}, {task: countdown, n_train: 20, n_test: 2}], "
    mixture += "exclude: [jsonl]}}"
    keys = {}
    for project, first in (("a", 100), ("b", 200)):
        root = tmp_path / project
        _write_jsonl(root / "data" / "train.jsonl", _sums(first, 30))
        _write_jsonl(root / "data" / "test.jsonl", _sums(first + 50, 4))
        monkeypatch.chdir(root)
        for kind, base in (("own", "base={max_steps: 3}"), ("mixture", mixture)):
            spec = load_study(study_path("demo"), ["output_dir=out", *OWN_TARGET, base])
            keys[project, kind] = spec.base_dir("jsonl", "mdm")
    assert keys["a", "own"] != keys["b", "own"] and keys["a", "mixture"] != keys["b", "mixture"]
    rows = _sums(200, 30)
    rows[3]["response"] = rows[3]["response"].replace("=", " = ")  # project b's file, edited
    _write_jsonl(tmp_path / "b" / "data" / "train.jsonl", rows)
    for kind, base in (("own", "base={max_steps: 3}"), ("mixture", mixture)):
        edited = load_study(study_path("demo"), ["output_dir=out", *OWN_TARGET, base])
        assert edited.base_dir("jsonl", "mdm") not in (keys["a", kind], keys["b", kind])


def test_a_base_is_keyed_on_resolved_values(tmp_path):
    """A field given at its default names the same base as the field left out."""
    spec = load_study(study_path("demo"), [f"output_dir={tmp_path}", *MINI])
    same = load_study(study_path("demo"), [f"output_dir={tmp_path}", *MINI, "base.eos_fill=true"])
    assert spec.base_config("chain_sum", "mdm").eos_fill is True
    assert same.base_dir("chain_sum", "mdm") == spec.base_dir("chain_sum", "mdm")
    record = spec.base_record("chain_sum", "mdm")
    assert record["stablemdm"] == version("stablemdm") and record["config"]["max_steps"] == 3
    mixture = get_task("mixture", **spec.base_data())
    assert record["data"]["train"]["examples"] == len(mixture.examples("train"))


@pytest.mark.filterwarnings("ignore:P-POTS")
def test_a_changed_target_seed_decodes_the_bases_at_step_zero_again(tmp_path):
    """The base does not change with the target's seed (its exclude entry is explicit), but
    the test items do: step 0 is decoded again, on the new items."""
    explicit = [*MINI, "base.data.exclude=[{task: chain_sum, n_train: 200, n_test: 8}]"]
    spec = load_study(study_path("demo"), [f"output_dir={tmp_path}", *explicit])
    progress = StudyProgress("s", 1, live=False, stream=io.StringIO())
    runner.train_bases(spec, progress)
    runner.evaluate_base(spec, "chain_sum", "mdm", progress)
    records = tmp_path / "chain_sum" / "base-mdm.jsonl"
    first = records.read_text()
    reseeded = load_study(
        study_path("demo"), [f"output_dir={tmp_path}", *explicit, "task_options.chain_sum.seed=5"]
    )
    assert reseeded.base_dir("chain_sum", "mdm") == spec.base_dir("chain_sum", "mdm")
    result = runner.evaluate_base(reseeded, "chain_sum", "mdm", progress)
    test = get_task("chain_sum", n_train=200, n_test=8, seed=5).examples("test")[:6]
    decoded = [json.loads(x) for x in records.read_text().splitlines()]
    assert [r["prompt"] for r in decoded] == [e.prompt for e in test]
    assert records.read_text() != first
    # a base that scores nothing carries its first outputs for the report
    shown = [{k: r[k] for k in ("prompt", "output", "gold")} for r in decoded[:3]]
    assert result.get("samples") == (shown if result["accuracy"] == 0 else None)


def test_exclusion_compares_prompts_up_to_case_unicode_form_and_whitespace(tmp_path):
    rows = [{"prompt": p, "response": "r"} for p in ("Q1 ", " q1", "q  2", "q3")]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", [{"prompt": "q9", "response": "r"}])
    _write_jsonl(tmp_path / "target.jsonl", [{"prompt": p, "response": "r"} for p in ("q1", "q 2")])
    part = {"task": "jsonl", "train": str(tmp_path / "train.jsonl")}
    part["test"] = str(tmp_path / "test.jsonl")
    target = {"task": "jsonl", "train": str(tmp_path / "target.jsonl")}
    target["test"] = str(tmp_path / "target.jsonl")
    mixture = get_task("mixture", parts=[part], exclude=[target])
    assert mixture.excluded == 3 and [e.prompt for e in mixture.examples("train")] == ["q3"]
    assert prompt_key(" \uff31\uff11\t") == "q1"  # full-width Q1: NFKC, case-folded, stripped
    assert prompt_key("q\u00a0 \n1") == "q 1"


def test_a_dataset_part_of_a_mixture_needs_its_lengths_in_one_line(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", _sums(3, 10))
    part = {
        "task": "dataset",
        "train": str(tmp_path / "d.jsonl"),
        "test": str(tmp_path / "d.jsonl"),
    }
    with pytest.raises(ValueError, match="mixture part 0 dataset: .*give the part max_length"):
        get_task("mixture", parts=[part, "countdown"])
    mixture = get_task("mixture", parts=[{**part, "max_length": 24, "gen_length": 12}])
    assert (mixture.max_length, mixture.gen_length) == (24, 12)
    assert len(mixture.examples("train")) == 10


def test_a_base_that_scores_nothing_is_shown_with_its_outputs():
    base = {"task": "t", "base_steps": 5, "base_sequences": 40, "base_task": "mixture"}
    samples = [{"prompt": "2+3", "output": "5 5 5 | 5", "gold": "5"}]
    bases = [
        {**base, "objective": "mdm", "accuracy": 0.4, "train_seconds": 2.0},
        {**base, "objective": "arm", "accuracy": 0.0, "train_seconds": 2.0, "samples": samples},
    ]
    results = [
        {
            "task": "t",
            "method": "standard",
            "seed": 1,
            "evaluations": [{"step": 10, "accuracy": 0.5}],
            "forward_tokens_per_step": 100,
            "train_seconds": 1.0,
        }
    ]
    text = markdown(build_report("s", results, [10], bases))
    assert "The ARM base scored nothing" in text and "The MDM base" not in text
    assert "| `2+3` | `5 5 5 \\| 5` | `5` |" in text


OWN_DATA_TINY = [  # the docs' own-data study at a size for a test
    "seeds=[1]",
    "methods=[arm,standard]",
    "eval_points=[1.0]",
    "eval_limit=3",
    "variance_draws=0",
    "train.max_steps=2",
    "train.d_model=32",
    "train.n_layers=1",
    "train.per_device_train_batch_size=8",
    "base.max_steps=2",
]


def test_the_own_data_study_of_the_docs_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """The YAML block of docs/study.md's "Your own data" (a JSONL target, a base on a JSONL
    mixture excluding it) runs from the repository root, as the docs say."""
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    assert "exclude: [jsonl]" in " ".join(capsys.readouterr().out.split())
    root = Path(__file__).resolve().parents[1]
    docs = (root / "docs" / "study.md").read_text().split("## Your own data", 1)[1]
    study = tmp_path / "my_data.yaml"
    study.write_text(docs.split("```yaml\n", 1)[1].split("```", 1)[0])
    monkeypatch.chdir(root)
    out = tmp_path / "out"
    assert main(["study", "--config", str(study), f"output_dir={out}", *OWN_DATA_TINY]) == 0
    printed = capsys.readouterr().out
    assert "jsonl: the shared bases at step 0" in printed
    base = json.loads((out / "jsonl" / "base-mdm.json").read_text())
    assert base["base_task"] == "mixture" and base["n"] == 3
    record = json.loads((Path(base["base"]) / "trained_on.json").read_text())
    (excluded,) = record["config"]["task_options"]["exclude"]  # the target as the study runs it
    assert excluded["task"] == "jsonl"
    assert Path(root, excluded["test"]).resolve() == root / "examples" / "jsonl" / "test.jsonl"
