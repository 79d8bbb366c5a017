"""`HFTokenizer`: a Hugging Face tokenizer behind the tokenizer protocol of `data.examples`.

It decides what is prompt and what is response. Without a template, the prompt is tokenised
with the tokenizer's own special tokens (BOS, or BERT's `[CLS] ... [SEP]`) and the response
follows, ending in EOS. With `chat_template`, the conversation is rendered by the tokenizer's
template and the response boundary is computed from the template itself: the prompt rendered
with the generation prompt must be a prefix of the whole conversation, so no prompt or
template token is ever masked or scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .examples import DataError, Example


class HFTokenizer:
    """Prompts, responses and chat templates through `tokenizer` (see the module docstring).

    `mask_token_id` is resolved by the model side (`models.hf`; None for an ARM). EOS is
    `eos_token_id`, else the tokenizer's EOS, else its SEP (BERT); PAD is the tokenizer's,
    else EOS (Llama family: attention comes from row lengths, so that is safe). Under
    `shift_logits` (position i-1 predicts token i) a prompt must encode to at least one token,
    the position that predicts the first response token."""

    def __init__(
        self,
        tokenizer: Any,
        mask_token_id: int | None,
        chat_template: bool = False,
        system_prompt: str | None = None,
        eos_token_id: int | None = None,
        shift_logits: bool = False,
    ) -> None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"tokenizer {name} has no chat template; set chat_template=false or use a chat "
                "model's tokenizer"
            )
        eos = eos_token_id
        for candidate in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
            eos = candidate if eos is None else eos
        if eos is None:
            raise ConfigError(f"tokenizer {name} has neither an EOS nor a SEP token to end on")
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.eos_token_id = int(eos)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        self.vocab_size = len(tokenizer)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.shift_logits = shift_logits

    def __repr__(self) -> str:
        return f"HFTokenizer({self.tokenizer.name_or_path!r}, chat_template={self.chat_template})"

    def _messages(self, example: Example) -> list[dict[str, str]]:
        """The conversation whose last message is the assistant's response."""
        if "messages" in example.meta:
            return list(example.meta["messages"])
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [
            *system,
            {"role": "user", "content": example.prompt},
            {"role": "assistant", "content": example.response},
        ]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True
        )
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def encode_prompt(self, example: Example) -> list[int]:
        """The conditioning ids: the prompt with special tokens, or the rendered conversation
        up to and including the assistant's generation prompt."""
        if self.chat_template:
            return self._render(self._messages(example)[:-1], generation_prompt=True)
        ids = list(self.tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
        if not ids and self.shift_logits:
            raise DataError(
                f"{example.source}: the prompt is empty and the tokenizer adds no BOS, so under "
                "shift_logits (position i-1 predicts token i) the first response token would be "
                "scored against its own position; give it a prompt, or set chat_template=true "
                "or shift_logits=false"
            )
        return ids

    def encode_response(self, example: Example) -> list[int]:
        """The response ids ending in EOS (under a template: everything the full conversation
        adds after the prompt, end-of-turn tokens included, up to the EOS that ends the turn)."""
        if not example.response and "messages" not in example.meta:
            raise DataError(f"{example.source}: empty response; every example needs a response")
        if not self.chat_template:
            ids = self.tokenizer(example.response, add_special_tokens=False)["input_ids"]
            return [*ids, self.eos_token_id]
        messages = self._messages(example)
        prompt = self._render(messages[:-1], generation_prompt=True)
        full = self._render(messages, generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise DataError(
                f"{example.source}: the chat template renders the prompt differently once the "
                "response is added (it is not prefix-stable), so the response boundary is "
                "unknown; use another template or chat_template=false"
            )
        ids = self._through_end_of_turn(full[len(prompt) :])
        if not ids:
            raise DataError(f"{example.source}: the response encodes to no tokens")
        return ids if ids[-1] == self.eos_token_id else [*ids, self.eos_token_id]

    def _through_end_of_turn(self, ids: list[int]) -> list[int]:
        """The response up to its last EOS when the template adds only whitespace after it
        (ChatML's `<|im_end|>` newline): otherwise a second EOS would follow and be trained."""
        if self.eos_token_id not in ids:
            return ids
        end = len(ids) - ids[::-1].index(self.eos_token_id)
        return ids[:end] if not self.tokenizer.decode(ids[end:]).strip() else ids

    def token_id(self, text: str, where: str) -> int:
        """The id of `text`, which must be exactly one token (ISAD tokens, for example)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"{where}: {text!r} is not one token of the tokenizer ({pieces})")
        return ids[0]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the underlying tokenizer (an added mask token included)."""
        self.tokenizer.save_pretrained(str(directory))
