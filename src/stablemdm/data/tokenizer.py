"""Character-level tokenizer: four special tokens, then one id per character of an alphabet.

Small tasks need no subword vocabulary; a fixed alphabet makes every id meaningful and every
unknown character a loud error instead of a silent `<unk>`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .examples import DataError, Example

DEFAULT_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))


TOKENIZER_FILE = "tokenizer.json"


class CharTokenizer:
    """Maps characters to ids: `<pad>`=0, `<mask>`=1, `<eos>`=2, `<sep>`=3, characters from 4."""

    PAD, MASK, EOS, SEP = "<pad>", "<mask>", "<eos>", "<sep>"
    SPECIAL_TOKENS = (PAD, MASK, EOS, SEP)

    def __init__(self, alphabet: str = DEFAULT_ALPHABET) -> None:
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError(f"alphabet must be a non-empty string, got {alphabet!r}")
        seen: set[str] = set()
        for ch in alphabet:
            if ch in seen:
                raise ValueError(f"alphabet contains {ch!r} (U+{ord(ch):04X}) more than once")
            seen.add(ch)
        self.alphabet = alphabet
        n_special = len(self.SPECIAL_TOKENS)
        self._char_to_id = {ch: i + n_special for i, ch in enumerate(alphabet)}
        self._id_to_text = list(self.SPECIAL_TOKENS) + list(alphabet)
        self.pad_token_id, self.mask_token_id, self.eos_token_id, self.sep_token_id = range(
            n_special
        )
        self.vocab_size = n_special + len(alphabet)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, where: str = "text") -> list[int]:
        """Ids of the characters of `text`; `where` names the text in the error message."""
        try:
            return [self._char_to_id[ch] for ch in text]
        except KeyError:
            pos = next(i for i, ch in enumerate(text) if ch not in self._char_to_id)
            ch = text[pos]
            raise ValueError(
                f"cannot encode {where}: character {ch!r} (U+{ord(ch):04X}) at position {pos} "
                "is not in the tokenizer's alphabet; normalise the text to the alphabet or "
                "build the tokenizer with a larger alphabet"
            ) from None

    def encode_prompt(self, example: Example) -> list[int]:
        """The conditioning part of a row: the prompt's ids followed by `<sep>`."""
        ids = self.encode(example.prompt, where=f"{example.source}, field 'prompt'")
        return ids + [self.sep_token_id]

    def encode_response(self, example: Example) -> list[int]:
        """The response's ids followed by `<eos>`; DataError for an empty response."""
        if not example.response:
            raise DataError(f"{example.source}: empty response; every example needs a response")
        ids = self.encode(example.response, where=f"{example.source}, field 'response'")
        return ids + [self.eos_token_id]

    def token_id(self, text: str, where: str) -> int:
        """The id of the single character `text` (ISAD tokens, for example)."""
        if len(text) != 1:
            raise ValueError(f"{where}: {text!r} is not a single token of the character tokenizer")
        return self.encode(text, where=where)[0]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list or a 1-D tensor); special tokens are dropped or spelled out."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D tensor of ids, got shape {list(ids.shape)}")
            ids = ids.tolist()
        n_special = len(self.SPECIAL_TOKENS)
        pieces = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if skip_special_tokens and i < n_special:
                continue
            pieces.append(self._id_to_text[i])
        return "".join(pieces)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `tokenizer.json` (type, alphabet, special tokens) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = {
            "type": "char",
            "alphabet": self.alphabet,
            "special_tokens": list(self.SPECIAL_TOKENS),
        }
        (directory / TOKENIZER_FILE).write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CharTokenizer:
        """Load a tokenizer written by `save_pretrained`."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(
                f"no tokenizer found: {path} does not exist; save one with "
                "CharTokenizer.save_pretrained(directory)"
            )
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(spec, dict) or spec.get("type") != "char":
            raise ValueError(f'{path}: expected an object with "type": "char"')
        if spec.get("special_tokens") != list(cls.SPECIAL_TOKENS):
            raise ValueError(
                f"{path}: special_tokens must be {list(cls.SPECIAL_TOKENS)}, "
                f"got {spec.get('special_tokens')!r}"
            )
        alphabet = spec.get("alphabet")
        if not isinstance(alphabet, str):
            raise ValueError(f'{path}: "alphabet" must be a string, got {alphabet!r}')
        try:
            return cls(alphabet)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
