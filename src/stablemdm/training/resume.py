"""Where a run writes and where it resumes from: refusing to overwrite, finding the latest
complete checkpoint, and checking that a resumed config changed only what may change."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import safe_globals

from ..errors import ConfigError
from .checkpoints import (
    METRICS,
    MODEL_FILES,
    PPOTS_FILE,
    RUN_CONFIG,
    SAMPLER_STATE,
    checkpoints,
    latest_complete,
    leftovers,
    missing_files,
    restart_metrics,
    step_of,
)
from .config import StableMDMConfig
from .finished import FINISHED, finished_step
from .finite import nonfinite_tensor
from .outputs import weight_files
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
    "auto_budget",  # like max_steps, it only sets how far estimator=auto trains
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
    "trust_remote_code",  # a permission (`remote_code`), not a setting of the run
}


UNCHANGED = "nothing there was changed"


def check_output_dir(config: StableMDMConfig) -> None:
    """Refuse, with --resume too and before anything is built, an output_dir whose run would
    destroy a model: the folder of a model this run reads (model=, init_from=,
    tokenizer_name=), or a checkpoint of a run (or a folder inside one). Symlinks are
    resolved."""
    out = Path(config.output_dir).resolve()
    named = str(config.output_dir)
    if os.path.realpath(named) != os.path.abspath(named):
        named += f" (a link to {out})"
    for field in ("model", "init_from", "tokenizer_name"):
        value = getattr(config, field)
        if value and Path(value).is_dir() and Path(value).resolve() == out:
            raise ConfigError(
                f"output_dir {named} is the folder {field}={value} names, which this run "
                f"reads: a run there would replace its files; choose another output_dir "
                f"({UNCHANGED})"
            )
    checkpoint = next((p for p in (out, *out.parents) if _is_checkpoint(p)), None)
    if checkpoint is not None:
        where = "is" if checkpoint == out else "lies inside"
        raise ConfigError(
            f"output_dir {named} {where} {checkpoint.name} of the run in {checkpoint.parent}: a "
            f"run there would replace that checkpoint's files and the run could no longer "
            f"resume from it; choose another output_dir (to continue that run: "
            f"output_dir={checkpoint.parent} --resume {checkpoint}; {UNCHANGED})"
        )


def _is_checkpoint(folder: Path) -> bool:
    """Whether `folder` is a run's checkpoint-N (a trainer state, no log of its own: a run
    folder that happens to be named checkpoint-N has its metrics.jsonl)."""
    return (
        step_of(folder) is not None
        and (folder / FINISHED).is_file()
        and not (folder / METRICS).is_file()
    )


def prepare_output(config: StableMDMConfig, resume: bool) -> None:
    """Create the output folder and refuse to overwrite an earlier run or a saved model
    unless resuming; a folder whose run stopped before its first complete checkpoint is
    reused (said on stderr)."""
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: ranks run this together
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {out} is not writable: {err.strerror}") from err
    weights = weight_files(out)
    used = checkpoints(out) or leftovers(out) or (out / METRICS).exists() or weights
    if resume or not used:
        return
    latest = latest_complete(out)[0]
    if latest is not None or weights:
        raise ConfigError(f"output_dir {out} {_what_is_there(out, latest)}")
    if config.process_index == 0:
        print(
            f"stablemdm: {out} holds a run that stopped before its first complete checkpoint; "
            f"starting it again there ({METRICS} starts afresh)",
            file=sys.stderr,
        )
        (out / METRICS).unlink(missing_ok=True)


def _holds_a_run(out: Path) -> bool:
    """Whether `out` holds a complete checkpoint or a saved model (a plain re-run there is
    refused)."""
    return latest_complete(out)[0] is not None or bool(weight_files(out))


def _what_is_there(out: Path, latest: Path | None) -> str:
    """The refusal of a plain re-run in a folder holding a run or a model: what it is
    (a finished or stopped run, a saved model) and the way on."""
    step = finished_step(out)
    if latest is None:
        what = (
            f"a run that finished at step {step}"
            if step is not None
            else f"a saved model ({', '.join(weight_files(out))})"
        )
        return (
            f"holds {what}, with no checkpoint to continue from; choose another output_dir "
            f"({UNCHANGED})"
        )
    if step is not None:
        return (
            f"holds a run that finished at step {step}; choose another output_dir for a new run, "
            f"or raise max_steps above {step} and pass --resume to train this one further from "
            f"{latest.name} ({UNCHANGED})"
        )
    return (
        f"holds a stopped run (latest complete checkpoint {latest.name}); pass --resume to "
        f"continue it, or choose another output_dir ({UNCHANGED})"
    )


def find_checkpoint(config: StableMDMConfig, resume: bool | str) -> Path:
    """The checkpoint to resume from: complete, readable, of the same config, and with finite
    weights."""
    path = _latest_checkpoint(config) if resume is True else _named_checkpoint(Path(resume))
    _check_unchanged(config, load_yaml((path / RUN_CONFIG).read_text()), path)
    bad = nonfinite_tensor(path)
    if bad is not None:
        raise ConfigError(
            f"--resume: checkpoint {path} holds non-finite weights ({bad} has NaN or infinite "
            f"values); {_way_back(path)}"
        )
    return path


def damaged_file(folder: Path) -> str | None:
    """`NAME (why)` for the first file of a checkpoint that cannot be read (None when all
    can): the trainer state, run config, weights, and every torch file the engine or the
    run loads on resume (optimizer, scheduler, scaler, RNG and sampler states, `*.bin`
    weights and FSDP states), loaded as the resume loads them: without running code (a
    pickle holding more than tensors and plain data is refused) and memory-mapped, so an
    optimizer.pt of gigabytes costs a read of its pickle and its directory only. Then the
    density."""
    torch_files = [
        p
        for p in sorted(folder.iterdir())
        if p.suffix in (".pt", ".pth", ".bin") and p.name != TRAINING_ARGS_NAME  # not loaded
    ]
    checks = [
        ("trainer_state.json", lambda p: json.loads(p.read_text())),
        (RUN_CONFIG, _mapping),
        (MODEL_FILES[0], _safetensors),
        *((p.name, _torch_file) for p in torch_files),
        (PPOTS_FILE, lambda p: json.loads(p.read_text())),
    ]
    for name, check in checks:
        if (folder / name).is_file():
            try:
                check(folder / name)
            except Exception as err:  # any parse failure means the same thing to the user
                return f"{name} cannot be read ({_why(err)})"
    return None


def _why(err: Exception) -> str:
    """Why a file did not load, in a few words: the Python object a pickle would have built
    (the part of torch's long message that matters), else the error's first line."""
    unsafe = _UNSAFE_GLOBAL.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if unsafe is not None:
        return (
            f"it holds more than tensors and plain data ({unsafe.group(1)}), which only an "
            "unsafe load would build: it was not loaded, and nothing in it ran"
        )
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}{': ' * bool(reason)}{reason}"


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # in torch's refusal of a pickle


def _mapping(path: Path) -> None:
    if not isinstance(load_yaml(path.read_text()), dict):
        raise ValueError("it holds no mapping")


def _safetensors(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        list(f.keys())


def _torch_file(path: Path) -> None:
    """Load a file torch.save wrote as resuming does (weights_only; the RNG state with the
    numpy types the engine allows), after checking its zip directory (at the file's end)
    covers every entry: a truncated file is named as such."""
    with zipfile.ZipFile(path) as archive:
        size = path.stat().st_size
        if any(i.header_offset + i.compress_size > size for i in archive.infolist()):
            raise ValueError("it is shorter than its directory says")
    allowed = safe_globals() if path.name.startswith("rng_state") else contextlib.nullcontext()
    with allowed:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (a missing or damaged file), or None."""
    missing = missing_files(folder)
    return f"missing {', '.join(missing)}" if missing else damaged_file(folder)


def _latest_checkpoint(config: StableMDMConfig) -> Path:
    """The latest complete, readable checkpoint in output_dir; the folders skipped (incomplete
    or damaged ones, leftovers of an interrupted save) are named on stderr."""
    out = Path(config.output_dir)
    if not out.is_dir() or not (checkpoints(out) or leftovers(out)):
        raise ConfigError(f"--resume: no checkpoint-* folder in {out}")
    skipped = [f"{p.name} (left by an interrupted save)" for p in leftovers(out)]
    for path in checkpoints(out):
        problem = _problem(path)
        if problem is None:
            if skipped and config.process_index == 0:
                print(
                    f"stablemdm: --resume skips {'; '.join(skipped)}; resuming from {path}",
                    file=sys.stderr,
                )
            return path
        skipped.append(f"{path.name} ({problem})")
    way = (
        "restore the damaged file, or start again in another output_dir"
        if _holds_a_run(out)
        else "run the same command without --resume to start again there"
    )
    raise ConfigError(f"--resume: no complete checkpoint in {out} ({'; '.join(skipped)}); {way}")


def _named_checkpoint(path: Path) -> Path:
    """The folder given as `--resume PATH`, refused unless it is a complete checkpoint (a
    missing optimizer or scheduler would silently restart them) whose files all read."""
    if not path.is_dir():
        raise ConfigError(f"--resume: {path} is not a folder")
    missing = missing_files(path)
    if missing:
        raise ConfigError(
            f"--resume: {path} is not a complete checkpoint (missing {', '.join(missing)}); "
            f"{_way_back(path)}"
        )
    damaged = damaged_file(path)
    if damaged:
        raise ConfigError(f"--resume: checkpoint {path} is corrupted: {damaged}; {_way_back(path)}")
    return path


def _way_back(path: Path) -> str:
    """Where to resume instead of a broken checkpoint: the usable one before it."""
    step = step_of(path)
    for other in checkpoints(path.parent):
        if (step is None or step_of(other) < step) and _problem(other) is None:
            return f"the previous complete checkpoint is {other} (--resume {other})"
    return "there is no complete checkpoint before it to resume from"


def load_sampler_state(sampler, checkpoint: Path) -> None:
    """Restore the sampler's state from a checkpoint, naming the file if it holds another
    sampler's state (a file copied from another run or method)."""
    path = checkpoint / SAMPLER_STATE
    try:
        sampler.load_state_dict(torch.load(path, weights_only=True))
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ConfigError(
            f"--resume: {path} holds the state of another sampler, not this run's "
            f"{type(sampler).__name__} ({err}); restore the checkpoint's own file, or "
            f"{_way_back(checkpoint)}"
        ) from None


def _check_unchanged(config: StableMDMConfig, saved: dict, path: Path) -> None:
    """Refuse a resumed config that differs from the checkpoint's beyond RESUMABLE_CHANGES.
    A field the checkpoint's config lacks (saved before the field existed) counts as its
    default, which is what that run used."""
    now = config.resolved()
    defaults = {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(StableMDMConfig)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    saved = {k: saved.get(k, defaults.get(k)) for k in set(saved) | set(now)}
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
