"""The multi-seed study (`stablemdm study`, `make demo`): every method x seed x task under
identical settings, evaluated by decoding at several points of training, reported as the
paper's Table 1 with paired differences, spreads and the worst-above-best check."""

from .progress import StudyProgress
from .report import build_report, markdown, write_report
from .runner import run_study
from .spec import METHODS, StudySpec, load_study

__all__ = [
    "METHODS",
    "StudyProgress",
    "StudySpec",
    "build_report",
    "load_study",
    "markdown",
    "run_study",
    "write_report",
]
