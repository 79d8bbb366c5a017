"""The networks stablemdm trains: its own compact transformer, and Hugging Face models
adapted to the MDM objective (see `hf`)."""

from .transformer import PRESETS, ModelConfig, Transformer

__all__ = ["PRESETS", "ModelConfig", "Transformer"]
