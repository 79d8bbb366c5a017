"""Measuring the variance of a model's training signal (paper.md section 2): the A/B/C
decomposition (`decompose`, pure math), its measurement on a model (`measure`), the
experiment (`report`), its tables and plots (`output`), and the `stablemdm variance` command."""

from .decompose import Components, compare_estimators, nested_components

__all__ = ["Components", "compare_estimators", "nested_components"]
