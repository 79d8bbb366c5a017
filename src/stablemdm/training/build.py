"""What a config builds: the model (built-in or Hugging Face), the rate sampler, the P-POTS
density (fitted or loaded) and the objective."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import default_data_collator

from ..data import TextTokenizer
from ..data.image_tokens import ImageTokenizer, image_tokenizer_for
from ..errors import ConfigError
from ..estimators.ema import EMA
from ..estimators.objective import Objective
from ..estimators.ppots import PPOTS
from ..estimators.ppots_fit import FitDesign, fit_ppots
from ..estimators.rates import Clipped, Uniform
from ..estimators.registry import with_scheme
from ..models.hf import max_positions
from ..models.transformer import ModelConfig, Transformer
from ..rng import seeded_generator
from ..tasks.registry import Task
from .compute import phase
from .config import StableMDMConfig
from .datasets import Canvas, TensorDataset, fitting_data, resolve_canvas
from .saved import is_hf_folder, load_checkpoint


def build_builtin(
    config: StableMDMConfig, tokenizer: TextTokenizer, max_length: int
) -> Transformer:
    """The built-in transformer: the `init_from` checkpoint (with the attention pattern the
    objective needs, same parameters) or a fresh seeded one for `max_length` tokens."""
    causal = config.objective == "arm"
    if config.init_from:
        folder = Path(config.init_from)
        if folder.is_dir() and is_hf_folder(folder):  # refused before anything of it is loaded
            raise ConfigError(
                f"init_from={config.init_from} holds a Hugging Face model: use model=PATH"
            )
        model, saved = load_checkpoint(folder)
        check_fits(model, tokenizer, max_length, f"init_from={config.init_from}")
        if isinstance(tokenizer, ImageTokenizer):  # the same image tokens, not just as many
            image_tokenizer_for(saved, tokenizer.codebook, f"init_from={config.init_from}")
        model.config.causal = causal
        model.config.block_size = config.block_size
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
        block_size=config.block_size,
        **overrides,
    )
    return Transformer(model_config, generator=seeded_generator(config.seed, "init"))


def build_hf(config: StableMDMConfig) -> tuple[torch.nn.Module, Any]:
    """A Hugging Face model adapted to the objective (optionally with LoRA adapters) and its
    tokenizer as an `HFTokenizer`."""
    from transformers import set_seed

    from ..data.hf_tokenizer import HFTokenizer
    from ..models.hf import apply_lora, describe_shift, load_hf_model, load_tokenizer

    set_seed(config.seed)  # anything the loading initialises (new heads, LoRA) is seeded
    tokenizer = None
    if config.tokenizer_name:
        tokenizer = load_tokenizer(
            config.tokenizer_name,
            config.trust_remote_code,
            allow_downloads=config.allow_downloads,
        )
    model, hf_tokenizer, spec = load_hf_model(
        config.model,
        objective=config.objective,
        kind=config.model_kind,
        block_size=config.block_size,
        tokenizer=tokenizer,
        shift_logits=config.shift_logits,
        mask_token_id=config.mask_token_id,
        mask_token=config.mask_token,
        add_mask_token=config.add_mask_token,
        trust_remote_code=config.trust_remote_code,
        gguf_file=config.gguf_file,
        dtype=getattr(torch, config.model_dtype),
        allow_downloads=config.allow_downloads,
    )
    if config.objective != "arm":  # the resolved value is saved in config.yaml
        said = config.objective == "mdm" and config.process_index == 0
        if config.shift_logits is None and spec.kind == "causal" and said:
            print(f"stablemdm: {describe_shift(model)}", file=sys.stderr)  # a choice: said
        config.shift_logits = spec.shift_logits
    wrapped = HFTokenizer(
        hf_tokenizer,
        spec.mask_token_id,
        chat_template=config.chat_template,
        system_prompt=config.system_prompt,
        shift_logits=spec.shift_logits,
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
    """Refuse, before anything runs, a built-in model whose vocabulary is not the
    tokenizer's, and any model with fewer positions than the sequences (`max_length`)."""
    if isinstance(model, Transformer) and model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"{where}: the model has {model.config.vocab_size} tokens, the tokenizer "
            f"{tokenizer.vocab_size}"
        )
    bound = max_positions(model)
    if bound is not None and bound[0] < max_length:
        limit, name = bound
        raise ConfigError(
            f"{where}: the sequences are {max_length} tokens (max_length: the prompt, <sep> "
            f"and the gen_length canvas) but the model has {limit} positions ({name} in its "
            f"config): set max_length (and gen_length) to fit in {limit}, or use a model with "
            f"a larger {name}"
        )


def build_model(
    config: StableMDMConfig, task: Task
) -> tuple[torch.nn.Module, TextTokenizer, Canvas]:
    """The model, tokenizer and canvas a config names (`build_builtin` or `build_hf`)."""
    if config.model is not None:
        model, tokenizer = build_hf(config)
        tokenizer = task.tokenizer_for(tokenizer)
        canvas = resolve_canvas(config, task, tokenizer)
        check_fits(model, tokenizer, canvas.max_length, f"model={config.model}")
        return model, tokenizer, canvas
    tokenizer = task.tokenizer_for(None)
    canvas = resolve_canvas(config, task, tokenizer)
    return build_builtin(config, tokenizer, canvas.max_length), tokenizer, canvas


def build_objective(config: StableMDMConfig, tokenizer: TextTokenizer, sampler=None) -> Objective:
    """The training objective the config names (sampler defaults to `build_sampler`)."""
    isad_ids = tuple(tokenizer.token_id(s, where="isad_tokens") for s in config.isad_tokens)
    return Objective(
        mask_token_id=tokenizer.mask_token_id,
        kind=config.objective,
        rate=config.rate,
        masking=config.masking,
        sampler=sampler if sampler is not None else build_sampler(config),
        eps=config.eps,
        isad_token_ids=isad_ids,
        isad_delta=config.isad_delta,
        isad_q_max=config.isad_q_max,
        compute_matched=config.compute_matched,
        normalizer=config.loss_normalizer,
        normalizer_length=config.normalizer_length,
        block_size=config.block_size,
    )


def build_sampler(config: StableMDMConfig, density: PPOTS | None = None):
    """The rate sampler: a density (uniform, clipped, P-POTS, EMA) under a uniform scheme."""
    if config.sampler == "uniform":
        base = Uniform()
    elif config.sampler == "clipped":
        base = Clipped(config.clip_low, config.clip_high)
    elif config.sampler == "ema":
        base = EMA(
            n_bins=config.ema_bins,
            decay=config.ema_decay,
            refresh_every=config.ema_refresh_every,
            mix=config.mix,
        )
    else:
        if density is None:
            raise ConfigError("sampler=ppots needs a fitted density (ppots_file, or fit first)")
        base = density
    return with_scheme(base, config.scheme)


def load_density(path: str | Path, config: StableMDMConfig | None = None) -> PPOTS:
    """A P-POTS density saved by `stablemdm fit-t` or a run (JSON). Given the `config` that
    will sample from it, a density fitted for another model, rate mode or task (or one that
    records none) gets a one-line warning on stderr."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ppots_file {path} does not exist")
    try:
        density = PPOTS.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"ppots_file {path}: {err}") from err
    if config is not None and config.process_index == 0:
        note = provenance_mismatch(density, config, path)
        if note:
            print(f"stablemdm: warning: {note}", file=sys.stderr)
    return density


def density_provenance(config: StableMDMConfig) -> dict[str, str]:
    """What a fitted density is for: the model, the rate mode and the task (a density is
    S(t) of one model on one task: another one's rates are not the optimal ones)."""
    if config.model is not None:
        model = _name_or_path(config.model)
    elif config.init_from is not None:
        model = f"init_from={_name_or_path(config.init_from)}"
    else:
        sizes = [f"{k}={getattr(config, k)}" for k in ("d_model", "n_layers", "n_heads")]
        given = [s for s in sizes if not s.endswith("=None")]
        model = " ".join([f"built-in model_preset={config.model_preset}", *given])
    return {"model": model, "rate": config.rate, "task": config.task}


def _name_or_path(name: str) -> str:
    """An existing path made absolute (two spellings of one folder are one model)."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def provenance_mismatch(density: PPOTS, config: StableMDMConfig, path: Path) -> str | None:
    """The warning for a density fitted for another model, rate mode or task than `config`
    trains (or recording none), else None."""
    recorded = (density.source or {}).get("fitted_for")
    if not isinstance(recorded, dict):
        return (
            f"ppots_file {path} does not record the model, rate mode and task it was fitted "
            "for (written by an older stablemdm), so it cannot be checked against this run"
        )
    now = density_provenance(config)
    differ = [
        f"{k} {recorded.get(k)!r} (this run: {v!r})" for k, v in now.items() if recorded.get(k) != v
    ]
    if not differ:
        return None
    return (
        f"ppots_file {path} was fitted for {'; '.join(differ)}; its rates are not fitted to "
        "this run (fit one with stablemdm fit-t and the same config)"
    )


def fit_density(
    config: StableMDMConfig,
    model: torch.nn.Module,
    task: Task,
    tokenizer: TextTokenizer,
    canvas: Canvas,
    step: int = 0,
    data: TensorDataset | None = None,
) -> PPOTS:
    """Estimate S(t) for this model and data, fit the P-POTS density and check it on held-out
    sequences (`ppots_fit.fit_ppots`). Each process estimates on its own `ppots_sequences`
    sequences and checks on as many others, and the estimates are pooled, so all processes
    fit the same density. A refit at optimizer step `step` draws other sequences and masks.
    `data` is the encoded train split when the caller has it (else it is encoded here)."""
    rank, n = config.process_index, config.ppots_sequences
    need = 2 * n * (rank + 1)
    data = data if data is not None else fitting_data(task, tokenizer, canvas, need)
    if need > len(data):
        raise ConfigError(
            f"ppots_sequences={n} per process needs {need} train sequences (half of them held "
            f"out for the self-check); task {task.name} has {len(data)}: lower ppots_sequences"
        )
    pick = torch.randperm(len(data), generator=seeded_generator(config.seed, "ppots-data", step))
    mine = [data[int(i)] for i in pick[2 * n * rank : need]]
    plain = build_objective(config, tokenizer, sampler=Uniform())
    design = FitDesign(
        method=config.ppots_method,
        counts=config.ppots_counts,
        rates=config.ppots_rates,
        masks=config.ppots_masks,
        mix=config.mix,
    )
    with phase("ppots_fit"):  # its passes are the run's overhead (training.compute)
        density = fit_ppots(
            plain,
            model,
            default_data_collator(mine[:n]),
            default_data_collator(mine[n:]),
            generator=seeded_generator(config.seed, "ppots-masks", rank, step),
            design=design,
            target=config.ppots_target,
            params=config.ppots_params,
        )
    density.source = {**(density.source or {}), "fitted_for": density_provenance(config)}
    return density
