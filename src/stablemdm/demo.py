"""`stablemdm demo` (`make demo`): train a tiny ARM and same-size MDMs (Standard, and
P-POTS+MIRROR with and without matching Standard's compute) on a built-in task, decode the
test split with each, and print one table.

Each run lives in its own folder under the output directory and is skipped when its
evaluation already exists, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from .config import StableMDMConfig
from .evaluation import evaluate
from .models import Transformer
from .run import train
from .tasks import get_task
from .tokenizer import CharTokenizer

# what the demo compares: the ARM baseline, Standard MDM, and the paper's headline method,
# as published (two forward passes per sequence) and at a Standard step's compute
RUNS: dict[str, dict] = {
    "arm": {"objective": "arm"},
    "mdm-standard": {},
    "mdm-ppots-mirror": {"sampler": "ppots", "masking": "mirror"},
    "mdm-ppots-mirror-matched": {"sampler": "ppots", "masking": "mirror", "compute_matched": True},
}


def demo_config(name: str, output: Path, task: str, steps: int, seed: int) -> StableMDMConfig:
    """The demo's CPU-sized training config for run `name`."""
    return StableMDMConfig(
        output_dir=str(output / name),
        task=task,
        model_preset="tiny",
        seed=seed,
        max_steps=steps,
        per_device_train_batch_size=64,
        learning_rate=2e-3,
        warmup_steps=min(30, steps // 10),
        logging_steps=max(1, steps // 10),
        save_steps=min(steps, 500),  # a stopped demo resumes from its last checkpoint
        save_total_limit=2,
        disable_tqdm=True,
        **RUNS[name],
    )


def run_demo(
    output: str | Path = "runs/demo",
    task: str = "chain_sum",
    steps: int = 3000,
    seed: int = 42,
    limit: int | None = None,
) -> dict[str, dict]:
    """Train and evaluate every demo run (resuming where a previous demo stopped)."""
    output = Path(output)
    results = {}
    for name in RUNS:
        folder = output / name
        result_file = folder / "demo-result.json"
        if result_file.is_file():
            results[name] = json.loads(result_file.read_text())
            print(f"[demo] {name}: already done ({result_file})")
            continue
        config = demo_config(name, output, task, steps, seed)
        print(
            f"[demo] training {name} ({config.objective}, sampler={config.sampler}, "
            f"masking={config.masking}, compute_matched={config.compute_matched}) "
            f"for {steps} steps ...",
            flush=True,
        )
        start = time.perf_counter()
        resume = any(folder.glob("checkpoint-*"))
        if not resume and folder.exists():
            shutil.rmtree(folder)  # the demo's own folder, stopped before its first checkpoint
        run = train(config, resume=resume)
        train_s = time.perf_counter() - start
        model = Transformer.from_pretrained(folder)
        tokenizer = CharTokenizer.from_pretrained(folder)
        start = time.perf_counter()
        ev = evaluate(
            model,
            tokenizer,
            get_task(task),
            "test",
            objective=config.objective,
            limit=limit,
            seed=seed,
            output_path=folder / "eval-test.jsonl",
        )
        final_loss = next((r["loss"] for r in reversed(run.log_history) if "loss" in r), None)
        results[name] = {
            "accuracy": ev.accuracy,
            "n": ev.n,
            "final_train_loss": final_loss,
            "train_seconds": round(train_s, 1),
            "eval_seconds": round(time.perf_counter() - start, 1),
            "parameters": model.num_parameters(),
        }
        result_file.write_text(json.dumps(results[name], indent=1))
    _print_table(results, task, steps, seed)
    return results


def _print_table(results: dict[str, dict], task: str, steps: int, seed: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stablemdm demo: {task}, {steps} steps, seed {seed}")
    for column in ("run", "params", "test accuracy", "train loss", "train s", "eval s"):
        table.add_column(column, no_wrap=True)
    for name, r in results.items():
        loss = f"{r['final_train_loss']:.3f}" if r["final_train_loss"] is not None else "-"
        table.add_row(
            name,
            f"{r['parameters']:,}",
            f"{100 * r['accuracy']:.1f}% of {r['n']}",
            loss,
            str(r["train_seconds"]),
            str(r["eval_seconds"]),
        )
    Console(width=None if sys.stdout.isatty() else 100).print(table)
