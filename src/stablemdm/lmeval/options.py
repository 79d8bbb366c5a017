"""The `--model_args` of the `stablemdm` lm-eval model, checked: each bad one is one
`ConfigError` line naming it and the values it takes."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from ..errors import ConfigError, short_repr
from ..likelihood import ESTIMATORS, Budget

REMASKING = ("low_confidence", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GENERATION_BATCH = 32  # prompts decoded together when lm-eval's --batch_size is "auto"
LM_EVAL_KEYS = ("batch_size", "max_batch_size", "device")  # what lm-eval itself passes


@dataclass(frozen=True)
class Options:
    """What the model does with each request. The model: `run`, a stablemdm run or checkpoint
    folder, or `pretrained`, a Hugging Face model (a Hub name in the local cache, or a folder),
    with `mask_token` naming its mask token where its config and tokenizer name none; `estimator`,
    `mc_batch`, `max_passes`, `target_se`, `min_draws`: the likelihood `Budget` (LLaDA's
    setting by default: 128 passes in batches of 32, no early stop); `seed`: the Monte Carlo
    and sampling seed; `greedy_check`: decode each continuation greedily to tell lm-eval
    whether it is the greedy one (False without it, as LLaDA's default); `gen_length`,
    `steps`, `block_length`, `remasking`: decoding (`gen_length` replaces a task's
    max_gen_toks); `records`: a JSONL file of each request's standard error and passes;
    `overwrite`: replace it; `trust_remote_code`: run the code a Hugging Face run or model ships;
    `dtype`: the weights' type (`DTYPES`); `max_length`: the tokens a request is cut to, where
    the run's `max_length` or the model's positions are not what it should be."""

    run: str | None = None
    pretrained: str | None = None
    mask_token: str | None = None
    estimator: str = "llada"
    mc_batch: int = 32
    max_passes: int = 128
    target_se: float | None = None
    min_draws: int = 8
    seed: int = 0
    greedy_check: bool = False
    gen_length: int | None = None
    steps: int | None = None
    block_length: int | None = None
    remasking: str = "low_confidence"
    records: str | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    dtype: str = "float32"
    max_length: int | None = None

    def __post_init__(self) -> None:
        if (self.run is None) == (self.pretrained is None):
            given = "both were given" if self.run is not None else "neither was given"
            raise ConfigError(
                "lm-eval model stablemdm: --model_args needs exactly one of run=FOLDER (a "
                "stablemdm run or checkpoint folder) and pretrained=NAME_OR_PATH (a Hugging Face "
                f"model: a Hub name in the local cache, or a folder); {given}"
            )
        if self.run is not None and self.mask_token is not None:
            raise _bad("mask_token", self.mask_token, "left unset with run= (a run keeps its own)")
        if self.estimator not in ESTIMATORS:
            raise _bad("estimator", self.estimator, f"one of {', '.join(ESTIMATORS)}")
        if self.remasking not in REMASKING:
            raise _bad("remasking", self.remasking, f"one of {', '.join(REMASKING)}")
        if self.dtype not in DTYPES:
            raise _bad("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        for name in ("gen_length", "steps", "block_length", "max_length"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise _bad(name, value, "an integer >= 1")
        for name in ("greedy_check", "overwrite", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _bad("seed", self.seed, "an integer")
        self.budget()  # its own checks, as one ConfigError line

    def budget(self) -> Budget:
        """The likelihood budget these options give."""
        return Budget(self.mc_batch, self.max_passes, self.target_se, self.min_draws)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _bad(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(
        f"lm-eval model stablemdm: {name}={short_repr(value)} in --model_args must be {expected}"
    )


def parse_options(kwargs: dict[str, Any]) -> tuple[Options, int]:
    """`Options` from the keyword arguments lm-eval builds out of `--model_args`, and the
    generation batch from lm-eval's own `--batch_size` (an integer, or "auto")."""
    known = {f.name for f in fields(Options)}
    unknown = sorted(set(kwargs) - known - set(LM_EVAL_KEYS))
    if unknown:
        raise ConfigError(
            f"lm-eval model stablemdm: unknown --model_args key {unknown[0]!r}; the keys are "
            f"{', '.join(sorted(known))} (lm-eval's --batch_size is the generation batch; "
            "the Monte Carlo batch is mc_batch)"
        )
    options = Options(**{k: v for k, v in kwargs.items() if k in known})
    size = kwargs.get("batch_size", 1)
    batch = int(size) if str(size).isdigit() and int(size) >= 1 else GENERATION_BATCH
    return options, batch
