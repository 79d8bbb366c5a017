"""Text and image tokens in one vocabulary, as in MMaDA: `ImageTokenizer` puts a named block
of image tokens, one per codebook entry, beside a text tokenizer's vocabulary.

An image canvas is spelled in text as `<img_0><img_17>...` (one token per patch, raster
order), so task examples, decoded outputs and records stay plain text. For the built-in
model the block is appended after the character vocabulary; a Hugging Face model's tokenizer
must already hold the tokens `<img_0>` ... `<img_{K-1}>` (its embedding covers both kinds).
The codebook travels with the tokenizer: `save_pretrained` writes it into the run folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .examples import DataError, Example, TextTokenizer
from .tokenizer import CharTokenizer
from .vq import CODEBOOK_FILE, Codebook

BLOCK = "image"
IMAGE_TOKEN = re.compile(r"<img_(\d+)>")


def spell(codes: Sequence[int]) -> str:
    """The text of an image canvas: `<img_k>` per code."""
    return "".join(f"<img_{int(k)}>" for k in codes)


def read_canvas(text: str, n_tokens: int) -> tuple[np.ndarray, bool]:
    """The codes `[n_tokens]` of the image tokens in `text`, in order (-1 where the canvas
    holds none), and whether `text` is exactly `n_tokens` image tokens and nothing else."""
    found = [int(m) for m in IMAGE_TOKEN.findall(text)]
    codes = np.full(n_tokens, -1, dtype=np.int64)
    codes[: min(len(found), n_tokens)] = found[:n_tokens]
    exact = len(found) == n_tokens and IMAGE_TOKEN.sub("", text).strip() == ""
    return codes, exact


class ImageTokenizer:
    """A text tokenizer (the prompt side) plus an image block (the response side): code k of
    `codebook` is token `image_ids[k]`. Responses must be spelled canvases (see `spell`)."""

    def __init__(self, text: TextTokenizer, codebook: Codebook, image_ids: Sequence[int]) -> None:
        if len(image_ids) != codebook.size:
            raise ValueError(f"{len(image_ids)} image token ids for {codebook.size} codes")
        self.text = text
        self.codebook = codebook
        self.image_ids = [int(i) for i in image_ids]
        self._code_of = {token: k for k, token in enumerate(self.image_ids)}
        self.vocab_size = max(text.vocab_size, max(self.image_ids) + 1)
        self.pad_token_id = text.pad_token_id
        self.mask_token_id = text.mask_token_id
        self.eos_token_id = text.eos_token_id

    @classmethod
    def extend(cls, text: TextTokenizer, codebook: Codebook) -> ImageTokenizer:
        """The image block appended after `text`'s vocabulary (the built-in model)."""
        return cls(text, codebook, range(text.vocab_size, text.vocab_size + codebook.size))

    @classmethod
    def within(cls, text: TextTokenizer, codebook: Codebook, where: str) -> ImageTokenizer:
        """The image block already in `text`'s vocabulary (a multimodal Hugging Face model):
        each `<img_k>` must be one token; ConfigError naming the first that is not."""
        ids = []
        for k in range(codebook.size):
            try:
                ids.append(text.token_id(f"<img_{k}>", where=where))
            except ValueError:
                raise ConfigError(
                    f"{where}: the tokenizer {text!r} has no image token <img_{k}>; a model for "
                    f"image tasks needs the {codebook.size} tokens <img_0> ... "
                    f"<img_{codebook.size - 1}> in its vocabulary (one embedding for text and "
                    "image tokens), or lower codebook_size"
                ) from None
        return cls(text, codebook, ids)

    def __repr__(self) -> str:
        return f"ImageTokenizer({self.text!r}, {BLOCK}: {self.codebook.size} tokens)"

    @property
    def blocks(self) -> dict[str, tuple[int, int]]:
        """The named id ranges [first, last + 1) of the vocabulary: "text" and "image"."""
        return {"text": (0, self.text.vocab_size), BLOCK: (min(self.image_ids), self.vocab_size)}

    def encode_prompt(self, example: Example) -> list[int]:
        """The prompt (a caption) through the text tokenizer."""
        return self.text.encode_prompt(example)

    def encode_response(self, example: Example) -> list[int]:
        """The spelled canvas of the response as image token ids, then `<eos>`."""
        codes, exact = read_canvas(example.response, self.codebook.n_tokens)
        if not exact or (codes >= self.codebook.size).any():
            raise DataError(
                f"{example.source}: the response is not a canvas of {self.codebook.n_tokens} "
                f"image tokens <img_k> with k < {self.codebook.size}"
            )
        return [self.image_ids[k] for k in codes] + [self.eos_token_id]

    def token_id(self, text: str, where: str) -> int:
        """The id of one token: an image token `<img_k>` or one of the text tokenizer."""
        match = IMAGE_TOKEN.fullmatch(text)
        if match and int(match.group(1)) < self.codebook.size:
            return self.image_ids[int(match.group(1))]
        return self.text.token_id(text, where)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids`: image tokens spelled `<img_k>`, runs of other ids by the text
        tokenizer."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        pieces: list[str] = []
        run: list[int] = []
        for token in [*ids, None]:
            if token is not None and token not in self._code_of:
                run.append(int(token))
                continue
            if run:
                pieces.append(self.text.decode(run, skip_special_tokens=skip_special_tokens))
                run = []
            if token is not None:
                pieces.append(f"<img_{self._code_of[token]}>")
        return "".join(pieces)

    def save_pretrained(self, directory: str | Path) -> None:
        """The text tokenizer's files, and `codebook.json` (the codebook and its token ids)."""
        directory = Path(directory)
        self.text.save_pretrained(directory)
        spec = {"block": BLOCK, "token_ids": self.image_ids, **self.codebook.to_dict()}
        (directory / CODEBOOK_FILE).write_text(json.dumps(spec) + "\n", encoding="utf-8")


def with_image_tokens(text: TextTokenizer, folder: str | Path) -> TextTokenizer:
    """`text` with the image block saved in `folder` (a run or checkpoint), if it has one."""
    path = Path(folder) / CODEBOOK_FILE
    if not path.is_file():
        return text
    codebook = Codebook.load(path)
    spec = json.loads(path.read_text(encoding="utf-8"))
    ids = spec.get("token_ids")
    if not isinstance(ids, list) or len(ids) != codebook.size:
        raise ConfigError(f"{path}: token_ids must list one token id per code")
    return ImageTokenizer(text, codebook, ids)


def image_tokenizer_for(
    tokenizer: TextTokenizer | None, codebook: Codebook, where: str
) -> ImageTokenizer:
    """The tokenizer an image task is encoded or decoded with: the character tokenizer
    extended by the image block (`tokenizer` None: the built-in model), a Hugging Face one
    that holds the image tokens, or a saved run's, whose codebook must be `codebook`."""
    if tokenizer is None or type(tokenizer) is CharTokenizer:
        return ImageTokenizer.extend(tokenizer or CharTokenizer(), codebook)
    if not isinstance(tokenizer, ImageTokenizer):
        return ImageTokenizer.within(tokenizer, codebook, where)
    saved = tokenizer.codebook
    if saved.fingerprint != codebook.fingerprint:
        raise ConfigError(
            f"{where}: the model's codebook ({saved.kind}, {saved.size} codes, "
            f"{saved.patch}x{saved.patch} patches, fitted on {saved.about or '?'}, fingerprint "
            f"{saved.fingerprint}) is from another run than this task's ({codebook.kind}, "
            f"{codebook.size} codes, {codebook.patch}x{codebook.patch} patches, fitted on "
            f"{codebook.about or '?'}, fingerprint {codebook.fingerprint}); use the task "
            "options the model was trained with (its config.yaml task_options)"
        )
    return tokenizer
