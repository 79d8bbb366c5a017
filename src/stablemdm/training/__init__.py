"""Training runs: the config (`StableMDMConfig`, recipes and `key=value` overrides), what it
builds (model, sampler, objective), the `transformers.Trainer` subclass and its callbacks,
atomic checkpoints, resume, and `train`, one whole run."""

from .config import StableMDMConfig
from .recipe import load_config
from .run import RunResult, train
from .trainer import StableMDMTrainer

__all__ = ["RunResult", "StableMDMConfig", "StableMDMTrainer", "load_config", "train"]
