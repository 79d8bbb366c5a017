"""The model and tokenizer a config names, and reloading them from a saved run.

Two families share one interface (`model(input_ids, attention_mask) -> logits`, a tokenizer
with `encode_prompt`/`encode_response`): stablemdm's own `Transformer` with the character
tokenizer, and Hugging Face models (`model=PATH`) adapted by `models.hf` with an
`HFTokenizer`. Everything a later command needs to drive a saved model (attention pattern,
logit shift, mask token, chat template) is read back from the saved folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoints import RUN_CONFIG
from ..config import ConfigError, StableMDMConfig, describe_yaml_error, load_yaml
from ..tokenizer import CharTokenizer
from ..trainer import seeded_generator
from .transformer import MODEL_TYPE, ModelConfig, Transformer

MODEL_CONFIG = "config.json"


def build_builtin(
    config: StableMDMConfig, tokenizer: CharTokenizer, max_length: int
) -> Transformer:
    """The built-in transformer: the `init_from` checkpoint (with the attention pattern the
    objective needs, same parameters) or a fresh seeded one for `max_length` tokens."""
    causal = config.objective == "arm"
    if config.init_from:
        model, _ = load_checkpoint(config.init_from)
        if not isinstance(model, Transformer):
            raise ConfigError(
                f"init_from={config.init_from} holds a Hugging Face model: use model=PATH"
            )
        check_fits(model, tokenizer, max_length, f"init_from={config.init_from}")
        model.config.causal = causal
        return model
    overrides = {
        k: getattr(config, k) for k in ("d_model", "n_layers", "n_heads") if getattr(config, k)
    }
    model_config = ModelConfig.from_preset(
        config.model_preset,
        vocab_size=tokenizer.vocab_size,
        max_seq_len=max_length,
        causal=causal,
        mask_token_id=tokenizer.mask_token_id,
        **overrides,
    )
    return Transformer(model_config, generator=seeded_generator(config.seed, "init"))


def build_hf(config: StableMDMConfig) -> tuple[torch.nn.Module, Any]:
    """A Hugging Face model adapted to the objective (optionally with LoRA adapters) and its
    tokenizer as an `HFTokenizer`."""
    from transformers import AutoTokenizer, set_seed

    from ..data.hf_tokenizer import HFTokenizer
    from .hf import apply_lora, load_hf_model

    set_seed(config.seed)  # anything the loading initialises (new heads, LoRA) is seeded
    tokenizer = None
    if config.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(
            config.tokenizer_name, trust_remote_code=config.trust_remote_code
        )
    model, hf_tokenizer, spec = load_hf_model(
        config.model,
        objective=config.objective,
        kind=config.model_kind,
        tokenizer=tokenizer,
        shift_logits=config.shift_logits,
        mask_token_id=config.mask_token_id,
        mask_token=config.mask_token,
        add_mask_token=config.add_mask_token,
        trust_remote_code=config.trust_remote_code,
        gguf_file=config.gguf_file,
        dtype=getattr(torch, config.model_dtype),
    )
    wrapped = HFTokenizer(
        hf_tokenizer,
        spec.mask_token_id,
        chat_template=config.chat_template,
        system_prompt=config.system_prompt,
    )
    if config.lora_r > 0:
        target = config.lora_target_modules
        model = apply_lora(
            model,
            config.lora_r,
            config.lora_alpha,
            config.lora_dropout,
            target[0] if target == ["all-linear"] else target,
        )
    return model, wrapped


def check_fits(model: torch.nn.Module, tokenizer: Any, max_length: int, where: str) -> None:
    """Refuse a built-in model whose vocabulary or length does not match tokenizer and data."""
    if not isinstance(model, Transformer):
        return
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"{where}: the model has {model.config.vocab_size} tokens, the tokenizer "
            f"{tokenizer.vocab_size}"
        )
    if model.config.max_seq_len < max_length:
        raise ConfigError(
            f"{where}: max_seq_len {model.config.max_seq_len} is shorter than the task's "
            f"sequences ({max_length})"
        )


def is_hf_folder(folder: Path) -> bool:
    """Whether a saved model folder holds a Hugging Face model (full or LoRA adapter) rather
    than the built-in transformer (whose config.json names MODEL_TYPE)."""
    if (folder / "adapter_config.json").is_file():
        return True
    path = folder / MODEL_CONFIG
    if not path.is_file():
        return False
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"{path} is not a valid model config ({err})") from err
    return model_type is not None and model_type != MODEL_TYPE


def saved_run_config(folder: str | Path) -> dict[str, Any]:
    """The resolved run config saved with a checkpoint (its own, or its run's), or {}."""
    folder = Path(folder)
    for path in (folder / RUN_CONFIG, folder.parent / RUN_CONFIG):
        if path.is_file():
            try:
                return load_yaml(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(
                    f"{path} is corrupted ({describe_yaml_error(err)}); restore it from the "
                    "run's output_dir or another checkpoint"
                ) from None
    return {}


def _step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1]) if path.name.rsplit("-", 1)[-1].isdigit() else -1


def other_checkpoints(folder: Path) -> str:
    """ "; try F" naming the latest other saved model beside or inside `folder` (the way out
    when `folder` cannot be read), or advice to re-save it."""
    near = [*folder.glob("checkpoint-*"), *folder.parent.glob("checkpoint-*")]
    ok = [p for p in near if p.resolve() != folder.resolve() and (p / MODEL_CONFIG).is_file()]
    if not ok:
        return "; re-save the model (or retrain it)"
    return f"; try another checkpoint, e.g. {max(ok, key=_step)}"


def load_checkpoint(folder: str | Path) -> tuple[torch.nn.Module, Any]:
    """A saved model and its tokenizer: a built-in run (the default character tokenizer if
    none is saved) or a Hugging Face model trained by stablemdm (full weights or LoRA). A
    missing or corrupted file is a `ConfigError` naming it and another checkpoint to use."""
    from safetensors import SafetensorError

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"checkpoint folder {folder} does not exist")
    try:
        return _load_checkpoint(folder)
    except ConfigError as err:
        raise ConfigError(f"{err}{other_checkpoints(folder)}") from err
    except (ValueError, OSError, SafetensorError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"cannot load the checkpoint {folder}: {message}{other_checkpoints(folder)}"
        ) from err


def _load_checkpoint(folder: Path) -> tuple[torch.nn.Module, Any]:
    """`load_checkpoint` of an existing folder."""
    if is_hf_folder(folder):
        from ..data.hf_tokenizer import HFTokenizer
        from .hf import load_trained

        run = saved_run_config(folder)
        model, hf_tokenizer, spec = load_trained(
            folder, bool(run.get("trust_remote_code", False)), run.get("gguf_file")
        )
        tokenizer = HFTokenizer(
            hf_tokenizer,
            spec.mask_token_id,
            chat_template=bool(run.get("chat_template", False)),
            system_prompt=run.get("system_prompt"),
        )
        return model, tokenizer
    if not (folder / MODEL_CONFIG).is_file():
        raise ConfigError(f"{folder} holds no saved model (no {MODEL_CONFIG})")
    model = Transformer.from_pretrained(folder)
    has_tokenizer = (folder / "tokenizer.json").is_file()
    return model, CharTokenizer.from_pretrained(folder) if has_tokenizer else CharTokenizer()


def objective_of(model: torch.nn.Module) -> str:
    """ "arm" for a causal model (built-in with causal attention, or an unadapted HF causal
    LM), else "mdm": what decoding and evaluation must use."""
    if isinstance(model, Transformer):
        return "arm" if model.config.causal else "mdm"
    from .hf import adapter_spec

    spec = adapter_spec(model)
    return "arm" if spec is not None and spec.mask_token_id is None else "mdm"
