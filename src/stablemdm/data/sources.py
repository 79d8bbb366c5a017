"""Training data from files through `datasets`, and lazy encoding of streamed examples."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .examples import Example, TextTokenizer, encode_examples, fits


class EncodedStream(torch.utils.data.IterableDataset):
    """Examples encoded one at a time into rows of `encode_examples` (for a streamed train
    split too large to hold); examples that do not fit the canvas are skipped and counted."""

    def __init__(
        self,
        examples: Iterable[Example],
        tokenizer: TextTokenizer,
        max_length: int,
        gen_length: int,
        eos_fill: bool = True,
    ) -> None:
        self.examples = examples
        self.tokenizer = tokenizer
        self.max_length, self.gen_length, self.eos_fill = max_length, gen_length, eos_fill
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for example in self.examples:
            if not fits(example, self.tokenizer, self.max_length, self.gen_length):
                self.skipped += 1
                continue
            row = encode_examples(
                [example], self.tokenizer, self.max_length, self.gen_length, self.eos_fill
            )
            yield {k: v[0] for k, v in row.items()}
