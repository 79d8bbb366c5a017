"""Block diffusion on a Hugging Face causal LM (AR to block diffusion, as Fast-dLLM v2 and SDAR
adapt one; docs/hf.md).

The network is not changed. Block diffusion calls a model with `block_ids` (`[noised |
clean]` in training, one sequence in the block-causal decoder); a forward pre-hook on the
causal LM's decoder turns them into what a Llama-family forward already takes: the 4-D
additive attention mask `[B, 1, Q, Q]` of `blocks.block_diffusion_mask` and `position_ids`
0..L-1 for each copy of the sequence. The hook sits on the decoder (`base_model`), which every
wrapper (peft's LoRA included) calls through `__call__`. Whether an architecture honours the
mask is checked on the model itself (`block_refusal`), not by its name.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .blocks import block_diffusion_mask

# attention implementations that apply a custom 4-D mask as given (flash attention does not)
MASKED_ATTENTION = ("sdpa", "eager")
HOOKED = "_stablemdm_block_hook"


def block_inputs(
    block_ids: torch.Tensor, attention_mask: torch.Tensor | None, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive 4-D mask `[B, 1, Q, Q]` (0: may attend, the dtype's minimum: may not) and
    `position_ids` `[B, Q]` (0..L-1 in each copy) of an input of Q = `length` positions made of
    copies of the `[B, L]` sequence that `block_ids` numbers."""
    b, size = block_ids.shape
    if length % size:
        raise ValueError(
            f"block diffusion input of {length} positions is not a whole number of copies of "
            f"block_ids' {size}"
        )
    copies = length // size
    allowed = block_diffusion_mask(block_ids, attention_mask, noised=copies - 1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=block_ids.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    positions = torch.arange(size, device=block_ids.device).repeat(copies)  # [Q]
    return mask, positions[None].expand(b, -1)


def _to_block_inputs(
    module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """The decoder's forward pre-hook: `block_ids` replaced by the mask and positions."""
    block_ids = kwargs.pop("block_ids", None)
    if block_ids is None:
        return args, kwargs
    ids = args[0] if args else kwargs.get("input_ids")
    length = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
    mask, positions = block_inputs(block_ids, kwargs.get("attention_mask"), length, module.dtype)
    kwargs.update(attention_mask=mask, position_ids=positions, use_cache=False)
    return args, kwargs


def enable_block_diffusion(model: Any) -> None:
    """Make the causal LM `model` accept `block_ids` (once; its weights untouched)."""
    decoder = model.base_model
    if not getattr(decoder, HOOKED, False):
        decoder.register_forward_pre_hook(_to_block_inputs, with_kwargs=True)
        setattr(decoder, HOOKED, True)


def block_refusal(model: Any) -> str | None:
    """Why `model` (hooked by `enable_block_diffusion`) cannot train block-causally, or None.
    Checked by behaviour on a 3-token probe: the clean copy must give the ordinary causal
    logits at positions 0..2 (the mask and position ids are honoured), and a noised token must
    not see an earlier noised block."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in MASKED_ATTENTION:
        return (
            f"its attention implementation {implementation!r} does not apply a custom 4-D mask "
            f"(load it with one of {', '.join(MASKED_ATTENTION)})"
        )
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return "its forward takes no position_ids"
    try:
        first, second, causal = _probe(model)
    except (TypeError, ValueError, RuntimeError) as err:
        return f"its forward failed with a 4-D mask ({str(err).splitlines()[0]})"
    # kernels differ (a masked SDPA call against the causal one): relative to the logits' scale
    tolerance = (1e-4 if model.dtype == torch.float32 else 2e-2) * float(causal.abs().max())
    if float((first[:, 3:] - causal).abs().max()) > tolerance:
        return "its clean copy does not reproduce its causal logits (mask or position_ids ignored)"
    if float((first[:, 1:3] - second[:, 1:3]).abs().max()) > tolerance:
        return "a noised token saw another noised block (the 4-D mask is not applied)"
    return None


def _probe(model: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (fp32) of `[x | x]` and `[x' | x]` with each of x's 3 tokens its own block (x'
    differs from x in its first token), and of x alone under the model's causal attention."""
    vocab = model.get_input_embeddings().num_embeddings
    x = torch.arange(3, device=model.device)[None] % vocab  # [1, 3]
    other = x.clone()
    other[0, 0] = (x[0, 0] + 1) % vocab
    block_ids = torch.arange(3, device=model.device)[None]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            causal = model(input_ids=x).logits.float()
            pairs = [model(input_ids=torch.cat([n, x], 1), block_ids=block_ids) for n in (x, other)]
    finally:
        model.train(training)
    return pairs[0].logits.float(), pairs[1].logits.float(), causal
