"""The model behind the lm-eval model: a stablemdm run (`run=FOLDER`), or any Hugging Face
model the library loads (`pretrained=NAME_OR_PATH`: a folder, or a Hub name in the local
cache), with its tokenizer and the length its requests are cut to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.hf_tokenizer import HFTokenizer
from ..errors import ConfigError
from ..models.hf import load_hf_as_is, max_positions
from ..models.hub import cached_folder, is_local
from ..training.saved import custom_code, load_checkpoint, saved_run_config
from .options import DTYPES, Options


def load_model(options: Options) -> tuple[torch.nn.Module, Any, int | None]:
    """(model, tokenizer, length) in the options' `dtype`: the length is the options'
    `max_length`, else the run's, else the model's positions, None when none names one."""
    dtype = DTYPES[options.dtype]
    if options.run is not None:
        model, tokenizer = load_checkpoint(options.run, options.trust_remote_code)
        model, length = model.to(dtype), saved_run_config(options.run).get("max_length")
    else:
        model, tokenizer = load_pretrained(
            options.pretrained, options.mask_token, options.trust_remote_code, dtype
        )
        length = None
    return model, tokenizer, options.max_length or length or (max_positions(model) or (None,))[0]


def load_pretrained(
    name: str, mask_token: str | None, trust_remote_code: bool, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, HFTokenizer]:
    """A Hugging Face MDM, or a causal LM as an ARM, as `models.hf.load_hf_as_is` loads it
    (nothing downloaded); its own code runs only with `trust_remote_code`, typed by the
    person running lm-eval."""
    folder = _folder(name)  # one line for a model that is not here, before any loading
    modules = [] if trust_remote_code else custom_code(folder)
    if modules:
        raise ConfigError(
            f"lm-eval model stablemdm: {name} ships its own code ({modules[0]}), which runs only "
            "if you allow it: add trust_remote_code=true to --model_args (or pass lm-eval's "
            "--trust_remote_code) if you trust where it came from; nothing was run"
        )
    model, tokenizer, spec = load_hf_as_is(
        name, mask_token=mask_token, trust_remote_code=trust_remote_code, dtype=dtype
    )
    return model, HFTokenizer(tokenizer, spec.mask_token_id, shift_logits=spec.shift_logits)


def _folder(name: str) -> Path:
    """The folder `name` names, or its snapshot in the local Hugging Face cache; stablemdm
    downloads nothing."""
    folder = Path(name) if is_local(name) else cached_folder(name)
    if folder is None:
        from huggingface_hub import constants

        raise ConfigError(
            f"lm-eval model stablemdm: pretrained={name} is neither a folder nor in the local "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}), and stablemdm downloads nothing: "
            f"fetch it once with `hf download {name}`, or give its folder"
        )
    if not folder.is_dir():
        raise ConfigError(f"lm-eval model stablemdm: pretrained={name}: no such folder")
    return folder
