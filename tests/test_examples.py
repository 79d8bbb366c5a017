import json

import pytest
import torch

from stablemdm.data import (
    DataError,
    Example,
    canvas_lengths,
    encode_examples,
    fits,
    read_jsonl,
    write_jsonl,
)
from stablemdm.data.tokenizer import CharTokenizer


@pytest.fixture
def tok():
    return CharTokenizer()


def test_example_meta_ignored_by_equality_and_hash():
    a = Example("1+1", "2", "2", "x:1", meta={"entry": [1, 2]})
    b = Example("1+1", "2", "2", "x:1", meta={"other": 3})
    assert a == b and hash(a) == hash(b)
    assert a != Example("1+1", "3", "3", "x:1")


def test_read_write_round_trip(tmp_path):
    path = tmp_path / "sub" / "data.jsonl"
    write_jsonl(
        path,
        [
            {"prompt": "2+2", "response": "4"},
            {"prompt": "q", "response": "r #### 5", "answer": "5", "id": 7},
        ],
    )
    assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]
    examples = read_jsonl(path)
    assert examples == [
        Example("2+2", "4", "4", f"{path}:1"),
        Example("q", "r #### 5", "5", f"{path}:2"),
    ]
    assert examples[1].source == f"{path}:2"


def test_read_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"prompt": "a", "response": "b"}\n   \n')
    (example,) = read_jsonl(path)
    assert example.source == f"{path}:2"


def test_read_reports_every_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "ok", "response": "ok"}),
        "{broken",
        json.dumps([1, 2]),
        json.dumps({"response": "r"}),
        json.dumps({"prompt": "", "response": "r"}),
        json.dumps({"prompt": "p", "response": 3}),
        json.dumps({"prompt": "p", "response": "r", "answer": 4}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    expected = {
        2: "invalid JSON",
        3: "expected a JSON object",
        4: "missing field 'prompt'",
        5: "field 'prompt' is empty",
        6: "field 'response' must be a string",
        7: "field 'answer' must be a string",
    }
    for lineno, problem in expected.items():
        assert f"{path}:{lineno}: {problem}" in message
    assert f"{path}:1:" not in message
    assert message.startswith(f"{len(expected)} malformed line(s)")


def test_read_caps_the_error_list(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("x\n" * 30)
    with pytest.raises(DataError, match="and 10 more") as info:
        read_jsonl(path)
    assert f"{path}:20:" in str(info.value) and f"{path}:21:" not in str(info.value)


def test_read_missing_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="not found") as info:
        read_jsonl(tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in str(info.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"prompt": "a", "response": "b"}])

    def records():
        yield {"prompt": "c", "response": "d"}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(path, records())
    assert path.read_text() == '{"prompt": "a", "response": "b"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def _examples():
    return [
        Example("12+3", "15", "15", "s #0"),
        Example("7", "seven", "seven", "s #1"),
        Example("100-1-1", "98", "98", "s #2"),
    ]


def test_prompt_ids_end_with_sep(tok):
    ids = tok.encode_prompt(Example("ab", "c", "c"))
    assert ids == tok.encode("ab") + [tok.sep_token_id]


def test_encode_with_canvas_layout(tok):
    examples = _examples()
    max_length, gen_length = 16, 7
    batch = encode_examples(examples, tok, max_length, gen_length)
    ids, attn, elig = batch["input_ids"], batch["attention_mask"], batch["eligible"]
    assert ids.shape == attn.shape == elig.shape == (3, max_length)
    assert ids.dtype == torch.long and attn.dtype == torch.bool and elig.dtype == torch.bool
    for row, example in enumerate(examples):
        head = tok.encode_prompt(example)
        start = len(head)
        response = tok.encode(example.response)
        fill = [tok.eos_token_id] * (gen_length - len(response))
        assert ids[row, :start].tolist() == head
        assert ids[row, start : start + gen_length].tolist() == response + fill
        assert (ids[row, start + gen_length :] == tok.pad_token_id).all()
        assert elig[row].nonzero().flatten().tolist() == list(range(start, start + gen_length))
    assert elig.sum(dim=1).tolist() == [gen_length] * 3
    assert torch.equal(attn, ids != tok.pad_token_id)
    assert not (elig & (ids == tok.sep_token_id)).any()
    assert not (elig & ~attn).any()


def test_encode_without_canvas_ends_at_first_eos(tok):
    examples = _examples()
    batch = encode_examples(examples, tok, max_length=12)
    ids, elig = batch["input_ids"], batch["eligible"]
    for row, example in enumerate(examples):
        start = len(example.prompt) + 1
        end = start + len(example.response) + 1
        assert ids[row, end - 1] == tok.eos_token_id
        assert (ids[row, end:] == tok.pad_token_id).all()
        assert elig[row].nonzero().flatten().tolist() == list(range(start, end))
    assert torch.equal(batch["attention_mask"], ids != tok.pad_token_id)


def test_encode_errors_name_source_lengths_and_setting(tok):
    example = Example("12+3", "15", "15", "chain_sum train #17")
    with pytest.raises(
        DataError, match=r"chain_sum train #17.*is 3 tokens.*gen_length is 2.*raise"
    ):
        encode_examples([example], tok, max_length=20, gen_length=2)
    with pytest.raises(DataError, match=r"chain_sum train #17.*9 > max_length 8.*raise max_length"):
        encode_examples([example], tok, max_length=8, gen_length=4)
    with pytest.raises(DataError, match=r"chain_sum train #17.*8 tokens > max_length 7"):
        encode_examples([example], tok, max_length=7)
    assert encode_examples([example], tok, max_length=8)["eligible"].sum() == 3
    empty = Example("12+3", "", "", "file.jsonl:4")
    with pytest.raises(DataError, match="file.jsonl:4: empty response"):
        encode_examples([empty], tok, max_length=20, gen_length=4)


def test_encode_unknown_character_names_source_and_field(tok):
    example = Example("caf\u00e9", "x", "x", "data.jsonl:3")
    with pytest.raises(ValueError, match=r"data.jsonl:3, field 'prompt'.*U\+00E9"):
        encode_examples([example], tok, max_length=20)


def test_n_response_counts_response_and_one_eos_without_the_fill(tok):
    examples = _examples()
    batch = encode_examples(examples, tok, max_length=16, gen_length=7)
    assert batch["n_response"].tolist() == [len(e.response) + 1 for e in examples]
    assert batch["n_response"].dtype == torch.long


def test_canvas_lengths_and_fits_measure_prompt_and_response(tok):
    examples = _examples()
    longest_response = max(len(e.response) for e in examples) + 1  # + <eos>
    longest_prompt = max(len(e.prompt) for e in examples) + 1  # + <sep>
    assert canvas_lengths(examples, tok) == (longest_prompt + longest_response, longest_response)
    assert canvas_lengths(examples, tok, gen_length=9) == (longest_prompt + 9, 9)
    assert canvas_lengths(examples, tok, max_length=30) == (30, longest_response)
    with pytest.raises(DataError, match="raise max_length"):
        canvas_lengths(examples, tok, max_length=6, gen_length=6)
    with pytest.raises(DataError, match="no examples"):
        canvas_lengths([], tok)
    example = examples[2]  # prompt + <sep> is 8 tokens, response + <eos> 3
    assert fits(example, tok, max_length=11, gen_length=3)
    assert not fits(example, tok, max_length=10, gen_length=3)
    assert not fits(example, tok, max_length=20, gen_length=2)
