"""GPU check of the Hugging Face path (issue 8): a ~125M-parameter Llama built from config,
adapted to an MDM (bidirectional attention, unshifted logits), fine-tuned in bf16 with
P-POTS+MIRROR through `stablemdm.training.run.train` for a few hundred steps; reports tokens/s, peak
memory and the decoded accuracy. Sized for one 10-minute command on an H100/H200; needs no
download (`stablemdm.models.toy`: a character-level tokenizer and a seeded Llama).

    python benchmarks/hf_gpu.py --output runs/hf_gpu            # on the GPU machine
    python benchmarks/hf_gpu.py --output runs/hf_gpu_cpu --tiny # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from stablemdm.models.toy import save_llama
from stablemdm.training.config import StableMDMConfig
from stablemdm.training.run import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the base model and the run")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, 4 steps")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    args = parser.parse_args()
    out = Path(args.output)
    size, steps = ("tiny", 4) if args.tiny else ("125m", args.steps)
    n_params = save_llama(out / "base", size)
    config = StableMDMConfig(
        output_dir=str(out / "run"),
        model=str(out / "base"),
        mask_token="<|mask|>",
        task="chain_sum",
        task_options={"n_train": 256 if args.tiny else 20_000, "n_test": 64},
        sampler="ppots",
        masking="mirror",
        max_steps=steps,
        per_device_train_batch_size=8 if args.tiny else 64,
        learning_rate=3e-4,
        warmup_steps=min(30, steps // 10),
        bf16=torch.cuda.is_available(),
        logging_steps=max(1, steps // 10),
        save_steps=steps,
        disable_tqdm=True,
        seed=42,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    logs = [r for r in result.log_history if "tokens_per_s" in r]
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "parameters": n_params,
        "steps": result.global_step,
        "train_seconds": round(seconds, 1),
        "tokens_per_s_last_log": logs[-1]["tokens_per_s"] if logs else None,
        "final_loss": next((r["loss"] for r in reversed(result.log_history) if "loss" in r), None),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        "torch": torch.__version__,
        "threads": os.cpu_count(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
