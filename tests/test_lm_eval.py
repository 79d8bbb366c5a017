"""The lm-eval model (issue 26, item 2): `stablemdm lm-eval` runs a multiple-choice, a
generation and a perplexity task of local YAMLs (tests/fixtures/lm_eval) end to end offline
on a tiny trained run; its loglikelihood is the likelihood API's, an ARM's is exact, and
bad model_args are one line. Skipped where the `lm-eval` extra is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "lm_eval", reason='the lm-eval extra is not installed: pip install ".[lm-eval]"'
)

from hf_caches import cached_dataset  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from stablemdm.cli import main  # noqa: E402
from stablemdm.likelihood import Budget, loglikelihood, loglikelihood_choices  # noqa: E402
from stablemdm.lmeval.model import StableMDMLM  # noqa: E402
from stablemdm.lmeval.requests import rolling_windows  # noqa: E402
from stablemdm.rng import seeded_generator  # noqa: E402
from stablemdm.training.recipe import load_config  # noqa: E402
from stablemdm.training.run import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"
CORPUS = ROOT / "data" / "corpus" / "fables.txt"
TINY = [
    "task=text",
    "task_options=" + json.dumps({"train": str(CORPUS), "max_length": 48}),
    "d_model=32",
    "n_layers=1",
    "n_heads=2",
    "per_device_train_batch_size=4",
    "max_steps=1",
    "save_steps=1",
    "logging_steps=1",
    "disable_tqdm=true",
    "eval_strategy=no",
]
SMALL = "estimator=count_mirror,mc_batch=4,max_passes=8,min_draws=2"


def _train(folder: Path, *extra: str) -> Path:
    train(load_config(None, [*TINY, f"output_dir={folder}", *extra]))
    return folder


@pytest.fixture(scope="module")
def mdm_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("lm-eval") / "mdm")


@pytest.fixture(scope="module")
def arm_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("lm-eval") / "arm", "objective=arm")


def _request(kind: str, args: tuple, doc_id: int, idx: int = 0) -> Instance:
    return Instance(kind, {}, args, idx, metadata=("t", doc_id, 1))


def test_lm_eval_runs_choice_generation_and_perplexity_tasks_offline(
    mdm_run, tmp_path, monkeypatch, one_thread
):
    monkeypatch.chdir(TASKS)  # the YAMLs' data_files are relative to it
    records, out = tmp_path / "records.jsonl", tmp_path / "results"
    code = main(
        [
            "lm-eval",
            "--model",
            "stablemdm",
            "--model_args",
            f"run={mdm_run},{SMALL},records={records},gen_length=4",
            "--tasks",
            "stablemdm_choices,stablemdm_generate,stablemdm_perplexity",
            "--include_path",
            str(TASKS),
            "--output_path",
            str(out),
            "--batch_size",
            "2",
        ]
    )
    assert code == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["stablemdm_choices"]["acc,none"] <= 1
    assert 0 <= results["stablemdm_generate"]["exact_match,none"] <= 1
    assert results["stablemdm_perplexity"]["bits_per_byte,none"] > 0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    choices = [r for r in rows if r["request_type"] == "loglikelihood"]
    rolling = [r for r in rows if r["request_type"] == "loglikelihood_rolling"]
    assert len(choices) == 4 * 3 and len(rolling) == 3
    assert all(r["se"] > 0 and r["passes"] == 8 and r["choices"] == 3 for r in choices)
    assert all(r["gap_se"] > 0 for r in choices)
    assert all(r["se"] > 0 and r["value"] < 0 for r in rolling)


# A fabricated stand-in for ARC-Easy (allenai/ai2_arc), in the columns lm-eval's arc_easy.yaml
# reads: (question, choices, answer key); the choice counts differ, so the requests show it.
ARC = [
    ("Where did the young mouse live?", ["in the wood", "in the sea", "on the moon"], "A"),
    ("What did the fox want?", ["the grapes", "the river"], "A"),
    ("Who won the race?", ["the tortoise", "the hare"], "A"),
]


def _arc_split(split: str) -> list[dict]:
    return [
        {
            "id": f"{split}-{i}",
            "question": question,
            "choices": {"text": texts, "label": list("ABC")[: len(texts)]},
            "answerKey": key,
        }
        for i, (question, texts, key) in enumerate(ARC)
    ]


def test_a_built_in_task_runs_from_its_data_in_the_local_datasets_cache(
    mdm_run, tmp_path, monkeypatch, one_thread
):
    """lm-eval's own arc_easy runs offline once allenai/ai2_arc (ARC-Easy) is in the local
    `datasets` cache, laid out as a first online load leaves it (tests/hf_caches.py)."""
    import datasets

    cache = tmp_path / "datasets"
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "choices": {
                "text": datasets.List(datasets.Value("string")),
                "label": datasets.List(datasets.Value("string")),
            },
            "answerKey": datasets.Value("string"),
        }
    )
    splits = {split: _arc_split(split) for split in ("train", "validation", "test")}
    cached_dataset(cache, "allenai/ai2_arc", "ARC-Easy", splits, features)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # `datasets` read both at its import, before this test: what it read is set too
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    records, out = tmp_path / "records.jsonl", tmp_path / "results"
    model_args = f"run={mdm_run},{SMALL},records={records}"
    argv = ["--tasks", "arc_easy", "--limit", "2", "--output_path", str(out), "--log_samples"]
    assert main(["lm-eval", "--model", "stablemdm", "--model_args", model_args, *argv]) == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["arc_easy"]
    assert 0 <= results["acc,none"] <= 1
    lines = next(out.rglob("samples_arc_easy_*.jsonl")).read_text().splitlines()
    samples = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    assert [s["doc"]["question"] for s in samples] == [q for q, _, _ in ARC[:2]]
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(r["choices"] for r in rows) == [2, 2, 3, 3, 3]
    assert all(r["task"] == "arc_easy" and r["se"] > 0 for r in rows)


def test_loglikelihood_is_the_likelihood_api_with_common_random_numbers(mdm_run, one_thread):
    lm = StableMDMLM(run=str(mdm_run), estimator="count_mirror", mc_batch=4, max_passes=8)
    context, choices = "Once a young mouse lived in the", [" wood.", " river."]
    requests = [
        _request("loglikelihood", (context, c), doc_id=7, idx=i) for i, c in enumerate(choices)
    ]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    encode = lm.tokenizer.encode
    want = loglikelihood_choices(
        lm.model,
        encode(context),
        [encode(c) for c in choices],
        generator=seeded_generator(0, "lm-eval", "t", 7, context),
        estimator="count_mirror",
        budget=Budget(batch_size=4, max_passes=8),
    )
    assert [value for value, _ in got] == [r.value for r in want.results]
    assert all(greedy is False for _, greedy in got)  # no greedy_check: LLaDA's default


def test_an_arm_run_gives_exact_values_with_error_zero(arm_run, one_thread):
    lm = StableMDMLM(run=str(arm_run), greedy_check=True)
    encode, context, text = lm.tokenizer.encode, "Once a", "the oak."
    (greedy,) = lm._decode([encode(context)], 3, 0.0, seeded_generator(0))
    assert len(greedy) == 3  # a run trained for one step does not stop at once
    other = greedy[:2] + [encode("q")[0] if greedy[2] != encode("q")[0] else encode("z")[0]]
    continuations = [lm.tokenizer.decode(greedy), lm.tokenizer.decode(other)]
    requests = [_request("loglikelihood", (context, c), 0, i) for i, c in enumerate(continuations)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    assert [is_greedy for _, is_greedy in got] == [True, False]
    for (value, _), continuation in zip(got, continuations, strict=True):
        exact = loglikelihood(
            lm.model,
            encode(context),
            encode(continuation),
            generator=seeded_generator(1),
            kind="arm",
        )
        assert value == exact.value and exact.se == 0
    (rolled,) = lm.loglikelihood_rolling([_request("loglikelihood_rolling", (text,), 1)], True)
    whole = loglikelihood(
        lm.model, [lm.prefix], encode(text), generator=seeded_generator(1), kind="arm"
    )
    assert rolled == pytest.approx(whole.value, abs=1e-5)
    assert all(r["se"] == 0 and r["estimator"] == "exact" for r in lm.records.rows)


def test_rolling_windows_predict_each_token_once_within_the_model_length():
    tokens = list(range(10, 33))
    windows = rolling_windows(tokens, prefix=2, limit=8)
    assert [t for _, continuation in windows for t in continuation] == tokens
    assert all(len(c) + len(x) <= 8 and c for c, x in windows)
    assert windows[0][0] == [2]


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("run={run},batch=4", "unknown --model_args key 'batch'"),
        ("run={run},estimator=exact", "estimator='exact' in --model_args must be one of"),
        ("run={run},mc_batch=3,max_passes=8", "max_passes=8 must be a multiple of"),
        ("estimator=llada", "or a folder); neither was given"),
        ("run={run},pretrained={run}", "or a folder); both were given"),
        ("run={run},mask_token=<m>", "mask_token='<m>' in --model_args must be left unset"),
        ("pretrained=nobody/no-such-model", "nor in the local Hugging Face cache"),
    ],
)
def test_bad_model_args_are_one_line(mdm_run, model_args, message, capsys):
    argv = ["lm-eval", "--model", "stablemdm", "--model_args", model_args.format(run=mdm_run)]
    code = main([*argv, "--tasks", "stablemdm_choices", "--include_path", str(TASKS)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("stablemdm lm-eval: error:")


def test_importing_stablemdm_does_not_import_lm_eval():
    code = "import sys, stablemdm.cli, stablemdm.likelihood; print('lm_eval' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.fixture(scope="module")
def block_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("lm-eval") / "block", "objective=block", "block_size=4")


def test_a_block_diffusion_run_answers_likelihood_requests_with_its_block_elbo(
    block_run, tmp_path, monkeypatch, one_thread
):
    """The multiple-choice and perplexity tasks run on a block-diffusion run trained for one
    step, offline; its values are the likelihood API's block ELBO in the run's blocks of 4."""
    monkeypatch.chdir(TASKS)
    records, out = tmp_path / "records.jsonl", tmp_path / "results"
    model_args = f"run={block_run},{SMALL},records={records}"
    tasks = ["--tasks", "stablemdm_choices,stablemdm_perplexity", "--include_path", str(TASKS)]
    argv = ["lm-eval", "--model", "stablemdm", "--model_args", model_args, *tasks]
    assert main([*argv, "--output_path", str(out)]) == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["stablemdm_choices"]["acc,none"] <= 1
    assert results["stablemdm_perplexity"]["bits_per_byte,none"] > 0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 4 * 3 + 3 and all(r["se"] > 0 and r["value"] < 0 for r in rows)
    lm = StableMDMLM(run=str(block_run), estimator="count_mirror", mc_batch=4, max_passes=8)
    context, choices = "Once a young mouse lived in the", [" old wood.", " river."]
    requests = [_request("loglikelihood", (context, c), 3, i) for i, c in enumerate(choices)]
    got = [value for value, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    encode = lm.tokenizer.encode
    kwargs = dict(estimator="count_mirror", budget=Budget(batch_size=4, max_passes=8))
    key = (0, "lm-eval", "t", 3, context)
    want = loglikelihood_choices(
        lm.model,
        encode(context),
        [encode(c) for c in choices],
        generator=seeded_generator(*key),
        block_size=4,
        **kwargs,
    )
    canvas = loglikelihood_choices(
        lm.model,
        encode(context),
        [encode(c) for c in choices],
        generator=seeded_generator(*key),
        kind="mdm",
        **kwargs,
    )
    assert got == [r.value for r in want.results] != [r.value for r in canvas.results]
