"""Where a run writes and where it resumes from: refusing to overwrite, finding the latest
complete checkpoint, and checking that a resumed config changed only what may change."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ConfigError
from .checkpoints import (
    METRICS,
    MODEL_FILES,
    RUN_CONFIG,
    SAMPLER_STATE,
    checkpoints,
    latest_complete,
    leftovers,
    missing_files,
    previous_complete,
    restart_metrics,
)
from .config import StableMDMConfig
from .finished import finished_step
from .finite import nonfinite_tensor
from .recipe import load_yaml

# fields that may differ between a run and its resumption: cadence, length, how processes
# talk (a run written by several processes resumes in one), and what a run stopped by
# non-finite steps needs to continue (a lower learning_rate, tighter clipping)
RESUMABLE_CHANGES = {
    "output_dir",
    "learning_rate",
    "max_grad_norm",
    "max_nonfinite_steps",
    "max_steps",
    "num_train_epochs",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "eval_steps",
    "eval_strategy",
    "eval_accuracy",
    "eval_limit",
    "report_to",
    "disable_tqdm",
    "dataloader_num_workers",
    "ddp_backend",
    "resume_from_checkpoint",
}


def prepare_output(config: StableMDMConfig, resume: bool) -> None:
    """Create the output folder and refuse to overwrite an earlier run unless resuming; a
    folder whose run stopped before its first complete checkpoint is reused (said on stderr)."""
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: ranks run this together
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {out} is not writable: {err.strerror}") from err
    if resume or not (checkpoints(out) or leftovers(out) or (out / METRICS).exists()):
        return
    latest = latest_complete(out)[0]
    if latest is not None or any((out / n).is_file() for n in MODEL_FILES):
        raise ConfigError(f"output_dir {out} {_what_is_there(out, latest)}")
    if config.process_index == 0:
        print(
            f"stablemdm: {out} holds a run that stopped before its first complete checkpoint; "
            f"starting it again there ({METRICS} starts afresh)",
            file=sys.stderr,
        )
        (out / METRICS).unlink(missing_ok=True)


def _what_is_there(out: Path, latest: Path | None) -> str:
    """The refusal of a plain re-run in a folder holding a run: what the run is (finished or
    stopped) and the way on."""
    step = finished_step(out)
    if latest is None:
        what = f"a run that finished at step {step}" if step is not None else "a saved model"
        return (
            f"holds {what}, with no checkpoint to continue from; choose another output_dir "
            "(nothing there was changed)"
        )
    if step is not None:
        return (
            f"holds a run that finished at step {step}; choose another output_dir for a new run, "
            f"or raise max_steps above {step} and pass --resume to train this one further from "
            f"{latest.name} (nothing there was changed)"
        )
    return (
        f"holds a stopped run (latest complete checkpoint {latest.name}); pass --resume to "
        "continue it, or choose another output_dir (nothing there was changed)"
    )


def find_checkpoint(config: StableMDMConfig, resume: bool | str) -> Path:
    """The checkpoint to resume from: complete, readable, of the same config, and with finite
    weights."""
    path = _latest_checkpoint(config) if resume is True else _named_checkpoint(Path(resume))
    try:
        json.loads((path / "trainer_state.json").read_text())
        if (path / MODEL_FILES[0]).is_file():
            with safe_open(str(path / MODEL_FILES[0]), "pt") as f:
                list(f.keys())
        torch.load(path / SAMPLER_STATE, weights_only=True)
        saved = load_yaml((path / RUN_CONFIG).read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"{RUN_CONFIG} holds no mapping")
        bad = nonfinite_tensor(path)
    except Exception as err:  # any parse failure means the same thing to the user
        raise ConfigError(
            f"--resume: checkpoint {path} is corrupted ({type(err).__name__}: {err}); "
            f"{_way_back(path)}"
        ) from err
    _check_unchanged(config, saved, path)
    if bad is not None:
        raise ConfigError(
            f"--resume: checkpoint {path} holds non-finite weights ({bad} has NaN or infinite "
            f"values); {_way_back(path)}"
        )
    return path


def _latest_checkpoint(config: StableMDMConfig) -> Path:
    """The latest complete checkpoint in output_dir; the folders skipped (incomplete ones,
    leftovers of an interrupted save) are named on stderr."""
    out = Path(config.output_dir)
    if not out.is_dir() or not (checkpoints(out) or leftovers(out)):
        raise ConfigError(f"--resume: no checkpoint-* folder in {out}")
    path, skipped = latest_complete(out)
    if path is None:
        raise ConfigError(
            f"--resume: no complete checkpoint in {out} ({'; '.join(skipped)}); run the same "
            "command without --resume to start again there"
        )
    if skipped and config.process_index == 0:
        print(
            f"stablemdm: --resume skips {'; '.join(skipped)}; resuming from {path}",
            file=sys.stderr,
        )
    return path


def _named_checkpoint(path: Path) -> Path:
    """The folder given as `--resume PATH`, refused unless it is a complete checkpoint (a
    missing optimizer or scheduler would silently restart them)."""
    if not path.is_dir():
        raise ConfigError(f"--resume: {path} is not a folder")
    missing = missing_files(path)
    if missing:
        raise ConfigError(
            f"--resume: {path} is not a complete checkpoint (missing {', '.join(missing)}); "
            f"{_way_back(path)}"
        )
    return path


def _way_back(path: Path) -> str:
    """Where to resume instead of a broken checkpoint: the complete one before it."""
    previous = previous_complete(path)
    if previous is None:
        return "there is no complete checkpoint before it to resume from"
    return f"the previous complete checkpoint is {previous} (--resume {previous})"


def _check_unchanged(config: StableMDMConfig, saved: dict, path: Path) -> None:
    """Refuse a resumed config that differs from the checkpoint's beyond RESUMABLE_CHANGES."""
    now = config.resolved()
    changed = sorted(
        k
        for k in set(saved) | set(now)
        if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)
    )
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        allowed = ", ".join(sorted(RESUMABLE_CHANGES - {"output_dir", "resume_from_checkpoint"}))
        raise ConfigError(
            f"--resume: the config differs from the checkpoint's ({details}); only {allowed} "
            f"may change on --resume: for other changes start a new run in another output_dir "
            f"(init_from={path} starts from its weights)"
        )


def _restart_metrics(config: StableMDMConfig, checkpoint: Path) -> None:
    """Drop from metrics.jsonl the records the run resumed from `checkpoint` writes again, so
    that each logged step appears once (said on stderr)."""
    step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    dropped = restart_metrics(Path(config.output_dir), step)
    if dropped:
        print(
            f"stablemdm: {METRICS}: dropped {dropped} record(s) written after the checkpoint "
            f"of step {step} (the resumed run logs those steps again)",
            file=sys.stderr,
        )
