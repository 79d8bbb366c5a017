"""Hugging Face models as MDMs and ARMs (docs/hf.md).

Three families are trained as masked diffusion models: masked LMs (BERT, RoBERTa,
ModernBERT) as they are, diffusion LMs with their own code (LLaDA, Dream) as they are, and
causal LMs adapted to bidirectional attention (AR-to-MDM, as Dream and dllm's A2D do), by
default with unshifted logits (position i predicts token i, dllm's A2D default; from
SmolLM2's weights Dream's shifted logits learned far slower, docs/hf.md). A causal LM left as
it is is the ARM baseline; with `objective="block"` it is trained as block diffusion through a
4-D attention mask (`hf_blocks`). How stablemdm drives a model is an `AdapterSpec` stored in
its config (`config.stablemdm`), so a saved model reloads exactly as it was trained.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import ConfigError
from ..estimators.losses import adapter, unwrap
from .hf_blocks import block_refusal, enable_block_diffusion
from .hub import first_line, hub_options, local_source, not_found

ModelKind = Literal["masked_lm", "diffusion", "causal"]
KINDS = ("masked_lm", "diffusion", "causal")
# mask tokens of known families, looked up in the vocabulary when nothing names one
KNOWN_MASK_TOKENS = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")
ADDED_MASK_TOKEN = "<|mask|>"
ADD_MASK_CONFLICT = (
    "add_mask_token=true adds a new mask token, while mask_token_id / mask_token name an "
    "existing one: set one or the other"
)
SPEC_KEY = "stablemdm"
PEFT_HINT = "pip install -e .[lora]"


@dataclass
class AdapterSpec:
    """How stablemdm drives a Hugging Face model; saved as `config.stablemdm`."""

    kind: ModelKind
    bidirectional: bool  # attention made bidirectional (AR-to-MDM adaptation)
    shift_logits: bool  # Dream's convention: position i-1 predicts token i
    mask_token_id: int | None  # None for an ARM
    conditions_on_t: bool  # the forward takes the masking rate `t` [B]
    mask_token_added: bool = False  # the mask token is a new row (`add_mask_token`): trained
    block_size: int | None = None  # trained as block diffusion with blocks this long

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterSpec:
        return cls(**values)


def adapter_spec(model: Any) -> AdapterSpec | None:
    """The spec of a model adapted by `load_hf_model` (None for any other model)."""
    values = adapter(model)
    return AdapterSpec.from_dict(values) if values else None


# config fields that bound the sequence length: the built-in model's, then Hugging Face's
POSITION_FIELDS = ("max_seq_len", "max_position_embeddings", "n_positions")


def max_positions(model: Any) -> tuple[int, str] | None:
    """The positions a model (built-in or Hugging Face, wrapped or not) has, and the config
    field that sets them; None when its config names no such bound."""
    config = getattr(unwrap(model), "config", None)
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def detect_kind(config: Any) -> ModelKind:
    """masked_lm for `*ForMaskedLM`, causal for `*ForCausalLM`, else diffusion (custom code).
    A config without architectures (GGUF files) is classed by its model type."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return "masked_lm"
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "causal"
    model_type = getattr(config, "model_type", None)
    if not architectures and model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked_lm"
    if not architectures and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    return "diffusion"


def _single_token(tokenizer: Any, text: str, where: str) -> int:
    """The id of `text` if it is exactly one token of the tokenizer, else ConfigError."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"{where}={text!r} is not one token of the tokenizer (it is {pieces})")
    return ids[0]


def resolve_mask_token_id(
    model_config: Any,
    tokenizer: Any,
    *,
    mask_token_id: int | None = None,
    mask_token: str | None = None,
) -> int | None:
    """The mask token id: explicit id, explicit token string, the model config's, the
    tokenizer's, a known mask string in the vocabulary; None when there is none."""
    if mask_token_id is not None:
        return mask_token_id
    if mask_token is not None:
        return _single_token(tokenizer, mask_token, "mask_token")
    for candidate in (
        getattr(model_config, "mask_token_id", None),
        getattr(tokenizer, "mask_token_id", None),
    ):
        if candidate is not None:
            return int(candidate)
    vocab = tokenizer.get_vocab()
    return next((vocab[t] for t in KNOWN_MASK_TOKENS if t in vocab), None)


def check_mask_token_id(mask_id: int, vocab_size: int, tokenizer: Any) -> None:
    """Refuse a mask id outside the embedding matrix or equal to a token with another job
    (PAD is allowed when the tokenizer pads with its own mask token: pads are never attended)."""
    if not 0 <= mask_id < vocab_size:
        raise ConfigError(
            f"mask token id {mask_id} is outside the model's {vocab_size} embeddings; set "
            "mask_token_id / mask_token, or add_mask_token=true"
        )
    roles = ["eos", "bos", "unk", "sep", "cls"]
    if getattr(tokenizer, "pad_token_id", None) != getattr(tokenizer, "mask_token_id", None):
        roles.append("pad")
    for role in roles:
        if getattr(tokenizer, f"{role}_token_id", None) == mask_id:
            token = getattr(tokenizer, f"{role}_token", None)
            raise ConfigError(
                f"mask token id {mask_id} is the tokenizer's {role.upper()} token {token!r}: "
                "masking with it would teach the model that this token means 'masked'; set "
                "mask_token_id / mask_token to a dedicated token, or add_mask_token=true"
            )


def add_mask_token(model: Any, tokenizer: Any, token: str = ADDED_MASK_TOKEN) -> int:
    """Add `token` as a new special token with new input and output embedding rows (the mean
    of the existing rows: an ordinary input, and no logit pulled up or down) and return its
    id."""
    if token in tokenizer.get_vocab():
        raise ConfigError(f"add_mask_token: {token!r} is already in the vocabulary; use mask_token")
    tokenizer.add_special_tokens({"additional_special_tokens": [token]})
    new_id = tokenizer.convert_tokens_to_ids(token)
    old_rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(len(tokenizer), old_rows), mean_resizing=False)
    heads = [model.get_input_embeddings(), model.get_output_embeddings()]
    with torch.no_grad():  # new rows deterministic (resizing draws them from the global RNG)
        for layer in {id(h): h for h in heads if h is not None}.values():
            layer.weight[old_rows:] = layer.weight[:old_rows].mean(dim=0)
            if getattr(layer, "bias", None) is not None:
                layer.bias[old_rows:] = layer.bias[:old_rows].mean()
    return new_id


def make_bidirectional(model: Any) -> None:
    """Full attention for a causal LM: `config.is_causal = False` makes transformers build a
    bidirectional mask, and `is_causal = False` on the attention modules stops SDPA and
    flash attention from adding a causal one when no mask is passed."""
    _set_causal(model, False)


def _set_causal(model: Any, causal: bool) -> None:
    model.config.is_causal = causal
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(module.is_causal, bool):
            module.is_causal = causal


@contextmanager
def as_arm(model: Any) -> Iterator[Any]:
    """An adapted causal LM with its causal attention and unshifted logits back for the
    duration: the same weights as the ARM baseline (the variance tool's reference)."""
    spec = adapter_spec(model)
    if spec is None or spec.kind != "causal":
        raise ConfigError(
            "only a causal LM adapted to an MDM has an ARM form of itself; pass an ARM "
            "checkpoint instead (--arm-checkpoint)"
        )
    inner = unwrap(model)
    saved = dict(inner.config.stablemdm)
    inner.config.stablemdm = {**saved, "bidirectional": False, "shift_logits": False}
    _set_causal(inner, True)
    try:
        yield model
    finally:
        inner.config.stablemdm = saved
        _set_causal(inner, not saved["bidirectional"])


# files of a tokenizer in a model folder (any one of them is a tokenizer to try)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOKENIZER_FILES += ("vocab.txt", "spiece.model", "merges.txt")


def _load_config(
    name: str, trust_remote_code: bool, gguf_file: str | None, allow_downloads: bool = False
) -> Any:
    """The model's config, with one clear line for a missing model or folder, a damaged
    config.json, or needed custom code."""
    from transformers import AutoConfig

    source = local_source(name, allow_downloads, (gguf_file or "config.json",))
    path = Path(source) / "config.json"
    if Path(source).is_dir() and gguf_file is None:
        if not path.is_file():
            raise ConfigError(f"model folder {name} holds no config.json (not a model folder?)")
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"{path} is not valid JSON ({err}); restore it from where the model came from"
            ) from None
    try:
        return AutoConfig.from_pretrained(
            source,
            trust_remote_code=trust_remote_code,
            gguf_file=gguf_file,
            **hub_options(allow_downloads),
        )
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"model {name} ships its own code, which runs only if you allow it: pass "
                "--trust-remote-code (or set trust_remote_code=true in a recipe you wrote)"
            ) from None
        if Path(source).is_dir():
            raise ConfigError(f"cannot read the config of {name}: {first_line(err)}") from None
        raise not_found(name, allow_downloads, err) from None


def load_tokenizer(
    name: str,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    allow_downloads: bool = False,
) -> Any:
    """`AutoTokenizer.from_pretrained` under the download policy, with one line naming the
    folder and the files it lacks, or the file that failed."""
    from transformers import AutoTokenizer

    source = local_source(name, allow_downloads, (gguf_file,) if gguf_file else TOKENIZER_FILES)
    folder = Path(source)
    if folder.is_dir() and gguf_file is None:
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(
                f"model folder {name} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                "copy the tokenizer files of the model it came from into it, or set "
                "tokenizer_name=..."
            )
    try:
        return AutoTokenizer.from_pretrained(
            source,
            trust_remote_code=trust_remote_code,
            gguf_file=gguf_file,
            **hub_options(allow_downloads),
        )
    except (OSError, ValueError, TypeError) as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(
                f"the tokenizer of {name} ships its own code, which runs only if you allow it: "
                "pass --trust-remote-code (or set trust_remote_code=true in a recipe you wrote)"
            ) from None
        if folder.is_dir():
            raise ConfigError(
                f"cannot load the tokenizer in {name}: {first_line(err)}; check its tokenizer "
                "files or set tokenizer_name=..."
            ) from None
        raise not_found(name, allow_downloads, err) from None


def _damaged_weights(name: str) -> str:
    """The first weight file of a model folder that safetensors cannot open, with why."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(name).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                list(f.keys())
        except (SafetensorError, OSError) as err:
            return f"{path} is not a readable safetensors file ({first_line(err)})"
    return ""


def _load_model(
    name: str,
    kind: ModelKind,
    trust_remote_code: bool,
    gguf_file: str | None,
    dtype: torch.dtype,
    config: Any = None,
    allow_downloads: bool = False,
) -> Any:
    """The model's weights with the Auto class of its kind (no adaptation yet). GGUF weights
    are dequantized into ordinary `dtype` tensors, which then train like any others. A config
    already loaded is reused (a GGUF file is not parsed for it twice). Damaged or missing
    weights are one line naming the file."""
    import transformers
    from safetensors import SafetensorError

    source = local_source(name, allow_downloads, (gguf_file or "config.json",))
    auto = {"masked_lm": "AutoModelForMaskedLM", "causal": "AutoModelForCausalLM"}
    options: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if config is not None:
        options["config"] = config
    if gguf_file is not None:
        options["gguf_file"] = gguf_file
        options["quantization_config"] = transformers.GgufConfig(gguf_file, dequantize=True)
    try:
        model = getattr(transformers, auto.get(kind, "AutoModel")).from_pretrained(
            source, **options, **hub_options(allow_downloads)
        )
    except (OSError, SafetensorError) as err:
        if not Path(source).is_dir():
            raise not_found(name, allow_downloads, err) from None
        damaged = _damaged_weights(source) or first_line(err)
        raise ConfigError(
            f"cannot load the weights of {name}: {damaged}; restore the weights from where "
            "the model came from"
        ) from None
    quantizer = getattr(model, "hf_quantizer", None)
    if gguf_file is not None and quantizer is not None:  # nothing is quantized any more
        quantizer.remove_quantization_config(model)
    model.name_or_path = model.config.name_or_path = name  # a Hub name, not its cache folder
    return model


def _apply(model: Any, spec: AdapterSpec) -> None:
    """Record the spec in the model's config and adapt its attention."""
    model.config.stablemdm = spec.to_dict()
    if spec.bidirectional:
        make_bidirectional(model)
    if spec.block_size is not None:
        enable_block_diffusion(model)


def load_hf_model(
    name_or_path: str,
    *,
    objective: Literal["mdm", "arm", "block"],
    kind: Literal["auto", "masked_lm", "diffusion", "causal"] = "auto",
    block_size: int | None = None,
    tokenizer: Any = None,
    shift_logits: bool | None = None,
    mask_token_id: int | None = None,
    mask_token: str | None = None,
    add_mask_token: bool = False,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    allow_downloads: bool = False,
) -> tuple[Any, Any, AdapterSpec]:
    """Load a Hugging Face model and its tokenizer and adapt them to `objective`; returns
    (model, tokenizer, spec). Local files only unless `allow_downloads`. `block_size` is
    objective=block's. See the module docstring and docs/hf.md for every option."""
    if add_mask_token and (mask_token_id is not None or mask_token is not None):
        raise ConfigError(ADD_MASK_CONFLICT)
    config = _load_config(name_or_path, trust_remote_code, gguf_file, allow_downloads)
    saved = getattr(config, SPEC_KEY, None)
    spec = AdapterSpec.from_dict(saved) if isinstance(saved, dict) else None
    kind = _resolve_kind(config, kind, spec, objective, name_or_path)
    if tokenizer is None:
        tokenizer = load_tokenizer(name_or_path, trust_remote_code, gguf_file, allow_downloads)
    model = _load_model(
        name_or_path, kind, trust_remote_code, gguf_file, dtype, config, allow_downloads
    )
    if spec is not None:
        if mask_token is not None:
            mask_token_id = _single_token(tokenizer, mask_token, "mask_token")
        _check_saved(spec, objective, shift_logits, mask_token_id)
    else:
        spec = _new_spec(model, tokenizer, kind, objective, shift_logits, mask_token_id, mask_token)
        if spec.mask_token_id is None and objective != "arm":
            if not add_mask_token:
                raise ConfigError(
                    f"model {name_or_path} has no mask token: set mask_token_id=ID or "
                    "mask_token=TOKEN, or add_mask_token=true to add a new one"
                )
            spec.mask_token_id = _add_mask_token(model, tokenizer)
            spec.mask_token_added = True
    if spec.mask_token_id is not None:
        rows = model.get_input_embeddings().num_embeddings
        check_mask_token_id(spec.mask_token_id, rows, tokenizer)
    spec.block_size = block_size if objective == "block" else None
    _apply(model, spec)
    if objective == "block":
        _check_block_support(model, name_or_path)
    return model, tokenizer, spec


def _check_block_support(model: Any, name: str) -> None:
    """Refuse, in one line naming the model and why, a causal LM that `hf_blocks` cannot
    train block-causally."""
    why = block_refusal(model)
    if why is not None:
        architecture = type(model).__name__
        raise ConfigError(
            f"objective=block: {name} ({architecture}) cannot be trained block-causally: {why}"
        )


_add_mask_token = add_mask_token  # `load_hf_model` has a parameter of the same name


def _resolve_kind(
    config: Any, kind: str, saved: AdapterSpec | None, objective: str, name: str
) -> ModelKind:
    """The kind to load: the saved spec's, else detected (`auto`) or as given; checked
    against the objective (only a causal LM is an ARM)."""
    if kind != "auto" and kind not in KINDS:
        raise ConfigError(f"model_kind must be auto or one of {', '.join(KINDS)}, got {kind!r}")
    if saved is not None and kind not in ("auto", saved.kind):
        raise ConfigError(
            f"model_kind={kind} conflicts with the saved model's kind {saved.kind} (config.json "
            f"'{SPEC_KEY}'); leave model_kind=auto to reuse it"
        )
    resolved = saved.kind if saved is not None else detect_kind(config) if kind == "auto" else kind
    if objective == "arm" and resolved != "causal":
        raise ConfigError(f"objective=arm needs a causal LM; {name} is a {resolved} model")
    if objective == "block" and resolved != "causal":
        raise ConfigError(
            f"objective=block adapts a causal LM (AR to block diffusion, through a 4-D "
            f"attention mask); {name} is a {resolved} model, whose attention is its own: train "
            "it with objective=mdm"
        )
    return resolved


def _new_spec(
    model: Any,
    tokenizer: Any,
    kind: ModelKind,
    objective: str,
    shift_logits: bool | None,
    mask_token_id: int | None,
    mask_token: str | None,
) -> AdapterSpec:
    """The spec of a model stablemdm has not trained before."""
    conditions = bool(
        getattr(model, "conditions_on_t", False) or getattr(model.config, "conditions_on_t", False)
    )
    if objective == "arm":
        if shift_logits:
            raise ConfigError("shift_logits is an MDM option: an ARM predicts the next token")
        return AdapterSpec(kind, False, False, None, conditions)
    if objective == "block" and shift_logits:
        raise ConfigError(
            "objective=block reads each noised position's own logits: leave shift_logits unset "
            "(or false)"
        )
    adapted = kind == "causal" and objective == "mdm"  # block diffusion keeps causal attention
    shift = default_shift_logits(model) if shift_logits is None else shift_logits
    mask_id = resolve_mask_token_id(
        model.config, tokenizer, mask_token_id=mask_token_id, mask_token=mask_token
    )
    return AdapterSpec(kind, adapted, shift, mask_id, conditions)


def default_shift_logits(model: Any) -> bool:
    """True for Dream only, whose weights were trained shifted; any other model predicts each
    position's own token. For an adapted causal LM that is dllm's A2D default: from SmolLM2's
    weights it learned far faster than the shift, from scratch the two were level (docs/hf.md)."""
    return str(getattr(unwrap(model).config, "model_type", "")).lower() == "dream"


def describe_shift(model: Any) -> str:
    """The run's log line on the `shift_logits` an adapted causal LM got when none was set."""
    spec = adapter_spec(model)
    if spec is None:
        raise ValueError("describe_shift needs a model adapted by load_hf_model")
    why = (
        "the default for a causal LM adapted to an MDM, pretrained or from scratch: position i "
        "predicts token i, as in dllm's A2D; from SmolLM2's weights the shift learned far "
        "slower, from scratch the two were level (docs/hf.md)"
    )
    if spec.shift_logits != default_shift_logits(model):
        why = "as saved with the model"
    return f"shift_logits={str(spec.shift_logits).lower()} ({why}; set shift_logits= to choose)"


def trained_objective(spec: AdapterSpec) -> Literal["mdm", "arm", "block"]:
    """The objective a saved spec was trained with: arm (no mask token), block, else mdm."""
    return "arm" if spec.mask_token_id is None else "mdm" if spec.block_size is None else "block"


def _check_saved(
    spec: AdapterSpec, objective: str, shift_logits: bool | None, mask_token_id: int | None
) -> None:
    """A model saved after stablemdm training keeps its spec; conflicting options are errors."""
    trained = trained_objective(spec)
    if objective != trained:
        described = {"arm": "an ARM", "mdm": "an MDM", "block": "block diffusion"}[trained]
        raise ConfigError(f"this model was trained as {described}; objective={objective} differs")
    for name, value in (("shift_logits", shift_logits), ("mask_token_id", mask_token_id)):
        if value is not None and value != getattr(spec, name):
            raise ConfigError(
                f"{name}={value} conflicts with the saved model's {name}={getattr(spec, name)} "
                f"(config.json '{SPEC_KEY}'); leave {name} unset to reuse it"
            )


def apply_lora(
    model: Any,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str = "all-linear",
) -> Any:
    """Wrap `model` with peft LoRA adapters. The input embedding is trained in full too when
    the mask token was added (`AdapterSpec.mask_token_added`): its new row must be learned.
    A local base model is recorded by its absolute path (adapter_config.json
    'base_model_name_or_path'), so the adapter loads from any working directory."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError(f"lora_r > 0 needs peft: {PEFT_HINT}") from None
    local = Path(getattr(model, "name_or_path", "") or "")
    if str(local) and local.exists():  # the adapter then loads from any working directory
        model.name_or_path = str(local.resolve())
    spec = adapter_spec(model)
    modules_to_save = None
    if spec is not None and spec.mask_token_added:
        embedding = model.get_input_embeddings()
        name = next(n for n, m in model.named_modules() if m is embedding)
        modules_to_save = [name.rsplit(".", 1)[-1]]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def load_trained(
    folder: str | Path, trust_remote_code: bool = False, gguf_file: str | None = None
) -> tuple[Any, Any, AdapterSpec]:
    """A model saved after stablemdm training, with its tokenizer and spec: full weights, or a
    LoRA adapter over the base model its adapter_config.json names (the folder's config.json
    then holds the spec). `trust_remote_code`/`gguf_file` are the run's, for the base, which
    must be a local folder or in the local cache (nothing is downloaded)."""
    folder = Path(folder)
    config = _load_config(str(folder), trust_remote_code, None)
    values = getattr(config, SPEC_KEY, None)
    if not isinstance(values, dict):
        raise ConfigError(f"{folder} was not saved by stablemdm (no '{SPEC_KEY}' in config.json)")
    spec = AdapterSpec.from_dict(values)
    tokenizer = load_tokenizer(str(folder), trust_remote_code)
    adapter = folder / "adapter_config.json"
    if not adapter.is_file():
        model = _load_model(str(folder), spec.kind, trust_remote_code, None, torch.float32, config)
        _apply(model, spec)
        return model, tokenizer, spec
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError(f"{folder} holds a LoRA adapter, which needs peft: {PEFT_HINT}") from None

    base = json.loads(adapter.read_text())["base_model_name_or_path"]
    try:
        model = _load_model(base, spec.kind, trust_remote_code, gguf_file, torch.float32)
    except (OSError, ValueError) as err:
        raise MissingBaseModel(_missing_base(folder, base)) from err
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _apply(model, spec)
    return PeftModel.from_pretrained(model, folder), tokenizer, spec


def load_hf_as_is(
    name_or_path: str,
    *,
    mask_token: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Any, AdapterSpec]:
    """A Hugging Face model to evaluate as it is (a folder, or a Hub name in the local
    cache): one saved by stablemdm as it was trained, a causal LM as an ARM, a masked or
    diffusion LM as an MDM with the mask token of its config or tokenizer, or `mask_token`;
    its weights loaded in `dtype`."""
    config = _load_config(name_or_path, trust_remote_code, None)
    saved = getattr(config, SPEC_KEY, None)
    spec = AdapterSpec.from_dict(saved) if isinstance(saved, dict) else None
    if spec is not None:
        objective, block_size = trained_objective(spec), spec.block_size
    else:
        objective, block_size = ("arm" if detect_kind(config) == "causal" else "mdm"), None
    if objective == "arm" and mask_token is not None:
        raise ConfigError(
            f"mask_token={mask_token!r}: {name_or_path} is a causal LM, scored as an ARM (exact "
            "log-likelihood), which masks nothing; leave mask_token unset"
        )
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    if spec is None and objective == "mdm":
        if resolve_mask_token_id(config, tokenizer, mask_token=mask_token) is None:
            raise ConfigError(
                f"model {name_or_path} names no mask token (neither its config nor its "
                "tokenizer has one): give the token it was trained with as mask_token=TOKEN"
            )
    return load_hf_model(
        name_or_path,
        objective=objective,
        block_size=block_size,
        tokenizer=tokenizer,
        mask_token=mask_token,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
    )


class MissingBaseModel(ConfigError):
    """A LoRA adapter whose base model is not where its adapter_config.json says."""


def _missing_base(folder: Path, base: str) -> str:
    """The one line for a LoRA adapter whose base model cannot be loaded."""
    where = "" if Path(base).is_absolute() else f" (relative to {Path.cwd()}, or a Hub name)"
    return (
        f"the LoRA adapter in {folder} needs its base model {base}{where}, which is not there: "
        f"put the base model back at that path, or set base_model_name_or_path in "
        f"{folder / 'adapter_config.json'} to where it is now"
    )
