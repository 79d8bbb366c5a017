"""What a likelihood estimate is asked for, checked up front: the question (a context and its
continuations as token ids), the sampling budget, and what the model declares about itself
(an ARM, an MDM or a block-diffusion model, its [MASK] id). Bad input is one `ConfigError`
line naming the fix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError, short_repr
from ..estimators.losses import Model, adapter, conditions_on_t, unwrap

Kind = Literal["auto", "mdm", "arm", "block"]


KINDS = ("auto", "mdm", "arm", "block")


def _token_ids(ids: Sequence[int] | torch.Tensor, what: str) -> tuple[int, ...]:
    """Token ids as a tuple of ints >= 0 (a list or a 1-D integer tensor)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point:
            raise ConfigError(f"likelihood: {what} must be a 1-D tensor of token ids")
        ids = ids.tolist()
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise ConfigError(f"likelihood: {what} must be a list of token ids, got {short_repr(ids)}")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ConfigError(
                f"likelihood: {what} holds {short_repr(i)}, not a token id (an int >= 0)"
            )
    return tuple(ids)


@dataclass(frozen=True)
class Question:
    """A context and the continuations whose log-likelihood given it is estimated (one, or
    the choices of a multiple-choice question)."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @classmethod
    def of(
        cls,
        context: Sequence[int] | torch.Tensor,
        continuations: Sequence[Sequence[int] | torch.Tensor],
    ) -> Question:
        """Check and convert the token ids; every continuation needs at least one token."""
        if not isinstance(continuations, Sequence) or len(continuations) == 0:
            raise ConfigError("likelihood: no continuation given; pass at least one")
        ctx = _token_ids(context, "the context")
        conts = tuple(
            _token_ids(c, f"continuation {i + 1} of {len(continuations)}")
            for i, c in enumerate(continuations)
        )
        for i, cont in enumerate(conts):
            if not cont:
                raise ConfigError(
                    f"likelihood: continuation {i + 1} of {len(conts)} is empty; the ELBO "
                    "needs at least one token to score (drop it or give its tokens)"
                )
        return cls(ctx, conts)

    @property
    def lengths(self) -> tuple[int, ...]:
        """The number of tokens L of each continuation."""
        return tuple(len(c) for c in self.continuations)


@dataclass(frozen=True)
class Budget:
    """How many forward passes an estimate may spend and when it may stop.

    A batch is `batch_size` sequence passes for each continuation (LLaDA's `batch_size`);
    batches are drawn until the standard error (of the log-likelihood, or of the gap between
    the two best choices) is at most `target_se` nats after at least `min_draws` independent
    draws, or until the next batch would pass `max_passes` per continuation (LLaDA's
    `mc_num`). `target_se=None` spends the whole cap, as LLaDA's evaluator does. `min_draws`
    keeps a standard error from a handful of draws (itself noisy) from stopping early.
    """

    batch_size: int = 32
    max_passes: int = 128
    target_se: float | None = None
    min_draws: int = 8

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_passes", "min_draws"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"likelihood: {name}={value!r} must be an integer >= 1")
        if self.max_passes % self.batch_size:
            raise ConfigError(
                f"likelihood: max_passes={self.max_passes} must be a multiple of "
                f"batch_size={self.batch_size} (passes are drawn in whole batches)"
            )
        if self.min_draws < 2:
            raise ConfigError(
                f"likelihood: min_draws={self.min_draws} must be >= 2 (a standard error needs "
                "two independent draws)"
            )
        target = self.target_se
        if target is not None and (
            isinstance(target, bool) or not isinstance(target, int | float) or not target > 0
        ):
            raise ConfigError(
                f"likelihood: target_se={target!r} must be a number > 0 (nats), or None to "
                "spend max_passes"
            )


def is_arm(model: Model, kind: Kind) -> bool:
    """Whether `model` is scored as an ARM: `kind`, or with "auto" what the model declares
    (the built-in transformer's `causal`, or a Hugging Face model adapted as an ARM)."""
    if kind not in KINDS:
        raise ConfigError(f"likelihood: kind={kind!r} is unknown; use one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind == "arm"
    spec = adapter(model)
    if spec:
        return spec.get("mask_token_id") is None
    return getattr(getattr(unwrap(model), "config", None), "causal", False) is True


def declared_block_size(model: Model) -> int | None:
    """The block length a model declares it was trained with as block diffusion (its Hugging
    Face adapter's `block_size`, the built-in transformer's config's), else None."""
    spec = adapter(model)
    if spec:
        return spec.get("block_size")
    return getattr(getattr(unwrap(model), "config", None), "block_size", None)


def block_size_of(model: Model, kind: Kind, block_size: int | None) -> int | None:
    """The block length of the ELBO, None for the full canvas: `block_size` if given (kind
    "auto" or "block"), else the model's own under "block" or "auto"; "mdm" reads the whole
    canvas at once even on a block-diffusion model."""
    size = block_size
    if size is not None and kind not in ("auto", "block"):
        raise ConfigError(
            f"likelihood: block_size={size!r} is for kind='block' (or 'auto'), not {kind!r}"
        )
    if size is None and kind in ("auto", "block"):
        size = declared_block_size(model)
    if size is None:
        if kind == "block":
            raise ConfigError(
                "likelihood: kind='block' needs a block length, and the model declares none "
                "(config.block_size); pass block_size=N"
            )
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"likelihood: block_size={short_repr(size)} must be an int >= 1")
    if conditions_on_t(model):
        raise ConfigError(
            "likelihood: the block ELBO draws a rate per block, but this model conditions on "
            "one t; score it with kind='mdm'"
        )
    return size


def mask_token_of(model: Model, mask_token_id: int | None) -> int:
    """The [MASK] id: the one given, else the model's (its Hugging Face adapter's, or its
    config's `mask_token_id`)."""
    found = mask_token_id
    if found is None:
        found = adapter(model).get("mask_token_id")
    if found is None:
        found = getattr(getattr(unwrap(model), "config", None), "mask_token_id", None)
    if found is None:
        raise ConfigError(
            "likelihood: the model declares no mask token id (config.mask_token_id); pass "
            "mask_token_id=ID, or kind='arm' for an autoregressive model"
        )
    if isinstance(found, bool) or not isinstance(found, int) or found < 0:
        raise ConfigError(f"likelihood: mask_token_id={short_repr(found)} must be an int >= 0")
    return found
