"""Packing tokenized documents into fixed-length rows, lazily.

- `wrap` (MDLM's default, `dataloader.py`): each document's tokens and one separator token
  are concatenated into one stream, cut into rows of `length` tokens; a document runs on into
  the next row. Unlike MDLM, the last, shorter row is kept (padded) rather than dropped, so a
  small held-out split is scored whole.
- `pad`: each document starts a row, followed by its separator, and the row is padded; a
  document longer than a row continues on the next rows (nothing is cut off).

Every token of a row is eligible: there is no prompt. The packer holds one row and one
document at a time, so a corpus larger than memory packs as it is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import torch

from .examples import DataError

Packing = Literal["wrap", "pad"]
PACKINGS = ("wrap", "pad")


def pack(documents: Iterable[list[int]], length: int, packing: Packing) -> Iterator[list[int]]:
    """Rows of at most `length` token ids from documents already ending in their separator;
    only a row that ends a document (`pad`) or the corpus (`wrap`) is shorter."""
    if length < 1:
        raise ValueError(f"packing needs a row length >= 1, got {length}")
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
    row: list[int] = []
    for ids in documents:
        if packing == "pad":
            yield from (ids[i : i + length] for i in range(0, len(ids), length))
            continue
        start = 0
        while start < len(ids):
            take = ids[start : start + length - len(row)]
            row.extend(take)
            start += len(take)
            if len(row) == length:
                yield row
                row = []
    if row:
        yield row


def row_tensors(rows: list[list[int]], length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows as the batch layout of `data.examples.encode_examples`: `input_ids`,
    `attention_mask` and `eligible` `[N, length]` (every real token attended and eligible,
    padding neither) and `n_response` `[N]` (the real tokens, the response normaliser)."""
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)  # [N, L]
    real = torch.zeros((len(rows), length), dtype=torch.bool)  # [N, L]
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        real[i, : len(ids)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": real,
        "eligible": real.clone(),
        "n_response": real.sum(dim=1),
    }


class PackedRows(torch.utils.data.IterableDataset):
    """A corpus too large to hold, packed as it is read into rows of `row_tensors`, pass
    after pass without end (the run's max_steps ends training, as for `EncodedStream`).
    `documents()` opens a new pass over the tokenized documents; each of several DataLoader
    workers takes every n-th row."""

    def __init__(
        self, documents, length: int, packing: Packing, pad_token_id: int, where: str
    ) -> None:
        self.documents, self.length, self.packing = documents, length, packing
        self.pad_token_id, self.where = pad_token_id, where

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        shard, shards = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        while True:
            empty = True
            for i, row in enumerate(pack(self.documents(), self.length, self.packing)):
                empty = False
                if i % shards == shard:
                    tensors = row_tensors([row], self.length, self.pad_token_id)
                    yield {k: v[0] for k, v in tensors.items()}
            if empty:
                raise DataError(f"{self.where}: no text to train on")
