"""The training configuration: one dataclass, the single source of truth for a run.

`StableMDMConfig` extends `transformers.TrainingArguments` with the fields that say what is
trained (task, model, objective) and how its loss is estimated (rate sampler, scheme,
masking). Recipes are flat YAML files of existing field names; `key=value` overrides are
parsed as YAML literals and type-checked against the field. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from ..errors import ConfigError
from ..estimators.registry import (
    ESTIMATOR_DEFAULTS,
    ISAD_DEFAULT_TOKENS,
    METHODS,
    UNBIASED_METHODS,
    unbiased,
)
from ..models.hf import ADD_MASK_CONFLICT
from ..tasks.registry import resolve_paths

SAMPLER_NAMES = ("uniform", "clipped", "ppots", "ema")


SCHEME_NAMES = ("iid", "stratified", "stratified_rows", "mirrored")


AUTO_DRAWS = 12  # estimator=auto: minibatches per candidate and measurement


AUTO_BATCH = 32  # estimator=auto: sequences per measured minibatch


@dataclass
class StableMDMConfig(TrainingArguments):
    """Everything a stablemdm training run needs; saved to `<output_dir>/config.yaml`."""

    # what is trained
    task: str = field(default="chain_sum", metadata={"help": "Built-in task name or 'jsonl'."})
    task_options: dict = field(
        default_factory=dict,
        metadata={
            "help": "Options of the task, e.g. {n_train: 2000} or {train: a.jsonl, test: b.jsonl}."
        },
    )
    model_preset: str = field(
        default="tiny", metadata={"help": "Model size preset: tiny, small, base."}
    )
    d_model: int | None = field(default=None, metadata={"help": "Override the preset's width."})
    n_layers: int | None = field(default=None, metadata={"help": "Override the preset's depth."})
    n_heads: int | None = field(
        default=None, metadata={"help": "Override the preset's head count."}
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder to fine-tune from (the paper's protocol)."},
    )
    objective: Literal["mdm", "arm", "block"] = field(
        default="mdm",
        metadata={
            "help": "mdm: masked diffusion; arm: the same network, causal; block: block "
            "diffusion (BD3-LM: blocks of block_size tokens, each denoised given the clean "
            "blocks before it)."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "objective=block: tokens per block, counted from the response's first "
            "token (a last block may be shorter); the prompt is clean context."
        },
    )

    # a Hugging Face model instead of the built-in transformer (docs/hf.md)
    model: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face model: a local folder, or a Hub name in the local cache "
            "(or downloaded, with allow_downloads=true). "
            "None trains stablemdm's own transformer (model_preset)."
        },
    )
    allow_downloads: bool = field(
        default=False,
        metadata={
            "help": "Let model= and tokenizer_name= be downloaded from the Hugging Face Hub. "
            "Default: local folders and the local Hugging Face cache only, nothing goes to the "
            "network (HF_HUB_OFFLINE=1 forbids downloads even when true)."
        },
    )
    model_kind: Literal["auto", "masked_lm", "diffusion", "causal"] = field(
        default="auto",
        metadata={
            "help": "masked_lm (BERT-style), diffusion (LLaDA/Dream custom code), causal (an "
            "AR model: adapted to bidirectional attention for objective=mdm); auto reads the "
            "config's architectures."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or name (default: the model's)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model folder's own code (LLaDA, Dream)."}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "Load the model and tokenizer from this GGUF file."}
    )
    model_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "Weight dtype (train in float32 with bf16=true autocast by default)."},
    )
    shift_logits: bool | None = field(
        default=None,
        metadata={
            "help": "Position i-1 predicts token i (Dream's convention). Default: true for Dream, "
            "false otherwise (a pretrained causal LM adapts far faster unshifted, docs/hf.md); "
            "the resolved value is logged and saved in config.yaml."
        },
    )
    mask_token_id: int | None = field(
        default=None,
        metadata={"help": "Mask token id (default: from the model config, then the tokenizer)."},
    )
    mask_token: str | None = field(
        default=None, metadata={"help": "Mask token string (one token of the tokenizer)."}
    )
    add_mask_token: bool = field(
        default=False,
        metadata={"help": "Add a new <|mask|> token (and embedding row) when the model has none."},
    )
    chat_template: bool = field(
        default=False,
        metadata={"help": "Format prompts with the tokenizer's chat template (never scored)."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message prepended under chat_template."}
    )
    eos_fill: bool = field(
        default=True,
        metadata={
            "help": "Fill the response canvas with EOS that is masked and scored (LLaDA SFT); "
            "false pads it (not attended, not scored)."
        },
    )
    loss_normalizer: Literal["eligible", "response", "fixed"] = field(
        default="eligible",
        metadata={
            "help": "Divide each sequence's loss by its eligible tokens (response + EOS fill), "
            "its response length, or normalizer_length."
        },
    )
    normalizer_length: int | None = field(
        default=None, metadata={"help": "The divisor of loss_normalizer=fixed."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Sequence length in tokens (default: the task's, or from the data)."},
    )
    gen_length: int | None = field(
        default=None,
        metadata={"help": "Response canvas in tokens (default: the task's, or from the data)."},
    )
    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank through peft (0: train every weight)."}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules LoRA adapts (peft names; all-linear by default)."},
    )

    # how the MDM loss is estimated (paper.md section 3)
    rate: Literal["t", "count"] = field(
        default="t", metadata={"help": "t: draw a masking rate; count: draw the number of masks."}
    )
    sampler: Literal["uniform", "clipped", "ppots", "ema"] = field(
        default="uniform",
        metadata={"help": "Density of the rate: uniform (Standard), clipped, ppots, ema."},
    )
    scheme: Literal["iid", "stratified", "stratified_rows", "mirrored"] = field(
        default="iid",
        metadata={
            "help": "How uniforms are drawn: iid, stratified (StraTS), stratified_rows (StraTS "
            "within each sequence's blocks, objective=block), mirrored (SyRM)."
        },
    )
    masking: Literal["iid", "mirror", "isad"] = field(
        default="iid", metadata={"help": "Mask draw: iid, mirror (MIRROR pairs), isad."}
    )
    eps: float = field(default=1e-3, metadata={"help": "p_mask(t) = (1 - eps) t + eps."})
    clip_low: float = field(default=0.2, metadata={"help": "Clipped sampler: lower end of t."})
    clip_high: float = field(default=0.8, metadata={"help": "Clipped sampler: upper end of t."})
    mix: float = field(
        default=0.1,
        metadata={"help": "P-POTS/EMA: weight of the uniform in the mixture; weights <= 1/mix."},
    )
    ppots_file: str | None = field(
        default=None, metadata={"help": "Use a density fitted earlier by `stablemdm fit-t` (JSON)."}
    )
    ppots_method: Literal["counts", "family", "grid"] = field(
        default="counts",
        metadata={
            "help": "P-POTS fit: counts (S measured per mask count, exact in t; p = sqrt(S)), "
            "or S on a rate grid fitted by the paper's smooth family or smoothed (grid)."
        },
    )
    ppots_target: Literal["loss", "grad"] = field(
        default="loss", metadata={"help": "Second moment of the loss, or of the gradient norm."}
    )
    ppots_params: str = field(
        default="head", metadata={"help": "Regex of parameter names for ppots_target=grad."}
    )
    ppots_sequences: int = field(
        default=32,
        metadata={"help": "P-POTS estimate: sequences per process (as many again held out)."},
    )
    ppots_rates: int = field(
        default=24, metadata={"help": "P-POTS estimate (family, grid): grid rates."}
    )
    ppots_counts: int = field(
        default=16,
        metadata={"help": "P-POTS estimate (counts): mask counts per sequence (all if fewer)."},
    )
    ppots_masks: int = field(
        default=2, metadata={"help": "P-POTS estimate: masks per rate or count."}
    )
    ppots_refit_steps: int = field(
        default=0,
        metadata={"help": "P-POTS: refit the density every this many steps (0: fit once)."},
    )
    ema_bins: int = field(default=20, metadata={"help": "EMA: bins of the rate."})
    ema_decay: float = field(default=0.9, metadata={"help": "EMA: decay of the per-bin moments."})
    ema_refresh_every: int = field(
        default=50, metadata={"help": "EMA: steps between density refreshes."}
    )
    isad_tokens: list[str] = field(
        default_factory=list,
        metadata={"help": "ISAD: token strings whose mask probability is raised."},
    )
    isad_delta: float = field(default=0.2, metadata={"help": "ISAD: q = min(p + delta, q_max)."})
    isad_q_max: float = field(default=0.95, metadata={"help": "ISAD: cap on q, must be < 1."})
    compute_matched: bool = field(
        default=False,
        metadata={"help": "MIRROR: two copies of half the sequences per step: Standard's passes."},
    )
    estimator: Literal["fixed", "auto"] = field(
        default="fixed",
        metadata={
            "help": "fixed: train with rate, sampler, scheme and masking as given; auto: "
            "measure every unbiased estimator on this model and train with the lowest gradient "
            "variance x forward passes, measured again every auto_every steps (docs/methods.md)."
        },
    )
    auto_every: int = field(
        default=0,
        metadata={
            "help": "auto: optimizer steps between measurements (each after a P-POTS refit); "
            "0: as many that the measurements' sequences are 2% of those trained on "
            "(under 3% of the time on the demo model, docs/methods.md)."
        },
    )
    auto_candidates: list[str] = field(
        default_factory=list,
        metadata={
            "help": "auto: the methods to choose from (names of the method table, e.g. "
            "[standard, count, count_ppots_mirror]); empty: every unbiased one the model allows."
        },
    )
    auto_draws: int = field(
        default=AUTO_DRAWS,
        metadata={"help": "auto: minibatches per candidate and measurement (>= 3)."},
    )
    auto_batch: int = field(
        default=AUTO_BATCH,
        metadata={"help": "auto: sequences per measured minibatch (even: MIRROR halves it)."},
    )
    auto_budget: Literal["charged", "extra"] = field(
        default="charged",
        metadata={
            "help": "auto: charged: its measurements and P-POTS fits come out of max_steps "
            "Standard steps' passes (it trains fewer steps, planned before step 1); extra: "
            "they come on top (docs/methods.md)."
        },
    )

    max_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": "Steps in a row whose loss or gradient is not finite (each skipped: no "
            "update) before the run stops, keeping its last finite checkpoint."
        },
    )
    log_rate_bins: int = field(
        default=0,
        metadata={
            "help": "If > 0, log the mean and second moment of the unweighted loss in this "
            "many bins of t (watch S(t) move: what P-POTS and EMA feed on)."
        },
    )

    # evaluation during training
    eval_accuracy: bool = field(
        default=False,
        metadata={"help": "Also decode the test split at each evaluation and log accuracy."},
    )
    eval_limit: int = field(
        default=64, metadata={"help": "Test items decoded per accuracy evaluation."}
    )
    eval_heldout: int = field(
        default=128, metadata={"help": "Held-out sequences for the periodic eval loss."}
    )

    # overridden defaults of TrainingArguments: a CPU-friendly, quiet, reproducible start
    output_dir: str = field(default="runs/default", metadata={"help": "Where the run writes."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Sequences per process and micro-batch."}
    )
    warmup_steps: float = field(default=20, metadata={"help": "Linear warmup steps."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "linear, cosine, constant, ..."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    logging_steps: float = field(default=10, metadata={"help": "Steps between log lines."})
    save_steps: float = field(default=100, metadata={"help": "Steps between checkpoints."})
    report_to: str | list[str] = field(
        default="none", metadata={"help": "none, tensorboard, wandb."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep 'eligible' in batches."}
    )
    use_cpu: bool = field(
        default_factory=lambda: not torch.cuda.is_available(),
        metadata={
            "help": "Train on the CPU (the default when there is no GPU; then DDP uses gloo)."
        },
    )
    dataloader_pin_memory: bool = field(
        default_factory=torch.cuda.is_available, metadata={"help": "Pin batches (GPU only)."}
    )
    # the Trainer computes an eval loss only for batches with labels; "eligible" plays that role
    label_names: list[str] | None = field(
        default_factory=lambda: ["eligible"], metadata={"help": "Do not change."}
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Eval computes the loss only."}
    )

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_numbers()
        self._check_ranges()
        self._check_combinations()
        self._check_blocks()
        self._check_estimator_sizes()
        self._check_model_options()
        self._check_auto()
        self._resolve_paths()
        super().__post_init__()

    def _resolve_paths(self) -> None:
        """Data files and local model, checkpoint and density paths made absolute and
        resolved, as given from the working directory: config.yaml then names them for a
        command run anywhere (a Hub name, or a path not there, is left as it is)."""
        self.task_options = resolve_paths(self.task, self.task_options)
        for name in ("model", "init_from", "tokenizer_name", "ppots_file"):
            value = getattr(self, name)
            if value and Path(value).exists():
                setattr(self, name, str(Path(value).resolve()))

    def _check_ranges(self) -> None:
        """The estimator's real-valued parameters lie in their ranges."""
        if not 0.0 <= self.eps < 1.0:
            raise ConfigError(f"eps must lie in [0, 1), got {self.eps}")
        if not 0.0 < self.mix <= 1.0:
            raise ConfigError(f"mix (lambda) must lie in (0, 1], got {self.mix}")
        if not 0.0 <= self.clip_low < self.clip_high <= 1.0:
            raise ConfigError(
                f"need 0 <= clip_low < clip_high <= 1, got {self.clip_low}, {self.clip_high}"
            )
        if self.isad_delta < 0:
            raise ConfigError(f"isad_delta must be >= 0, got {self.isad_delta}")
        if not 0.0 < self.isad_q_max < 1.0:
            raise ConfigError(
                f"isad_q_max must be < 1 (q = 1 never shows the token, so no weight can correct "
                f"the bias) and > 0, got {self.isad_q_max}"
            )

    def _check_combinations(self) -> None:
        """Options that only make sense together (isad, mirror, arm, ppots, eval)."""
        if self.masking == "isad" and not self.isad_tokens:
            raise ConfigError("masking=isad needs isad_tokens, e.g. isad_tokens=['#']")
        if self.masking == "isad" and self.rate == "count":
            raise ConfigError("masking=isad has no count-mode form: set rate=t or another masking")
        if self.compute_matched and self.masking != "mirror":
            raise ConfigError("compute_matched only applies to masking=mirror")
        if self.objective == "arm" and (
            self.sampler != "uniform"
            or self.masking != "iid"
            or self.rate != "t"
            or self.scheme != "iid"
        ):
            raise ConfigError(
                "objective=arm draws no rates or masks: leave sampler, scheme, masking and rate at "
                "their defaults (uniform, iid, iid, t)"
            )
        if self.ppots_file is not None and self.sampler != "ppots" and self.estimator != "auto":
            raise ConfigError("ppots_file is only used with sampler=ppots (or estimator=auto)")
        if self.eval_accuracy and self.eval_strategy in ("no", IntervalStrategy.NO):
            raise ConfigError(
                "eval_accuracy=true decodes at each evaluation: set eval_strategy=steps"
            )

    def _check_blocks(self) -> None:
        """objective=block: block_size set (and only then), with the estimators built for
        blocks, on the built-in transformer or a causal LM (`models.hf_blocks`); any other
        refused in one line saying so."""
        if (self.objective == "block") != (self.block_size is not None):
            raise ConfigError(
                "objective=block needs block_size=N (tokens per block, e.g. 4), and only it "
                "uses one"
            )
        if self.objective != "block":
            if self.scheme == "stratified_rows":
                raise ConfigError(
                    "scheme=stratified_rows stratifies the rates of each sequence's blocks: it "
                    "needs objective=block (use scheme=stratified on the full canvas)"
                )
            return
        if _sampler_is(self, "ppots") and (
            self.ppots_method == "counts" or self.ppots_target == "grad"
        ):
            raise ConfigError(
                "objective=block fits P-POTS (sampler=ppots, or a candidate of estimator=auto) "
                "from each block's loss at a grid of rates, pooled over block positions: set "
                "ppots_method=grid (or family) and ppots_target=loss"
            )
        if self.shift_logits:
            raise ConfigError(
                "objective=block reads each noised position's own logits: leave shift_logits "
                "unset (or false)"
            )

    def _check_estimator_sizes(self) -> None:
        """Bin, draw and step counts of the samplers and their fits; the P-POTS parameter regex."""
        if self.log_rate_bins < 0:
            raise ConfigError(f"log_rate_bins must be >= 0, got {self.log_rate_bins}")
        for name in (
            "ppots_sequences",
            "ppots_rates",
            "ppots_masks",
            "ema_bins",
            "ema_refresh_every",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ppots_rates < 2:
            raise ConfigError("ppots_rates must be >= 2 to fit a density")
        if self.ppots_counts < 2:
            raise ConfigError("ppots_counts must be >= 2 (k = 1 and at least one more count)")
        if self.ppots_refit_steps < 0:
            raise ConfigError(f"ppots_refit_steps must be >= 0, got {self.ppots_refit_steps}")
        if self.ppots_refit_steps and self.sampler != "ppots" and self.estimator != "auto":
            raise ConfigError("ppots_refit_steps is only used with sampler=ppots")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        try:
            re.compile(self.ppots_params)
        except re.error as err:
            raise ConfigError(
                f"ppots_params={self.ppots_params!r} is not a valid regex ({err})"
            ) from None

    def _check_auto(self) -> None:
        """The estimator=auto fields: sizes, candidates, and the fields auto sets itself."""
        for name, low in (("auto_every", 0), ("auto_draws", 3), ("auto_batch", 2)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.auto_batch % 2:
            raise ConfigError(
                f"auto_batch must be even (MIRROR at equal compute masks half of it twice), got "
                f"{self.auto_batch}"
            )
        for name in self.auto_candidates:
            if name not in METHODS:
                raise ConfigError(
                    f"auto_candidates: unknown method {name!r}; known: {', '.join(METHODS)}"
                )
            if not unbiased(name):
                raise ConfigError(
                    f"auto_candidates: {name} is biased (it estimates another objective than "
                    "the ELBO), so auto never trains with it: remove it"
                )
        if len(set(self.auto_candidates)) != len(self.auto_candidates):
            raise ConfigError(f"auto_candidates lists a method twice: {self.auto_candidates}")
        if self.estimator != "auto":
            return
        if self.objective == "arm":
            raise ConfigError(
                "estimator=auto chooses among MDM estimators, and objective=arm draws no rates "
                "or masks: set estimator=fixed"
            )
        set_here = [
            f"{k}={getattr(self, k)!r}"
            for k, v in ESTIMATOR_DEFAULTS.items()
            if k != "estimator" and getattr(self, k) != v
        ]
        if set_here:
            raise ConfigError(
                f"estimator=auto chooses rate, sampler, scheme, masking and compute_matched "
                f"itself: remove {', '.join(set_here)} (or list methods in auto_candidates)"
            )
        if self.ppots_refit_steps:
            raise ConfigError(
                "estimator=auto refits the P-POTS density at each measurement (every auto_every "
                "steps): remove ppots_refit_steps"
            )
        if self.auto_budget == "charged" and self.max_steps < 1:
            raise ConfigError(
                "auto_budget=charged plans its steps within max_steps Standard steps: set "
                "max_steps, or auto_budget=extra to train num_train_epochs"
            )
        isad_named = "isad" in self.auto_candidates
        if isad_named and not (self.isad_tokens or ISAD_DEFAULT_TOKENS.get(self.task)):
            raise ConfigError(
                f"auto_candidates: isad needs isad_tokens (task {self.task} has no default "
                "answer delimiter), e.g. isad_tokens=['#']"
            )

    def _check_model_options(self) -> None:
        """Options of Hugging Face models, lengths and the loss normaliser."""
        hf_only = {
            "model_kind": "auto",
            "tokenizer_name": None,
            "trust_remote_code": False,
            "gguf_file": None,
            "model_dtype": "float32",
            "shift_logits": None,
            "mask_token_id": None,
            "mask_token": None,
            "add_mask_token": False,
            "chat_template": False,
            "lora_r": 0,
            "allow_downloads": False,
        }
        if self.model is None:
            stray = [k for k, default in hf_only.items() if getattr(self, k) != default]
            if stray:
                raise ConfigError(
                    f"{', '.join(stray)} {'applies' if len(stray) == 1 else 'apply'} only to a "
                    "Hugging Face model: set model=PATH, or remove it"
                )
            if self.activation_checkpointing or self.gradient_checkpointing:
                raise ConfigError(
                    "activation_checkpointing applies to Hugging Face models (model=PATH); the "
                    "built-in transformer is small enough not to need it"
                )
        elif self.init_from is not None:
            raise ConfigError("set model (a Hugging Face model) or init_from, not both")
        if self.system_prompt is not None and not self.chat_template:
            raise ConfigError("system_prompt is used only with chat_template=true")
        if self.add_mask_token and (self.mask_token_id is not None or self.mask_token):
            raise ConfigError(ADD_MASK_CONFLICT)
        if self.objective == "arm" and (self.mask_token_id is not None or self.mask_token):
            raise ConfigError("objective=arm never masks: remove mask_token_id / mask_token")
        if (self.loss_normalizer == "fixed") != (self.normalizer_length is not None):
            raise ConfigError(
                "loss_normalizer=fixed needs normalizer_length=N (and only it uses one)"
            )
        for name in ("normalizer_length", "max_length", "gen_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length and self.gen_length and self.gen_length >= self.max_length:
            raise ConfigError(
                f"gen_length {self.gen_length} leaves no room for a prompt in max_length "
                f"{self.max_length}: raise max_length"
            )
        if self.lora_r < 0 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(
                f"need lora_r >= 0, lora_alpha > 0 and 0 <= lora_dropout < 1; got {self.lora_r}, "
                f"{self.lora_alpha}, {self.lora_dropout}"
            )

    def _check_numbers(self) -> None:
        """Every float finite, every size, count and step positive: before any work starts."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        for names, bad, what in (
            (_POSITIVE, lambda v: v <= 0, "> 0"),
            (_NON_NEGATIVE, lambda v: v < 0, ">= 0"),
        ):
            for name in names:
                value = getattr(self, name)
                if value is not None and bad(value):
                    raise ConfigError(f"{name} must be {what}, got {value}")
        for name in ("seed", "data_seed"):  # numpy's range: set_seed refuses any other
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**32:
                raise ConfigError(f"{name} must be an integer in [0, 2**32), got {value}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(
                f"max_steps must be >= 1 (or -1: train num_train_epochs), got {self.max_steps}"
            )

    def _check_choices(self) -> None:
        hints = typing.get_type_hints(StableMDMConfig)
        for f in dataclasses.fields(StableMDMConfig):
            if f.name in _OWN_FIELDS and get_origin(hints[f.name]) is Literal:
                allowed = get_args(hints[f.name])
                if getattr(self, f.name) not in allowed:
                    raise ConfigError(
                        f"{f.name} must be one of {', '.join(map(str, allowed))}; "
                        f"got {getattr(self, f.name)!r}"
                    )

    def resolved(self) -> dict[str, Any]:
        """Every stablemdm field plus each TrainingArguments field that differs from its
        default: enough to re-run this exact training with `stablemdm train --config`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init or f.name in _DERIVED:
                continue
            value = getattr(self, f.name)
            if f.name == "use_cpu" and value != torch.cuda.is_available():
                continue  # the machine's default: a config written on a CPU box runs on a GPU
            if (
                f.name in _OWN_FIELDS
                or f.name in _OVERRIDDEN
                or value != _BASE_DEFAULTS.get(f.name)
            ):
                out[f.name] = _plain(value)
        return out


_OWN_FIELDS = {f.name for f in dataclasses.fields(StableMDMConfig)} - {
    f.name for f in dataclasses.fields(TrainingArguments)
}


# sizes, counts and steps that must be > 0, and amounts that must be >= 0 (None: unset)
_POSITIVE = (
    "learning_rate",
    "num_train_epochs",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "logging_steps",
    "save_steps",
    "eval_steps",
    "save_total_limit",
    "d_model",
    "n_layers",
    "n_heads",
    "block_size",
    "eval_limit",
    "eval_heldout",
)


_NON_NEGATIVE = ("warmup_steps", "weight_decay", "max_grad_norm", "dataloader_num_workers")


_OVERRIDDEN = {
    "output_dir",
    "learning_rate",
    "max_steps",
    "per_device_train_batch_size",
    "warmup_steps",
    "lr_scheduler_type",
    "max_grad_norm",
    "weight_decay",
    "logging_steps",
    "save_steps",
    "report_to",
    "remove_unused_columns",
    "use_cpu",
    "seed",
    "label_names",
    "prediction_loss_only",
    "dataloader_pin_memory",
}


# TrainingArguments' declared defaults (building an instance would reset accelerate's state)
_BASE_DEFAULTS = {
    f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
    for f in dataclasses.fields(TrainingArguments)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
}


# set by TrainingArguments.__post_init__ from other fields; writing them back would pin them
_DERIVED = {"logging_dir", "hub_token", "local_rank", "accelerator_config", "parallelism_config"}


def _plain(value: Any) -> Any:
    """A YAML-safe copy of a config value (enums become their values)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _auto_tries(c: StableMDMConfig, key: str, values: tuple) -> bool:
    """Whether estimator=auto has a candidate whose estimator field `key` is in `values`."""
    names = c.auto_candidates or UNBIASED_METHODS
    return c.estimator == "auto" and any(
        METHODS[n].get(key, ESTIMATOR_DEFAULTS[key]) in values for n in names
    )


def _sampler_is(c: StableMDMConfig, *names: str) -> bool:
    """Whether the run samples rates from one of `names` (itself, or as a candidate of auto)."""
    return c.sampler in names or _auto_tries(c, "sampler", names)


# fields only one method reads: (whether the config uses it, what it needs)
METHOD_OPTIONS: dict[str, tuple[typing.Callable[[StableMDMConfig], bool], str]] = {
    **dict.fromkeys(
        ("clip_low", "clip_high"), (lambda c: c.sampler == "clipped", "sampler=clipped")
    ),
    "mix": (
        lambda c: _sampler_is(c, "ppots", "ema"),
        "sampler=ppots or sampler=ema (or estimator=auto)",
    ),
    **dict.fromkeys(
        ("ppots_method", "ppots_target", "ppots_sequences", "ppots_masks"),
        (lambda c: _sampler_is(c, "ppots"), "sampler=ppots (or estimator=auto)"),
    ),
    "ppots_rates": (
        lambda c: _sampler_is(c, "ppots") and c.ppots_method != "counts",
        "sampler=ppots with ppots_method=family or grid",
    ),
    "ppots_counts": (
        lambda c: _sampler_is(c, "ppots") and c.ppots_method == "counts",
        "sampler=ppots with ppots_method=counts",
    ),
    "ppots_params": (
        lambda c: _sampler_is(c, "ppots") and c.ppots_target == "grad",
        "sampler=ppots with ppots_target=grad",
    ),
    **dict.fromkeys(
        ("ema_bins", "ema_decay", "ema_refresh_every"),
        (lambda c: _sampler_is(c, "ema"), "sampler=ema (or estimator=auto)"),
    ),
    **dict.fromkeys(
        ("isad_tokens", "isad_delta", "isad_q_max"),
        (
            lambda c: c.masking == "isad" or _auto_tries(c, "masking", ("isad",)),
            "masking=isad (or estimator=auto)",
        ),
    ),
    **dict.fromkeys(
        ("auto_every", "auto_candidates", "auto_draws", "auto_batch", "auto_budget"),
        (lambda c: c.estimator == "auto", "estimator=auto"),
    ),
    "eps": (lambda c: c.objective in ("mdm", "block"), "objective=mdm or block"),
    **dict.fromkeys(
        ("lora_alpha", "lora_dropout", "lora_target_modules"),
        (lambda c: c.lora_r > 0, "lora_r > 0"),
    ),
    "eval_limit": (lambda c: c.eval_accuracy, "eval_accuracy=true"),
    "eval_heldout": (
        lambda c: c.eval_strategy not in ("no", IntervalStrategy.NO),
        "eval_strategy=steps or epoch",
    ),
    **dict.fromkeys(
        ("d_model", "n_layers", "n_heads", "model_preset"),
        (lambda c: c.model is None and c.init_from is None, "the built-in model without init_from"),
    ),
}


# what draws rates and masks: an ARM reads none of it (`recipe.load_config` drops these
# fields under objective=arm, so an ARM can be trained over any method recipe)
ESTIMATOR_FIELDS = frozenset(
    {"rate", "sampler", "scheme", "masking", "eps", "clip_low", "clip_high", "mix"}
    | {"compute_matched", "estimator"}
    | {name for name in _OWN_FIELDS if name.startswith(("ppots_", "ema_", "isad_", "auto_"))}
)


# what estimator=auto decides itself (`recipe.load_config` drops these fields under it, so
# auto can be trained over any method recipe; `_check_auto` refuses them otherwise)
AUTO_CHOSEN = (*(k for k in ESTIMATOR_DEFAULTS if k != "estimator"), "ppots_refit_steps")
