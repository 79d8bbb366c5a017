"""Training data: examples and JSONL files (`examples`), encoded into the `[B, L]` batch
layout of docs/architecture.md."""

from .examples import (
    DataError,
    Example,
    TextTokenizer,
    canvas_lengths,
    encode_examples,
    fits,
    length_cap,
    map_jsonl,
    read_jsonl,
    write_jsonl,
)

__all__ = [
    "DataError",
    "Example",
    "TextTokenizer",
    "canvas_lengths",
    "encode_examples",
    "length_cap",
    "fits",
    "map_jsonl",
    "read_jsonl",
    "write_jsonl",
]
