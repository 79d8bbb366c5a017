"""Reading a saved run back: its config, its latest checkpoint, and the model and tokenizer in
it, with everything a later command needs to drive them."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from ..data.image_tokens import with_image_tokens
from ..data.tokenizer import CharTokenizer
from ..errors import ConfigError
from ..models.transformer import MODEL_TYPE, Transformer
from ..tasks.registry import missing_paths
from .checkpoints import RUN_CONFIG
from .finite import nonfinite_parameter, nonfinite_tensor
from .recipe import describe_yaml_error, load_yaml

MODEL_CONFIG = "config.json"


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


def run_task_options(
    folder: str | Path, task: str, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The task_options a later command uses on the run saved in `folder`: the run's own
    (its config.yaml) when `task` is the run's task, else none, each of `given` (the
    `--task-option`s) replacing one. A data file or folder among the run's own options that
    is not there any more (moved, deleted, or a relative path from another directory) is a
    ConfigError naming the option that points at it."""
    saved, given = saved_run_config(folder), given or {}
    options = dict(saved.get("task_options") or {}) if task == saved.get("task") else {}
    for where, path in missing_paths(task, options):
        top = re.split(r"[.\[]", where, maxsplit=1)[0]
        if top in given:
            continue
        relative = "" if Path(path).is_absolute() else f" (relative to {Path.cwd()})"
        option = f"{top}=PATH" if top == where else f"{top}=[...] (the whole list, {where} changed)"
        raise ConfigError(
            f"the run {folder} trained on {path}{relative}, its task_options {where} in "
            f"config.yaml, which is not there any more: point at the data with --task-option "
            f"{option}"
        )
    return {**options, **given}


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


def custom_code(folder: Path) -> list[str]:
    """The code modules a Hugging Face model folder names (`auto_map` of its config.json,
    tokenizer_config.json, or of the local base model a LoRA adapter names): what loading it
    with trust_remote_code would run."""
    folders = [folder]
    with contextlib.suppress(OSError, ValueError, AttributeError):
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        if Path(base).is_dir():
            folders.append(Path(base))
    modules = []
    for path in (f / name for f in folders for name in (MODEL_CONFIG, "tokenizer_config.json")):
        try:
            auto_map = json.loads(path.read_text()).get("auto_map") or {}
            values = [v for value in auto_map.values() for v in _as_list(value)]
        except (OSError, ValueError, AttributeError):
            continue
        modules += [f"{path}: {v}" for v in values if isinstance(v, str)]
    return modules


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def load_checkpoint(
    folder: str | Path, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, Any]:
    """A saved model and its tokenizer: a built-in run (the default character tokenizer if
    none is saved) or a Hugging Face model trained by stablemdm (full weights or LoRA), with
    the image tokens and codebook of an image task when the folder holds them. A missing or
    corrupted file, or weights that are not finite, is a `ConfigError` naming it and another
    checkpoint to use. A model's own code runs only with `trust_remote_code`, which comes
    from the person running the command, never from the folder (its config.yaml may say
    anything)."""
    from safetensors import SafetensorError

    from ..models.hf import MissingBaseModel

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"checkpoint folder {folder} does not exist")
    modules = custom_code(folder) if not trust_remote_code else []
    if modules and is_hf_folder(folder):
        raise ConfigError(
            f"{folder} ships its own code ({modules[0]}), which runs only with "
            f"--trust-remote-code: pass it if you trust where {folder} came from (nothing was "
            "run; a trust_remote_code in the folder's config.yaml is not used)"
        )
    try:
        model, tokenizer = _load_checkpoint(folder, trust_remote_code)
        _check_finite(model, folder)
        return model, with_image_tokens(tokenizer, folder)
    except MissingBaseModel:  # every checkpoint of the run needs the same base
        raise
    except ConfigError as err:
        raise ConfigError(f"{err}{other_checkpoints(folder)}") from err
    except (ValueError, OSError, SafetensorError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"cannot load the checkpoint {folder}: {message}{other_checkpoints(folder)}"
        ) from err


def _load_checkpoint(folder: Path, trust_remote_code: bool) -> tuple[torch.nn.Module, Any]:
    """`load_checkpoint` of an existing folder."""
    if is_hf_folder(folder):
        from ..data.hf_tokenizer import HFTokenizer
        from ..models.hf import load_trained

        run = saved_run_config(folder)
        model, hf_tokenizer, spec = load_trained(folder, trust_remote_code, run.get("gguf_file"))
        tokenizer = HFTokenizer(
            hf_tokenizer,
            spec.mask_token_id,
            chat_template=bool(run.get("chat_template", False)),
            system_prompt=run.get("system_prompt"),
            shift_logits=spec.shift_logits,
        )
        return model, tokenizer
    if not (folder / MODEL_CONFIG).is_file():
        raise ConfigError(f"{folder} holds no saved model (no {MODEL_CONFIG})")
    model = Transformer.from_pretrained(folder)
    has_tokenizer = (folder / "tokenizer.json").is_file()
    return model, CharTokenizer.from_pretrained(folder) if has_tokenizer else CharTokenizer()


def _check_finite(model: torch.nn.Module, folder: Path) -> None:
    """Refuse a loaded model whose weights hold NaN or infinity (`finite`: such a model is
    never used), naming the file and the tensor when the folder's own files show it."""
    bad = nonfinite_parameter(model)
    if bad is not None:
        where = nonfinite_tensor(folder) or bad
        raise ConfigError(
            f"{folder} holds non-finite weights ({where} has NaN or infinite values), which "
            "no command uses"
        )


def objective_of(model: torch.nn.Module) -> str:
    """ "arm" for a causal model (built-in with causal attention, or an unadapted HF causal
    LM), "block" for one trained as block diffusion (the built-in config's block_size, an HF
    adapter's), else "mdm": what decoding and evaluation must use."""
    if isinstance(model, Transformer):
        if model.config.block_size is not None:
            return "block"
        return "arm" if model.config.causal else "mdm"
    from ..models.hf import adapter_spec

    spec = adapter_spec(model)
    if spec is not None and spec.block_size is not None:
        return "block"
    return "arm" if spec is not None and spec.mask_token_id is None else "mdm"
