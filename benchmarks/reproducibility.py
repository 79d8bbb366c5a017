"""What decides bit-reproducibility on CPU: the same short training run (tiny preset,
chain_sum, 30 steps, seed 42) in fresh processes that differ in one setting each, compared
loss by loss with a reference run.

    python benchmarks/reproducibility.py        # about a minute on two cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

RUN = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train
config = load_config(None, ["task_options={n_train: 2000, n_test: 10}", "max_steps=30",
    "logging_steps=1", "per_device_train_batch_size=64", "save_steps=30", "disable_tqdm=true",
    "learning_rate=0.002", f"output_dir={sys.argv[2]}"])
print(json.dumps([r["loss"] for r in train(config).log_history if "loss" in r]))
"""
VARIANTS = {  # name: (threads, extra environment)
    "reference (1 thread)": (1, {}),
    "same settings again": (1, {}),
    "2 threads": (2, {}),
    "ATEN_CPU_CAPABILITY=default (scalar kernels)": (1, {"ATEN_CPU_CAPABILITY": "default"}),
    "ATEN_CPU_CAPABILITY=avx2": (1, {"ATEN_CPU_CAPABILITY": "avx2"}),
}


def losses(threads: int, env: dict[str, str], folder: str) -> list[float]:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(threads), folder],
        capture_output=True,
        text=True,
        env=full,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            name: losses(t, env, f"{tmp}/{i}")
            for i, (name, (t, env)) in enumerate(VARIANTS.items())
        }
    reference = runs.pop("reference (1 thread)")
    print(
        "| variant | identical losses | first differing step | loss at step 30 (reference "
        f"{reference[-1]!r}) |\n| --- | --- | --- | --- |"
    )
    for name, run in runs.items():
        diff = next(
            (i + 1 for i, (a, b) in enumerate(zip(reference, run, strict=True)) if a != b), None
        )
        print(f"| {name} | {'yes' if run == reference else 'no'} | {diff or '-'} | {run[-1]!r} |")


if __name__ == "__main__":
    main()
