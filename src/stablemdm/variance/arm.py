"""The ARM reference of `stablemdm variance`, decided before anything is measured: a trained
ARM (`--arm-checkpoint`, of the model's own vocabulary), the model's own weights with causal
attention (the built-in transformer, an adapted causal LM), or none (a masked LM or a
diffusion model without a checkpoint: the report is written without the ARM row)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data import TextTokenizer
from ..errors import ConfigError
from ..estimators.objective import Objective
from ..models import Transformer
from ..models.hf import adapter_spec
from ..training.build import check_fits
from ..training.config import StableMDMConfig
from ..training.saved import load_checkpoint, objective_of


def has_causal_form(model: torch.nn.Module) -> bool:
    """Whether `measure.causal` can turn the model into its own ARM: the built-in
    transformer, or a causal LM adapted to an MDM (not a masked LM or a diffusion model)."""
    spec = adapter_spec(model)
    if spec is not None:
        return spec.kind == "causal"
    return hasattr(getattr(model, "config", None), "causal")


def arm_reference(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    max_length: int,
    arm_checkpoint: str | Path | None,
    notes: list[str],
    trust_remote_code: bool = False,
) -> torch.nn.Module | None:
    """The network the ARM row measures: the `arm_checkpoint` model (checked against the
    model's tokenizer and length), else `model` itself when it has a causal form, else None
    with a note saying why and how to get one."""
    if arm_checkpoint is not None:
        return load_arm(arm_checkpoint, tokenizer, max_length, trust_remote_code)
    if has_causal_form(model):
        return model
    spec = adapter_spec(model)
    kind = spec.kind if spec is not None else type(model).__name__
    notes.append(
        f"arm: skipped, a {kind} model has no causal form of its own weights; pass "
        "--arm-checkpoint DIR (an ARM trained with the same tokenizer) for the ARM reference"
    )
    return None


def load_arm(
    path: str | Path, tokenizer: TextTokenizer, max_length: int, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The ARM saved in `path`, in eval mode; ConfigError when it is an MDM, or when its
    vocabulary or length does not match the model's tokenizer and data."""
    where = f"--arm-checkpoint {path}"
    arm_model, arm_tokenizer = load_checkpoint(path, trust_remote_code)
    check_same_vocabulary(arm_tokenizer, tokenizer, tokenizer.mask_token_id, where)
    check_fits(arm_model, tokenizer, max_length, where)
    if isinstance(arm_model, Transformer):
        arm_model.config.causal = True
    elif objective_of(arm_model) != "arm":
        raise ConfigError(f"{where} holds an MDM, not an ARM")
    return arm_model.eval()


def vocabulary(tokenizer: Any) -> dict[str, int]:
    """Token -> id of a tokenizer (a Hugging Face one's vocabulary with its added tokens, or
    the character tokenizer's special tokens and alphabet)."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None:
        return dict(inner.get_vocab())
    return {tokenizer.decode([i], skip_special_tokens=False): i for i in range(len(tokenizer))}


def check_same_vocabulary(
    arm_tokenizer: Any, tokenizer: Any, mask_token_id: int | None, where: str
) -> None:
    """ConfigError unless both tokenizers map the same tokens to the same ids: the ARM reads
    the model's encoded data. The model's mask token may be missing from the ARM's (added
    for the MDM; the data never holds it)."""
    ours, theirs = vocabulary(tokenizer), vocabulary(arm_tokenizer)
    ours = {t: i for t, i in ours.items() if t in theirs or i != mask_token_id}
    if ours == theirs:
        return
    differ = sorted(t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t))
    raise ConfigError(
        f"{where}: its tokenizer's vocabulary differs from the model's ({len(differ)} of "
        f"{len(ours)} tokens, e.g. {differ[:3]}), so it would read the model's token ids as "
        "other tokens; pass an ARM trained with the model's tokenizer"
    )


def arm_objective(config: StableMDMConfig, tokenizer: TextTokenizer) -> Objective:
    """The ARM's objective on the run's loss normaliser, so its row is on the MDM's scale."""
    return Objective(
        mask_token_id=tokenizer.mask_token_id,
        kind="arm",
        normalizer=config.loss_normalizer,
        normalizer_length=config.normalizer_length,
    )
