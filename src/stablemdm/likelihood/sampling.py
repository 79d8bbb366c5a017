"""The likelihood API: `loglikelihood` (one continuation) and `loglikelihood_choices` (the
choices of one question), adaptive and with common random numbers.

Draws come in batches of `Budget.batch_size` forward passes per continuation. After each
batch the standard error is read from the independent draws so far (a copy, a MIRROR pair,
or a whole stratified batch for `llada`): of the log-likelihood for one continuation, of the
gap between the two best choices for several. Sampling stops once it is at most
`Budget.target_se` (after `Budget.min_draws` draws) or when the next batch would pass
`Budget.max_passes` per continuation.

Common random numbers: each batch draws one seed; every choice derives its generator from it,
so all choices get the same rates (the same t, the same count fraction, LLaDA's same first
count) and the same uniform per continuation position. Continuations of one length get the
same masks; of different lengths, count k = ceil(L r) from the shared rate r, and the masks
of the same per-position uniforms (position j of every continuation shares its uniform). A
block-diffusion model's draws are per block (`blocks`), block j of every choice sharing its
rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch

from ..errors import ConfigError
from ..estimators.losses import Model, conditions_on_t
from ..estimators.rates import RateSampler
from ..rng import seeded_generator
from .blocks import block_copy_values
from .density import fit_count_density, fit_passes
from .inputs import Budget, Kind, Question, block_size_of, is_arm, mask_token_of
from .result import Choices, Likelihood, choices_of, mean_se, top_two
from .schemes import Scheme, make_scheme, scheme_class
from .values import arm_loglikelihood, draw_values

SEED_BOUND = 2**62  # each batch's shared seed is drawn below this


Score = Callable[[Sequence[int], int, int, torch.Generator], torch.Tensor]


def loglikelihood(
    model: Model,
    context: Sequence[int] | torch.Tensor,
    continuation: Sequence[int] | torch.Tensor,
    *,
    generator: torch.Generator,
    estimator: str = "llada",
    budget: Budget | None = None,
    mask_token_id: int | None = None,
    kind: Kind = "auto",
    density: RateSampler | None = None,
    block_size: int | None = None,
) -> Likelihood:
    """log p(continuation | context) of `model` as an ELBO estimate with its standard error
    (an ARM's exact value with error 0); see `loglikelihood_choices` for the options."""
    return loglikelihood_choices(
        model,
        context,
        [continuation],
        generator=generator,
        estimator=estimator,
        budget=budget,
        mask_token_id=mask_token_id,
        kind=kind,
        density=density,
        block_size=block_size,
    ).results[0]


def loglikelihood_choices(
    model: Model,
    context: Sequence[int] | torch.Tensor,
    continuations: Sequence[Sequence[int] | torch.Tensor],
    *,
    generator: torch.Generator,
    estimator: str = "llada",
    budget: Budget | None = None,
    mask_token_id: int | None = None,
    kind: Kind = "auto",
    density: RateSampler | None = None,
    crn: bool = True,
    block_size: int | None = None,
) -> Choices:
    """Each continuation's log-likelihood given `context` (token ids), sampled until the gap
    between the two best is known to `budget.target_se`.

    `estimator`: one of `schemes.ESTIMATORS`; `density`: P-POTS's for `ppots_count` (fitted
    on these continuations when not given, its passes charged to them); `crn`: common random
    numbers across the choices; `kind`: "auto" (what the model declares), "mdm", "arm" or
    "block" (the block ELBO, `blocks`, in blocks of `block_size` tokens, by default the
    model's own); `mask_token_id`: the model's [MASK] id when it does not declare one. Every
    draw comes from `generator`."""
    question = Question.of(context, continuations)
    budget = Budget() if budget is None else budget
    if not isinstance(budget, Budget):
        raise ConfigError("likelihood: budget must be a likelihood.Budget")
    cls = scheme_class(estimator)  # an unknown name is refused for an ARM too
    if is_arm(model, kind):
        return _exact_choices(model, question)
    size = block_size_of(model, kind, block_size)
    mask_id = mask_token_of(model, mask_token_id)
    _check(cls, budget, model)
    fitted = [0] * len(question.lengths)
    if estimator == "ppots_count" and density is None:
        conts = question.continuations
        density = fit_count_density(
            model, question.context, conts, mask_id, generator, block_size=size
        )
        fitted = fit_passes(question.lengths, block_size=size)
    scheme = make_scheme(estimator, density)
    score = partial(_copy_values, model, scheme, question.context, mask_id, size)
    values = _sample(question, score, scheme, budget, generator, crn)
    spent = values.shape[1] // _draws_per_batch(scheme, budget) * budget.batch_size
    return choices_of(values, [spent + f for f in fitted], scheme.name)


def _exact_choices(model: Model, question: Question) -> Choices:
    """An ARM: each continuation's exact log-likelihood, one pass each, error 0."""
    if not question.context:
        raise ConfigError(
            "likelihood: an ARM predicts each token from those before it, so the first "
            "continuation token needs a context; give at least one token (e.g. a BOS)"
        )
    values = [arm_loglikelihood(model, question.context, c) for c in question.continuations]
    results = tuple(Likelihood(v, 0.0, 1, 1, "exact") for v in values)
    if len(values) == 1:
        return Choices(results, 0, float("nan"), float("nan"))
    best, second = top_two(torch.tensor(values)[:, None])
    return Choices(results, best, values[best] - values[second], 0.0)


def _draws_per_batch(scheme: Scheme | type[Scheme], budget: Budget) -> int:
    """Independent draws in one batch: one for a stratified batch, else one per copy."""
    return 1 if scheme.stratified else budget.batch_size // scheme.rows_per_copy


def _check(scheme: type[Scheme], budget: Budget, model: Model) -> None:
    """Reject a budget or model the estimator cannot use, in one line."""
    if budget.batch_size % scheme.rows_per_copy:
        raise ConfigError(
            f"likelihood: estimator {scheme.name!r} draws MIRROR pairs; batch_size="
            f"{budget.batch_size} must be even"
        )
    if budget.max_passes // budget.batch_size * _draws_per_batch(scheme, budget) < 2:
        raise ConfigError(
            f"likelihood: max_passes={budget.max_passes} gives estimator {scheme.name!r} one "
            "independent draw, which has no standard error; allow at least two batches"
        )
    if scheme.counts and conditions_on_t(model):
        raise ConfigError(
            f"likelihood: estimator {scheme.name!r} integrates t out (count mode), but this "
            "model conditions on t; use estimator='standard'"
        )


def _copy_values(
    model: Model,
    scheme: Scheme,
    context: Sequence[int],
    mask_id: int,
    block_size: int | None,
    continuation: Sequence[int],
    width: int,
    copies: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The estimates `[copies]` of one continuation's ELBO (the block ELBO with a
    `block_size`), its positions among the question's `width` (its longest continuation)."""
    length = len(continuation)
    eligible = (torch.arange(width) < length).expand(copies, -1)  # [n, Lmax]
    if block_size is not None:
        return block_copy_values(
            model, scheme, context, continuation, eligible, generator, mask_id, block_size
        )
    r = scheme.rates(copies, length, generator)
    draw = scheme.draw(eligible, length, r, generator)
    return draw_values(model, context, continuation, draw, mask_id)


def _batch(question, score: Score, scheme, budget, seed, crn) -> torch.Tensor:
    """One batch's draws `[C, D]` for every choice, each from its generator (shared under
    common random numbers)."""
    copies = budget.batch_size // scheme.rows_per_copy
    width = max(question.lengths)
    rows = []
    for c, cont in enumerate(question.continuations):
        generator = seeded_generator(seed, "likelihood", *(() if crn else (c,)))
        v = score(cont, width, copies, generator)  # [n]
        rows.append(v.mean(dim=0, keepdim=True) if scheme.stratified else v)
    return torch.stack(rows)


def _precision(values: torch.Tensor) -> float:
    """The standard error the stopping rule watches: of the one continuation's value, or of
    the gap between the two best choices."""
    if values.shape[0] == 1:
        return mean_se(values[0])[1]
    best, second = top_two(values)
    return mean_se(values[best] - values[second])[1]


def _sample(question, score: Score, scheme, budget, generator, crn) -> torch.Tensor:
    """Draw batches until the target standard error or the cap; all draws `[C, R]`."""
    batches: list[torch.Tensor] = []
    for _ in range(budget.max_passes // budget.batch_size):
        seed = int(torch.randint(SEED_BOUND, (), generator=generator))
        batches.append(_batch(question, score, scheme, budget, seed, crn))
        values = torch.cat(batches, dim=1)
        enough = values.shape[1] >= budget.min_draws
        if budget.target_se is not None and enough and _precision(values) <= budget.target_se:
            break
    return values
