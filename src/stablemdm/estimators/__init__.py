"""The estimators of the MDM objective (paper.md sections 1 and 3): rate samplers (Standard,
Clipped, P-POTS, EMA), schemes over a batch (StraTS, SyRM), count mode, masks (iid, MIRROR,
ISAD), the per-sequence losses, the P-POTS fit, block diffusion's objective (`blocks`, after
BD3-LM: a rate and a mask per block), and `Objective`, which composes them into one training
step. Pure PyTorch/NumPy: no trainer, CLI or file I/O."""

from .counts import count_probabilities, counts_from_rates, sample_counts
from .ema import EMA
from .losses import arm_loss, mdm_loss
from .masking import apply_mask, mirror_masks, p_mask
from .objective import Objective, ObjectiveOutput
from .ppots import PPOTS
from .ppots_fit import FitDesign, density_from_second_moment, fit_ppots
from .rates import Clipped, PiecewiseDensity, RateSampler, Uniform
from .registry import METHODS, make_sampler, with_scheme
from .stratified import Stratified
from .syrm import Mirrored

__all__ = [
    "EMA",
    "METHODS",
    "PPOTS",
    "Clipped",
    "FitDesign",
    "Mirrored",
    "Objective",
    "ObjectiveOutput",
    "PiecewiseDensity",
    "RateSampler",
    "Stratified",
    "Uniform",
    "apply_mask",
    "arm_loss",
    "count_probabilities",
    "counts_from_rates",
    "density_from_second_moment",
    "fit_ppots",
    "make_sampler",
    "mdm_loss",
    "mirror_masks",
    "p_mask",
    "sample_counts",
    "with_scheme",
]
