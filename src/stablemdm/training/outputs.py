"""Where commands write: outputs never clobber inputs, and every file appears whole or not at all.

A command that writes (`eval --output`, `fit-t --output`, the `variance` report folder, a
study's report) refuses an existing file or a non-empty report folder unless `--overwrite`
is given, and refuses, even with `--overwrite`, to write over a file it reads (its config,
data or density) or into a checkpoint folder it reads. Files are written to a temporary
name in the same folder and renamed into place (`atomic_path`), so a crash or a full disk
leaves the earlier file, not half of a new one. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import ConfigError
from .config import StableMDMConfig

UNCHANGED = "nothing was written"


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
    not a folder, and not an existing file unless `overwrite`. Returns it as a Path."""
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
            raise ConfigError(
                f"{flag} {path} is inside {folder}, which this command reads; write elsewhere "
                f"(refused even with --overwrite; {UNCHANGED})"
            )
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file path ({UNCHANGED})")
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


def disk_full(path: Path) -> ConfigError:
    """The one-line error of a full disk while writing `path`, with the way out."""
    return ConfigError(
        f"no space left on the device while writing {path}; free space and run the command "
        f"again (the earlier {path.name}, if any, is unchanged)"
    )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) to write to; renamed onto `path` when the
    block ends without error, removed otherwise. A full disk becomes a `ConfigError`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise disk_full(path) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
