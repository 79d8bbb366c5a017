"""Decoding: LLaDA-style MDM decoding into a canvas of masks, and ARM greedy decoding.

MDM: each row's canvas is `gen_length` masks placed right after its prompt (the training
layout of docs/architecture.md), decoded in semi-autoregressive blocks; each iteration
predicts every masked position and unmasks the most confident ones of the current block.
A block-diffusion model (objective=block) is decoded in the blocks it was trained on, each
position seeing only the prompt, the earlier blocks and its own block: block by block over a
KV cache (`kv_decoding`), or with `kv_cache=False` the same way as an MDM's whole canvas.
ARM: one forward pass per new token over the whole prefix, or over its latest tokens when the
model's context is shorter (no cache; the models are small).
Both return, per row, the generated tokens before the first `<eos>`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch

from ..estimators.blocks import response_blocks
from ..estimators.losses import Model, adapter, logits_of, unwrap
from ..models.transformer import Transformer
from .kv_decoding import decode_cached
from .unmasking import (
    REMASKING,
    ban,
    banned_ids,
    pick_tokens,
    require_generator,
    restrict,
    reveal,
    unmask_schedule,
)


@contextmanager
def _eval_mode(model: Model) -> Iterator[None]:
    """Run under no_grad with an nn.Module in eval mode, restoring its training mode after."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train(True)


def _model_device(model: Model) -> torch.device:
    """The device of the model's first parameter (CPU for parameterless models)."""
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


def _truncate_at_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    """The tokens before the first `<eos>` (all of them when there is none)."""
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


def _check_prompts(prompts: Sequence[Sequence[int]], where: str) -> list[list[int]]:
    """Prompts as lists of ints; each must be non-empty (decoding conditions on them)."""
    rows = [list(p) for p in prompts]
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"{where}: prompt {b} is empty; every prompt needs at least <sep>")
    return rows


def _check_temperature(temperature: float, generator: torch.Generator | None, where: str) -> None:
    """Temperature must be >= 0; sampling (> 0) needs an explicit generator."""
    if temperature < 0.0:
        raise ValueError(f"{where}: temperature={temperature} is negative; use 0 for greedy")
    if temperature > 0.0:
        require_generator(generator, f"{where} with temperature={temperature}")


def _right_padded(
    rows: list[list[int]], room: int, pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-padded with `room` free positions after the longest: x `[B, L]` and
    the prompt lengths `[B]`."""
    prompt_len = torch.tensor([len(r) for r in rows], device=device)  # [B]
    x = torch.full((len(rows), int(prompt_len.max()) + room), pad_token_id, dtype=torch.long)
    for b, row in enumerate(rows):
        x[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return x.to(device), prompt_len


def _canvas_allowed(
    canvas_tokens: Sequence[Sequence[int]] | None, length: int, device: torch.device, where: str
) -> Callable[[int], torch.Tensor] | None:
    """None without `canvas_tokens`, else a function of the vocabulary size V giving the
    `[length, V]` mask of the ids each canvas position may take (built once)."""
    if canvas_tokens is None:
        return None
    if len(canvas_tokens) != length:
        raise ValueError(
            f"{where}: canvas_tokens lists {len(canvas_tokens)} positions for a canvas of "
            f"{length}; decode with the task's gen_length"
        )
    masks: dict[int, torch.Tensor] = {}

    def allowed(vocab: int) -> torch.Tensor:
        if vocab not in masks:
            mask = torch.zeros(length, vocab, dtype=torch.bool)  # [G, V]
            for i, ids in enumerate(canvas_tokens):
                mask[i, list(ids)] = True
            masks[vocab] = mask.to(device)
        return masks[vocab]

    return allowed


def generate_mdm(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    mask_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    canvas_tokens: Sequence[Sequence[int]] | None = None,
    block_causal: bool = False,
) -> list[list[int]]:
    """Decode a canvas of `gen_length` masks after each prompt, LLaDA style: `gen_length /
    block_length` blocks left to right, `steps / n_blocks` model calls per block, each call
    unmasking that block's most confident masked positions (`unmask_schedule` counts; with
    more iterations than block positions, the iterations that would unmask nothing are skipped).
    With `block_causal` (`generate_block`) the model is given the canvas's blocks (the prompt
    is block 0) and attends block-causally, and a last block may be shorter.

    `remasking`: "low_confidence" (confidence = softmax probability of the chosen token) or
    "random" (confidence = U(0,1) from `generator`). The mask and pad tokens are never chosen
    (pad only when it is not also EOS); with `canvas_tokens` (one list of ids per canvas
    position), each position only takes its own ids (an image canvas: image tokens, then
    `<eos>`). A model that conditions on t is given the fraction of its canvas still masked.
    After each block a row whose decoded canvas holds `<eos>` is finished; decoding stops once
    all rows are. Returns each row's canvas up to (excluding) its first `<eos>`.
    """
    n_blocks = _check_mdm_options(
        gen_length, block_length, steps, remasking, temperature, generator, block_causal
    )
    rows = _check_prompts(prompts, "generate_mdm")
    if not rows:
        return []

    device = _model_device(model)
    x, canvas, attention_mask = _masked_canvas(
        rows, gen_length, mask_token_id, pad_token_id, device
    )
    block_ids = _canvas_blocks(x, canvas, block_length) if block_causal else None
    allowed = _canvas_allowed(canvas_tokens, gen_length, device, "generate_mdm")

    with _eval_mode(model):
        for block in range(n_blocks):
            span = slice(block * block_length, min((block + 1) * block_length, gen_length))
            block_pos = canvas[:, span]  # [B, Lb]
            schedule = unmask_schedule(block_pos.shape[1], steps // n_blocks)
            for n_unmask in (k for k in schedule if k > 0):
                _unmask_step(
                    model,
                    x,
                    canvas,
                    block_pos,
                    attention_mask,
                    n_unmask,
                    mask_token_id=mask_token_id,
                    eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id,
                    remasking=remasking,
                    temperature=temperature,
                    generator=generator,
                    allowed=allowed,
                    span=span,
                    block_ids=block_ids,
                )
            decoded = x.gather(1, canvas[:, : span.stop])  # [B, G_done]
            if bool((decoded == eos_token_id).any(dim=1).all()):
                break

    out = x.gather(1, canvas).tolist()  # [B, G]
    return [_truncate_at_eos(tokens, eos_token_id) for tokens in out]


def _masked_canvas(
    rows: list[list[int]], gen_length: int, mask_token_id: int, pad_token_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt followed by `gen_length` masks, right-padded: x `[B, L]`, the canvas
    positions `[B, G]` and the attention mask `[B, L]` (prompt and canvas)."""
    x, prompt_len = _right_padded(rows, gen_length, pad_token_id, device)  # [B, L], [B]
    total = x.shape[1]
    positions = torch.arange(total, device=device)  # [L]
    canvas = prompt_len[:, None] + torch.arange(gen_length, device=device)  # [B, G]
    x.scatter_(1, canvas, mask_token_id)
    attention_mask = positions[None, :] < (prompt_len + gen_length)[:, None]  # [B, L]
    return x, canvas, attention_mask


def _canvas_blocks(x: torch.Tensor, canvas: torch.Tensor, block_length: int) -> torch.Tensor:
    """Block ids `[B, L]` of a block-diffusion decode: the prompt 0, then the canvas's blocks
    of `block_length` (as `estimators.blocks.response_blocks` numbers them in training)."""
    on_canvas = torch.zeros_like(x, dtype=torch.bool).scatter_(1, canvas, True)  # [B, L]
    return response_blocks(on_canvas, block_length)


def _check_mdm_options(
    gen_length: int,
    block_length: int,
    steps: int,
    remasking: str,
    temperature: float,
    generator: torch.Generator | None,
    block_causal: bool = False,
) -> int:
    """`generate_mdm`'s options checked, each failure one line naming the fix; the number of
    blocks (a last short one counted with `block_causal`)."""
    where = "generate_mdm"
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise ValueError(
            f"{where}: gen_length={gen_length}, block_length={block_length}, steps={steps} "
            "must all be positive"
        )
    if gen_length % block_length != 0 and not block_causal:
        raise ValueError(
            f"{where}: block_length={block_length} does not divide gen_length={gen_length}; "
            "choose a block_length that divides gen_length"
        )
    n_blocks = -(-gen_length // block_length)
    if steps % n_blocks != 0:
        raise ValueError(
            f"{where}: steps={steps} is not a multiple of the number of blocks "
            f"{n_blocks} (= gen_length / block_length); choose steps divisible by {n_blocks}"
        )
    if remasking not in REMASKING:
        raise ValueError(f"{where}: unknown remasking={remasking!r}; choose one of {REMASKING}")
    _check_temperature(temperature, generator, where)
    if remasking == "random":
        require_generator(generator, f"{where} with remasking='random'")
    return n_blocks


def _unmask_step(
    model: Model,
    x: torch.Tensor,
    canvas: torch.Tensor,
    block_pos: torch.Tensor,
    attention_mask: torch.Tensor,
    n_unmask: int,
    *,
    mask_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    remasking: str,
    temperature: float,
    generator: torch.Generator | None,
    allowed: Callable[[int], torch.Tensor] | None = None,
    span: slice = slice(None),
    block_ids: torch.Tensor | None = None,
) -> None:
    """One model call of `generate_mdm`: pick a token at each of the block's positions (the
    canvas positions `span`; only `allowed` ids if given) and unmask, in `x` `[B, L]` in place,
    the `n_unmask` most confident still-masked ones (`block_ids`: a block-diffusion model's)."""
    t = (x.gather(1, canvas) == mask_token_id).float().mean(dim=1)  # [B]
    logits = logits_of(model, x, attention_mask, t, block_ids=block_ids)  # [B, L, V]
    limit = None if allowed is None else allowed(logits.shape[-1])[span]  # [Lb, V]
    index = block_pos[:, :, None].expand(-1, -1, logits.shape[-1])  # [B, Lb, V]
    banned = banned_ids(mask_token_id, pad_token_id, eos_token_id)
    block_logits = ban(logits.gather(1, index), banned, limit)  # [B, Lb, V]
    current = x.gather(1, block_pos)  # [B, Lb]
    new = reveal(
        block_logits,
        current,
        n_unmask,
        mask_token_id=mask_token_id,
        remasking=remasking,
        temperature=temperature,
        generator=generator,
    )
    x.scatter_(1, block_pos, new)


def trained_block_size(model: Model) -> int | None:
    """The block size a model was trained with as block diffusion (a built-in transformer's
    config, a Hugging Face model's adapter), else None."""
    inner = unwrap(model)
    if isinstance(inner, Transformer):
        return inner.config.block_size
    return adapter(model).get("block_size")


def generate_block(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    gen_length: int,
    steps: int | None = None,
    block_length: int | None = None,
    kv_cache: bool = True,
    **options,
) -> list[list[int]]:
    """Decode a block-diffusion model (trained with objective=block) in the blocks it was
    trained on, block-causally: each position sees the prompt, the earlier blocks and its own
    block, as in training (BD3-LM's sampling mask). With `kv_cache` (the default) the prompt
    and each finished block run once and each block is denoised over its own positions
    (`kv_decoding`), stopping each row at its block with `<eos>`; without (and always for a
    Hugging Face model, which has no cached forward), `generate_mdm` runs the whole canvas
    block-causally at every call (the same tokens, greedily). A last block
    may be shorter; `steps` defaults to one unmasked token per call; `gen_length` is a cap."""
    size = trained_block_size(model)
    if size is None:
        raise ValueError(
            "generate_block: the model was not trained as block diffusion (no block_size in "
            "its config); decode it with objective 'mdm'"
        )
    if block_length not in (None, size):
        raise ValueError(
            f"generate_block: block_length={block_length}, but the model was trained with "
            f"block_size={size}; leave block_length unset (it decodes in its own blocks)"
        )
    steps = -(-gen_length // size) * size if steps is None else steps
    cached = kv_cache and isinstance(unwrap(model), Transformer)  # the cache is the built-in's
    decode = _generate_cached if cached else partial(generate_mdm, block_causal=True)
    return decode(model, prompts, gen_length=gen_length, steps=steps, block_length=size, **options)


def _generate_cached(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    mask_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    canvas_tokens: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """`generate_block` over a KV cache (`kv_decoding.decode_cached`), with `generate_mdm`'s
    options and checks; each row's tokens before its first `<eos>`."""
    n_blocks = _check_mdm_options(
        gen_length, block_length, steps, remasking, temperature, generator, True
    )
    rows = _check_prompts(prompts, "generate_block")
    if not rows:
        return []
    device = _model_device(model)
    x, prompt_len = _right_padded(rows, 0, pad_token_id, device)  # [B, P], [B]
    with _eval_mode(model):
        canvas = decode_cached(
            unwrap(model),
            x,
            prompt_len,
            gen_length=gen_length,
            steps_per_block=steps // n_blocks,
            mask_token_id=mask_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            allowed=_canvas_allowed(canvas_tokens, gen_length, device, "generate_block"),
            remasking=remasking,
            temperature=temperature,
            generator=generator,
        )
    return [_truncate_at_eos(tokens, eos_token_id) for tokens in canvas.tolist()]


def generate_arm(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    context_length: int | None = None,
    canvas_tokens: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Autoregressive decoding with a causal model: one forward pass per new token over the
    right-padded prefix, reading each row's logits at its last real position. A row stops at
    `<eos>` or after `max_new_tokens`; returns its new tokens before the first `<eos>`.
    With `context_length`, the model sees at most that many latest tokens of each row (a
    sliding window), so it generates past the length it was built and trained for. With
    `canvas_tokens`, the i-th new token is one of `canvas_tokens[i]` (raster order)."""
    where = "generate_arm"
    if max_new_tokens < 1:
        raise ValueError(f"{where}: max_new_tokens={max_new_tokens} must be positive")
    if context_length is not None and context_length < 1:
        raise ValueError(f"{where}: context_length={context_length} must be positive")
    _check_temperature(temperature, generator, where)
    rows = _check_prompts(prompts, where)
    if not rows:
        return []

    device = _model_device(model)
    x, prompt_len = _right_padded(rows, max_new_tokens, pad_token_id, device)  # [B, L], [B]
    n_rows, total = x.shape
    positions = torch.arange(total, device=device)  # [L]
    length = prompt_len.clone()  # [B]
    active = torch.ones(n_rows, dtype=torch.bool, device=device)  # [B]
    row_index = torch.arange(n_rows, device=device)  # [B]
    allowed = _canvas_allowed(canvas_tokens, max_new_tokens, device, where)

    with _eval_mode(model):
        for step in range(max_new_tokens):
            window, seen = _latest(x, length, context_length)  # [B, W], [B]
            attention_mask = positions[None, : window.shape[1]] < seen[:, None]  # [B, W]
            logits = logits_of(model, window, attention_mask)  # [B, W, V]
            last = logits[row_index, seen - 1].float()  # [B, V]
            if allowed is not None:
                last = restrict(last, allowed(last.shape[-1])[step])
            if pad_token_id != eos_token_id:
                last[:, pad_token_id] = float("-inf")
            chosen = pick_tokens(last, temperature, generator)  # [B]
            write = row_index[active]
            x[write, length[write]] = chosen[write]
            length = length + active.long()
            active = active & (chosen != eos_token_id)
            if not bool(active.any()):
                break

    new_tokens = [x[b, len(row) : int(length[b])].tolist() for b, row in enumerate(rows)]
    return [_truncate_at_eos(tokens, eos_token_id) for tokens in new_tokens]


def _latest(
    x: torch.Tensor, length: torch.Tensor, context: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's latest min(length, context) tokens, left-aligned: the window `[B, W]` and
    how many of its positions are real `[B]` (all of the prefix when context is None)."""
    width = int(length.max())
    if context is None or width <= context:
        return x[:, :width], length
    start = (length - context).clamp(min=0)  # [B]
    index = start[:, None] + torch.arange(context, device=x.device)  # [B, C]
    window = x.gather(1, index)  # [B, C]
    return window, length - start


GENERATORS: dict[str, Callable[..., list[list[int]]]] = {
    "mdm": generate_mdm,
    "arm": generate_arm,
    "block": generate_block,
}


def generate(
    model: Model, prompts: Sequence[Sequence[int]], *, objective: str, **options
) -> list[list[int]]:
    """Decode with the decoder of the training objective ("mdm", "arm" or "block"); `options`
    are that decoder's keyword arguments."""
    if objective not in GENERATORS:
        raise ValueError(
            f"generate: unknown objective={objective!r}; choose one of {tuple(GENERATORS)}"
        )
    return GENERATORS[objective](model, prompts, **options)
