"""One run per output folder: a lock file naming its holder, taken over after a crash.

`output_lock(folder)` holds `folder/stablemdm.lock` for a block: the file names the holder's
pid, host and start time and is locked with `flock` while the holder lives, so the kernel
releases it when the holder dies however it dies (SIGKILL, OOM, a lost node). A second run
in the folder is refused with one line naming the holder. A lock file nobody holds (its run
crashed) is taken over, said on stderr; one naming another host is refused instead, because
a run on another machine may be alive without this machine seeing its lock, and the line
says how to remove it. The holder deletes the file when it ends; where it cannot (the folder
became read-only) the file stays for the next run to take over, and the run's own error is the
one reported. See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

LOCK = "stablemdm.lock"


def _holder(fd: int) -> dict:
    """What the lock file open as `fd` says of its holder ({} when empty or unreadable)."""
    try:
        data = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
        f"{holder.get('started', '?')}"
    )


def _alive(pid: object) -> bool:
    """Whether process `pid` exists on this host (used where flock is unavailable)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _held_elsewhere(fd: int) -> bool:
    """Whether another process holds the lock on `fd` (flock; where the file system has no
    flock, whether the pid the file names is alive on this host)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        holder = _holder(fd)
        return holder.get("host") == socket.gethostname() and _alive(holder.get("pid"))
    return False


def _open(path: Path, what: str) -> int:
    """Open (creating) the lock file, or a one-line error when the folder is not writable."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(f"{what} {path.parent} is not writable: {err.strerror}") from err


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a holder ending deletes it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def acquire(path: Path, what: str = "output_dir") -> int:
    """Take the lock file `path`; returns its open descriptor. Refuses (ConfigError) when
    another process holds it or it names a run on another host."""
    while True:
        fd = _open(path, what)
        if _held_elsewhere(fd):
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(
                f"{what} {path.parent} is in use by another run ({_describe(holder)}); wait for "
                f"it to end, or choose another {what} (nothing there was changed)"
            )
        if _same_file(fd, path):
            break
        os.close(fd)  # deleted by its holder as we opened it: try a fresh one
    holder = _holder(fd)
    if holder.get("host") not in (None, socket.gethostname()):
        os.close(fd)
        raise ConfigError(
            f"{what} {path.parent} is locked by a run on another host ({_describe(holder)}); "
            f"if no run uses that folder any more, delete {path} and run again (nothing there "
            "was changed)"
        )
    if holder:
        print(
            f"stablemdm: {path} was left by a run that is no longer running ({_describe(holder)});"
            " taking it over",
            file=sys.stderr,
        )
    mine = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(mine).encode(), 0)
    os.fsync(fd)
    return fd


@contextlib.contextmanager
def claim(path: str | Path, wait: bool) -> Iterator[bool]:
    """Hold an exclusive flock on the file `path` for the block, so that two processes never
    do the same work at once; yields True when held, False when another process holds it
    and `wait` is off (with `wait` on, blocks until that process lets go or dies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def release(path: Path, fd: int) -> None:
    """Delete the lock file, then let go of it. A file that cannot be deleted (the folder
    became read-only) stays, never hiding the error a failed run ends with: the lock itself
    goes with the descriptor, so the next run takes the file over."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)


def _missing_parents(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def output_lock(folder: str | Path, what: str = "output_dir", held: bool = True) -> Iterator[Path]:
    """Create `folder` and hold its lock for the block (`held=False`: only create it, for
    the processes of a multi-process run other than the main one). Folders created here that
    are still empty afterwards (a refused run) are removed again."""
    folder = Path(folder)
    created = _missing_parents(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{what} {folder} is not writable: {err.strerror}") from err
    fd = acquire(folder / LOCK, what) if held else None
    try:
        yield folder
    finally:
        if fd is not None:
            release(folder / LOCK, fd)
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty
