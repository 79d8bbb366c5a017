"""The estimators by name: rate samplers and schemes (`make_sampler`, `with_scheme`) and the
method table (the paper's Table 1 rows as config fields) that the variance tool and the
study share."""

from __future__ import annotations

import inspect
from typing import Any

from .ema import EMA
from .ppots import PPOTS
from .rates import Clipped, RateSampler, RateScheme, Uniform
from .stratified import Stratified, StratifiedRows
from .syrm import Mirrored

SAMPLERS: dict[str, type[RateSampler]] = {
    cls.name: cls for cls in (Uniform, Clipped, PPOTS, EMA, Stratified, StratifiedRows, Mirrored)
}


SCHEMES: dict[str, type[RateScheme] | None] = {
    "iid": None,
    "stratified": Stratified,
    "stratified_rows": StratifiedRows,
    "mirrored": Mirrored,
}


def make_sampler(name: str, **options: Any) -> RateSampler:
    """Build a registered sampler by its paper name with keyword options."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(sorted(SAMPLERS))}")
    cls = SAMPLERS[name]
    params = inspect.signature(cls).parameters
    unknown = set(options) - set(params)
    if unknown:
        raise ValueError(
            f"sampler {name!r} has no option(s) {sorted(unknown)}; its options: {sorted(params)}"
        )
    missing = [
        p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in options
    ]
    if missing:
        raise ValueError(f"sampler {name!r} needs option(s) {missing}")
    return cls(**options)


def with_scheme(base: RateSampler, scheme: str) -> RateSampler:
    """Draw `base`'s density with a uniform scheme: "iid", "stratified", "stratified_rows"
    (block diffusion: within each sequence) or "mirrored"."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    if isinstance(base, RateScheme):
        raise ValueError(
            f"{type(base).__name__} already has a uniform scheme; pass the density sampler it wraps"
        )
    wrapper = SCHEMES[scheme]
    return base if wrapper is None else wrapper(base)


# The estimator fields every method starts from, so "standard" means Standard whatever the
# base config says; each method then overrides a few of them.
ESTIMATOR_DEFAULTS: dict[str, Any] = {
    "estimator": "fixed",
    "rate": "t",
    "sampler": "uniform",
    "scheme": "iid",
    "masking": "iid",
    "compute_matched": False,
}


METHODS: dict[str, dict[str, str]] = {
    "standard": {},
    "clipped": {"sampler": "clipped"},
    "ppots": {"sampler": "ppots"},
    "mirror": {"masking": "mirror"},
    "ppots_mirror": {"sampler": "ppots", "masking": "mirror"},
    "strats": {"scheme": "stratified"},
    "ppots_strats": {"sampler": "ppots", "scheme": "stratified"},
    "syrm": {"scheme": "mirrored"},
    "ema": {"sampler": "ema"},
    "isad": {"masking": "isad"},
    "count": {"rate": "count"},
    "count_ppots": {"rate": "count", "sampler": "ppots"},
    "count_mirror": {"rate": "count", "masking": "mirror"},
    "count_ppots_mirror": {"rate": "count", "sampler": "ppots", "masking": "mirror"},
    "count_strats": {"rate": "count", "scheme": "stratified"},
    "count_syrm": {"rate": "count", "scheme": "mirrored"},
    "strats_rows": {"scheme": "stratified_rows"},
    "ppots_strats_rows": {"sampler": "ppots", "scheme": "stratified_rows"},
    "count_strats_rows": {"rate": "count", "scheme": "stratified_rows"},
}


# methods that only block diffusion trains: they stratify the rates of each sequence's blocks
BLOCK_ONLY_METHODS = ("strats_rows", "ppots_strats_rows", "count_strats_rows")


def unbiased(name: str) -> bool:
    """Whether method `name` estimates the ELBO itself: its rate density is importance
    weighted (Clipped is not: it estimates the objective restricted to its interval)."""
    return SAMPLERS[METHODS[name].get("sampler", "uniform")].unbiased


# the methods `estimator: auto` may train with, before the model and task rule some out
UNBIASED_METHODS = tuple(name for name in METHODS if unbiased(name))


DEFAULT_METHODS = tuple(
    "standard clipped ppots mirror ppots_mirror strats syrm ema isad count count_ppots_mirror "
    "count_strats".split()
)


# ISAD's raised tokens when the config sets none: the answer delimiter of the task.
ISAD_DEFAULT_TOKENS: dict[str, list[str]] = {
    "chain_sum": ["-"],
    "gsm8k": ["#"],
    "gsm_symbolic": ["#"],
}
