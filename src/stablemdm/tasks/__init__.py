"""Tasks: the registry (`get_task` by name) and the built-in tasks, each with train and test
splits and an answer checker. Importing the package registers every built-in task."""

from . import gsm8k, images, mixture, reasoning_gym, text, user  # noqa: F401  (each registers)
from .registry import Task, available_tasks, get_task, register_task

__all__ = ["Task", "available_tasks", "get_task", "register_task"]
