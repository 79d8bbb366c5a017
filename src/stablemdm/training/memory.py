"""Attention memory against the memory there is, checked before training on a CPU.

Long sequences fail in the attention: each layer keeps `[batch, L, L]` values (the score
plane or the expanded mask) for the backward pass, so memory grows with max_length squared.
A CPU run that allocates past the machine's memory is not refused with an exception: the
kernel's out-of-memory killer ends it, or another process. `check_attention_memory` refuses
in one line when a lower bound of what training needs already exceeds the memory available,
and warns when it takes a third of it; the built-in model on a CPU was measured to need
about 2.3 times the bound (docs/reliability.md, "Data surprises"). On a GPU the attention
kernels keep no `[L, L]` plane, and running out is an exception that the CLI reports."""

from __future__ import annotations

import resource
import sys

import psutil
import torch

from ..errors import ConfigError
from .config import StableMDMConfig

BYTES_PER_ENTRY = 4  # a float32 [batch, L, L] entry per layer: the lower bound of the estimate
WARN_SHARE = 3  # warn when the bound takes more than 1/WARN_SHARE of the available memory
GIB = 2**30


def attention_bytes(layers: int, batch: int, max_length: int) -> int:
    """A lower bound of the bytes training's attention keeps: one float32 `[batch, L, L]`
    plane per layer."""
    return layers * batch * max_length**2 * BYTES_PER_ENTRY


def available_memory() -> int:
    """Bytes this process may still allocate: the machine's available memory, under the
    address-space limit (`ulimit -v`) when one is set."""
    free = psutil.virtual_memory().available
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit != resource.RLIM_INFINITY:
        free = min(free, limit - psutil.Process().memory_info().vms)
    return max(free, 0)


def model_layers(model: torch.nn.Module) -> int:
    """The number of transformer layers a model's config declares (1 when it names none)."""
    config = getattr(model, "config", None)
    for name in ("n_layers", "num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def check_attention_memory(
    config: StableMDMConfig, model: torch.nn.Module, max_length: int
) -> None:
    """On a CPU, refuse a batch whose attention cannot fit the memory available (ConfigError
    naming max_length and per_device_train_batch_size), and warn when it takes a third.
    Block diffusion attends over `[noised | clean]`, twice max_length (with MIRROR over
    `[noised | mirror | clean]`, three times)."""
    if not config.use_cpu:
        return
    layers, batch = model_layers(model), config.per_device_train_batch_size
    block = config.objective == "block"
    parts = (3 if config.masking == "mirror" else 2) if block else 1
    attended = parts * max_length
    layout = {1: "", 2: ", objective=block: noised | clean"}.get(
        parts, ", objective=block: noised | mirror | clean"
    )
    need, free = attention_bytes(layers, batch, attended), available_memory()
    if need * WARN_SHARE <= free:
        return
    sizes = (
        f"max_length={max_length} with per_device_train_batch_size={batch} needs at least "
        f"{need / GIB:.1f} GiB for attention ({layers} layers x {batch} x {attended}^2 x "
        f"{BYTES_PER_ENTRY} bytes{layout})"
    )
    fix = (
        "lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the "
        "batch), or max_length by shortening or dropping the longest examples"
    )
    if need > free:
        raise ConfigError(f"{sizes}, more than the {free / GIB:.1f} GiB available: {fix}")
    if config.process_index == 0:
        print(
            f"stablemdm: warning: {sizes}, over a third of the {free / GIB:.1f} GiB available: "
            f"training may run out of memory; {fix}",
            file=sys.stderr,
        )
