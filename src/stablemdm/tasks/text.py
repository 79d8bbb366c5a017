"""Raw text as a task: pretraining on a local corpus, scored by held-out bits per token.

    task: text
    task_options: {train: data/corpus/fables.txt, max_length: 128}

The corpus (`data.corpus`) is tokenized, by the character tokenizer (text mapped into its
alphabet by `normalize_text`) or by a Hugging Face model's, each document followed by the
tokenizer's `<eos>` as separator, and packed into rows of `max_length` tokens (`data.packing`:
MDLM's `wrap`, or `pad`). Every token is eligible: there is no prompt and no answer, so the
task has no examples to decode and score; the run reports the held-out ELBO in bits per token
instead (`evaluation.perplexity`). The held-out split is the `test` corpus, else the documents
`data.corpus.held_out` picks (`test_fraction` of them). `gen_length` is `max_length - 1`: an
unconditional sample is `<sep>` and a canvas filling the rest of the row.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from ..data import DataError, Example, TextTokenizer
from ..data.corpus import held_out, read_documents
from ..data.packing import PACKINGS, PackedRows, Packing, pack, row_tensors
from ..data.tokenizer import CharTokenizer
from .registry import Task, check_split, normalize_text, register_task


@register_task("text")
class TextTask(Task):
    """A raw text corpus packed into fixed-length rows (see the module docstring);
    `streaming` reads and packs the training corpus lazily, pass after pass."""

    def __init__(
        self,
        train: str | Path,
        test: str | Path | None = None,
        test_fraction: float = 0.05,
        text_field: str = "text",
        max_length: int = 128,
        packing: Packing = "wrap",
        streaming: bool = False,
    ) -> None:
        if packing not in PACKINGS:
            raise ValueError(f"task 'text': packing={packing!r}; use one of {list(PACKINGS)}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"task 'text': max_length={max_length!r} must be an integer >= 2")
        if test is None and not 0 < test_fraction < 1:
            raise ValueError(
                f"task 'text': test_fraction={test_fraction!r} must be in (0, 1) (the share of "
                "documents held out), or give a test corpus"
            )
        self.paths = {"train": Path(train), "test": None if test is None else Path(test)}
        self.test_fraction, self.text_field = test_fraction, text_field
        self.max_length, self.gen_length = max_length, max_length - 1
        self.packing, self.streaming = packing, streaming
        for split in ("train", "test"):  # an empty corpus or split is refused now
            if next(self.documents(split), None) is None:
                held = test is None and split == "test"
                fix = "raise test_fraction or give a test corpus" if held else "point at text"
                raise DataError(f"{self._where(split)}: no text (no non-blank document); {fix}")

    def _where(self, split: str) -> str:
        """The corpus a split is read from, for messages."""
        if self.paths["test"] is None:
            kept = self.test_fraction if split == "test" else 1 - self.test_fraction
            return f"{self.paths['train']} (the {kept:g} of its documents in split {split})"
        return str(self.paths[split])

    def documents(self, split: str) -> Iterator[str]:
        """The documents of `split`, lazily: its own corpus, or the train corpus's documents
        that `held_out` assigns to it."""
        check_split(split)
        if self.paths["test"] is not None:
            return read_documents(self.paths[split], self.text_field, self.streaming)
        everything = read_documents(self.paths["train"], self.text_field, self.streaming)
        test = split == "test"
        return (d for i, d in enumerate(everything) if held_out(i, self.test_fraction) == test)

    def token_documents(self, split: str, tokenizer: TextTokenizer) -> Iterator[list[int]]:
        """Each document of `split` as token ids ending in `<eos>` (the separator); text the
        character tokenizer cannot spell is mapped into its alphabet first."""
        char = isinstance(tokenizer, CharTokenizer)
        for i, text in enumerate(self.documents(split)):
            text = normalize_text(text) if char else text
            if text.strip():
                source = f"{self._where(split)}, document {i}"
                yield tokenizer.encode_response(Example("", text, "", source))

    def rows(
        self, split: str, tokenizer: TextTokenizer, limit: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The packed rows of `split` (the first `limit`), in the batch layout."""
        documents = self.token_documents(split, tokenizer)
        rows = list(itertools.islice(pack(documents, self.max_length, self.packing), limit))
        if not rows:
            raise DataError(f"{self._where(split)}: no text left once tokenized")
        return row_tensors(rows, self.max_length, tokenizer.pad_token_id)

    def stream(self, tokenizer: TextTokenizer) -> PackedRows:
        """The training split read, tokenized and packed lazily, pass after pass."""
        return PackedRows(
            lambda: self.token_documents("train", tokenizer),
            self.max_length,
            self.packing,
            tokenizer.pad_token_id,
            self._where("train"),
        )

    def examples(self, split: str) -> list[Example]:
        """None: a corpus has no prompt/response examples to decode and score (its rows
        are `rows`)."""
        check_split(split)
        return []

    def extract(self, output: str) -> str | None:
        """None: raw text has no answer."""
        return None
