"""lm-eval's requests as token ids: contexts and continuations split as lm-eval splits them,
the choices of one question grouped (they share common random numbers), a document cut
into the rolling windows of the model's length, and a generation cut at its stop
sequences."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

Encode = Callable[[str], list[int]]


def text_encoder(tokenizer: Any) -> Encode:
    """Plain text to ids with no special tokens (lm-eval's convention for a base model):
    the character tokenizer's ids, or a Hugging Face tokenizer's."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None:
        return lambda text: list(inner(text, add_special_tokens=False)["input_ids"])
    return lambda text: tokenizer.encode(text, where="the lm-eval request")


def encode_pair(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's `TemplateLM._encode_pair` makes them: the
    context's trailing spaces move to the continuation, and the continuation is what the
    whole text adds to the context's ids."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode(context + continuation), encode(context)
    return head, whole[len(head) :]


def fit_context(context: list[int], continuation: list[int], limit: int | None) -> list[int]:
    """The latest tokens of `context` that fit the model's `limit` positions beside the
    whole continuation (lm-eval's left truncation); a continuation longer than the model
    is a ConfigError."""
    if limit is None or len(context) + len(continuation) <= limit:
        return context
    room = limit - len(continuation)
    if room < 1:
        raise ConfigError(
            f"lm-eval model stablemdm: a continuation of {len(continuation)} tokens does not "
            f"fit the model's {limit} positions with a token of context; evaluate a task with "
            "shorter answers, or a model trained longer (max_length)"
        )
    return context[-room:]


@dataclass(frozen=True)
class Question:
    """The requests of one question (same task, document and context), by their index in
    lm-eval's list."""

    key: tuple[Any, ...]
    context: list[int]
    indices: list[int]
    continuations: list[list[int]]


def group_questions(
    keys: Sequence[tuple[Any, ...]], pairs: Sequence[tuple[list[int], list[int]]]
) -> list[Question]:
    """Requests of equal key (task, document, context text) as one question each, in the
    order of their first request."""
    groups: dict[tuple[Any, ...], Question] = {}
    for i, (key, (context, continuation)) in enumerate(zip(keys, pairs, strict=True)):
        question = groups.setdefault(key, Question(key, context, [], []))
        question.indices.append(i)
        question.continuations.append(continuation)
    return list(groups.values())


def rolling_windows(
    tokens: list[int], prefix: int, limit: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict each token of a document once, each
    row (context + continuation) at most `limit` tokens: lm-eval's rolling windows with one
    token of context, the first conditioned on `prefix` (lm-eval's prefix token)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(tokens, prefix, max_seq_len=limit - 1, context_len=1)
    return [make_disjoint_window(w) for w in windows]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of the stop sequences it contains."""
    ends = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(ends)] if ends else text
