"""Answer extraction that survives a tokenizer's decoding, and the scorer self-check (issue 20,
item 1): a BERT-style WordPiece tokenizer decodes '####' as '# # # #' and '-5' as '- 5', which
scored even the gold responses 0%; training and `eval` now refuse, in one line, a tokenizer
and task whose round-tripped gold responses do not all score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_fixtures import wordpiece_tokenizer
from transformers import BertConfig, BertForMaskedLM

from stablemdm.cli import main
from stablemdm.data import Example
from stablemdm.data.hf_tokenizer import HFTokenizer
from stablemdm.data.tokenizer import CharTokenizer
from stablemdm.errors import ConfigError
from stablemdm.evaluation.scoring import check_scorer
from stablemdm.tasks.registry import final_number, get_task

SMALL = {"n_train": 300, "n_test": 40}
TINY = [
    "task_options={n_train: 64, n_test: 6}",
    "per_device_train_batch_size=4",
    "max_steps=1",
    "save_steps=1",
    "disable_tqdm=true",
]


def _wordpiece(lowercase: bool = False) -> HFTokenizer:
    tok = wordpiece_tokenizer(lowercase)
    return HFTokenizer(tok, tok.mask_token_id)


@pytest.fixture(scope="module")
def bert_wordpiece(tmp_path_factory) -> Path:
    """A tiny BERT with an uncased WordPiece tokenizer, saved as a model folder."""
    tok = wordpiece_tokenizer(lowercase=True)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "bert_wp"
    BertForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["gsm_symbolic", "chain_sum", "countdown", "mini_sudoku"])
def test_wordpiece_round_trip_of_every_gold_response_scores(name):
    task, tokenizer = get_task(name, **SMALL), _wordpiece()
    examples = task.examples("test")
    decoded = [tokenizer.decode(tokenizer.encode_response(e)) for e in examples]
    if name == "gsm_symbolic":  # the decoding that used to score 0/N
        assert all("# # # #" in text for text in decoded)
    scored = [task.score(text, e) for text, e in zip(decoded, examples, strict=True)]
    failed = [text for text, ok in zip(decoded, scored, strict=True) if not ok]
    assert not failed, failed[:3]
    check_scorer(task, tokenizer, examples)


def test_gsm8k_answers_survive_wordpiece(tmp_path):
    rows = [
        {"question": "Debt?", "answer": "It is 1,000.5 - 2,001 = <<x>>-1,000.5\n#### -1,000.5"},
        {"question": "Big?", "answer": "1000+234 = 1,234\n#### 1,234"},
    ]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task, tokenizer = get_task("gsm8k", data_dir=tmp_path), _wordpiece(lowercase=True)
    for example in task.examples("test"):
        text = tokenizer.decode(tokenizer.encode_response(example))
        assert "# # # #" in text and task.extract(text) == example.answer
        assert task.score(text, example)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so # # # # 1, 234. 5 apples", "1234.5"),
        ("#### - 5", "-5"),
        ("# # # #- 12", "-12"),
        ("####  1 , 000 , 000", "1000000"),
        ("#### 3, 4", "3"),  # not a thousands separator: the first number only
        ("#### 2 - 1", "2"),  # a difference is not a negative number
        ("# # # no marker 5", None),
    ],
)
def test_final_number_reads_tokenizer_spacing(text, expected):
    assert final_number(text) == expected


def test_jsonl_answer_after_a_spaced_marker(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "q", "response": "work #### yes"}) + "\n")
    task = get_task("jsonl", train=data, test=data)
    (example,) = task.examples("test")
    assert task.score("work # # # # yes", example) and not task.score("# # # # no", example)


class Strict:
    """A task whose answer rule needs the literal '####' (as gsm8k's did)."""

    name = "strict"

    def extract(self, output: str) -> str | None:
        return output.rsplit("####", 1)[1].strip() if "####" in output else None

    def score(self, output: str, example: Example) -> bool:
        return self.extract(output) == example.answer


def test_self_check_names_the_example_the_decoded_text_and_the_cause():
    examples = [Example("q", f"steps #### {n}", str(n), f"strict #{n}") for n in range(5)]
    check_scorer(Strict(), CharTokenizer(), examples)  # the character tokenizer round-trips
    with pytest.raises(ConfigError) as err:
        check_scorer(Strict(), _wordpiece(), examples)
    message = str(err.value)
    assert "\n" not in message and "strict #0" in message
    assert "'steps # # # # 0'" in message and "spacing" in message
    wrong = [Example("q", "steps #### 5", "6", "strict #9")]
    with pytest.raises(ConfigError, match=r"strict #9.*rejects this gold response as written"):
        check_scorer(Strict(), CharTokenizer(), wrong)


@pytest.mark.parametrize("bad", [1, 100, 199])
def test_self_check_reads_every_item_it_will_score(bad):
    """One wrong gold answer among 200 items is found wherever it is (the check used to read
    32 evenly spaced items, so wrong answers on the other 168 rows passed)."""
    examples = [Example("q", f"steps #### {n}", str(n), f"strict #{n}") for n in range(200)]
    examples[bad] = Example("q", f"steps #### {bad}", "wrong", f"strict #{bad}")
    with pytest.raises(ConfigError, match=rf"strict #{bad},.*rejects this gold response"):
        check_scorer(Strict(), CharTokenizer(), examples)
    check_scorer(Strict(), CharTokenizer(), examples[:bad] + examples[bad + 1 :])


def _jsonl(tmp_path: Path) -> list[str]:
    """A task whose answers are words with capitals, which an uncased tokenizer lowercases."""
    data = tmp_path / "capitals.jsonl"
    rows = [{"prompt": c, "response": f"it is #### {c.title()}"} for c in ("paris", "rome", "oslo")]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return ["task=jsonl", f"task_options={{train: {data}, test: {data}}}"]


def _one_error(capsys, verb: str) -> str:
    lines = [
        line
        for line in capsys.readouterr().err.strip().splitlines()
        if not line.startswith("stablemdm: warning:")
    ]
    assert len(lines) == 1 and lines[0].startswith(f"stablemdm {verb}: error: scorer self-check")
    return lines[0]


def test_train_refuses_a_tokenizer_the_answer_rule_cannot_read(bert_wordpiece, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", f"model={bert_wordpiece}", *TINY, *_jsonl(tmp_path), f"output_dir={out}"]
    assert main(args) == 2
    line = _one_error(capsys, "train")
    assert "capitals.jsonl:1" in line and "'it is # # # # paris'" in line and "lowercases" in line
    assert not out.exists()


def test_eval_refuses_it_too(bert_wordpiece, tmp_path, capsys):
    out = tmp_path / "run"
    train = ["train", f"model={bert_wordpiece}", "task=chain_sum", *TINY, f"output_dir={out}"]
    assert main(train) == 0  # chain_sum's answers survive the uncased WordPiece
    _jsonl(tmp_path)
    data = tmp_path / "capitals.jsonl"
    args = ["eval", str(out), "--task", "jsonl", f"--task-option=train={data}"]
    assert main([*args, f"--task-option=test={data}"]) == 2
    assert "lowercases" in _one_error(capsys, "eval")
    assert not list(out.glob("eval-*.jsonl"))
