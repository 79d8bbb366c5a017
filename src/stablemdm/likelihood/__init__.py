"""The log-likelihood of a continuation given a context, with its standard error: the ELBO of
a masked diffusion model estimated by Monte Carlo (a block-diffusion model's block ELBO,
`blocks`), an ARM's exact value.

It follows LLaDA's evaluator (`eval_llada.py`: Monte Carlo copies of the continuation, the
number of masked tokens stratified across each batch, the loss weighted by L/k), reproduced
as the `llada` estimator, and offers the paper's estimators in their count form (paper.md
section 3: count mode, MIRROR, P-POTS) as alternatives, each unbiased for the same ELBO.
Sampling is adaptive (it stops once the standard error reaches a target) and uses common
random numbers across the choices of one question. Pure PyTorch on a model callable and token
ids: no trainer, CLI or file I/O (docs/likelihood.md).
"""

from .density import fit_count_density
from .exact import exact_elbo
from .inputs import Budget, Question
from .result import Choices, Likelihood
from .sampling import loglikelihood, loglikelihood_choices
from .schemes import ESTIMATORS, llada_counts

__all__ = [
    "ESTIMATORS",
    "Budget",
    "Choices",
    "Likelihood",
    "Question",
    "exact_elbo",
    "fit_count_density",
    "llada_counts",
    "loglikelihood",
    "loglikelihood_choices",
]
