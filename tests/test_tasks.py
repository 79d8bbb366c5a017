import json
import re

import pytest

from stablemdm.data import DataError, Example, encode_examples
from stablemdm.data.tokenizer import DEFAULT_ALPHABET, CharTokenizer
from stablemdm.tasks import registry as tasks
from stablemdm.tasks.registry import (
    GSM8K_ENV,
    Task,
    available_tasks,
    final_number,
    fits,
    get_task,
    normalize_number,
    normalize_text,
    register_task,
)

SMALL = {"n_train": 300, "n_test": 40}
RG_TASKS = ["chain_sum", "mini_sudoku", "countdown", "gsm_symbolic"]


def _gsm8k_or_skip():
    try:
        return get_task("gsm8k")
    except DataError as err:
        pytest.skip(f"GSM8K data not available: {err}")


def _task(name):
    return _gsm8k_or_skip() if name == "gsm8k" else get_task(name, **SMALL)


def _bump_last_number(text: str) -> str:
    """The text with its last integer increased by one: a wrong answer for numeric tasks."""
    match = list(re.finditer(r"\d+", text))[-1]
    return text[: match.start()] + str(int(match.group()) + 1) + text[match.end() :]


def _perturb(name: str, response: str) -> str:
    if name == "mini_sudoku":
        return response[1] + response[0] + response[2:]
    if name == "countdown":
        return response + "+1"
    return _bump_last_number(response)


@pytest.mark.parametrize("name", ["gsm8k", *RG_TASKS])
def test_scorer_accepts_gold_and_rejects_perturbed(name):
    task = _task(name)
    for example in task.examples("test"):
        assert task.score(example.response, example), example.source
        assert not task.score(_perturb(name, example.response), example), example.source
        assert not task.score("", example)


@pytest.mark.parametrize("name", ["gsm8k", *RG_TASKS])
def test_splits_disjoint_encodable_and_fit(name):
    task = _task(name)
    train, test = task.examples("train"), task.examples("test")
    assert train and test
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    tok = CharTokenizer()
    batch = encode_examples(train, tok, task.max_length, task.gen_length)
    assert batch["input_ids"].shape == (len(train), task.max_length)
    for example in test:
        tok.encode(example.prompt, where=example.source)
        tok.encode(example.response, where=example.source)
        assert len(example.prompt) + 1 + task.gen_length <= task.max_length, example.source
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        task.examples("validation")


@pytest.mark.parametrize("name", RG_TASKS)
def test_reasoning_gym_sizes_and_test_responses_fit(name):
    task = get_task(name, **SMALL)
    test = task.examples("test")
    assert len(task.examples("train")) == SMALL["n_train"] and len(test) == SMALL["n_test"]
    assert len({e.prompt for e in test}) == len(test)
    assert all(len(e.response) + 1 <= task.gen_length for e in test)
    assert task.unscorable <= 0.05 * SMALL["n_test"]
    assert all(e.meta["metadata"]["source_dataset"] == name for e in test)


def test_reasoning_gym_splits_cached_and_seeded():
    a = get_task("chain_sum", **SMALL)
    b = get_task("chain_sum", **SMALL)
    assert a.examples("test") == b.examples("test")
    other = get_task("chain_sum", n_train=300, n_test=40, seed=1)
    assert a.examples("test") != other.examples("test")


def test_compact_formats():
    chain = get_task("chain_sum", **SMALL).examples("test")
    assert all(re.fullmatch(r"\d{1,2}([+-]\d{1,2}){1,2}", e.prompt) for e in chain)
    assert all(e.response == str(eval(e.prompt)) == e.answer for e in chain)
    sudoku = get_task("mini_sudoku", **SMALL).examples("test")
    assert all(re.fullmatch(r"[1-4_]{16}", e.prompt) for e in sudoku)
    assert all(re.fullmatch(r"[1-4]{16}", e.response) for e in sudoku)
    assert all(p in ("_", r) for e in sudoku for p, r in zip(e.prompt, e.response, strict=True))
    countdown = get_task("countdown", **SMALL).examples("test")
    for e in countdown:
        target, numbers = e.prompt.split(":")
        assert eval(e.response) == int(target)
        assert sorted(re.findall(r"\d+", e.response)) == sorted(numbers.split(","))
    gsm = get_task("gsm_symbolic", **SMALL).examples("test")
    assert all(final_number(e.response) == e.answer for e in gsm)


def test_countdown_checker_judges_the_expression_not_the_string():
    task = get_task("countdown", **SMALL)
    for example in task.examples("test"):
        assert task.score(" (" + example.response + ")\n", example)
        assert not task.score(example.response + "*1", example)  # uses a number not given


def test_gsm_symbolic_declares_gsm8k_contamination():
    assert get_task("gsm_symbolic", **SMALL).contaminates == frozenset({"gsm8k"})
    assert "gsm8k" in get_task("gsm_symbolic", **SMALL).__doc__


def test_too_small_problem_space_is_a_clear_error():
    with pytest.raises(ValueError, match="problem space is too small"):
        get_task("chain_sum", n_train=10, n_test=300, max_terms=2, max_digits=1)


def test_invalid_difficulty_is_a_clear_error():
    with pytest.raises(ValueError, match="task 'mini_sudoku': invalid options"):
        get_task("mini_sudoku", **SMALL, min_empty=10, max_empty=5)


def test_get_task_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'.*chain_sum.*gsm8k"):
        get_task("nope")
    with pytest.raises(ValueError, match=r"no option\(s\) \['n_tarin'\].*n_train"):
        get_task("chain_sum", n_tarin=5)
    with pytest.raises(ValueError, match="task 'jsonl'.*missing"):
        get_task("jsonl")
    with pytest.raises(ValueError, match="n_test must be a positive int"):
        get_task("chain_sum", n_test=0)
    assert {"gsm8k", "jsonl", *RG_TASKS} <= set(available_tasks())


def test_register_task_and_duplicates(monkeypatch):
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))

    @register_task("_test_constant")
    class Constant(Task):
        max_length, gen_length = 8, 4

        def examples(self, split):
            return [Example("a", "b", "b", "const")]

        def extract(self, output):
            return output.strip() or None

    task = get_task("_test_constant")
    assert task.name == "_test_constant" and task.score(" b ", task.examples("train")[0])
    with pytest.raises(ValueError, match="already registered"):
        register_task("_test_constant")(Constant)


def test_gsm8k_missing_dir_names_paths_and_fix(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=rf"{tmp_path}.*data_dir=.*{GSM8K_ENV}"):
        get_task("gsm8k", data_dir=tmp_path)
    monkeypatch.setenv(GSM8K_ENV, str(tmp_path / "absent"))
    with pytest.raises(DataError, match=rf"\${GSM8K_ENV}.*absent"):
        get_task("gsm8k")


def test_gsm8k_from_small_folder(tmp_path):
    rows = [
        {
            "question": "Tom has 2\u00d73 apples\u2014how many?",
            "answer": "2*3 = <<2*3=6>>6\n#### 6",
        },
        {"question": "Big?", "answer": "1000+234 = <<1000+234=1234>>1,234\n#### 1,234"},
    ]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = get_task("gsm8k", data_dir=tmp_path)
    first, second = task.examples("test")
    assert first.prompt == "Tom has 2*3 apples-how many?"
    assert first.response == "2*3 = 6\n#### 6" and first.answer == "6"
    assert second.answer == "1234" and task.dropped == 0
    assert task.score("so #### 1,234.0", second) and not task.score("1234", second)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}))
    with pytest.raises(DataError, match=r"test.jsonl:1: field 'answer' does not end with '####"):
        get_task("gsm8k", data_dir=tmp_path)


def test_normalizers():
    text = "\u201cIt\u2019s 5\u00bd \u00d7 2\u2212 1\u201d\tcaf\u00e9 \u20ac3 \u4e2d"
    out = normalize_text(text)
    assert out == '"It\'s 51/2 * 2- 1" cafe EUR3 '
    assert set(out) <= set(DEFAULT_ALPHABET)
    assert normalize_number(" 1,000.50 ") == "1000.5"
    assert normalize_number("72.0") == "72" and normalize_number("-3") == "-3"
    assert final_number("a #### 1 #### $1,200.00 dollars") == "1200"
    assert final_number("no marker 5") is None


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_jsonl_task(tmp_path):
    _write(
        tmp_path / "train.jsonl",
        [
            {"prompt": "2+2", "response": "4"},
            {"prompt": "3+3", "response": "work #### 6", "answer": "6"},
            {"prompt": "long", "response": "x" * 40},
        ],
    )
    _write(tmp_path / "test.jsonl", [{"prompt": "5+5", "response": "steps #### 10"}])
    task = get_task("jsonl", train=tmp_path / "train.jsonl", test=tmp_path / "test.jsonl")
    assert task.gen_length == 41 and task.max_length == 5 + 41
    (example,) = task.examples("test")
    assert task.score("other steps ####  10 ", example) and task.score("10", example)
    assert not task.score("steps #### 11", example) and not task.score("", example)
    small = get_task(
        "jsonl",
        train=tmp_path / "train.jsonl",
        test=tmp_path / "test.jsonl",
        max_length=20,
        gen_length=14,
    )
    train = small.examples("train")  # all kept: the run leaves out what does not fit its lengths
    assert len(train) == 3 and [fits(e, 20, 14) for e in train] == [True, True, False]
    with pytest.raises(DataError, match=r"test.jsonl:1.*raise max_length"):
        get_task(
            "jsonl",
            train=tmp_path / "train.jsonl",
            test=tmp_path / "test.jsonl",
            max_length=16,
            gen_length=14,
        )


def test_jsonl_task_rejects_unencodable_text(tmp_path):
    _write(tmp_path / "train.jsonl", [{"prompt": "ok", "response": "na\u00efve"}])
    _write(tmp_path / "test.jsonl", [{"prompt": "ok", "response": "ok"}])
    with pytest.raises(ValueError, match=r"train.jsonl:1, field 'response'.*U\+00EF"):
        get_task("jsonl", train=tmp_path / "train.jsonl", test=tmp_path / "test.jsonl")
