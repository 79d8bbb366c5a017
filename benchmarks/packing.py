"""Packing throughput of raw text (`task: text`, streaming): tokens per second from a .txt
corpus on disk to packed training rows, the path a streamed run's DataLoader takes
(`TextTask.stream`: read a paragraph, map it into the character alphabet, tokenize, pack,
build the row tensors). It is timed on the process CPU clock, so a busy machine shows what
one core delivers; the corpus is the shipped fables repeated to `--megabytes`.

    .venv/bin/python benchmarks/packing.py [--megabytes 8] [--max-length 128] [--packing wrap]

Prints one JSON line: tokens/s and rows/s of the whole pipeline, and of packing alone (the
tokenized documents held in memory first).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from stablemdm.data.packing import pack
from stablemdm.tasks.registry import get_task

CORPUS = Path(__file__).parents[1] / "data" / "corpus" / "fables.txt"


def corpus(folder: Path, megabytes: float) -> Path:
    """The fables repeated to about `megabytes` MB, in `folder`."""
    text = CORPUS.read_text(encoding="utf-8").strip() + "\n\n"
    path = folder / "corpus.txt"
    path.write_text(text * max(1, round(megabytes * 2**20 / len(text))), encoding="utf-8")
    return path


def timed(rows) -> tuple[int, int, float]:
    """(rows, real tokens, CPU seconds) of draining `rows`."""
    start, n, tokens = time.process_time(), 0, 0
    for row in rows:
        n += 1
        tokens += int(row["attention_mask"].sum()) if isinstance(row, dict) else len(row)
    return n, tokens, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=8.0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--packing", default="wrap", choices=["wrap", "pad"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = corpus(Path(folder), args.megabytes)
        task = get_task(
            "text",
            train=str(path),
            max_length=args.max_length,
            packing=args.packing,
            streaming=True,
        )
        tokenizer = task.tokenizer_for(None)
        documents = list(task.token_documents("train", tokenizer))
        one_pass = len(list(pack(documents, args.max_length, args.packing)))
        stream = itertools.islice(iter(task.stream(tokenizer)), one_pass)
        rows, tokens, seconds = timed(stream)
        _, _, packing_only = timed(pack(documents, args.max_length, args.packing))
    print(
        json.dumps(
            {
                "megabytes": args.megabytes,
                "max_length": args.max_length,
                "packing": args.packing,
                "rows": rows,
                "tokens": tokens,
                "tokens_per_s": round(tokens / seconds),
                "rows_per_s": round(rows / seconds),
                "pack_only_tokens_per_s": round(tokens / packing_only),
            }
        )
    )


if __name__ == "__main__":
    main()
