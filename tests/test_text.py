"""Raw text (issue 26, item 4): corpora read lazily, packed by MDLM's wrap or per document,
a task every estimator and `variance` train and measure on, held-out bits per token with its
standard error, streaming within a memory bound, and one-line errors for bad corpora."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from test_variance_hf import DESIGN  # the smallest design that measures every component

from stablemdm.cli import main
from stablemdm.data import DataError
from stablemdm.data.corpus import read_documents
from stablemdm.data.packing import pack
from stablemdm.errors import ConfigError
from stablemdm.evaluation.perplexity import heldout_bits
from stablemdm.likelihood import exact_elbo
from stablemdm.models import ModelConfig, Transformer
from stablemdm.tasks.registry import get_task
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

CORPUS = Path(__file__).parents[1] / "data" / "corpus" / "fables.txt"
DOCS = ["the fox ran.", "a crow sat on\nthe oak.", "moral: wait.", "x"]
TINY = [
    "d_model=32",
    "n_layers=1",
    "n_heads=2",
    "per_device_train_batch_size=4",
    "logging_steps=1",
    "disable_tqdm=true",
    "warmup_steps=1",
    "eval_strategy=steps",
    "eval_heldout=3",
]


def _options(**extra) -> str:
    fields = {"train": str(CORPUS), "max_length": 24, "test_fraction": 0.05, **extra}
    return "task_options=" + json.dumps(fields)


def _run(folder: Path, *extra: str, steps: int = 2, **options) -> list[dict]:
    """Train a tiny text run; its metrics.jsonl records."""
    config = load_config(
        None,
        ["task=text", _options(**options), *TINY, f"max_steps={steps}", f"eval_steps={steps}"]
        + [f"save_steps={steps}", f"output_dir={folder}", *extra],
    )
    train(config)
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _bits(records: list[dict]) -> dict:
    return next(r for r in records if "eval_bits_per_token" in r)


def test_wrap_cuts_one_stream_and_pad_starts_each_document_on_a_row():
    documents = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 10, 11, 12, 0]]
    wrapped = list(pack(documents, 4, "wrap"))
    assert [len(r) for r in wrapped] == [4, 4, 4, 3]  # only the last row is short
    assert sum(wrapped, []) == sum(documents, [])  # nothing lost, order kept
    padded = list(pack(documents, 4, "pad"))
    # each document starts a row; the one longer than a row continues on the next
    assert padded == [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9], [10, 11, 12, 0]]


@pytest.mark.parametrize("form", ["txt", "folder", "jsonl", "parquet", "saved"])
def test_every_corpus_form_reads_the_same_documents(tmp_path, form):
    import datasets

    path = tmp_path / "corpus"
    if form == "txt":
        path = tmp_path / "c.txt"
        path.write_text("\n\n\n".join(DOCS) + "\n")
    elif form == "folder":
        path.mkdir()
        (path / "a.txt").write_text("\n\n".join(DOCS[:2]))
        (path / "b.txt").write_text("\n\n".join(DOCS[2:]))
    elif form == "jsonl":
        path = tmp_path / "c.jsonl"
        rows = [{"body": d, "id": i} for i, d in enumerate(DOCS)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        data = datasets.Dataset.from_dict({"body": DOCS})
        path = tmp_path / "c.parquet" if form == "parquet" else path
        data.to_parquet(str(path)) if form == "parquet" else data.save_to_disk(str(path))
    assert list(read_documents(path, text_field="body")) == DOCS


def test_held_out_documents_are_a_fixed_disjoint_share_of_the_corpus():
    task = get_task("text", train=str(CORPUS), test_fraction=0.1)
    every = list(read_documents(CORPUS))
    train, test = list(task.documents("train")), list(task.documents("test"))
    assert len(train) + len(test) == len(every) and not set(train) & set(test)
    assert test == list(get_task("text", train=str(CORPUS), test_fraction=0.1).documents("test"))
    sd = math.sqrt(len(every) * 0.1 * 0.9)
    assert abs(len(test) - 0.1 * len(every)) < 4 * sd


def test_streamed_corpus_is_packed_holding_a_few_documents(tmp_path):
    """A corpus far larger than what is held: 8 MB read lazily, rows taken from the start."""
    big = tmp_path / "big.txt"
    paragraph = "a fable of one line, long enough to matter. " * 4
    with open(big, "w") as f:
        for _ in range(8 * 2**20 // len(paragraph)):
            f.write(paragraph + "\n\n")
    task = get_task("text", train=str(big), max_length=64, streaming=True)
    read = []
    documents = task.token_documents("train", task.tokenizer_for(None))
    counted = (read.append(1) or d for d in documents)
    rows = list(itertools.islice(pack(counted, 64, "wrap"), 40))
    assert len(read) <= 40 * 64 // len(paragraph) + 2  # a row's worth of documents ahead
    tracemalloc.start()
    stream = iter(task.stream(task.tokenizer_for(None)))
    batch = [next(stream) for _ in range(500)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (
        peak < 2**20
        and batch[0]["input_ids"].shape == (64,)
        and rows[0] == batch[0]["input_ids"].tolist()
    )


@pytest.mark.parametrize(
    "method",
    [[], ["rate=count", "sampler=ppots", "masking=mirror"]],
    ids=["standard", "count_ppots_mirror"],
)
def test_every_estimator_trains_on_text_and_logs_held_out_bits(tmp_path, one_thread, method):
    records = _run(tmp_path / "run", *method)
    assert any("loss" in r and math.isfinite(r["loss"]) for r in records)
    bits = _bits(records)
    assert 0 < bits["eval_bits_per_token_se"] < 0.1 * bits["eval_bits_per_token"]


def test_an_arm_text_run_logs_its_exact_bits_with_error_zero(tmp_path, one_thread):
    bits = _bits(_run(tmp_path / "arm", "objective=arm", streaming=True, packing="pad"))
    assert bits["eval_bits_per_token_se"] == 0 and bits["eval_bits_per_token"] > 0


def test_held_out_bits_are_the_exact_elbo_within_their_error(one_thread):
    """Rows short enough to enumerate: the estimate agrees with exact_elbo within 4 SE."""
    config = ModelConfig(vocab_size=12, d_model=16, n_layers=1, n_heads=2, mask_token_id=1)
    model = Transformer(config, generator=torch.Generator().manual_seed(0)).eval()
    ids = torch.tensor([[4, 5, 6, 7], [8, 9, 2, 0]])
    eligible = torch.tensor([[True] * 4, [True, True, True, False]])
    bits = heldout_bits(model, {"input_ids": ids, "eligible": eligible}, seed=0)
    exact = sum(exact_elbo(model, [], r[e].tolist(), 1) for r, e in zip(ids, eligible, strict=True))
    assert bits.tokens == 7 and bits.bits_per_token_se > 0
    error = bits.bits_per_token - (-exact / (7 * math.log(2)))
    assert abs(error) < 4 * bits.bits_per_token_se


def test_a_block_text_run_scores_held_out_rows_with_its_block_elbo(tmp_path, one_thread):
    """A block-diffusion model's held-out bits are its block ELBO (each row cut into blocks
    from its first token, as training cuts it), within 4 SE of the exact one; a block text run
    logs them at its evaluations."""
    config = ModelConfig(
        vocab_size=12, d_model=16, n_layers=1, n_heads=2, mask_token_id=1, block_size=2
    )
    model = Transformer(config, generator=torch.Generator().manual_seed(0)).eval()
    ids = torch.tensor([[4, 5, 6, 7, 3], [8, 9, 2, 0, 0]])
    eligible = torch.tensor([[True] * 5, [True, True, True, False, False]])
    bits = heldout_bits(model, {"input_ids": ids, "eligible": eligible}, seed=0)
    rows = [r[e].tolist() for r, e in zip(ids, eligible, strict=True)]
    exact = sum(exact_elbo(model, [], row, 1, block_size=2) for row in rows)
    assert bits.tokens == 8 and bits.bits_per_token_se > 0
    error = bits.bits_per_token - (-exact / (8 * math.log(2)))
    assert abs(error) < 4 * bits.bits_per_token_se
    logged = _bits(_run(tmp_path / "block", "objective=block", "block_size=4"))
    assert 0 < logged["eval_bits_per_token_se"] < 0.1 * logged["eval_bits_per_token"]


def test_variance_and_eval_read_a_text_run(tmp_path, one_thread, capsys):
    run = tmp_path / "run"
    _run(run)
    assert main(["variance", f"--checkpoint={run}", *DESIGN, f"--output={tmp_path / 'v'}"]) == 0
    report = json.loads((tmp_path / "v" / "variance.json").read_text())
    assert report["config"]["task"] == "text"
    capsys.readouterr()
    assert main(["eval", str(run), "--limit=2"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["rows"] == 2 and result["bits_per_token_se"] > 0 and "accuracy" not in result
    assert "no accuracy" in out.err


def _bad(tmp_path: Path, case: str) -> dict:
    """task_options of a bad corpus."""
    if case == "empty":
        (tmp_path / "e.txt").write_text("\n \n\n")
        return {"train": str(tmp_path / "e.txt")}
    if case == "column":
        (tmp_path / "c.jsonl").write_text('{"content": "a b"}\n')
        return {"train": str(tmp_path / "c.jsonl")}
    if case == "binary":
        (tmp_path / "b.txt").write_bytes(bytes(range(256)) * 4)
        return {"train": str(tmp_path / "b.txt")}
    return {"train": str(CORPUS), "packing": "tight"}


@pytest.mark.parametrize("case", ["empty", "column", "binary", "packing"])
def test_bad_corpora_are_one_line(tmp_path, case, capsys):
    options = json.dumps(_bad(tmp_path, case))
    code = main(["train", "task=text", f"task_options={options}", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    expected = {"empty": "no text", "column": "no text column 'text'", "binary": "not UTF-8"}
    assert expected.get(case, "packing='tight'") in err
    assert not (tmp_path / "o").exists()


def test_eval_accuracy_is_refused_for_text(tmp_path):
    with pytest.raises(ConfigError, match="no answers"):
        _run(tmp_path / "acc", "eval_accuracy=true")


def test_the_held_out_split_needs_a_document(tmp_path):
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(DataError, match="split test.*no text.*raise test_fraction"):
        get_task("text", train=str(tmp_path / "one.txt"), test_fraction=0.01)


@pytest.mark.filterwarnings("ignore:P-POTS")
def test_a_study_base_pretrains_on_raw_text(tmp_path, capsys, base_cache):
    """A miniature study whose shared bases are pretrained on the corpus, then fine-tuned."""
    data = json.dumps({"task": "text", "train": str(CORPUS), "max_length": 40})
    mini = [
        "tasks=[chain_sum]",
        "seeds=[3]",
        "methods=[standard]",
        "eval_points=[1.0]",
        "eval_limit=4",
        "variance_draws=3",
        "train.max_steps=1",
        "train.per_device_train_batch_size=4",
        "train.d_model=32",
        "train.n_layers=1",
        "task_options={chain_sum: {max_terms: 2, max_digits: 1, n_train: 40, n_test: 4}}",
        f"base={{max_steps: 2, data: {data}}}",
    ]
    assert main(["study", "--config", "demo", f"output_dir={tmp_path / 's'}", *mini]) == 0
    bases = sorted(p for p in base_cache.iterdir() if p.is_dir())
    assert [b.name.split("-")[:2] for b in bases] == [["text", "arm"], ["text", "mdm"]]
    record = json.loads((bases[1] / "trained_on.json").read_text())
    documents = len(list(get_task("text", train=str(CORPUS)).documents("train")))
    assert record["data"]["train"]["documents"] == documents
    assert record["config"]["max_length"] == 40
    assert "base-mdm (text-mdm-" in capsys.readouterr().err


def test_raw_text_is_not_a_mixture_part():
    with pytest.raises(ValueError, match="cannot be mixed"):
        get_task("mixture", parts=[{"task": "text", "train": str(CORPUS)}])


def test_packing_benchmark_reports_tokens_per_second():
    script = Path(__file__).parents[1] / "benchmarks" / "packing.py"
    done = subprocess.run(
        [sys.executable, str(script), "--megabytes=0.2", "--max-length=32"],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["tokens"] > 0.9 * 0.2 * 2**20 and result["tokens_per_s"] > 0
