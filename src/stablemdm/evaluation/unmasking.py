"""One denoising step's rule, shared by every MDM decoder (the full canvas in `decoding`, a
block-diffusion model's blocks over a KV cache in `kv_decoding`): how many positions each call
unmasks, the token picked at each position (greedy or Gumbel-max), its confidence, and which
still-masked positions are revealed (LLaDA's low-confidence remasking, or random)."""

from __future__ import annotations

import torch

REMASKING = ("low_confidence", "random")


def unmask_schedule(n_masked: int, steps: int) -> list[int]:
    """How many positions each of `steps` iterations unmasks: `n_masked` spread as evenly as
    possible, remainder to the earliest iterations (LLaDA), so the counts sum to `n_masked`."""
    base, extra = divmod(n_masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device):
    """U(0,1) draws on the generator's device, moved to `device` (CPU generators work anywhere)."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def require_generator(generator: torch.Generator | None, why: str) -> torch.Generator:
    """Randomness never comes from the global RNG: a draw needs an explicit generator."""
    if generator is None:
        raise ValueError(f"{why} draws random numbers; pass generator=torch.Generator()")
    return generator


def pick_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """Greedy argmax when temperature == 0, else Gumbel-max sampling at that temperature."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    u = uniform(tuple(logits.shape), generator, logits.device).clamp_min(
        torch.finfo(torch.float32).tiny
    )
    gumbel = -torch.log(-torch.log(u))  # [..., V]
    return (logits / temperature + gumbel).argmax(dim=-1)


def restrict(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits `[..., P, V]` (or `[B, V]` with `allowed` `[V]`) with disallowed ids at -inf."""
    return logits.masked_fill(~allowed, float("-inf"))


def banned_ids(mask_token_id: int, pad_token_id: int, eos_token_id: int) -> list[int]:
    """Ids a decoder never picks: the mask, and the pad token unless it is also EOS
    (Llama-family tokenizers)."""
    return [mask_token_id] + ([pad_token_id] if pad_token_id != eos_token_id else [])


def ban(logits: torch.Tensor, banned: list[int], allowed: torch.Tensor | None) -> torch.Tensor:
    """fp32 `logits` `[B, Lb, V]` with the `banned` ids and the ids outside `allowed` `[Lb, V]`
    at -inf."""
    out = logits.float()
    out[..., banned] = float("-inf")
    return out if allowed is None else restrict(out, allowed)


def reveal(
    logits: torch.Tensor,
    current: torch.Tensor,
    n_unmask: int,
    *,
    mask_token_id: int,
    remasking: str,
    temperature: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The block `current` `[B, Lb]` after one call: a token picked at each position from
    `logits` `[B, Lb, V]` (banned ids already at -inf), and the `n_unmask` most confident
    still-masked positions set to theirs ("low_confidence": the chosen token's probability;
    "random": U(0,1) from `generator`)."""
    chosen = pick_tokens(logits, temperature, generator)  # [B, Lb]
    if remasking == "low_confidence":
        probs = logits.softmax(dim=-1)  # [B, Lb, V]
        confidence = probs.gather(2, chosen[:, :, None]).squeeze(2)  # [B, Lb]
    else:
        confidence = uniform(tuple(chosen.shape), generator, logits.device)  # [B, Lb]
    masked = current == mask_token_id  # [B, Lb]
    confidence = confidence.masked_fill(~masked, float("-inf"))
    top = confidence.topk(n_unmask, dim=1).indices  # [B, k]
    unmask = torch.zeros_like(masked).scatter_(1, top, True) & masked  # [B, Lb]
    return torch.where(unmask, chosen, current)
