"""A write that fails for want of room, as it really happens: a file-size limit (`ulimit -f`)
and a full file system (a small tmpfs), under which torch and safetensors raise their own
errors (RuntimeError, SafetensorError), not OSError, and an output_dir made read-only.
Training ends with one line naming what is intact and the way on, and leaves no
tmp-checkpoint-N. Written files get the mode the umask gives, whatever wrote them.
docs/reliability.md lists these."""

import hashlib
import os
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_trainer import SMALL
from test_variance_hf import DESIGN

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


# A run whose output_dir turns read-only after step 3: root, who may write anywhere, also
# drops to the `nobody` user then (the folder's files stay root's).
READ_ONLY_AFTER_STEP_3 = """
import os, sys
from transformers import TrainerCallback
import stablemdm.training.run as run

class ReadOnly(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.chmod(args.output_dir, 0o555)
            if os.geteuid() == 0:
                os.seteuid(65534)

train = run.train
run.train = lambda config, resume=False, callbacks=None: train(config, resume, [ReadOnly()])
from stablemdm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_folder_made_read_only_mid_run_names_the_checkpoint_not_the_lock(tmp_path):
    """output_dir becomes read-only after step 3: saving checkpoint-4 fails, and the one line
    names that write and checkpoint-2, not the lock file the run could not remove on its way
    out; once the folder is writable again, --resume takes the lock over and finishes."""
    base = Path(tempfile.mkdtemp(prefix="stablemdm-read-only-"))  # not under pytest's 0o700
    os.chmod(base, 0o755)
    run = base / "run"
    args = [*ARGS, "max_steps=6", "save_steps=2", "logging_steps=10", f"output_dir={run}"]
    try:
        done = subprocess.run(
            [sys.executable, "-c", READ_ONLY_AFTER_STEP_3, "train", *args],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 2, done.stderr[-3000:]
        line = _the_one_line(done.stderr)
        assert f"cannot write {run / 'checkpoint-4'}: Permission denied" in line
        assert f"the previous checkpoint, {run / 'checkpoint-2'}, is intact: make {run} " in line
        assert "stablemdm.lock" not in line
        assert [p.name for p in checkpoints(run)] == ["checkpoint-2"] and not leftovers(run)
        os.chmod(run, 0o755)
        assert train(load_config(None, args), resume=True).global_step == 6
    finally:
        os.chmod(run, 0o755)
        shutil.rmtree(base)


def _modes(*paths: Path) -> dict[str, int]:
    """Every file under `paths` (or each path, for a file) with its permission bits."""
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return {str(f): stat.S_IMODE(f.stat().st_mode) for f in files}


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_outputs_follow_the_umask(tmp_path, umask, capsys):
    """Under umask 022 (or 027) every file of a trained run (checkpoints and final model,
    model.safetensors and trainer_state.json included), an eval record, a density, a
    variance report and a sample grid gets mode 644 (or 640), as a file open() makes:
    colleagues reading the folder can read the run."""
    from stablemdm.cli import main
    from stablemdm.evaluation.image_scoring import save_grid

    run, density, report = tmp_path / "run", tmp_path / "density.json", tmp_path / "variance"
    before = os.umask(umask)
    try:
        train(load_config(None, [*ARGS, "max_steps=2", "save_steps=1", f"output_dir={run}"]))
        assert main(["eval", str(run), "--limit", "2"]) == 0
        small = ["ppots_sequences=2", "ppots_rates=4", "ppots_masks=2"]
        assert main(["fit-t", *SMALL, *small, "--output", str(density)]) == 0
        assert main(["variance", *SMALL, *small, *DESIGN, f"--output={report}"]) == 0
        grid = save_grid(np.zeros((2, 4, 4)), np.array([0, 1]), ["a", "b"], tmp_path / "g.png")
    finally:
        os.umask(before)
    modes = _modes(run, density, report, grid)
    assert {run / "model.safetensors", run / "checkpoint-2" / "model.safetensors"} <= set(
        map(Path, modes)
    )
    assert {str(run / "eval-chain_sum-test.jsonl"), str(report / "variance.json")} <= set(modes)
    assert {f: m for f, m in modes.items() if m != 0o666 & ~umask} == {}
