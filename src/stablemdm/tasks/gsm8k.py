"""GSM8K from the offline copy in `../shared/data/gsm8k` (or `data_dir`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..data import DataError, Example, map_jsonl
from .registry import (
    GSM8K_ENV,
    Task,
    _check_prompts_fit,
    check_split,
    final_number,
    fits,
    normalize_text,
    register_task,
)

_REPO_ROOT = Path(__file__).resolve().parents[3]


_CALCULATOR = re.compile(r"<<.*?>>")


def _gsm8k_dir(data_dir: str | Path | None) -> Path:
    """The GSM8K folder: the option, else $STABLEMDM_GSM8K_DIR, else the shared data folder."""
    if data_dir is not None:
        tried, how = [Path(data_dir)], "the data_dir option"
    elif os.environ.get(GSM8K_ENV):
        tried, how = [Path(os.environ[GSM8K_ENV])], f"${GSM8K_ENV}"
    else:
        rel = Path("..") / "shared" / "data" / "gsm8k"
        tried, how = [Path.cwd() / rel, _REPO_ROOT / rel], "the default locations"
    for path in tried:
        if (path / "train.jsonl").is_file() and (path / "test.jsonl").is_file():
            return path.resolve()
    raise DataError(
        f"GSM8K data not found via {how}: no train.jsonl and test.jsonl in "
        f"{', '.join(str(p) for p in tried)}; pass data_dir=... or set ${GSM8K_ENV}"
    )


def _gsm8k_example(record: dict, source: str) -> Example:
    """An Example from a GSM8K record {"question", "answer": "... #### <number>"}."""
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise DataError(f"field '{key}' must be a non-empty string")
    response = normalize_text(_CALCULATOR.sub("", record["answer"])).strip()
    answer = final_number(response)
    if answer is None:
        raise DataError("field 'answer' does not end with '#### <number>'")
    return Example(normalize_text(record["question"]).strip(), response, answer, source)


@register_task("gsm8k")
class GSM8K(Task):
    """Grade-school math word problems; response = the worked solution without `<<...>>`
    calculator annotations, scored by exact match of the number after '####'.

    The lengths (characters) cover every test prompt and all but ~0.4% of training examples;
    training examples that do not fit are dropped and counted in `dropped`.
    """

    max_length = 1664
    gen_length = 768

    def __init__(self, data_dir: str | Path | None = None) -> None:
        folder = _gsm8k_dir(data_dir)
        train = map_jsonl(folder / "train.jsonl", _gsm8k_example)
        self._splits = {
            "train": [e for e in train if fits(e, self.max_length, self.gen_length)],
            "test": map_jsonl(folder / "test.jsonl", _gsm8k_example),
        }
        self.dropped = len(train) - len(self._splits["train"])
        _check_prompts_fit(self._splits["test"], self.max_length, self.gen_length)

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        return list(self._splits[split])

    def extract(self, output: str) -> str | None:
        return final_number(output)
