"""A compact Llama-style transformer: the network both the MDM and its ARM baseline train.

Token embedding -> n_layers x [RMSNorm -> RoPE attention (SDPA) -> residual; RMSNorm ->
SwiGLU MLP -> residual] -> RMSNorm -> linear head; no biases. With `causal=False` attention
is bidirectional and the network predicts the tokens under [MASK] (a masked diffusion
model); with `causal=True` each position sees only itself and earlier positions, giving the
autoregressive baseline. The switch changes the attention pattern only, never a parameter,
so the two models compared in paper.md section 2 are the same network trained two ways.
Given `block_ids`, the input is block diffusion's `[noised | clean]` pair (or one sequence
read block-causally) and attention follows `blocks.block_diffusion_mask`: a third way to train
the same network.
The network never sees t (`conditions_on_t = False`), which is what allows count mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import skip_init

from .blocks import block_diffusion_mask
from .kv_cache import KVCache

MODEL_TYPE = "stablemdm-transformer"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INIT_STD = 0.02  # GPT-2 initialisation; residual output projections get INIT_STD/sqrt(2 n_layers)
FFN_MULTIPLE = 64  # SwiGLU hidden size is rounded up to a multiple of this

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 128, "n_layers": 2, "n_heads": 4},
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 4},
    "base": {"d_model": 512, "n_layers": 8, "n_heads": 8},
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ModelConfig:
    """Shape and behaviour of a `Transformer`; `d_ff=None` resolves to round(8/3 d_model)
    rounded up to a multiple of 64 in `__post_init__`, so saved configs are explicit."""

    vocab_size: int  # number of token ids, [MASK] included
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads; d_model / n_heads must be even (RoPE)
    d_ff: int | None = None  # SwiGLU hidden size
    max_seq_len: int = 512  # RoPE tables are built for this length; longer inputs are rejected
    causal: bool = False  # False: bidirectional MDM; True: the ARM baseline
    mask_token_id: int | None = None  # the reserved [MASK] id; required when causal is False
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the embedding matrix with the output head
    block_size: int | None = None  # trained as block diffusion with blocks this long (decoding)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_ff is None:
            self.d_ff = math.ceil(round(8 * self.d_model / 3) / FFN_MULTIPLE) * FFN_MULTIPLE
        if not _is_int(self.d_ff) or self.d_ff < 1:
            raise ValueError(
                f"ModelConfig.d_ff must be a positive integer or None, got {self.d_ff!r}"
            )
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "choose d_model as a multiple of n_heads"
            )
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"ModelConfig head dimension d_model/n_heads={self.head_dim} is odd; RoPE needs "
                "an even head dimension, change d_model or n_heads"
            )
        if not isinstance(self.causal, bool) or not isinstance(self.tie_embeddings, bool):
            raise ValueError("ModelConfig.causal and ModelConfig.tie_embeddings must be booleans")
        if self.mask_token_id is None and not self.causal:
            raise ValueError(
                "ModelConfig.mask_token_id is required when causal=False (the MDM must know its "
                "[MASK] id); set mask_token_id, or causal=True for the ARM baseline"
            )
        if self.mask_token_id is not None and (
            not _is_int(self.mask_token_id) or not 0 <= self.mask_token_id < self.vocab_size
        ):
            raise ValueError(
                f"ModelConfig.mask_token_id={self.mask_token_id!r} must be an integer in "
                f"[0, vocab_size={self.vocab_size})"
            )
        if self.block_size is not None and (
            not _is_int(self.block_size) or self.block_size < 1 or self.causal
        ):
            raise ValueError(
                f"ModelConfig.block_size={self.block_size!r} must be None or an integer >= 1, "
                "on a bidirectional model (causal=False)"
            )
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ValueError(
                f"ModelConfig.rope_theta={self.rope_theta} and norm_eps={self.norm_eps} must be > 0"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (what config.json stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build a config from a mapping; unknown or missing keys are errors, not ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"ModelConfig got unknown keys {unknown}; valid keys are {sorted(fields)}"
            )
        if "vocab_size" not in values:
            raise ValueError("ModelConfig needs vocab_size (the tokenizer's vocabulary size)")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size from PRESETS with `overrides` applied (vocab_size is always needed)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets are {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def _linear(d_in: int, d_out: int) -> nn.Linear:
    """A bias-free linear layer left uninitialised (weights are drawn by `_init_weights`)."""
    return skip_init(nn.Linear, d_in, d_out, bias=False)


def _rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `[max_seq_len, head_dim/2]` for rotary position embeddings."""
    dim = config.head_dim
    inv_freq = config.rope_theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head `x` `[B, H, L, Dh]` by position (fp32 math)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, H, L, Dh/2] each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE; the pattern comes from the mask passed in."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = _linear(config.d_model, 3 * config.d_model)
        self.out = _linear(config.d_model, config.d_model)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, H, L, Dh]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.out(y.transpose(1, 2).reshape(b, l, d))  # [B, L, D]

    def cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention of a chunk `x` `[B, Lc, D]` over the `past` keys and values then its own
        (`mask` `[B, 1, Lc, S + Lc]`); returns the output and the chunk's keys and values."""
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, H, Lc, Dh]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if past is None:
            keys, values = k, v
        else:
            keys, values = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, l, d)), k, v  # [B, Lc, D]


class SwiGLU(nn.Module):
    """Gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = _linear(config.d_model, config.d_ff)
        self.up = _linear(config.d_model, config.d_ff)
        self.down = _linear(config.d_ff, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # [B, L, D]


class Block(nn.Module):
    """Pre-norm residual block: attention then SwiGLU."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal)  # [B, L, D]
        return x + self.mlp(self.mlp_norm(x))  # [B, L, D]

    def cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` for a chunk attending over cached keys (`Attention.cached`); returns the
        output and the chunk's keys and values."""
        y, k, v = self.attn.cached(self.attn_norm(x), cos, sin, mask, past)
        x = x + y  # [B, Lc, D]
        return x + self.mlp(self.mlp_norm(x)), k, v


def _chunk_mask(cached: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask `[B, 1, Lc, S + Lc]` of a chunk over the cache: every real cached key
    `cached` `[B, S]` and every real chunk key `chunk` `[B, Lc]`, plus each query's own key (no
    NaN rows at padding)."""
    length = chunk.shape[1]
    keys = torch.cat([cached, chunk], dim=1)[:, None, None, :]  # [B, 1, 1, S + Lc]
    own = torch.eye(length, dtype=torch.bool, device=chunk.device)  # [Lc, Lc]
    own = F.pad(own, (cached.shape[1], 0))  # [Lc, S + Lc]
    return keys | own  # [B, 1, Lc, S + Lc]


class Transformer(nn.Module):
    """The MDM (causal=False) or ARM baseline (causal=True); `forward` returns fp32 logits.

    Weights are drawn from `generator` (None: torch's global generator, as in masking.py).
    """

    conditions_on_t: ClassVar[bool] = False
    # Range-check input ids on an accelerator too. Reading the check's result back is a host
    # sync every forward, so it is off by default and ids on the CPU are always checked.
    check_device_ids: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = skip_init(nn.Embedding, config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = _linear(config.d_model, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        cos, sin = _rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, Dh/2]
        self.register_buffer("rope_sin", sin, persistent=False)  # [max_seq_len, Dh/2]
        self._init_weights(generator)
        # the architecture is fixed here, so count once: the Trainer asks every step
        self._n_parameters = sum(p.numel() for p in self.parameters())

    def _init_weights(self, generator: torch.Generator | None) -> None:
        """normal(0, 0.02) everywhere; residual output projections scaled by 1/sqrt(2 n_layers)."""
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = (
                residual_std if name.endswith(("attn.out.weight", "mlp.down.weight")) else INIT_STD
            )
            with torch.no_grad():
                nn.init.normal_(param, 0.0, std, generator=generator)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied embedding is counted once); without the
        token embedding if asked (the Trainer's FLOP estimate asks, every step)."""
        total = self._n_parameters
        if exclude_embeddings and not self.config.tie_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total

    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        block_ids: torch.Tensor | None = None,
    ) -> None:
        """Shapes and dtype always; the id range where it costs no device sync (host tensors,
        or any device with `check_device_ids`)."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"Transformer.forward: input_ids must be a [B, L] long tensor, got "
                f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
            )
        length = (
            input_ids.shape[1] if block_ids is None else self._check_blocks(input_ids, block_ids)
        )
        if length > self.config.max_seq_len:
            raise ValueError(
                f"Transformer.forward: sequence length {length} exceeds ModelConfig.max_seq_len="
                f"{self.config.max_seq_len}; truncate the inputs or build the model with a "
                "larger max_seq_len"
            )
        on_host = input_ids.device.type == "cpu"
        if (on_host or self.check_device_ids) and (
            (input_ids < 0) | (input_ids >= self.config.vocab_size)
        ).any():
            raise ValueError(
                f"Transformer.forward: input_ids contain ids outside [0, vocab_size="
                f"{self.config.vocab_size}); check the tokenizer against ModelConfig.vocab_size"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"Transformer.forward: attention_mask shape {tuple(attention_mask.shape)} must "
                f"equal input_ids shape {tuple(input_ids.shape)}"
            )

    def _check_blocks(self, input_ids: torch.Tensor, block_ids: torch.Tensor) -> int:
        """The number of positions (L) of block-diffusion inputs: `block_ids` `[B, L]` (long) with
        `input_ids` `[B, 2L]` (noised | clean), `[B, 3L]` (noised | mirror | clean) or `[B, L]`,
        on a bidirectional model."""
        if self.config.causal:
            raise ValueError(
                "Transformer.forward: block_ids given to a causal model; block diffusion trains "
                "the bidirectional network (causal=False)"
            )
        if block_ids.dtype != torch.long or block_ids.dim() != 2:
            raise ValueError(
                f"Transformer.forward: block_ids must be a [B, L] long tensor, got "
                f"{block_ids.dtype} of shape {tuple(block_ids.shape)}"
            )
        b, length = block_ids.shape
        if b != input_ids.shape[0] or input_ids.shape[1] not in (length, 2 * length, 3 * length):
            raise ValueError(
                f"Transformer.forward: input_ids of shape {tuple(input_ids.shape)} with block_ids "
                f"of shape {tuple(block_ids.shape)}; input_ids must be [B, 2L] (noised | clean), "
                "[B, 3L] (noised | mirror | clean) or [B, L]"
            )
        return length

    def _attention_mask(self, attention_mask: torch.Tensor, length: int) -> torch.Tensor:
        """Boolean SDPA mask `[B, 1, L, L]`: real keys (and earlier ones if causal), plus the
        diagonal so a query at a padded position still attends to something (no NaN rows)."""
        device = attention_mask.device
        allowed = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
        if self.config.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
        return allowed | torch.eye(length, dtype=torch.bool, device=device)  # [B, 1, L, L]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        block_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, L, V]` (fp32) for `input_ids` `[B, L]`; `attention_mask` `[B, L]` marks
        real tokens (1/True) and padding (0/False); padding never affects real positions.
        With `block_ids` `[B, L]` (block diffusion: the block of each position), `input_ids` is
        `[noised | clean]` `[B, 2L]` (or `[noised | mirror | clean]` `[B, 3L]`), every part at
        positions 0..L-1, or one `[B, L]` sequence read block-causally; attention is
        `block_diffusion_mask`'s."""
        self._check_inputs(input_ids, attention_mask, block_ids)
        length = input_ids.shape[1]
        if block_ids is None:
            mask = None if attention_mask is None else self._attention_mask(attention_mask, length)
            cos, sin = self.rope_cos[:length], self.rope_sin[:length]  # [L, Dh/2]
        else:
            halves = length // block_ids.shape[1]  # 3 with MIRROR's copy, 2, 1: one sequence
            mask = block_diffusion_mask(block_ids, attention_mask, noised=halves - 1)
            cos, sin = (
                t[: block_ids.shape[1]].repeat(halves, 1) for t in (self.rope_cos, self.rope_sin)
            )
        is_causal = self.config.causal and mask is None
        x = self.tok_embeddings(input_ids)  # [B, L, D]
        for block in self.blocks:
            x = block(x, cos, sin, mask, is_causal)  # [B, L, D]
        return self.lm_head(self.norm(x)).float()  # [B, L, V]

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        valid: torch.Tensor | None = None,
        store: bool = False,
    ) -> torch.Tensor:
        """Logits `[B, Lc, V]` (fp32) of a chunk `input_ids` `[B, Lc]` at the RoPE `positions`
        `[B, Lc]`, attending to every real key of `cache` (the clean blocks before it) and,
        bidirectionally, to the chunk's real positions (`valid` `[B, Lc]`, default all): the
        view `block_diffusion_mask` gives a block over earlier clean blocks, without running
        them again. With `store` (a clean block, or the prompt) the chunk's keys and values
        are appended to `cache`. The training path (`forward`) never builds a cache."""
        if self.config.causal or self.config.block_size is None:
            raise ValueError(
                "Transformer.forward_cached: only a block-diffusion model (block_size set, "
                "causal=False) decodes over a KV cache; decode it with forward"
            )
        self._check_inputs(input_ids, None)
        if positions.shape != input_ids.shape or int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(
                f"Transformer.forward_cached: positions must be [B, Lc] like input_ids and below "
                f"max_seq_len={self.config.max_seq_len}; shorten gen_length or the prompt"
            )
        chunk = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        mask = _chunk_mask(cache.valid, chunk)  # [B, 1, Lc, S + Lc]
        cos, sin = (
            t[positions][:, None] for t in (self.rope_cos, self.rope_sin)
        )  # [B, 1, Lc, Dh/2]
        x = self.tok_embeddings(input_ids)  # [B, Lc, D]
        keys, values = [], []
        for index, block in enumerate(self.blocks):
            x, k, v = block.cached(x, cos, sin, mask, cache.layer(index))
            keys.append(k)
            values.append(v)
        if store:
            cache.append(keys, values, chunk)
        return self.lm_head(self.norm(x)).float()  # [B, Lc, V]

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write config.json and model.safetensors (a tied head is stored once)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, **self.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            del state["lm_head.weight"]
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> Transformer:
        """Load a model written by `save_pretrained`, with its weights on `map_location`."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found; from_pretrained needs a directory written by "
                    "Transformer.save_pretrained"
                )
        try:
            values = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON ({err}); re-save the model") from err
        if not isinstance(values, dict) or values.pop("model_type", None) != MODEL_TYPE:
            raise ValueError(f'{config_path} lacks "model_type": "{MODEL_TYPE}"')
        config = ModelConfig.from_dict(values)
        try:
            state = load_file(str(weights_path))
        except SafetensorError as err:
            raise ValueError(f"{weights_path} is not a readable safetensors file ({err})") from err
        if config.tie_embeddings:
            state["lm_head.weight"] = state.get("tok_embeddings.weight")
        model = cls(config, generator=torch.Generator().manual_seed(0))
        expected = {k: v.shape for k, v in model.state_dict().items()}
        found = {k: v.shape for k, v in state.items() if v is not None}
        if found != expected:
            missing = sorted(set(expected) - set(found))
            unexpected = sorted(set(found) - set(expected))
            wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
            raise ValueError(
                f"{weights_path} does not match {config_path}: missing {missing}, unexpected "
                f"{unexpected}, wrong shape {wrong}"
            )
        model.load_state_dict(state)
        return model.to(map_location)
