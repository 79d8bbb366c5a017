"""Shifted logits or not, for a causal LM adapted to an MDM (issue 20, docs/hf.md): the same
model, data and recipe trained with `shift_logits=true` (Dream's convention: position i-1
predicts token i) and `false` (position i predicts token i, dllm's A2D default), then decoded
on the test split. Reports the last logged training loss, the held-out loss and the accuracy.

    # a fresh tiny Llama (models/toy.py), two seeds, seconds per run on a CPU
    python benchmarks/shift_logits.py --output runs/shift_tiny --seeds 0 1
    # SmolLM2-135M-Instruct, real weights (`make smollm2`), minutes per run on a CPU
    python benchmarks/shift_logits.py --output runs/shift_smollm2 --model runs/smollm2 \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --chat-template --steps 200 --batch 8 \
        --lr 1e-4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stablemdm.evaluation.scoring import evaluate
from stablemdm.models.toy import save_llama
from stablemdm.tasks.registry import get_task
from stablemdm.training.config import StableMDMConfig
from stablemdm.training.run import train
from stablemdm.training.saved import load_checkpoint


def run_one(args: argparse.Namespace, base: str, seed: int, shift: bool) -> dict:
    """Train one setting and decode the test split; returns its row of the report."""
    folder = Path(args.output) / f"seed{seed}_shift{str(shift).lower()}"
    options = dict(gguf_file=args.gguf_file, add_mask_token=True, chat_template=args.chat_template)
    if args.gguf_file is None:  # the toy tokenizer has its own mask token
        options = dict(mask_token="<|mask|>")
    config = StableMDMConfig(
        output_dir=str(folder),
        model=base,
        shift_logits=shift,
        task="chain_sum",
        task_options=_task_options(args),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_steps=max(1, args.steps // 20),
        logging_steps=max(1, args.steps // 10),
        save_steps=args.steps,
        eval_strategy="steps",
        eval_steps=args.steps,
        eval_heldout=args.n_test,
        disable_tqdm=True,
        seed=seed,
        **options,
    )
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    model, tokenizer = load_checkpoint(folder)
    accuracy = evaluate(model.eval(), tokenizer, _task(args), "test", seed=seed).accuracy
    losses = [r["loss"] for r in result.log_history if "loss" in r]
    heldout = [r["eval_loss"] for r in result.log_history if "eval_loss" in r]
    return {
        "seed": seed,
        "shift_logits": shift,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "heldout_loss": heldout[-1] if heldout else None,
        "accuracy": accuracy,
        "train_seconds": round(seconds, 1),
    }


def _task_options(args: argparse.Namespace) -> dict:
    keys = ("n_train", "n_test", "max_terms", "max_digits")
    return {k: getattr(args, k) for k in keys}


def _task(args: argparse.Namespace):
    return get_task("chain_sum", **_task_options(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the base models and runs")
    parser.add_argument("--model", help="a causal LM folder (default: a fresh tiny Llama)")
    parser.add_argument("--gguf-file", help="the GGUF file inside --model (SmolLM2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--n-train", type=int, default=2000, help="chain_sum training items")
    parser.add_argument("--n-test", type=int, default=50, help="chain_sum test items decoded")
    parser.add_argument("--max-terms", type=int, default=3, help="chain_sum terms")
    parser.add_argument("--max-digits", type=int, default=2, help="chain_sum digits per term")
    parser.add_argument("--chat-template", action="store_true", help="the model's template")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        base = args.model
        if base is None:  # a fresh model per seed: the seed draws the initialisation too
            base = str(Path(args.output) / f"base{seed}")
            save_llama(base, "tiny", seed=seed)
        for shift in (True, False):
            rows.append(run_one(args, base, seed, shift))
            print(json.dumps(rows[-1]), flush=True)
    report = {"args": vars(args), "rows": rows}
    (Path(args.output) / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
