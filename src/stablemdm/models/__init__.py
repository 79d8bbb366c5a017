"""The networks stablemdm trains: its own compact transformer, and Hugging Face models
adapted to the MDM objective (see `hf`); block diffusion's attention rule (`blocks`, after
BD3-LM's `block_diff_mask`)."""

from .transformer import PRESETS, ModelConfig, Transformer

__all__ = ["PRESETS", "ModelConfig", "Transformer"]
