"""Evaluation by decoding: confidence-based unmasking for MDMs, left-to-right generation for
ARMs (`decoding`), and accuracy on a task's test split (`scoring`)."""

from .decoding import generate, generate_arm, generate_mdm
from .scoring import EvalResult, evaluate

__all__ = ["EvalResult", "evaluate", "generate", "generate_arm", "generate_mdm"]
