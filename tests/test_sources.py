"""data.sources and the `dataset` task: JSONL, JSON, Parquet and saved datasets through
`datasets`, column names, chat messages, streaming, and the errors that name the column."""

import itertools
import json

import datasets
import pytest
import torch
from hf_fixtures import llama_tokenizer
from safetensors.torch import load_file
from transformers import TrainerCallback

from stablemdm.data import DataError, encode_examples
from stablemdm.data.hf_tokenizer import HFTokenizer
from stablemdm.data.sources import EncodedStream, examples_from_records, load_records
from stablemdm.data.tokenizer import CharTokenizer
from stablemdm.errors import ConfigError
from stablemdm.tasks.registry import get_task
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

ROWS = [{"question": f"{i}+{i}", "solution": f"#### {2 * i}", "gold": str(2 * i)} for i in range(6)]
COLUMNS = {"prompt_column": "question", "response_column": "solution", "answer_column": "gold"}


@pytest.fixture
def files(tmp_path):
    table = datasets.Dataset.from_list(ROWS)
    out = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json"}
    out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out["json"].write_text(json.dumps(ROWS))
    out["parquet"] = tmp_path / "d.parquet"
    table.to_parquet(str(out["parquet"]))
    out["saved"] = tmp_path / "saved"
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(out["saved"]))
    return out


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "saved"])
def test_every_format_gives_the_same_examples(files, kind):
    examples = list(examples_from_records(load_records(files[kind]), **COLUMNS, source="f"))
    assert [(e.prompt, e.response, e.answer) for e in examples] == [
        (r["question"], r["solution"], r["gold"]) for r in ROWS
    ]
    assert examples[2].source == "f:row 2"


def test_streaming_reads_lazily_and_checks_columns_on_the_first_row(files):
    stream = load_records(files["jsonl"], streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    assert len(list(examples_from_records(stream, **COLUMNS))) == len(ROWS)
    with pytest.raises(DataError, match="missing column 'prompt'.*available: question"):
        next(examples_from_records(load_records(files["jsonl"], streaming=True)))


def test_a_missing_column_is_named_with_the_available_ones(files):
    with pytest.raises(DataError) as err:
        list(examples_from_records(load_records(files["parquet"]), source=str(files["parquet"])))
    message = str(err.value)
    assert "d.parquet" in message and "'prompt'" in message and "question, solution" in message


def test_missing_files_and_splits_are_named(tmp_path, files):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no split 'dev'"):
        load_records(files["saved"], split="dev")
    with pytest.raises(DataError, match=".csv"):
        (tmp_path / "d.csv").write_text("a\n")
        load_records(tmp_path / "d.csv")


def test_chat_messages_become_examples_with_the_conversation(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
    ]
    examples = examples_from_records(rows, messages_column="messages", source="chat")
    first = next(examples)
    assert (first.prompt, first.response, first.answer) == ("1+1", "2", "2")
    assert first.meta["messages"][-1]["content"] == "2"
    with pytest.raises(DataError, match="chat:row 1.*assistant"):
        next(examples)


def test_dataset_task_with_both_tokenizers(files):
    task = get_task("dataset", train=str(files["parquet"]), test=str(files["jsonl"]), **COLUMNS)
    assert task.max_length is None and len(task.examples("train")) == len(ROWS)
    assert task.score("#### 4", task.examples("test")[2])
    for tok in (CharTokenizer(), HFTokenizer(llama_tokenizer(), 7, chat_template=True)):
        batch = encode_examples(task.examples("train"), tok, 40, 10)
        assert batch["eligible"].any(dim=1).all()


def test_streamed_task_encodes_like_the_in_memory_one(files):
    tok = HFTokenizer(llama_tokenizer(), 7)
    task = get_task("dataset", train=str(files["jsonl"]), test=str(files["jsonl"]), **COLUMNS)
    streamed = get_task(
        "dataset", train=str(files["jsonl"]), test=str(files["jsonl"]), streaming=True, **COLUMNS
    )
    stream = EncodedStream(lambda: streamed.stream("train"), tok, 20, 8)
    rows = list(itertools.islice(stream, 2 * len(ROWS)))  # two passes
    whole = encode_examples(task.examples("train"), tok, 20, 8)
    assert stream.skipped == 0
    for i, row in enumerate(rows):
        assert all(torch.equal(row[k], whole[k][i % len(ROWS)]) for k in whole)
    short = EncodedStream(lambda: streamed.stream("train"), tok, 9, 8)  # prompts leave no room
    with pytest.raises(DataError, match="none of the 6 streamed train examples fits"):
        next(iter(short))


def test_dataset_task_takes_text_outside_the_character_alphabet(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "café?", "response": "#### naïve"}) + "\n")
    with pytest.raises(ValueError, match="alphabet"):
        get_task("jsonl", train=str(path), test=str(path))
    task = get_task("dataset", train=str(path), test=str(path))
    assert task.examples("test")[0].prompt == "café?"
    assert task.score("... #### naïve", task.examples("test")[0])


def _streamed_config(tmp_path, train_rows, test_rows, *extra: str):
    """A tiny built-in model on a `dataset` task whose train file is streamed."""
    for name, rows in (("train", train_rows), ("test", test_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = (
        f"task_options={{train: {tmp_path / 'train.jsonl'}, test: {tmp_path / 'test.jsonl'}, "
        "streaming: true}"
    )
    small = ["d_model=16", "n_layers=1", "per_device_train_batch_size=4", "logging_steps=1"]
    small += ["disable_tqdm=true", "eval_strategy=no", "warmup_steps=0"]
    return load_config(None, ["task=dataset", options, *small, *extra])


class _Stop(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 6:
            raise KeyboardInterrupt("killed")


@pytest.mark.usefixtures("one_thread")
def test_a_streamed_split_trains_pass_after_pass_and_resumes_in_place(tmp_path):
    """12 examples in batches of 4 are 3 steps a pass: 10 steps read the stream 3.3 times
    (before: 'Batch does not contain any data' after the first pass), and a run killed at
    step 6 and resumed from checkpoint-4 (inside the second pass) ends with the same weights
    as the uninterrupted run."""
    rows = [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(12)]
    steps = ["max_steps=10", "save_steps=4"]
    full = _streamed_config(tmp_path, rows, rows[:4], *steps, f"output_dir={tmp_path / 'full'}")
    assert train(full).global_step == 10
    cut = _streamed_config(tmp_path, rows, rows[:4], *steps, f"output_dir={tmp_path / 'cut'}")
    with pytest.raises(KeyboardInterrupt):
        train(cut, callbacks=[_Stop()])
    assert train(cut, resume=True).global_step == 10
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("one_thread")
def test_a_streamed_split_is_measured_on_its_train_examples_and_counts_what_it_leaves_out(
    tmp_path, capsys, monkeypatch
):
    """The canvas is measured on the first train examples, not on the (short) test file, so
    none is dropped; with a canvas too small for some, the count over the sample is printed
    before training and the count over the whole split after the first pass."""
    rows = [{"prompt": f"{i}+{i}=", "response": str(2 * i) * (1 + i % 4)} for i in range(30)]
    short = [{"prompt": "1+1=", "response": "2"}] * 4
    config = _streamed_config(tmp_path, rows, short, "max_steps=2", f"output_dir={tmp_path / 'a'}")
    train(config)
    assert config.gen_length == max(len(r["response"]) for r in rows) + 1  # with <eos>
    assert "left out" not in capsys.readouterr().err
    monkeypatch.setattr("stablemdm.training.datasets.STREAM_SAMPLE", 10)
    small = ["gen_length=5", "max_length=12", "max_steps=9", f"output_dir={tmp_path / 'b'}"]
    train(_streamed_config(tmp_path, rows, short, *small))
    err = capsys.readouterr().err
    sample = sum(len(r["response"]) + 1 > 5 for r in rows[:10])
    whole = sum(len(r["response"]) + 1 > 5 for r in rows)
    assert (
        f"stablemdm: {sample} of the first 10 streamed train examples of task dataset do not "
        "fit max_length=12, gen_length=5 and are left out; the count over the whole split "
        "follows after the first pass"
    ) in err
    assert (
        f"stablemdm: {whole} of 30 streamed train examples do not fit max_length=12, "
        "gen_length=5 and are left out (counted over the first full pass)"
    ) in err


def test_a_streamed_split_needs_max_steps_and_one_example_that_fits(tmp_path):
    rows = [{"prompt": "1+1=", "response": "2"}] * 4
    with pytest.raises(ConfigError, match="no length to count epochs in: set max_steps"):
        train(_streamed_config(tmp_path, rows, rows, "max_steps=-1", f"output_dir={tmp_path}/a"))
    with pytest.raises(ConfigError, match="none of the first 4 streamed train examples"):
        train(
            _streamed_config(
                tmp_path, rows, rows, "max_length=3", "gen_length=2", f"output_dir={tmp_path}/b"
            )
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
