"""Running a study: every task x method x seed in its own folder, resumable.

A run is trained with checkpoints at each evaluation point, then each of those checkpoints is
decoded on the test split; `result.json` marks it finished. Re-running skips finished runs,
resumes a killed one from its latest checkpoint, and restarts one that died before its first.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, default_data_collator

from ..evaluation import evaluate
from ..models.loading import load_checkpoint, objective_of
from ..run import build_objective, build_sampler, encode_split, load_density, resolve_canvas, train
from ..tasks import get_task
from ..trainer import seeded_generator
from .spec import StudySpec

RESULT = "result.json"


class SaveAt(TrainerCallback):
    """Saves a checkpoint at each of the given optimizer steps (the evaluation points)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


def _train(config, callbacks: list) -> float:
    """Train (resuming from a checkpoint if there is one); returns the seconds it took."""
    folder = Path(config.output_dir)
    resume = any(folder.glob("checkpoint-*"))
    if not resume and folder.exists():
        shutil.rmtree(folder)  # the study's own run folder, stopped before its first checkpoint
    start = time.perf_counter()
    train(config, resume=resume, callbacks=callbacks)
    return time.perf_counter() - start


def train_base(spec: StudySpec, task: str, log: Callable[[str], None]) -> None:
    """Pretrain the shared base MDM and ARM of `task` once (cached in the study folder)."""
    for objective in ("mdm", "arm"):
        config = spec.base_config(task, objective)
        if (Path(config.output_dir) / "model.safetensors").is_file():
            continue
        log(f"base {task}/{objective}: {config.max_steps} steps")
        _train(config, [])


def estimator_variance(model, config, task, draws: int, seed: int) -> float | None:
    """Variance of the minibatch loss estimate over `draws` draws of rates and masks on one
    fixed held-out batch of the test split: the masking noise the method leaves (0 for an
    ARM, whose only randomness is the data)."""
    if draws < 2:
        return None
    _, tokenizer = load_checkpoint(config.output_dir)
    canvas = resolve_canvas(config, task, tokenizer)
    data = encode_split(task, tokenizer, "test", canvas, config.per_device_train_batch_size)
    batch = default_data_collator([data[i] for i in range(len(data))])
    density = None
    if config.sampler == "ppots":
        density = load_density(Path(config.output_dir) / "ppots.json")
    objective = build_objective(config, tokenizer, build_sampler(config, density))
    model.eval()
    with torch.no_grad():
        losses = [
            objective(
                model,
                batch,
                seeded_generator(seed, "variance-rate", i),
                seeded_generator(seed, "variance-mask", i),
            ).loss.item()
            for i in range(draws)
        ]
    return float(torch.tensor(losses, dtype=torch.float64).var())


def run_one(spec: StudySpec, task: str, method: str, seed: int) -> dict[str, Any]:
    """Train, evaluate at every point and measure one run; writes and returns result.json."""
    config = spec.run_config(task, method, seed)
    folder = Path(config.output_dir)
    steps = spec.eval_steps()
    seconds = _train(config, [SaveAt(steps)])
    task_data = get_task(task, **config.task_options)
    evaluations = []
    for step in steps:
        model, tokenizer = load_checkpoint(folder / f"checkpoint-{step}")
        ev = evaluate(
            model,
            tokenizer,
            task_data,
            "test",
            objective=objective_of(model),
            limit=spec.eval_limit,
            seed=seed,
            gen_length=config.gen_length,
            output_path=folder / f"eval-{step}.jsonl",
        )
        evaluations.append({"step": step, "accuracy": ev.accuracy, "n": ev.n})
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    result = {
        "task": task,
        "method": method,
        "seed": seed,
        "evaluations": evaluations,
        "accuracy": evaluations[-1]["accuracy"],
        "train_seconds": round(seconds, 1),
        "forward_tokens_per_step": forward_tokens_per_step(config),
        "losses": [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None],
        "estimator_variance": estimator_variance(
            model, config, task_data, spec.variance_draws, seed
        ),
    }
    (folder / RESULT).write_text(json.dumps(result, indent=1))
    return result


def forward_tokens_per_step(config) -> int:
    """Token positions through the network per optimizer step: sequences (halved by
    compute-matched MIRROR) x forward passes per sequence (two for MIRROR) x length."""
    sequences = config.per_device_train_batch_size * config.gradient_accumulation_steps
    passes = 2 if config.objective == "mdm" and config.masking == "mirror" else 1
    if config.compute_matched:
        sequences //= 2
    return sequences * passes * config.max_length


def run_study(spec: StudySpec, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run (or pick up) every run of the study; returns their results."""
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    runs = [(t, m, s) for t in spec.tasks for s in spec.seeds for m in spec.methods]
    results = []
    started = time.perf_counter()
    for task in spec.tasks if spec.base is not None else ():
        train_base(spec, task, say)
    for done, (task, method, seed) in enumerate(runs):
        path = spec.run_dir(task, method, seed) / RESULT
        prefix = f"[{done + 1}/{len(runs)}] {task}/{method}/seed-{seed}"
        if path.is_file():
            results.append(json.loads(path.read_text()))
            say(f"{prefix}: done already")
            continue
        result = run_one(spec, task, method, seed)
        results.append(result)
        elapsed = time.perf_counter() - started
        say(
            f"{prefix}: accuracy {100 * result['accuracy']:.1f}% in {result['train_seconds']} s "
            f"(study {elapsed / 60:.1f} min)"
        )
    return results
