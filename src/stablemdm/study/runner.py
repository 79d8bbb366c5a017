"""Running a study: every task x method x seed in its own folder, resumable.

A run is trained with checkpoints at each evaluation point, then each of those checkpoints is
decoded on the test split; `result.json` marks it finished. Re-running skips finished runs,
resumes a killed one from its latest checkpoint, restarts one that died before its first, and
only evaluates one killed after its training ended (its training time as recorded then).
With a `base`, the shared bases are pretrained first (or found in the cache) and decoded on
every target at step 0. Once every run is finished, each run's estimator noise is measured
on its own and on Standard's final model (`noise`) and added to its result.json.
The trainer's own log lines go to the run's `train.log` (they are in metrics.jsonl too).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..evaluation.scoring import evaluate
from ..tasks.registry import Task, get_task
from ..training.compute import read_compute
from ..training.config import StableMDMConfig
from ..training.finished import finished_step
from ..training.lock import claim
from ..training.outputs import write_text
from ..training.run import train
from ..training.saved import load_checkpoint, objective_of
from .bases import TRAINED_ON, cache_key, examples_digest
from .noise import measure_noise
from .progress import StudyProgress
from .spec import RESULT, StudySpec

TRAIN_LOG = "train.log"
TRAIN_TIME = "train_seconds.json"  # the seconds the run's training took, once it ended
ZERO_SAMPLES = 3  # outputs shown of a base that scores nothing at step 0


class SaveAt(TrainerCallback):
    """Saves a checkpoint at each evaluation point: `steps_of(end)`, the steps of a run that
    ends at step `end` (its own: estimator=auto may plan fewer than max_steps)."""

    def __init__(self, steps_of: Callable[[int], list[int]]) -> None:
        self.steps_of = steps_of
        self.steps: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = set(self.steps_of(state.max_steps))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


def _train(config: StableMDMConfig, callbacks: list) -> float:
    """Train (resuming from a checkpoint if there is one; a run whose training ended is left
    as it is); returns the seconds its training took."""
    folder = Path(config.output_dir)
    resume = any(folder.glob("checkpoint-*"))
    if not resume and folder.exists():
        shutil.rmtree(folder)  # the study's own run folder, stopped before its first checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(folder / TRAIN_LOG, "a") as log, contextlib.redirect_stdout(log):
        result = train(config, resume=resume, callbacks=callbacks)
    if not result.trained:
        return _recorded_seconds(folder)
    seconds = time.perf_counter() - start
    write_text(folder / TRAIN_TIME, json.dumps({"train_seconds": seconds}))
    return seconds


def _recorded_seconds(folder: Path) -> float:
    """The training time of a run trained earlier: as recorded, else the trainer's runtime
    in metrics.jsonl."""
    try:
        return float(json.loads((folder / TRAIN_TIME).read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        records = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        return float(sum(r.get("train_runtime", 0.0) for r in records))


def _pretrain(config: StableMDMConfig, record: dict, progress: StudyProgress) -> None:
    """Train one base unless its weights are there already; `record` (what it is trained
    on, `StudySpec.base_record`) goes into its folder as trained_on.json."""
    folder = Path(config.output_dir)
    label = f"base-{config.objective} ({folder.name})"
    if (folder / "model.safetensors").is_file():
        progress.say(f"{label}: cached, reused")
        return
    progress.say(f"{label}: pretraining {config.max_steps} steps (seed {config.seed})")
    seconds = _train(config, [progress.start_run(label, config.max_steps)])
    write_text(folder / TRAINED_ON, json.dumps(record, indent=1))
    progress.say(f"{label}: pretrained in {seconds:.0f} s")


def _claim_file(config: StableMDMConfig) -> Path:
    folder = Path(config.output_dir)
    return folder.parent / f".{folder.name}.claim"


def train_bases(spec: StudySpec, progress: StudyProgress) -> None:
    """Pretrain each base MDM and ARM the study needs once (cached by spec: study.bases).
    A base another process is pretraining (a second study sharing the cache) is left to it:
    this one pretrains the others first, then waits for it (and pretrains it itself if that
    process stopped before finishing)."""
    bases = [
        (spec.base_config(t, o), spec.base_record(t, o))
        for t in spec.base_tasks()
        for o in ("mdm", "arm")
    ]
    busy = []
    for config, record in bases:
        with claim(_claim_file(config), wait=False) as mine:
            if mine:
                _pretrain(config, record, progress)
            else:
                busy.append((config, record))
    for config, record in busy:
        progress.say(f"base-{config.objective}: another process is pretraining it; waiting")
        with claim(_claim_file(config), wait=True):
            _pretrain(config, record, progress)


def evaluate_base(spec: StudySpec, task: str, objective: str, progress: StudyProgress) -> dict:
    """The base's step-0 accuracy on `task`'s test items (what every run of `objective`
    starts from), written to `output_dir/task/base-OBJECTIVE.json` and reused while its
    key (`_step_zero_key`) is the same; a base that scores nothing shows a few outputs."""
    base = spec.base_config(task, objective)
    path = Path(spec.output_dir) / task / f"base-{objective}.json"
    run = spec.run_config(task, next(iter(spec.methods)), spec.seeds[0])
    target = get_task(task, **run.task_options)
    key = _step_zero_key(spec, base, run, target)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        done = json.loads(path.read_text())
        if done.get("key") == key:
            return done
    progress.phase(f"{task}: decoding base-{objective} at step 0")
    model, tokenizer = load_checkpoint(Path(base.output_dir), run.trust_remote_code)
    ev = evaluate(
        model,
        tokenizer,
        target,
        "test",
        objective=objective,
        limit=spec.eval_limit,
        gen_length=run.gen_length,
        output_path=path.with_suffix(".jsonl"),
    )
    sequences = base.max_steps * base.per_device_train_batch_size * base.gradient_accumulation_steps
    result = {
        "task": task,
        "objective": objective,
        "accuracy": ev.accuracy,
        "n": ev.n,
        "n_limit": spec.eval_limit,
        "base": base.output_dir,
        "base_steps": base.max_steps,
        "base_sequences": sequences,
        "base_task": base.task,
        "train_seconds": _recorded_seconds(Path(base.output_dir)),
        "key": key,
    }
    if ev.n_correct == 0:
        result["samples"] = [
            {k: r[k] for k in ("prompt", "output", "gold")} for r in ev.records[:ZERO_SAMPLES]
        ]
    write_text(path, json.dumps(result, indent=1))
    return result


def _step_zero_key(
    spec: StudySpec, base: StableMDMConfig, run: StableMDMConfig, target: Task
) -> str:
    """What decides a base's step-0 result: the base (its folder names what it was trained
    on), the target's name, options and test items, and how many are decoded, how long."""
    return cache_key(
        {
            "base": base.output_dir,
            "task": run.task,
            "task_options": run.task_options,
            "test": examples_digest(target, ("test",)),
            "eval_limit": spec.eval_limit,
            "gen_length": run.gen_length,
        }
    )


def compute_record(config: StableMDMConfig, folder: Path) -> dict[str, Any]:
    """A finished run's budget as trained and its counted compute (`training.compute`,
    None for a run trained before passes were counted): the steps it trained, its sequences
    per step, and its training forward token positions per step."""
    steps = finished_step(folder)
    compute = read_compute(folder)
    tokens = compute["training_forward_tokens"] if compute else None
    return {
        "steps": steps,
        "sequences_per_step": config.per_device_train_batch_size
        * config.gradient_accumulation_steps
        * config.world_size,
        "compute": compute,
        "forward_tokens_per_step": tokens / steps if tokens and steps else None,
    }


def training_losses(folder: Path) -> list[tuple[int, float]]:
    """(step, loss) of each training log line; a resumed run's repeated steps count once,
    as logged last."""
    losses = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("loss") is not None:
            losses[record["step"]] = record["loss"]
    return sorted(losses.items())


def run_one(
    spec: StudySpec, task: str, method: str, seed: int, progress: StudyProgress
) -> dict[str, Any]:
    """Train, evaluate at every point and measure one run; writes and returns result.json."""
    config = spec.run_config(task, method, seed)
    folder = Path(config.output_dir)
    steps = spec.eval_steps()
    watch = progress.start_run(f"{task}/{method}/seed-{seed}", config.max_steps)
    seconds = _train(config, [SaveAt(spec.eval_steps), watch])
    task_data = get_task(task, **config.task_options)
    budget = compute_record(config, folder)
    evaluations = []
    for step, at in zip(steps, spec.eval_steps(budget["steps"]), strict=True):
        progress.phase(f"decoding step {at}")
        model, tokenizer = load_checkpoint(folder / f"checkpoint-{at}", config.trust_remote_code)
        ev = evaluate(
            model,
            tokenizer,
            task_data,
            "test",
            objective=objective_of(model),
            limit=spec.eval_limit,
            seed=seed,
            gen_length=config.gen_length,
            output_path=folder / f"eval-{at}.jsonl",
        )
        point = {"step": step, "trained_step": at, "accuracy": ev.accuracy, "n": ev.n}
        evaluations.append({**point, **ev.metrics, **ev.speed()})
    result = {
        "task": task,
        "method": method,
        "seed": seed,
        "evaluations": evaluations,
        "eval_limit": spec.eval_limit,
        "accuracy": evaluations[-1]["accuracy"],
        "train_seconds": round(seconds, 1),
        **budget,
        "losses": training_losses(folder),
    }
    write_text(folder / RESULT, json.dumps(result, indent=1))
    return result


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's CPU threads set to `n` (None: unchanged) for the block, then restored."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_study(
    spec: StudySpec, progress: StudyProgress | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run (or pick up) every run of the study, seed by seed; returns their results and the
    bases' step-0 evaluations (none without a base)."""
    runs = [(t, m, s) for t in spec.tasks for s in spec.seeds for m in spec.methods]
    results, bases = [], []
    with progress or StudyProgress(spec.name, len(runs)) as progress, _threads(spec.threads):
        if spec.base is not None:
            train_bases(spec, progress)
            for task in spec.tasks:
                bases += [evaluate_base(spec, task, o, progress) for o in ("mdm", "arm")]
        for task, method, seed in runs:
            path = spec.run_dir(task, method, seed) / RESULT
            label = f"{task}/{method}/seed-{seed}"
            if path.is_file():
                results.append(json.loads(path.read_text()))
                progress.finish_run(label, None)
                continue
            results.append(run_one(spec, task, method, seed, progress))
            progress.finish_run(label, results[-1])
        measure_noise(spec, results, progress.say)
    return results, bases
