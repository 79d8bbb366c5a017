"""Who may run a model's own code (the `auto_map` of a Hugging Face folder): the person
running the command, never a folder they received.

`--trust-remote-code` on the command line, or `trust_remote_code=true` typed there, always
allows it; `trust_remote_code: true` in a recipe the user wrote allows it too, and the run
log names the code. A run's saved config (`config.yaml` in a run or checkpoint folder, or
any copy of it) never does: a received folder could name any code. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ConfigError
from ..models.hub import cached_folder, is_local
from .checkpoints import METRICS, MODEL_FILES, step_of
from .config import StableMDMConfig
from .finished import FINISHED
from .lock import LOCK
from .recipe import SAVED_MARK, parse_override
from .saved import MODEL_CONFIG, custom_code

# what marks a folder as a run's, a checkpoint's, a study's or a saved model's
RUN_FILES = (METRICS, FINISHED, LOCK, MODEL_CONFIG, "adapter_config.json", "report.json")


def add_trust_remote_code(parser: argparse.ArgumentParser) -> None:
    """`--trust-remote-code`, for every verb that loads a model."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the code a Hugging Face model ships (its auto_map); only for a model you "
        "trust: a trust_remote_code in a run folder's own files is never used",
    )


def is_run_config(path: str | Path) -> bool:
    """Whether the YAML file `path` is a run's saved config, not a recipe the user wrote: it
    starts with the line stablemdm writes (`recipe.SAVED_MARK`), or it lies in a folder that
    holds a run, a checkpoint, a study or a saved model."""
    path = Path(path)
    folder = path.resolve().parent
    with open(path, encoding="utf-8", errors="replace") as f:
        if f.readline().startswith(SAVED_MARK):
            return True
    if step_of(folder) is not None or any(folder.glob("checkpoint-*")):
        return True
    return any((folder / name).exists() for name in (*RUN_FILES, *MODEL_FILES))


def model_code(config: StableMDMConfig) -> dict[str, list[str] | None]:
    """The code modules the config's model and tokenizer folders name (`saved.custom_code`),
    by model name; None for a name not on this machine (no folder, not in the local Hugging
    Face cache) that may be downloaded: its code cannot be seen."""
    code: dict[str, list[str] | None] = {}
    for name in filter(None, (config.model, config.tokenizer_name)):
        folder = Path(name) if Path(name).is_dir() else None
        if folder is None and not is_local(name):
            folder = cached_folder(name)
        if folder is not None:
            code[name] = custom_code(folder)
        elif config.allow_downloads:
            code[name] = None
    return code


def allow_remote_code(
    config: StableMDMConfig, path: str | Path | None, overrides: list[str], flag: bool
) -> None:
    """Set `config.trust_remote_code` as the command allows: `flag` (`--trust-remote-code`)
    or a `trust_remote_code` override typed on the command line (`train.trust_remote_code`
    for a study) always do; a recipe's value stands, unless `path` is a run's saved config
    (`is_run_config`) and the model ships code: then a ConfigError naming the code, before
    anything is loaded. The run log (stderr) names the code a run will import."""
    config.trust_remote_code = config.trust_remote_code or flag
    if not config.trust_remote_code:
        return
    code = {n: m for n, m in model_code(config).items() if m is None or m}
    if not code:
        return  # the model ships no code: there is nothing to allow
    name, modules = next(iter(code.items()))
    what = f"{name} ships its own code ({modules[0]})" if modules else f"{name} may ship code"
    keys = [parse_override(o)[0].rsplit(".", 1)[-1] for o in overrides]
    typed = flag or "trust_remote_code" in keys
    if not typed and path is not None and is_run_config(path):
        raise ConfigError(
            f"{what}, which runs only with --trust-remote-code on the command line: pass it if "
            f"you trust where {Path(path).parent} came from (nothing was run; the "
            f"trust_remote_code: true in {path}, a run's saved config, is not used)"
        )
    if os.environ.get("RANK", "0") == "0":
        source = "the command line" if typed else path
        shown = "; ".join("; ".join(m) if m else f"whatever {n} ships" for n, m in code.items())
        print(
            f"stablemdm: trust_remote_code (from {source}): this run imports {shown}",
            file=sys.stderr,
        )
