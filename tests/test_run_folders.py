"""A run folder is changed only by its own run: a finished run is recognised and left as it
is (`--resume` trains no step past the end), and a second run in the same output_dir is
refused while the first lives, its lock taken over once it is dead. docs/reliability.md
lists these guarantees."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trainer import SMALL
from transformers import TrainerCallback

from stablemdm.cli import main
from stablemdm.errors import ConfigError
from stablemdm.training.checkpoints import checkpoints
from stablemdm.training.lock import LOCK, acquire, release
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = [*SMALL, "eval_strategy=no"]


def _config(folder: Path, *extra: str):
    return load_config(None, [*ARGS, f"output_dir={folder}", *extra])


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _steps(folder: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


class _DieAtTheEnd(TrainerCallback):
    """Kills the run (an exception out of train) once training ended, after its last
    checkpoint and before its final model is written."""

    def on_train_end(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("killed before the final model was written")


def test_a_finished_run_is_left_as_it_is(tmp_path, capsys):
    """A 4-step run with save_total_limit=1 and one checkpoint: a plain re-run is refused
    with a line saying it finished (not advising --resume); --resume (library and CLI, exit
    0) trains nothing and changes no file; raising max_steps continues it."""
    run = tmp_path / "run"
    steps = ["max_steps=4", "save_steps=4", "save_total_limit=1"]
    train(_config(run, *steps))
    before = snapshot(run)
    with pytest.raises(ConfigError) as err:
        train(_config(run, *steps))
    assert f"{run} holds a run that finished at step 4" in str(err.value)
    assert "raise max_steps above 4 and pass --resume" in str(err.value)
    capsys.readouterr()
    result = train(_config(run, *steps), resume=True)
    assert result.global_step == 4 and not result.trained
    assert "holds a run that finished at step 4: nothing to train, nothing was changed" in (
        capsys.readouterr().err
    )
    cli = ["train", *ARGS, *steps, f"output_dir={run}", "--resume"]
    assert main(cli) == 0
    assert "already trained to step 4" in capsys.readouterr().out
    assert main([*cli[:-1], "--resume", str(run / "checkpoint-4")]) == 0
    assert snapshot(run) == before
    train(_config(run, "max_steps=6", "save_steps=2", "save_total_limit=1"), resume=True)
    assert _steps(run)[-2:] == [6, 6] and [p.name for p in checkpoints(run)] == ["checkpoint-6"]


def test_a_run_killed_after_its_last_checkpoint_publishes_it_without_training(tmp_path, capsys):
    """Killed after checkpoint-4 (= max_steps) but before its final model: --resume makes
    the checkpoint's model the final one (the uninterrupted run's weights), trains no step 5,
    and leaves the checkpoint and metrics.jsonl unchanged; then the run is finished."""
    steps = ["max_steps=4", "save_steps=2", "save_total_limit=1"]
    train(_config(tmp_path / "full", *steps))
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_config(run, *steps), callbacks=[_DieAtTheEnd()])
    assert not (run / "model.safetensors").exists()
    checkpoint, metrics = snapshot(run / "checkpoint-4"), (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    result = train(_config(run, *steps), resume=True)
    assert "checkpoint-4 is at the end of the run: its model is now the final one" in (
        capsys.readouterr().err
    )
    assert result.global_step == 4 and not result.trained
    assert snapshot(run / "checkpoint-4") == checkpoint
    assert (run / "metrics.jsonl").read_text() == metrics
    full = snapshot(tmp_path / "full")
    assert snapshot(run)["model.safetensors"] == full["model.safetensors"]
    assert snapshot(run)["tokenizer.json"] == full["tokenizer.json"]
    before = snapshot(run)
    train(_config(run, *steps), resume=True)
    assert snapshot(run) == before


def test_a_finished_run_by_epochs_is_recognised(tmp_path):
    """One epoch of 3 steps: --resume changes nothing; two epochs continue it to step 6."""
    run = tmp_path / "run"
    data = ["max_steps=-1", "task_options={n_train: 24, n_test: 4}", "save_steps=3"]
    train(_config(run, *data, "num_train_epochs=1"))
    before = snapshot(run)
    assert not train(_config(run, *data, "num_train_epochs=1"), resume=True).trained
    assert snapshot(run) == before
    train(_config(run, *data, "num_train_epochs=2"), resume=True)
    assert max(_steps(run)) == 6


# --- one run per output folder ---------------------------------------------------------------


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "stablemdm.cli", "train", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _wait_for_a_checkpoint(proc: subprocess.Popen, run: Path, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not checkpoints(run):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the first run never wrote a checkpoint"
        time.sleep(0.05)


def test_a_second_run_in_a_folder_is_refused_until_the_first_is_dead(tmp_path, capsys):
    """A real training process holds output_dir: a second run there (plain, --resume, other
    settings) is refused with one line naming the holder's pid and host, and changes
    nothing; once the holder is killed (SIGKILL), --resume takes its stale lock over."""
    run, log = tmp_path / "run", tmp_path / "first.txt"
    first = _start([*ARGS, "max_steps=100000", "save_steps=3", f"output_dir={run}"], log)
    try:
        _wait_for_a_checkpoint(first, run, log)
        holder = json.loads((run / LOCK).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        config = (run / "config.yaml").read_text()
        capsys.readouterr()
        for extra in ([], ["--resume"], ["seed=5"]):
            assert main(["train", *ARGS, "max_steps=9", f"output_dir={run}", *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and "Traceback" not in err
            assert f"output_dir {run} is in use by another run (pid {first.pid} on host " in err
            assert (run / "config.yaml").read_text() == config
            assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((run / LOCK).read_text())["pid"] == first.pid  # left behind
    step = max(int(p.name.split("-")[1]) for p in checkpoints(run))
    capsys.readouterr()
    assert main(["train", *ARGS, f"max_steps={step + 1}", f"output_dir={run}", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"was left by a run that is no longer running (pid {first.pid} on host" in err
    assert not (run / LOCK).exists()  # released at the end
    assert max(_steps(run)) == step + 1


def test_a_lock_of_another_host_is_refused_with_the_way_out(tmp_path, capsys):
    """A lock file naming a run on another machine (whose lock this host cannot see) is not
    taken over; a refused first run leaves no folder behind."""
    run = tmp_path / "run"
    run.mkdir()
    holder = {"pid": 1, "host": "elsewhere", "started": "2025-01-01 00:00:00 +0000"}
    (run / LOCK).write_text(json.dumps(holder))
    assert main(["train", *ARGS, "max_steps=2", f"output_dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "locked by a run on another host (pid 1 on host elsewhere" in err
    assert f"delete {run / LOCK} and run again" in err and "\n" not in err
    assert sorted(p.name for p in run.iterdir()) == [LOCK]
    fresh = tmp_path / "a" / "b"
    assert main(["train", *ARGS, "max_steps=0", f"output_dir={fresh}", "--resume"]) == 2
    assert main(["train", *ARGS, "max_steps=2", f"output_dir={fresh}", "--resume"]) == 2
    assert "no checkpoint-* folder" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_a_study_folder_in_use_is_refused(tmp_path, capsys):
    """A study's output_dir held by another holder (a real flock, taken here through another
    open file): `study` there exits 2 with one line, before any run folder is made."""
    out = tmp_path / "study"
    out.mkdir()
    fd = acquire(out / LOCK)
    try:
        assert main(["study", "--config", "demo", f"output_dir={out}", "seeds=[1]"]) == 2
    finally:
        release(out / LOCK, fd)
    err = capsys.readouterr().err.strip()
    assert f"study output_dir {out} is in use by another run (pid {os.getpid()}" in err
    assert "\n" not in err and list(out.iterdir()) == []


# --- a model a run reads, or a checkpoint, is never its output_dir ---------------------------


def _refused(args: list[str], capsys) -> str:
    """The one error line `stablemdm train ARGS` is refused with (exit 2, no traceback; a
    warning about the overrides may come before it)."""
    capsys.readouterr()
    assert main(["train", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [x for x in lines if "error:" in x] == lines[-1:] and "Traceback" not in str(lines)
    return lines[-1]


def test_a_checkpoint_or_a_model_being_read_is_never_an_output_dir(tmp_path, capsys):
    """output_dir naming a checkpoint of a run (directly, through a symlink, or a folder
    inside it), the folder model= or init_from= names, or a folder holding weights of any
    kind is refused in one line, with --resume too where it would write there; every file
    stays byte-identical and the run goes on with --resume."""
    from stablemdm.models.toy import save_llama

    run, hf, weights, link = (tmp_path / n for n in ("run", "hf", "weights", "link"))
    train(_config(run, "max_steps=4", "save_steps=2"))
    save_llama(hf)
    weights.mkdir()
    (weights / "pytorch_model.bin").write_bytes(b"weights of a model trained elsewhere")
    (weights / "config.json").write_text("{}")
    link.symlink_to(run / "checkpoint-4")
    before = {f: snapshot(f) for f in (run, hf, weights)}
    checkpoint = f"is checkpoint-4 of the run in {run}"
    cases = [
        ([f"output_dir={run / 'checkpoint-4'}"], checkpoint),
        ([f"output_dir={run / 'checkpoint-4'}", "max_steps=6", "--resume"], checkpoint),
        ([f"output_dir={link}"], f"output_dir {link} (a link to {run / 'checkpoint-4'}) "),
        ([f"output_dir={link}", "--resume", str(run / "checkpoint-2")], checkpoint),
        ([f"output_dir={run / 'checkpoint-4' / 'new'}"], "lies inside checkpoint-4 of the run"),
        ([f"init_from={run}", f"output_dir={run}"], f"is the folder init_from={run} names"),
        ([f"model={hf}", "add_mask_token=true", f"output_dir={hf}"], f"model={hf} names"),
        ([f"model={hf}", "add_mask_token=true", f"output_dir={hf}", "--resume"], "model="),
        ([f"output_dir={weights}"], "holds a saved model (pytorch_model.bin)"),
    ]
    for extra, message in cases:
        assert message in _refused([*ARGS, "max_steps=4", "save_steps=2", *extra], capsys)
        assert {f: snapshot(f) for f in (run, hf, weights)} == before, extra
    assert link.is_symlink()
    train(_config(run, "max_steps=6", "save_steps=2"), resume=True)
    assert max(_steps(run)) == 6 and (run / "checkpoint-6").is_dir()


def test_an_eval_output_inside_the_run_says_what_may_be_written_there(tmp_path, capsys):
    """`eval --output` inside the checkpoint folder it reads is refused naming the one kind
    of file allowed there (eval-*.jsonl directly in it); such a file is written."""
    run = tmp_path / "run"
    train(_config(run, "max_steps=2", "save_steps=2"))
    checkpoint = run / "checkpoint-2"
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--limit", "2", "--output", f"{checkpoint}/x.txt"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"is inside {checkpoint}, which this command reads" in err and "\n" not in err
    assert f"or name it eval-*.jsonl directly in {checkpoint}" in err
    own = checkpoint / "eval-mine.jsonl"
    assert main(["eval", str(checkpoint), "--limit", "2", "--output", str(own)]) == 0
    assert len(own.read_text().splitlines()) == 2
