"""A finished run is recognised and left alone.

When a run ends, its final model is written into output_dir and then `trainer_state.json`
beside it (`mark_finished`): the run is finished when that file's step reaches the
configured end (`max_steps`, or the engine's step count of `num_train_epochs`). `--resume`
on a finished run changes nothing and says so; on a run stopped after its last checkpoint
reached the end but before the final model was written, it publishes that checkpoint's model
as the final one (`publish_final`) instead of training a step past the end. See
docs/reliability.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import ConfigError
from .checkpoints import MODEL_FILES
from .compute import planned_end
from .config import StableMDMConfig
from .outputs import atomic_path

FINISHED = "trainer_state.json"  # in output_dir: written last, once the final model is whole

# what a checkpoint holds only to resume training, not as part of the model
TRAINING_ONLY = ("optimizer", "scheduler.pt", "scaler.pt", "rng_state", FINISHED, "training_args")


def _state(path: Path) -> dict | None:
    """A trainer_state.json, or None when absent or unreadable."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def end_step(config: StableMDMConfig, state: dict) -> int | None:
    """The step `config`'s run ends at: max_steps (or the steps estimator=auto planned within
    that budget, recorded in `state`), or, for a run by epochs, the step count the engine
    computed (in `state`) if num_train_epochs is unchanged; None if unknown."""
    if config.max_steps > 0:
        return planned_end(state, config.max_steps)
    if state.get("num_train_epochs") == config.num_train_epochs:
        return state.get("max_steps")
    return None


def reached(folder: Path, config: StableMDMConfig) -> int | None:
    """The step of the trainer state saved in `folder` (a checkpoint, or a run folder) if it
    is at or past the end of `config`'s run, else None."""
    state = _state(Path(folder) / FINISHED)
    if state is None:
        return None
    step, end = state.get("global_step"), end_step(config, state)
    return step if isinstance(step, int) and isinstance(end, int) and step >= end else None


def finished_step(out: Path) -> int | None:
    """The step at which the run in `out` ended, when its final model was written whole."""
    if not any((Path(out) / name).is_file() for name in MODEL_FILES):
        return None
    step = (_state(Path(out) / FINISHED) or {}).get("global_step")
    return step if isinstance(step, int) else None


def finished_at(out: Path, config: StableMDMConfig) -> int | None:
    """The step at which the run in `out` finished, if that reaches `config`'s end (a run
    whose max_steps was raised since is not finished), else None."""
    return reached(out, config) if finished_step(out) is not None else None


def mark_finished(trainer, out: Path) -> None:
    """Write the trainer state beside the final model, last: the run is finished."""
    with atomic_path(Path(out) / FINISHED) as tmp:
        trainer.state.save_to_json(str(tmp))


def _model_source(checkpoint: Path, config: StableMDMConfig) -> Path:
    """The checkpoint whose model is final: the best one with load_best_model_at_end."""
    best = (_state(checkpoint / FINISHED) or {}).get("best_model_checkpoint")
    if config.load_best_model_at_end and best and Path(best).is_dir():
        return Path(best)
    return checkpoint


def publish_final(checkpoint: Path, out: Path, config: StableMDMConfig) -> None:
    """Write the final model of a run whose `checkpoint` is at its end: the checkpoint's
    weights, model config, tokenizer, sampler state and density, copied whole file by file,
    then its trainer state (the mark of a finished run)."""
    source = _model_source(checkpoint, config)
    files = [p for p in sorted(source.iterdir()) if p.is_file()]
    files = [p for p in files if not p.name.startswith(TRAINING_ONLY)]
    if not any(p.name in MODEL_FILES or p.name.startswith("model-") for p in files):
        raise ConfigError(
            f"--resume: {source} is at the end of the run but holds no model file to publish "
            f"(its weights are only in the engine's sharded format); convert it, or load it "
            "with the engine's tools"
        )
    for path in files:
        with atomic_path(Path(out) / path.name) as tmp:
            shutil.copyfile(path, tmp)
    with atomic_path(Path(out) / FINISHED) as tmp:
        shutil.copyfile(checkpoint / FINISHED, tmp)
