"""Finite weights only: a checkpoint or final model holding NaN or infinity is never used.

`--resume` refuses a checkpoint whose saved weights are not finite (naming it and the first
bad tensor), and so does every command that loads a saved model (`saved.load_checkpoint`:
`eval`, `generate`, `variance`, `init_from`, a study's decoding); no checkpoint is written
while the weights are not finite, and a run whose weights end non-finite does not publish
them as its final model. See docs/reliability.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoints import MODEL_FILES, checkpoints


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding `folder`'s weights (single, sharded or a LoRA adapter)."""
    single, index, adapter = (folder / name for name in MODEL_FILES)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [folder / shard for shard in shards]
    return [path for path in (single, adapter) if path.is_file()]


def nonfinite_tensor(folder: Path) -> str | None:
    """'FILE: TENSOR' for the first saved weight tensor of `folder` holding NaN or infinity,
    or None when every one is finite."""
    for path in _weight_files(Path(folder)):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return f"{path.name}: {name}"
    return None


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter of `model` holding NaN or infinity (this process's
    part of it, when sharded), or None."""
    for name, param in model.named_parameters():
        if param.numel() and param.is_floating_point() and not torch.isfinite(param).all():
            return name
    return None


def weights_finite(trainer) -> bool:
    """Whether the parameters of `trainer`'s model are finite on every process (the same
    answer on each)."""
    bad = nonfinite_parameter(trainer.model) is not None
    flag = torch.tensor(float(bad), device=trainer.args.device)
    if trainer.args.world_size > 1:
        flag = trainer.accelerator.reduce(flag, reduction="sum")
    return not bool(flag)


def last_finite_checkpoint(run_dir: Path) -> Path | None:
    """The latest `checkpoint-N` of `run_dir` whose weights are all finite."""
    for path in checkpoints(run_dir):
        try:
            if nonfinite_tensor(path) is None:
                return path
        except Exception:  # an unreadable checkpoint is not a finite one
            continue
    return None


def way_on(run_dir: Path, trust_remote_code: bool = False) -> str:
    """What is intact after non-finite weights or steps, and how to continue (a run whose
    model runs its own code continues only with --trust-remote-code: `remote_code`)."""
    last = last_finite_checkpoint(run_dir)
    if last is None:
        return (
            f"no finite checkpoint was written; start again in {run_dir} with a lower learning_rate"
        )
    flag = " --trust-remote-code" if trust_remote_code else ""
    return (
        f"the last finite checkpoint, {last}, is intact; continue it with a lower learning_rate: "
        f"stablemdm train --config {run_dir / 'config.yaml'} learning_rate=<lower> --resume {last}"
        f"{flag}"
    )


def check_final_weights(trainer) -> None:
    """Refuse (FloatingPointError, one line) to publish a final model whose weights are not
    finite."""
    if weights_finite(trainer):
        return
    bad = nonfinite_parameter(trainer.model) or "a parameter on another process"
    run_dir = Path(trainer.args.output_dir)
    raise FloatingPointError(
        f"the weights after step {trainer.state.global_step} are not finite ({bad} holds NaN or "
        f"infinity), so no final model was written to {run_dir}; "
        f"{way_on(run_dir, trainer.args.trust_remote_code)} "
        "(docs/reliability.md)"
    )
