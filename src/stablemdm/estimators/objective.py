"""The training objective in one place: rate sampler -> masks -> model -> loss -> weights.

`Objective` turns a batch into per-sequence estimates of the MDM (or ARM) loss. The
variance-reduction methods of paper.md section 3 only change which rates (or counts) and
which masks are drawn and the weight each sequence carries; the loss itself is always
`losses.mdm_loss`. The trainer and the variance tool both call this, so what is measured is
exactly what is trained.

Per sequence, in rate mode (`rate="t"`):

    t, w = sampler.sample(...)        # w = 1 / p(t), the importance weight
    mask ~ Bernoulli(p_mask(t))       # iid, MIRROR pair, or ISAD with its likelihood ratio
    l = w * (1/|E|) * sum_masked CE / p_mask(t)

In count mode (`rate="count"`, this project's addition) a count k in 1..|E| replaces t, the
mask is a uniform k-subset and the ELBO factor becomes k/|E| (paper.md section 3).

Block diffusion (`kind="block"`, `blocks.py`) draws one rate (or count) and one mask per
response block of `block_size` positions and scores every block in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .blocks import (
    block_count_masks,
    block_isad_masks,
    block_loss,
    block_rate_masks,
    block_sums,
    blocks_per_row,
    response_blocks,
)
from .counts import counts_from_rates
from .losses import Model, arm_loss, conditions_on_t, mdm_loss
from .masking import (
    DEFAULT_EPS,
    bernoulli_mask,
    iid_mask,
    isad_log_ratio,
    isad_probabilities,
    mirror_masks,
    mirror_subset_masks,
    p_mask,
    subset_mask,
)
from .rates import RateSampler, Uniform

ObjectiveKind = Literal["mdm", "arm", "block"]


RateMode = Literal["t", "count"]


MaskingScheme = Literal["iid", "mirror", "isad"]


Normalizer = Literal["eligible", "response", "fixed"]


NORMALIZERS = ("eligible", "response", "fixed")


@dataclass
class ObjectiveOutput:
    """One evaluation of the objective on a batch.

    `per_sequence` `[B]` is the weighted estimate whose mean is the training loss;
    `unweighted` `[B]` is the same without the importance weight (what P-POTS and EMA
    estimate S(t) from); `rate` `[B]` is t, or (k - 1/2)/|E| in count mode (the middle of
    the cell of rates that map to k); `weight` `[B]`;
    `forward_passes` counts sequence-forward passes (MIRROR costs two per sequence).
    For `kind="block"`, `unweighted`, `rate` and `weight` are per block: the blocks holding
    an eligible token, row by row (a block's rate is what its draw is about); `unweighted` is
    each block's term of its sequence's loss before the weight.
    """

    loss: torch.Tensor
    per_sequence: torch.Tensor
    unweighted: torch.Tensor
    rate: torch.Tensor
    weight: torch.Tensor
    forward_passes: int


@dataclass
class Objective:
    """A fully specified estimator of the training loss (see the module docstring).

    `isad_token_ids` are the vocabulary ids whose masking probability ISAD raises.
    `normalizer` is what each sequence's summed loss is divided by: its eligible tokens
    (response, `<eos>` and the `<eos>` fill; the paper's 1/|E|), its response length
    (response + one `<eos>`: batch key `n_response`), or a fixed `normalizer_length` (the
    same divisor for every sequence, so long answers weigh more, as a token-level mean over a
    fixed canvas does). The ARM uses the same divisor, so both models optimise the same sum.
    `block_size` is block diffusion's block length (`kind="block"` only).
    """

    mask_token_id: int
    kind: ObjectiveKind = "mdm"
    rate: RateMode = "t"
    masking: MaskingScheme = "iid"
    sampler: RateSampler | None = None
    eps: float = DEFAULT_EPS
    isad_token_ids: tuple[int, ...] = ()
    isad_delta: float = 0.2
    isad_q_max: float = 0.95
    compute_matched: bool = False
    normalizer: Normalizer = "eligible"
    normalizer_length: int | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.sampler is None:
            self.sampler = Uniform()
        if self.kind not in ("mdm", "arm", "block"):
            raise ValueError(f"objective must be 'mdm', 'arm' or 'block', got {self.kind!r}")
        self._check_blocks()
        if self.rate not in ("t", "count"):
            raise ValueError(f"rate must be 't' or 'count', got {self.rate!r}")
        if self.masking not in ("iid", "mirror", "isad"):
            raise ValueError(f"masking must be 'iid', 'mirror' or 'isad', got {self.masking!r}")
        if self.masking == "isad":
            if not self.isad_token_ids:
                raise ValueError("masking 'isad' needs at least one ISAD token (isad_tokens)")
            if self.rate == "count":
                raise ValueError(
                    "ISAD raises per-token probabilities, which has no count-mode form: "
                    "use rate 't' with masking 'isad', or a different masking with rate 'count'"
                )
            isad_probabilities(  # validates delta and q_max up front
                torch.zeros(1, 1, dtype=torch.bool),
                torch.zeros(1, 1, dtype=torch.bool),
                torch.full((1,), 0.5),
                self.isad_delta,
                self.isad_q_max,
            )
        if self.compute_matched and self.masking != "mirror":
            raise ValueError("compute_matched only applies to masking 'mirror'")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}")
        if (self.normalizer == "fixed") != (self.normalizer_length is not None):
            raise ValueError("normalizer 'fixed' needs normalizer_length (and only it uses one)")
        if self.normalizer_length is not None and self.normalizer_length < 1:
            raise ValueError(f"normalizer_length must be >= 1, got {self.normalizer_length}")
        p_mask(torch.zeros(1), self.eps)

    def _check_blocks(self) -> None:
        """`block_size` >= 1 for and only for `kind="block"`."""
        if (self.kind == "block") != (self.block_size is not None):
            raise ValueError("kind 'block' needs block_size (and only it uses one)")
        if self.block_size is not None and (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 1
        ):
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")

    def denominator(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The per-sequence divisor `[B]` named by `normalizer` (None: the losses' default,
        the number of eligible tokens)."""
        if self.normalizer == "eligible":
            return None
        if self.normalizer == "fixed":
            return torch.full_like(
                batch["eligible"][:, 0], self.normalizer_length, dtype=torch.float
            )
        if "n_response" not in batch:
            raise ValueError("normalizer 'response' needs the batch key n_response")
        return batch["n_response"].float().clamp(min=1)

    def draw_rates(
        self,
        n: int,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
        slice_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the global batch's rates (or count fractions) with a generator shared by all
        processes and return this process's n of (rate, weight). Sharing the draw is what lets
        StraTS stratify the global batch. The draw is `slice_size` (default n) per slice: a
        short slice (an epoch's last micro-batch) takes the first n rates of its full slice,
        so every rate of the step stays in its own stratum."""
        size = n if slice_size is None else max(n, slice_size)
        t, w = self.sampler.sample(size * world_size, generator)
        return t[rank * size : rank * size + n], w[rank * size : rank * size + n]

    def draw_block_rates(
        self,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
        slice_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block diffusion's rates and weights `[n, nb]`: one row of nb rates per sequence,
        drawn for the global batch as `draw_rates` draws (so a scheme stratifies every block of
        the batch jointly, or each row's blocks with `StratifiedRows`), this process's rows."""
        n, length = batch["input_ids"].shape
        nb = blocks_per_row(length, self.block_size)
        size = n if slice_size is None else max(n, slice_size)
        t, w = self.sampler.sample_rows(size * world_size, nb, generator)  # [rows, nb]
        return t[rank * size : rank * size + n], w[rank * size : rank * size + n]

    def __call__(
        self,
        model: Model,
        batch: dict[str, torch.Tensor],
        rate_generator: torch.Generator | None = None,
        mask_generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
        micro_batch_size: int | None = None,
    ) -> ObjectiveOutput:
        """Evaluate the objective on `batch` (`input_ids`, `attention_mask`, `eligible`).
        `micro_batch_size` is the nominal size of a micro-batch (a last, shorter one still
        draws its rates from full slices: `draw_rates`)."""
        if self.kind == "arm":  # no rate, no mask: the only randomness is the data
            out = arm_loss(
                model,
                batch["input_ids"],
                batch["eligible"],
                batch.get("attention_mask"),
                normalizer=self.denominator(batch),
            )
            ones = torch.ones_like(out.per_sequence)
            unweighted = out.per_sequence.detach()
            return ObjectiveOutput(out.loss, out.per_sequence, unweighted, ones, ones, len(ones))
        nominal = micro_batch_size
        if self.compute_matched:  # MIRROR's two copies of half the sequences: B passes
            half = max(1, batch["input_ids"].shape[0] // 2)
            batch = {k: v[:half] for k, v in batch.items()}
            nominal = None if nominal is None else max(1, nominal // 2)
        if self.kind == "block":  # one rate per response block, drawn row by row
            r, weight = self.draw_block_rates(batch, rate_generator, rank, world_size, nominal)
            return self.at_block_rates(model, batch, r, weight, mask_generator)
        n = batch["input_ids"].shape[0]
        r, weight = self.draw_rates(n, rate_generator, rank, world_size, nominal)
        return self.at_rates(model, batch, r, weight, mask_generator)

    def at_rates(
        self,
        model: Model,
        batch: dict[str, torch.Tensor],
        r: torch.Tensor,
        weight: torch.Tensor | None = None,
        mask_generator: torch.Generator | None = None,
    ) -> ObjectiveOutput:
        """Evaluate the MDM objective at given rates `r` `[B]` (t, or the count fraction
        k/|E| in count mode) with rate weights `weight` (default 1; count mode replaces it by
        1 / (|E| q(k))): the entry point for the P-POTS grid estimate and the nested variance
        design, which fix the rates themselves."""
        if self.kind == "block":
            raise ValueError("kind 'block' draws one rate per block: call at_block_rates")
        x0, eligible = batch["input_ids"], batch["eligible"]  # [B, L]
        attention = batch.get("attention_mask")
        b = x0.shape[0]
        r = r.to(x0.device)
        weight = torch.ones_like(r) if weight is None else weight.to(x0.device)
        if self.rate == "count":
            if conditions_on_t(model):
                raise ValueError(
                    "rate='count' integrates t out, but this model declares conditions_on_t: "
                    "it must see t, so train it with rate='t'"
                )
            p, rate, weight, masks = self._count_masks(eligible, r, mask_generator)
        else:
            p = p_mask(r, self.eps)  # [B]
            masks, weight = self._rate_masks(x0, eligible, p, weight, mask_generator)
            rate = r
        p, weight, rate = p.float(), weight.float(), rate.float()  # samplers work in float64
        n = self.denominator(batch)
        t = rate if self.rate == "t" else None  # what a model that conditions on t is given
        mirrored = len(masks) == 2  # MIRROR: both copies in one forward pass of the 2B batch
        if mirrored:
            x0, eligible, p, attention, n, t = (
                torch.cat([a, a]) if a is not None else None
                for a in (x0, eligible, p, attention, n, t)
            )
        out = mdm_loss(
            model,
            x0,
            eligible,
            torch.cat(masks) if mirrored else masks[0],
            p,
            self.mask_token_id,
            attention_mask=attention,
            normalizer=n,
            t=t,
        )
        per_copy = out.per_sequence
        unweighted = 0.5 * (per_copy[:b] + per_copy[b:]) if mirrored else per_copy  # [B]
        per_sequence = unweighted * weight
        return ObjectiveOutput(
            per_sequence.mean(), per_sequence, unweighted.detach(), rate, weight, b * len(masks)
        )

    def at_block_rates(
        self,
        model: Model,
        batch: dict[str, torch.Tensor],
        r: torch.Tensor,
        weight: torch.Tensor | None = None,
        mask_generator: torch.Generator | None = None,
    ) -> ObjectiveOutput:
        """Block diffusion at given per-block rates `r` `[B, nb]` (t, or the count fraction
        in count mode, which replaces `weight` by 1 / (|E_j| q(k_j))), block by block as
        `at_rates` is for whole sequences; one forward pass over `[noised | clean]`."""
        if conditions_on_t(model):
            raise ValueError(
                "kind 'block' gives the model no t (each block has its own rate, as in BD3-LM), "
                "but this model declares conditions_on_t"
            )
        x0, eligible = batch["input_ids"], batch["eligible"]  # [B, L]
        block_ids = response_blocks(eligible, self.block_size)  # [B, L]
        r = r.to(x0.device)
        weight = torch.ones_like(r) if weight is None else weight.to(x0.device)
        masks, p, rate, weight = self._block_masks(
            x0, eligible, block_ids, r, weight, mask_generator
        )
        out, per_block = block_loss(
            model,
            x0,
            eligible,
            masks,
            block_ids,
            p,
            self.mask_token_id,
            attention_mask=batch.get("attention_mask"),
            weight=weight,
            normalizer=self.denominator(batch),
        )
        real = block_sums(eligible.long(), block_ids, r.shape[1]) > 0  # [B, nb]
        passes = len(x0) * len(masks)  # MIRROR: two noised copies per sequence
        return ObjectiveOutput(
            out.loss, out.per_sequence, per_block[real].detach(), rate[real], weight[real], passes
        )

    def _block_masks(self, x0, eligible, block_ids, r, weight, generator):
        """Block diffusion's masks from per-block rates `r` `[B, nb]`: (masks `[B, L]`, one or
        MIRROR's two, and per block the ELBO factor p, the reported rate and the weight, times
        ISAD's likelihood ratio of the block, in float32)."""
        mirror = self.masking == "mirror"
        if self.rate == "count":
            masks, p, rate, weight = block_count_masks(
                eligible, block_ids, self.sampler, r, generator, mirror
            )
        elif self.masking == "isad":
            p, rate = p_mask(r, self.eps), r
            special = torch.isin(x0, torch.tensor(self.isad_token_ids, device=x0.device))
            mask, ratio = block_isad_masks(
                eligible, block_ids, p, special, self.isad_delta, self.isad_q_max, generator
            )
            masks, weight = (mask,), weight * ratio
        else:
            p, rate = p_mask(r, self.eps), r
            masks = block_rate_masks(eligible, block_ids, p, generator, mirror)
        return masks, p.float(), rate.float(), weight.float()  # samplers work in float64

    def _rate_masks(self, x0, eligible, p, weight, generator):
        """Masks for rate mode and the weight, times the ISAD likelihood ratio if used."""
        if self.masking == "mirror":
            return mirror_masks(eligible, p, generator), weight
        if self.masking == "isad":
            ids = torch.tensor(self.isad_token_ids, device=x0.device)
            special = torch.isin(x0, ids)  # [B, L]
            q = isad_probabilities(eligible, special, p, self.isad_delta, self.isad_q_max)
            mask = bernoulli_mask(eligible, q, generator)
            return (mask,), weight * torch.exp(isad_log_ratio(mask, eligible, p, q))
        return (iid_mask(eligible, p, generator),), weight

    def _count_masks(self, eligible, r, generator):
        """Count mode: k = ceil(|E| r), its discretised-density weight 1 / (|E| q(k)), and
        k-subset masks; returns (ELBO factor k/|E|, reported rate, weight, masks)."""
        n = eligible.sum(dim=1)  # [B]
        if (n == 0).any():
            raise ValueError("count mode needs at least one eligible token in every sequence")
        k, weight = counts_from_rates(self.sampler, r, n)  # [B], [B]
        if self.masking == "mirror":
            masks = mirror_subset_masks(eligible, k, generator)
        else:
            masks = (subset_mask(eligible, k, generator),)
        # ELBO factor k/|E|; the reported rate is the middle of the cell of rates that map to k
        return k / n, (k - 0.5) / n, weight, masks
