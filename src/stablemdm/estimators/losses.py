"""Per-sequence training losses (paper.md section 1).

Both losses return per-sequence values `[B]` and their mean; the caller reduces further and
the variance estimators use the same vector. Variance-reduction methods never change this
code: they change which t and masks are drawn and the per-sequence weight passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .masking import apply_mask

Model = Callable[..., object]


@dataclass
class Loss:
    """A loss evaluation: `per_sequence` `[B]`, its mean `loss`, and the token-level pieces
    (`token_nll` `[B, L]`, zero off `scored`) so metrics reuse the numbers the gradient saw."""

    loss: torch.Tensor
    per_sequence: torch.Tensor
    token_nll: torch.Tensor
    scored: torch.Tensor


def unwrap(model: Model) -> Model:
    """The network inside DDP/FSDP (`.module`) and peft (`get_base_model()`) wrappers."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter(model: Model) -> dict:
    """How to drive a Hugging Face model adapted by `models.hf` (its `config.stablemdm`:
    `shift_logits`, `conditions_on_t`, ...); {} for any other model."""
    values = getattr(getattr(unwrap(model), "config", None), "stablemdm", None)
    return values if isinstance(values, dict) else {}


def conditions_on_t(model: Model) -> bool:
    """Whether the model declares `conditions_on_t` (itself or in its adapter): it is given t."""
    return bool(
        adapter(model).get("conditions_on_t") or getattr(unwrap(model), "conditions_on_t", False)
    )


def logits_of(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    t: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
):
    """Call any model `model(input_ids, attention_mask)` (through its DDP/peft wrapper) and
    return logits `[B, L, V]` where position i predicts token i (plain tensors and Hugging Face
    outputs with `.logits` both work). A model that conditions on t is also given `t` `[B]`;
    a model with shifted logits (Dream, AR-to-MDM: position i-1 predicts token i) is shifted
    back (position 0, always prompt, keeps its own). Block diffusion passes `block_ids`
    (`models.blocks.block_diffusion_mask`), which only a model taking them accepts."""
    kwargs = {}
    if conditions_on_t(model):
        if t is None:
            raise ValueError("this model conditions on t, but no t was given")
        kwargs["t"] = t
    if block_ids is not None:
        if adapter(model).get("shift_logits"):
            raise ValueError("block diffusion needs unshifted logits (position i predicts i)")
        kwargs["block_ids"] = block_ids
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out  # [B, L, V]
    if adapter(model).get("shift_logits"):
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy `[B, L]` of targets under logits `[B, L, V]`, computed in fp32."""
    b, l, v = logits.shape
    return F.cross_entropy(
        logits.float().reshape(b * l, v), targets.reshape(b * l), reduction="none"
    ).view(b, l)


def mdm_loss(
    model: Model,
    x0: torch.Tensor,
    eligible: torch.Tensor,
    mask: torch.Tensor,
    p: torch.Tensor,
    mask_token_id: int,
    attention_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    normalizer: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
) -> Loss:
    """ELBO-weighted MDM loss per sequence:

        l_b = weight_b * (1/N_b) * sum_{i in E_b, mask_i} CE_i(x0 | x_t) / p_b

    `p` `[B]` is the masking probability the ELBO divides by: p_mask(t) in rate mode, k/|E|
    in count mode. `normalizer` N `[B]` defaults to |E_b| (paper.md section 1); any constant
    per sequence keeps the estimator unbiased for its own objective. A sequence whose draw
    masks nothing contributes 0 and still counts in the mean (dropping it would bias it).
    `t` `[B]` is passed to a model that conditions on it.
    """
    xt = apply_mask(x0, mask, mask_token_id)  # [B, L]
    logits = logits_of(model, xt, attention_mask, t)  # [B, L, V]
    scored = mask & eligible
    nll = token_nll(logits, x0) * scored  # [B, L]
    n = eligible.sum(dim=1).clamp(min=1) if normalizer is None else normalizer  # [B]
    per_sequence = nll.sum(dim=1) / (n * p)
    if weight is not None:
        per_sequence = per_sequence * weight
    return Loss(per_sequence.mean(), per_sequence, nll, scored)


def arm_loss(
    model: Model,
    x0: torch.Tensor,
    eligible: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    normalizer: torch.Tensor | None = None,
) -> Loss:
    """Autoregressive loss per sequence: next-token cross-entropy summed over eligible
    positions, divided by `normalizer` `[B]` (default: their number, i.e. the mean).

    Position i is predicted from positions < i, so the logits are shifted by one.
    """
    logits = logits_of(model, x0, attention_mask)[:, :-1]  # [B, L-1, V]
    targets = x0[:, 1:]
    scored = torch.zeros_like(eligible)
    scored[:, 1:] = eligible[:, 1:]
    nll = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    nll[:, 1:] = token_nll(logits, targets) * scored[:, 1:]
    n = scored.sum(dim=1).clamp(min=1) if normalizer is None else normalizer  # [B]
    per_sequence = nll.sum(dim=1) / n
    if weight is not None:
        per_sequence = per_sequence * weight
    return Loss(per_sequence.mean(), per_sequence, nll, scored)
