"""Where commands write: outputs never clobber inputs, and every file appears whole or not at all.

A command that writes (`eval --output`, `fit-t --output`, the `variance` report folder, a
study's report) refuses an existing file or a non-empty report folder unless `--overwrite`
is given, and refuses, even with `--overwrite`, to write over a file it reads (its config,
data or density), into a checkpoint folder it reads, or over any model, tokenizer or
checkpoint file. Files are written to a temporary name in the same folder and renamed into
place (`atomic_path`), so a crash or a full disk leaves the earlier file, not half of a new
one; `write_failure` recognises a write that failed for want of room, also when torch or
safetensors report it. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import re
import resource
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..data.atomic import replaced_atomically
from ..errors import ConfigError
from .config import StableMDMConfig

UNCHANGED = "nothing was written"

# files holding a model's weights (or a shard index): a folder with one is a saved model
WEIGHTS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.gguf",
    "*.ckpt",
    "*.safetensors.index.json",
)

# files of a saved model, its tokenizer or a checkpoint: no command's output, so never
# replaced, even with --overwrite (an output path naming one is a slip)
PROTECTED = (
    *WEIGHTS,
    "*.model",
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "trainer_state.json",
    "config.yaml",
    "metrics.jsonl",
)


def _protected(path: Path) -> bool:
    """Whether `path` is a model, tokenizer or checkpoint file, or a run's own record (any
    file in a checkpoint folder but evaluation records, a run's density)."""
    if any(fnmatch.fnmatch(path.name, pattern) for pattern in PROTECTED):
        return True
    if re.search(r"checkpoint-\d+$", path.parent.name):
        return not fnmatch.fnmatch(path.name, "eval-*.jsonl")
    return path.name == "ppots.json" and (path.parent / "config.yaml").is_file()


def weight_files(folder: Path) -> list[str]:
    """The names of the files directly in `folder` that hold weights (`WEIGHTS`)."""
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    return [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in WEIGHTS)]


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies (at any depth) inside it."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _present(paths: Iterable[str | Path | None]) -> list[Path]:
    return [Path(p) for p in paths if p]


def check_output_file(
    path: str | Path,
    *,
    overwrite: bool,
    inputs: Iterable[str | Path | None] = (),
    reads: Iterable[str | Path | None] = (),
    allowed_in_reads: str | None = None,
    flag: str = "--output",
) -> Path:
    """`path` checked as an output file: not one of `inputs`, not inside a checkpoint folder
    of `reads` (except a name matching `allowed_in_reads` directly in it: eval's records),
    not a folder, never an existing model, tokenizer or checkpoint file (`_protected`), and
    not an existing file unless `overwrite`. Returns it as a Path."""
    path = Path(path)
    for file in _present(inputs):
        if file.exists() and path.resolve() == file.resolve():
            raise ConfigError(
                f"{flag} {path} is an input of this command; choose another path "
                f"(refused even with --overwrite; {UNCHANGED})"
            )
    for folder in _present(reads):
        own = allowed_in_reads and fnmatch.fnmatch(path.name, allowed_in_reads)
        if _inside(path, folder) and not (own and path.parent.resolve() == folder.resolve()):
            there = (
                f", or name it {allowed_in_reads} directly in {folder} (the only files this "
                "command writes into a folder it reads)"
                if allowed_in_reads
                else ""
            )
            raise ConfigError(
                f"{flag} {path} is inside {folder}, which this command reads; write elsewhere"
                f"{there} (refused even with --overwrite; {UNCHANGED})"
            )
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file path ({UNCHANGED})")
    if path.is_file() and _protected(path):
        raise ConfigError(
            f"{flag} {path} is a model, tokenizer or checkpoint file, which no command's output "
            f"replaces; choose another path (refused even with --overwrite; {UNCHANGED})"
        )
    if path.exists() and not overwrite:
        raise ConfigError(
            f"{flag} {path} already exists; pass --overwrite to replace it, or choose another "
            f"path ({UNCHANGED})"
        )
    return path


def check_output_folder(
    folder: str | Path,
    *,
    overwrite: bool,
    reads: Iterable[str | Path | None] = (),
    flag: str = "--output",
) -> Path:
    """`folder` checked as a report folder: not inside a folder of `reads` (even with
    `overwrite`), not a file, and empty or absent unless `overwrite`."""
    folder = Path(folder)
    for read in _present(reads):
        if _inside(folder, read):
            raise ConfigError(
                f"{flag} {folder} is inside {read}, which this command reads; write elsewhere "
                f"(refused even with --overwrite; {UNCHANGED})"
            )
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file, not a folder ({UNCHANGED})")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ConfigError(
            f"{flag} {folder} already holds files (an earlier report?); pass --overwrite to "
            f"replace the report there, or choose another folder ({UNCHANGED})"
        )
    return folder


def config_inputs(
    config: StableMDMConfig, path: str | Path | None = None
) -> tuple[list[Path], list[Path]]:
    """(files, folders) a command built from `config` (read from `path`) reads: the recipe,
    the density, data files named in task_options, and model or checkpoint folders."""
    named = [path, config.ppots_file, config.gguf_file, config.init_from, config.model]
    named += [config.tokenizer_name]
    named += [v for v in config.task_options.values() if isinstance(v, str)]
    existing = [Path(p) for p in named if p and Path(p).exists()]
    return [p for p in existing if p.is_file()], [p for p in existing if p.is_dir()]


# what a failed write ran into, by errno
_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file-size limit (ulimit -f) exceeded",
}
# how torch's and safetensors' writers report an I/O failure (without an errno, for torch)
_SERIALIZER_IO = re.compile(
    r"PytorchStreamWriter|file write failed|inline_container|iostream error|I/O error"
)
_OS_ERROR = re.compile(r"os error (\d+)")


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from or during."""
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _diagnose(folder: Path | None) -> str:
    """The likely cause of a write failure that names none (torch's writer): a file-size
    limit, else a disk with little space left, else an I/O error."""
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return _CAUSES[errno.EFBIG]
    try:
        if folder is not None and shutil.disk_usage(folder).free < 64 * 2**20:
            return _CAUSES[errno.ENOSPC]
    except OSError:
        pass
    return "I/O error (is the disk full?)"


def make_room(cause: str) -> str:
    """The remedy for a failed write's `cause`."""
    return "raise the file-size limit" if cause == _CAUSES[errno.EFBIG] else "free space"


def write_failure(err: BaseException, folder: str | Path | None = None) -> str | None:
    """What a write that raised `err` ran into (a full disk, a quota, a file-size limit, an
    I/O error), or None when `err` is no write failure. torch and safetensors raise their own
    errors (RuntimeError, SafetensorError) for these, not OSError; `folder` is where the
    write went, to check for free space when the error names no cause."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _CAUSES:
            return _CAUSES[e.errno]
        if isinstance(e, OSError) or not _SERIALIZER_IO.search(str(e)):
            continue
        code = _OS_ERROR.search(str(e))
        if code and int(code.group(1)) in _CAUSES:
            return _CAUSES[int(code.group(1))]
        return _diagnose(Path(folder) if folder else None)
    return None


def disk_full(path: Path, cause: str = _CAUSES[errno.ENOSPC]) -> ConfigError:
    """The one-line error of a failed write of `path` (a full disk...), with the way out."""
    return ConfigError(
        f"{cause} while writing {path}; {make_room(cause)} and run the command again (the "
        f"earlier {path.name}, if any, is unchanged)"
    )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) to write to; renamed onto `path`, with the
    mode the umask gives, when the block ends without error, removed otherwise
    (`data.atomic.replaced_atomically`). A full disk (or a file-size limit) becomes a
    `ConfigError`."""
    path = Path(path)
    try:
        with replaced_atomically(path) as tmp:
            yield tmp
    except Exception as err:
        cause = write_failure(err, path.parent)
        if cause is not None:
            raise disk_full(path, cause) from err
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
