"""data.sources and the `dataset` task: JSONL, JSON, Parquet and saved datasets through
`datasets`, column names, chat messages, streaming, and the errors that name the column."""

import json

import datasets
import pytest
import torch
from hf_fixtures import llama_tokenizer

from stablemdm.data import DataError, encode_examples
from stablemdm.data.hf_tokenizer import HFTokenizer
from stablemdm.data.sources import EncodedStream, examples_from_records, load_records
from stablemdm.data.tokenizer import CharTokenizer
from stablemdm.tasks.registry import get_task

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
    rows = list(EncodedStream(streamed.stream("train"), tok, 20, 8))
    whole = encode_examples(task.examples("train"), tok, 20, 8)
    assert len(rows) == len(ROWS)
    for i, row in enumerate(rows):
        assert all(torch.equal(row[k], whole[k][i]) for k in whole)
    short = EncodedStream(streamed.stream("train"), tok, 9, 8)  # prompts leave no room
    assert list(short) == [] and short.skipped == len(ROWS)


def test_dataset_task_takes_text_outside_the_character_alphabet(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "café?", "response": "#### naïve"}) + "\n")
    with pytest.raises(ValueError, match="alphabet"):
        get_task("jsonl", train=str(path), test=str(path))
    task = get_task("dataset", train=str(path), test=str(path))
    assert task.examples("test")[0].prompt == "café?"
    assert task.score("... #### naïve", task.examples("test")[0])
