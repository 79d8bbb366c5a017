"""Files written whole or not at all, with the mode the umask gives.

`replaced_atomically(path)` is a temporary path beside `path`, renamed onto it when the block
ends without error and removed otherwise, so a crash or a full disk leaves the earlier file,
never half of a new one. A temporary file is private (mkstemp's 0o600), so before the rename
it gets the mode `open()` would have given (`new_file_mode`: the replaced file's, else 0o666
less the umask): colleagues who may read the folder may read the run. `follow_umask` gives
that mode to files a library wrote private: safetensors >= 0.8 writes every file through a
0o600 temporary one (safetensors issue 782). See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def new_file_mode(path: str | Path | None = None) -> int:
    """The permission bits `open(path, "w")` gives: those of the existing file `path`, else
    0o666 less the process umask."""
    if path is not None and Path(path).is_file():
        return stat.S_IMODE(os.stat(path).st_mode)
    mask = os.umask(0o077)  # reading the umask sets it: set a strict one, restore at once
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(paths: Iterable[str | Path]) -> None:
    """Give each of `paths` the mode a new file gets under the umask (0o666 less it)."""
    mode = new_file_mode()
    for path in paths:
        os.chmod(path, mode)


@contextlib.contextmanager
def replaced_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) to write to: given the mode `open()`
    would give `path` and renamed onto it when the block ends without error, removed
    otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, new_file_mode(path))  # after the block: a writer may replace the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
