"""Raw text corpora: the documents of .txt files (a file, or a folder of them), of the text
column of JSONL, JSON or Parquet files, or of a saved `datasets` folder, read lazily one
document at a time; and the deterministic held-out split of one corpus.

In a .txt file a document is a paragraph: lines up to a blank line (Project Gutenberg's and
most plain-text corpora's convention). Bad input (nothing to read, a missing column, a binary
file) is one `DataError` line naming the file and the fix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from .examples import DataError, check_data_file
from .sources import load_records

TEXT_SUFFIXES = (".txt",)
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def text_files(path: Path) -> list[Path]:
    """The .txt files a corpus path names: the file itself, or a folder's, sorted by name
    (recursively), so the order is the same on every machine."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: a folder with no .txt file; point at .txt files or a dataset")
    return files


def _paragraphs(path: Path) -> Iterator[str]:
    """The paragraphs of one .txt file (lines up to a blank line), read line by line."""
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    lines.append(line.rstrip("\r\n"))
                elif lines:
                    yield "\n".join(lines)
                    lines = []
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text (byte {err.start} of a line); a binary file is no corpus"
        ) from None
    if lines:
        yield "\n".join(lines)


def _column(path: Path, text_field: str, streaming: bool) -> Iterator[str]:
    """The `text_field` values of a records file or saved dataset."""
    records = load_records(path, split="train", streaming=streaming and path.is_file())
    names = getattr(records, "column_names", None)
    for i, row in enumerate(records):
        columns = list(names) if names is not None else list(row)
        if text_field not in columns:
            raise DataError(
                f"{path}: no text column {text_field!r}; it has {', '.join(columns)}; set "
                "task_options.text_field to the column holding the text"
            )
        value = row[text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}:row {i}: {text_field!r} must be text, got {type(value).__name__}"
            )
        if value.strip():
            yield value


def read_documents(path: str | Path, text_field: str = "text", streaming: bool = True):
    """The non-blank documents of a corpus, lazily and in a fixed order (see the module
    docstring); `streaming` reads a records file lazily too (a .txt file always is)."""
    path = Path(path)
    check_data_file(path, folder_ok=True)
    if (
        path.is_dir()
        and not any(path.glob("*.arrow"))
        and not (path / "dataset_dict.json").exists()
    ):
        for file in text_files(path):
            yield from _paragraphs(file)
    elif path.is_dir() or path.suffix in RECORD_SUFFIXES:
        yield from _column(path, text_field, streaming)
    elif path.suffix in TEXT_SUFFIXES:
        yield from _paragraphs(path)
    else:
        raise DataError(
            f"{path}: expected a .txt file, a folder of them, a .jsonl, .json or .parquet "
            "file with a text column, or a saved dataset folder"
        )


def held_out(index: int, fraction: float) -> bool:
    """Whether document `index` belongs to the held-out split of a corpus that holds out
    `fraction` of its documents: a hash of the index, so the choice needs no count of the
    documents (a streamed corpus) and is the same on every machine and every read."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction
