"""A write that fails for want of room, as it really happens: a file-size limit (`ulimit -f`)
and a full file system (a small tmpfs), under which torch and safetensors raise their own
errors (RuntimeError, SafetensorError), not OSError. Training ends with one line naming what
is intact and the way on, and leaves no tmp-checkpoint-N. docs/reliability.md lists these."""

import hashlib
import os
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_trainer import SMALL

from stablemdm.training.checkpoints import checkpoints, leftovers, missing_files
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

ARGS = [*SMALL, "eval_strategy=no", "save_total_limit=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
CLI = [sys.executable, "-m", "stablemdm.cli", "train"]


def _file_size_limit(limit: int):
    """A preexec_fn: files of this process may not grow past `limit` bytes; writes beyond
    fail with EFBIG (SIGXFSZ ignored, as Python itself does, instead of killing it)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _the_one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("stablemdm train: error: "), err
    assert sum(": error: " in line for line in lines) == 1, err
    return lines[-1]


def test_a_file_size_limit_during_a_save_is_one_line_and_leaves_no_tmp_folder(tmp_path):
    """Two real limits in two processes: 50 kB, below the weights (safetensors fails on
    checkpoint-1's model.safetensors), and 150 kB, above the weights and below the optimizer
    state (torch.save fails on checkpoint-4's optimizer.pt) in a run resumed from
    checkpoint-2. Each exits 2 with one line; checkpoint-2 stays intact and continues."""
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    train(load_config(None, [*ARGS, "max_steps=2", "save_steps=2", f"output_dir={resumed}"]))
    before = _hashes(resumed / "checkpoint-2")
    runs = {
        fresh: (50_000, [*ARGS, "max_steps=3", "save_steps=1"]),
        resumed: (150_000, [*ARGS, "max_steps=4", "save_steps=2", "--resume"]),
    }
    procs = {
        run: subprocess.Popen(
            [*CLI, *args, f"output_dir={run}"],
            env=ENV,
            preexec_fn=_file_size_limit(limit),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run, (limit, args) in runs.items()
    }
    errs = {run: proc.communicate(timeout=600)[1] for run, proc in procs.items()}
    assert {run: proc.returncode for run, proc in procs.items()} == {fresh: 2, resumed: 2}
    line = _the_one_line(errs[fresh])
    assert f"file-size limit (ulimit -f) exceeded while writing {fresh / 'checkpoint-1'}" in line, (
        errs[fresh][-3000:]
    )
    assert "no checkpoint was written yet: raise the file-size limit, then run the same" in line
    assert not checkpoints(fresh) and not leftovers(fresh)
    line = _the_one_line(errs[resumed])
    assert f"exceeded while writing {resumed / 'checkpoint-4'}" in line
    assert f"the previous checkpoint, {resumed / 'checkpoint-2'}, is intact" in line
    assert "then run with --resume" in line
    assert [p.name for p in checkpoints(resumed)] == ["checkpoint-2"] and not leftovers(resumed)
    assert _hashes(resumed / "checkpoint-2") == before
    config = load_config(None, [*ARGS, "max_steps=4", "save_steps=2", f"output_dir={resumed}"])
    assert train(config, resume=True).global_step == 4  # the way on works once there is room


def _can_mount_a_tmpfs(folder: Path) -> bool:
    probe = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(folder))}"
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", probe], timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    """A real full file system: a 480 kB tmpfs (in a private mount namespace) holds one
    checkpoint of the tiny model but not two; with save_total_limit=1 the save of
    checkpoint-2 fails (no space left), the run exits 2 with one line naming checkpoint-1,
    which is complete, and no tmp-checkpoint-2 is left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_a_tmpfs(disk):
        pytest.skip("no private mount namespace here (unshare -rm) to mount a small tmpfs")
    run, copy = disk / "run", tmp_path / "copy"
    train_cmd = shlex.join([*CLI, *ARGS, "max_steps=3", "save_steps=1", f"output_dir={run}"])
    script = (
        f"mount -t tmpfs -o size=480k tmpfs {shlex.quote(str(disk))} && {{ {train_cmd}; "
        f"echo $? > {shlex.quote(str(tmp_path / 'rc'))}; cp -a {shlex.quote(str(run))} "
        f"{shlex.quote(str(copy))}; }}"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert (tmp_path / "rc").read_text().strip() == "2", done.stderr[-3000:]
    line = _the_one_line(done.stderr)
    assert f"no space left on the device while writing {run / 'checkpoint-2'}" in line
    assert f"the previous checkpoint, {run / 'checkpoint-1'}, is intact" in line
    assert [p.name for p in checkpoints(copy)] == ["checkpoint-1"] and not leftovers(copy)
    assert missing_files(copy / "checkpoint-1") == []
