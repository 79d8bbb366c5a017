"""Checkpoint folders: written whole or not at all, found by completeness, rotated safely.

A checkpoint is written into `tmp-checkpoint-N` and renamed to `checkpoint-N` once every
file is there and on disk (`publish`), so a kill at any moment leaves either the complete
folder or a `tmp-` leftover, which `transformers`' `get_last_checkpoint` does not match and
the next save removes. Older checkpoints are deleted only after the new one is published
(`rotate`), and each vanishes at once (renamed away, then removed). `--resume` takes the
latest complete checkpoint and names the folders it skipped (`latest_complete`).
See docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..data.atomic import follow_umask
from ..estimators.registry import METHODS, UNBIASED_METHODS
from .recipe import load_yaml

RUN_CONFIG = "config.yaml"  # the resolved run config, in the run folder and each checkpoint


SAMPLER_STATE = "sampler_state.pt"  # torch.save of the sampler's state_dict


PPOTS_FILE = "ppots.json"  # the P-POTS density the run samples from


AUTO_FILE = "auto.json"  # estimator=auto: the candidates, the choice and its history


# what a checkpoint holds the weights in: one file, a sharded index, or a LoRA adapter
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


STAGING = "tmp-"  # prefix of a checkpoint being written (or being deleted)


METRICS = "metrics.jsonl"


_NAME = re.compile(r"checkpoint-(\d+)")


def step_of(path: Path) -> int | None:
    """The step N of a `checkpoint-N` folder (None for any other name)."""
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoints(run_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders of a run, latest step first."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def leftovers(run_dir: Path) -> list[Path]:
    """Folders an interrupted save or rotation left behind (`tmp-...checkpoint-N`)."""
    return sorted(p for p in Path(run_dir).glob(f"{STAGING}*checkpoint-*") if p.is_dir())


def _saved_config(folder: Path) -> dict:
    """The run config saved in `folder` ({} when unreadable: reported when resuming)."""
    try:
        saved = load_yaml((folder / RUN_CONFIG).read_text())
    except Exception:  # an unreadable config is reported as corrupted when resuming
        return {}
    return saved if isinstance(saved, dict) else {}


def _uses_ppots(saved: dict) -> bool:
    """Whether a saved run config samples from a P-POTS density (itself, or as a candidate
    of estimator=auto)."""
    if saved.get("estimator") == "auto":
        names = saved.get("auto_candidates") or UNBIASED_METHODS
        return any(METHODS.get(n, {}).get("sampler") == "ppots" for n in names)
    return saved.get("sampler") == "ppots"


def missing_files(folder: Path) -> list[str]:
    """What `folder` lacks to resume a run exactly (empty when it is a complete checkpoint):
    weights, optimizer, scheduler, RNG state, trainer state, sampler state, run config and,
    for P-POTS, the density. DeepSpeed's `global_step*` folder holds weights, optimizer and
    scheduler; FSDP's `pytorch_model_fsdp*` the weights; estimator=auto its `auto.json`."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    deepspeed = any(n.startswith("global_step") for n in names)
    fsdp = any(n.startswith("pytorch_model_fsdp") for n in names)
    missing = [n for n in ("trainer_state.json", RUN_CONFIG, SAMPLER_STATE) if n not in names]
    if not (names & set(MODEL_FILES) or deepspeed or fsdp):
        missing.append(" or ".join(MODEL_FILES))
    if not deepspeed and not any(n.startswith("optimizer") for n in names):
        missing.append("optimizer.pt")
    if not deepspeed and "scheduler.pt" not in names:
        missing.append("scheduler.pt")
    if not any(n.startswith("rng_state") for n in names):
        missing.append("rng_state.pth")
    saved = _saved_config(folder) if RUN_CONFIG in names else {}
    if PPOTS_FILE not in names and _uses_ppots(saved):
        missing.append(PPOTS_FILE)
    if AUTO_FILE not in names and saved.get("estimator") == "auto":
        missing.append(AUTO_FILE)
    return missing


def latest_complete(run_dir: Path) -> tuple[Path | None, list[str]]:
    """(the latest complete checkpoint or None, the folders skipped on the way, with why)."""
    skipped = [f"{p.name} (left by an interrupted save)" for p in leftovers(run_dir)]
    for path in checkpoints(run_dir):
        missing = missing_files(path)
        if not missing:
            return path, skipped
        skipped.append(f"{path.name} (missing {', '.join(missing)})")
    return None, skipped


def clear_staging(run_dir: Path) -> None:
    """Remove what interrupted saves left (before a new save starts)."""
    for path in leftovers(run_dir):
        shutil.rmtree(path, ignore_errors=True)


def _sync(folder: Path) -> None:
    """Flush every file of `folder` and the folder itself to disk."""
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Rename the finished `staged` folder to `final` (a checkpoint saved again at the same
    step, after resuming from an earlier one, replaces the old folder), its files given the
    mode the umask gives (safetensors writes its own private)."""
    follow_umask(p for p in staged.rglob("*") if p.is_file())
    _sync(staged)
    if final.exists():
        discard(final, then=lambda: staged.rename(final))
    else:
        staged.rename(final)
    _sync(final.parent)


def discard(path: Path, then=None) -> None:
    """Delete a checkpoint so that it vanishes at once: rename it to a `tmp-` name, run
    `then` (if any), remove it."""
    trash = path.with_name(f"{STAGING}deleting-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    if then is not None:
        then()
    shutil.rmtree(trash, ignore_errors=True)


def rotate(run_dir: Path, limit: int | None, keep: set[Path]) -> None:
    """Delete the oldest checkpoints beyond `limit`, never one in `keep` (the one just
    published, the best one): called only once the new checkpoint is complete."""
    if not limit or limit <= 0:
        return
    found = checkpoints(run_dir)
    kept = [p for p in found if p in keep]
    old = [p for p in reversed(found) if p not in keep]
    for path in old[: max(0, len(found) - max(limit, len(kept)))]:
        discard(path)


def restart_metrics(run_dir: Path, step: int) -> int:
    """Drop from `metrics.jsonl` what a run resumed at `step` logs again: records of later
    steps, the end-of-training summary of an earlier call at `step`, and a torn last line.
    Written atomically; returns how many records were dropped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            later = record["step"] > step or (record["step"] == step and "train_runtime" in record)
        except (json.JSONDecodeError, KeyError, TypeError):
            later = True
        if later:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(f".{METRICS}.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)
    return dropped
