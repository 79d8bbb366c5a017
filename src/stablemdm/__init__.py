"""stablemdm: train masked diffusion language models with low gradient variance.

The package follows the paper (see docs/architecture.md): `estimators` (samplers, masks,
losses, the objective), `variance` (the A/B/C decomposition and its measurement),
`training`, `tasks`, `evaluation`, `models`, `data`, `study`, and `cli` on top. The names
below are the documented Python API; each is imported from its module on first use, so
`import stablemdm` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Objective": "estimators.objective",
    "ObjectiveOutput": "estimators.objective",
    "Uniform": "estimators.rates",
    "Clipped": "estimators.rates",
    "PPOTS": "estimators.ppots",
    "EMA": "estimators.ema",
    "Stratified": "estimators.stratified",
    "Mirrored": "estimators.syrm",
    "FitDesign": "estimators.ppots_fit",
    "fit_ppots": "estimators.ppots_fit",
    "make_sampler": "estimators.registry",
    "with_scheme": "estimators.registry",
    "nested_components": "variance.decompose",
    "compare_estimators": "variance.decompose",
    "StableMDMConfig": "training.config",
    "load_config": "training.recipe",
    "train": "training.run",
    "StableMDMTrainer": "training.trainer",
    "get_task": "tasks.registry",
    "CharTokenizer": "data.tokenizer",
    "generate": "evaluation.decoding",
    "evaluate": "evaluation.scoring",
    "seeded_generator": "rng",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stablemdm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
