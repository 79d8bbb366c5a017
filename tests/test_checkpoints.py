"""Checkpoints are written whole or not at all (tmp-checkpoint-N renamed when complete), old
ones are rotated away only after that, `--resume` takes the latest complete one and says what
it skipped, a named incomplete one is refused with the way back, a run killed with SIGKILL at
random moments (inside checkpoint writes too) resumes to the uninterrupted run's weights bit
for bit with each step logged once, and a run that died before its first checkpoint is simply
run again. docs/reliability.md lists these guarantees."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import SMALL
from transformers import TrainerCallback

from stablemdm.errors import ConfigError
from stablemdm.training.checkpoints import (
    checkpoints,
    latest_complete,
    leftovers,
    missing_files,
    publish,
    restart_metrics,
    rotate,
)
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(folder: Path, *extra: str):
    return load_config(None, [*SMALL, "eval_strategy=no", f"output_dir={folder}", *extra])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loss_records(folder: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training log line of metrics.jsonl, in file order."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


class _Stop(TrainerCallback):
    """Ends the process's training (an exception out of train) after step `at`."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


class _EndsUnfinished(TrainerCallback):
    """Ends the process (an exception out of train) after its last checkpoint, before the
    final model: a run not finished, whose checkpoints --resume then reads."""

    def on_train_end(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("killed before the final model")


def test_a_save_interrupted_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """With save_total_limit=1, a save that dies while writing the project's own files (the
    sampler state, after the engine's) leaves checkpoint-2 complete and a tmp-checkpoint-3
    that --resume skips, naming it; the resumed run ends where the uninterrupted one does."""
    steps = ["max_steps=5", "save_steps=1", "save_total_limit=1"]
    train(_config(tmp_path / "full", *steps))
    real_save = torch.save

    def dies_in_checkpoint_3(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("tmp-checkpoint-3", "sampler_state.pt")):
            raise KeyboardInterrupt("killed while writing checkpoint-3")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_in_checkpoint_3)
    run = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_config(run, *steps))
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in checkpoints(run)] == ["checkpoint-2"]
    assert missing_files(run / "checkpoint-2") == []
    assert [p.name for p in leftovers(run)] == ["tmp-checkpoint-3"]
    assert (run / "tmp-checkpoint-3" / "optimizer.pt").is_file()
    capsys.readouterr()
    train(_config(run, *steps), resume=True)
    err = capsys.readouterr().err
    assert "skips tmp-checkpoint-3 (left by an interrupted save)" in err
    assert f"resuming from {run / 'checkpoint-2'}" in err
    assert "dropped 1 record(s) written after the checkpoint of step 2" in err
    assert [p.name for p in checkpoints(run)] == ["checkpoint-5"] and not leftovers(run)
    assert _same(_weights(run), _weights(tmp_path / "full"))
    assert _same(_weights(run / "checkpoint-5"), _weights(tmp_path / "full" / "checkpoint-5"))
    assert _loss_records(run) == _loss_records(tmp_path / "full")


def test_resume_skips_incomplete_checkpoints_and_refuses_a_named_one(tmp_path, capsys):
    """A checkpoint missing any file it needs to resume exactly is skipped by --resume (with
    the reason) and refused when named, with the previous complete checkpoint as the way."""
    run = tmp_path / "run"
    steps = ["max_steps=4", "save_steps=2"]
    with pytest.raises(KeyboardInterrupt):
        train(_config(run, *steps), callbacks=[_EndsUnfinished()])
    last = run / "checkpoint-4"
    uninterrupted = _weights(last)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "sampler_state.pt"):
        (last / name).rename(tmp_path / name)
        with pytest.raises(ConfigError) as err:
            train(_config(run, *steps), resume=str(last))
        assert f"{last} is not a complete checkpoint (missing {name})" in str(err.value)
        assert f"the previous complete checkpoint is {run / 'checkpoint-2'}" in str(err.value)
        (tmp_path / name).rename(last / name)
    (last / "optimizer.pt").unlink()
    (run / "tmp-checkpoint-6").mkdir()
    (run / "tmp-checkpoint-6" / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    train(_config(run, *steps), resume=True)
    err = capsys.readouterr().err
    assert (
        "skips tmp-checkpoint-6 (left by an interrupted save); checkpoint-4 (missing "
        f"optimizer.pt); resuming from {run / 'checkpoint-2'}"
    ) in err
    assert missing_files(last) == [] and not leftovers(run)
    assert _same(_weights(run), uninterrupted)
    assert [s for s, _ in _loss_records(run)] == [1, 2, 3, 4]


def test_no_complete_checkpoint_is_refused_and_named(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_config(run, "max_steps=2", "save_steps=2"), callbacks=[_EndsUnfinished()])
    (run / "checkpoint-2" / "scheduler.pt").unlink()
    with pytest.raises(ConfigError, match="no complete checkpoint .*missing scheduler.pt"):
        train(_config(run, "max_steps=2", "save_steps=2"), resume=True)
    with pytest.raises(ConfigError, match="there is no complete checkpoint before it"):
        train(_config(run, "max_steps=2"), resume=str(run / "checkpoint-2"))


def test_a_run_that_died_before_its_first_checkpoint_is_run_again_in_place(tmp_path, capsys):
    """Its folder (config.yaml, metrics.jsonl, no checkpoint) is reused by a plain re-run,
    which says so; a folder with a complete checkpoint or a finished run is still refused."""
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_config(run, "max_steps=3", "save_steps=3"), callbacks=[_Stop(2)])
    assert (run / "metrics.jsonl").is_file() and not checkpoints(run)
    capsys.readouterr()
    train(_config(run, "max_steps=3", "save_steps=3"))
    assert "stopped before its first complete checkpoint; starting it again" in (
        capsys.readouterr().err
    )
    assert [s for s, _ in _loss_records(run)] == [1, 2, 3]
    with pytest.raises(ConfigError, match="holds a run that finished at step 3; choose another"):
        train(_config(run, "max_steps=3"))
    finished = tmp_path / "finished"
    train(_config(finished, "max_steps=1", "save_strategy=no"))
    assert not checkpoints(finished)
    with pytest.raises(ConfigError, match="finished at step 1, with no checkpoint to continue"):
        train(_config(finished, "max_steps=1", "save_strategy=no"))


def _folder(path: Path, *names: str) -> Path:
    path.mkdir(parents=True)
    for name in names:
        (path / name).write_text(name)
    return path


COMPLETE = (
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state_0.pth",
    "trainer_state.json",
    "sampler_state.pt",
    "config.yaml",
)


def test_publish_replaces_and_rotate_keeps_the_new_checkpoint(tmp_path):
    """publish renames a finished folder into place (replacing one of the same step); rotate
    deletes the oldest beyond the limit but never the one just published nor the best."""
    for step in (2, 4, 6):
        _folder(tmp_path / f"checkpoint-{step}", *COMPLETE)
    staged = _folder(tmp_path / "tmp-checkpoint-4", *COMPLETE, "new")
    publish(staged, tmp_path / "checkpoint-4")
    assert (tmp_path / "checkpoint-4" / "new").is_file() and not leftovers(tmp_path)
    rotate(tmp_path, 2, {tmp_path / "checkpoint-4"})
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-4"]
    rotate(tmp_path, 1, {tmp_path / "checkpoint-4"})
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-4"]
    rotate(tmp_path, None, set())
    assert latest_complete(tmp_path) == (tmp_path / "checkpoint-4", [])
    (tmp_path / "checkpoint-4" / "config.yaml").write_text("sampler: ppots\n")
    assert missing_files(tmp_path / "checkpoint-4") == ["ppots.json"]


def test_restart_metrics_keeps_each_step_once(tmp_path):
    lines = [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 2.0},
        {"step": 2, "eval_loss": 2.5},
        {"step": 2, "train_runtime": 1.0},
        {"step": 3, "loss": 3.0},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert restart_metrics(tmp_path, 2) == 3
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == lines[:3]
    assert restart_metrics(tmp_path, 2) == 0


def _training_started(run: Path, after: int, launched: float) -> bool:
    """Whether this process has logged a step later than `after` (it is training)."""
    path = run / "metrics.jsonl"
    if not path.is_file() or path.stat().st_mtime < launched:
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] > after:
                return True
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return False


def _launch(args: list[str], run: Path, log: Path) -> tuple[subprocess.Popen, int, float]:
    """Start `stablemdm train` in a subprocess: --resume when a checkpoint exists, else a plain
    run (which reuses a folder left by a run killed before its first checkpoint). Returns the
    process, the step it starts from and when it was launched."""
    found = checkpoints(run) if run.is_dir() else []
    start = json.loads((found[0] / "trainer_state.json").read_text())["global_step"] if found else 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "stablemdm.cli", "train", *args, f"output_dir={run}"]
    launched = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cmd + ["--resume"] * bool(found), env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    return proc, start, launched


def _staged(run: Path) -> list[Path]:
    """Checkpoint folders being written (not ones being deleted by rotation)."""
    return list(run.glob("tmp-checkpoint-*"))


def _kill(args: list[str], run: Path, log: Path, delay: float, in_write: bool) -> bool:
    """Run training and SIGKILL it `delay` seconds after it starts training, or (`in_write`)
    at the first checkpoint write after that. Returns whether a checkpoint was being written
    (its tmp-checkpoint-N folder present) when it was killed."""
    proc, start, launched = _launch(args, run, log)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not _training_started(run, start, launched):
        assert time.monotonic() < deadline, "the training process never started"
        time.sleep(0.005)
    time.sleep(delay)
    while in_write and proc.poll() is None and not _staged(run):
        time.sleep(0.0005)
    writing = bool(_staged(run))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return writing and proc.returncode == -signal.SIGKILL


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """A CLI training run (save_steps=1, save_total_limit=1) is killed with SIGKILL at seeded
    random moments and inside a checkpoint write, and resumed with --resume (or run again when
    no checkpoint exists yet) until it finishes: every checkpoint folder left is complete, the
    final weights equal the uninterrupted run's bit for bit, and each step is logged once."""
    args = [*SMALL, "eval_strategy=no", "max_steps=16", "save_steps=1", "save_total_limit=1"]
    train(load_config(None, [*args, f"output_dir={tmp_path / 'full'}"]))
    run, rng = tmp_path / "killed", random.Random(12)
    hit_a_write = False
    for n in range(4):  # a kill at a random moment, then kills inside a write until one lands
        if n > 1 and hit_a_write:
            break
        log = tmp_path / f"stderr-{n}.txt"
        hit_a_write |= _kill(args, run, log, rng.uniform(0.0, 0.2), in_write=n > 0)
        assert all(missing_files(p) == [] for p in checkpoints(run))
    assert hit_a_write, "no kill landed inside a checkpoint write"
    proc, _, _ = _launch(args, run, tmp_path / "stderr-last.txt")
    assert proc.wait(timeout=300) == 0, (tmp_path / "stderr-last.txt").read_text()[-3000:]
    assert _same(_weights(run), _weights(tmp_path / "full"))
    assert _loss_records(run) == _loss_records(tmp_path / "full")
    assert [p.name for p in checkpoints(run)] == ["checkpoint-16"] and not leftovers(run)


def test_a_damaged_checkpoint_file_is_skipped_and_a_refused_resume_changes_no_metric(
    tmp_path, capsys
):
    """A run killed at step 5: checkpoint-4's optimizer.pt is truncated (a real partial
    file) and checkpoint-2's sampler_state.pt is another sampler's. A named resume of either
    is one line naming the file (exit 2), bare --resume names what it skips, and every
    refusal leaves metrics.jsonl byte for byte as it was; with checkpoint-2 restored, bare
    --resume skips checkpoint-4 and ends with the uninterrupted run's weights and losses."""
    from stablemdm.cli import main
    from stablemdm.estimators.ema import EMA

    steps = ["max_steps=6", "save_steps=2"]
    train(_config(tmp_path / "full", *steps))
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_config(run, *steps), callbacks=[_Stop(5)])
    optimizer = run / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    sampler = run / "checkpoint-2" / "sampler_state.pt"
    own = sampler.read_bytes()
    torch.save(EMA().state_dict(), sampler)
    metrics = (run / "metrics.jsonl").read_bytes()
    cli = ["train", *SMALL, "eval_strategy=no", *steps, f"output_dir={run}"]
    refusals = {
        str(run / "checkpoint-4"): f"checkpoint {run / 'checkpoint-4'} is corrupted: "
        "optimizer.pt cannot be read (BadZipFile",
        str(run / "checkpoint-2"): f"{sampler} holds the state of another sampler, not this "
        "run's Uniform",
        "sampler=ema": "the config differs from the checkpoint's",
    }
    for resume, message in refusals.items():
        capsys.readouterr()
        args = [*cli, "--resume", resume] if "=" not in resume else [*cli, resume, "--resume"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "".join(err), err
        assert (run / "metrics.jsonl").read_bytes() == metrics
    sampler.write_bytes(own)
    capsys.readouterr()
    train(_config(run, *steps), resume=True)
    err = capsys.readouterr().err
    assert "skips checkpoint-4 (optimizer.pt cannot be read (BadZipFile" in err
    assert f"resuming from {run / 'checkpoint-2'}" in err
    assert _same(_weights(run), _weights(tmp_path / "full"))
    assert _loss_records(run) == _loss_records(tmp_path / "full")


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_resume_between_two_log_lines_logs_the_uninterrupted_losses(tmp_path, accumulation):
    """logging_steps=3, checkpoints every 2 steps, a kill after step 5: the run resumes from
    checkpoint-4, in the middle of the window of steps 4-6, and its log line at step 6 (and
    every later one) equals the uninterrupted run's bit for bit, with or without gradient
    accumulation (before, it averaged steps 5-6 only)."""
    steps = ["max_steps=9", "save_steps=2", "logging_steps=3"]
    steps.append(f"gradient_accumulation_steps={accumulation}")
    train(_config(tmp_path / "full", *steps))
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_config(run, *steps), callbacks=[_Stop(5)])
    train(_config(run, *steps), resume=True)
    assert [s for s, _ in _loss_records(run)] == [3, 6, 9]
    assert _loss_records(run) == _loss_records(tmp_path / "full")
    assert _same(_weights(run), _weights(tmp_path / "full"))


def test_a_checkpoint_saved_before_a_field_existed_resumes(tmp_path):
    """A checkpoint whose config.yaml lacks fields added later (here `estimator` and
    `allow_downloads`, as one written before they existed) resumes: a missing field counts as
    its default, what that run used; a present field that differs is still refused."""
    import yaml

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_config(run, "max_steps=4", "save_steps=2"), callbacks=[_Stop(3)])
    saved = run / "checkpoint-2" / "config.yaml"
    values = yaml.safe_load(saved.read_text())
    del values["estimator"], values["allow_downloads"]
    saved.write_text(yaml.safe_dump(values))
    assert train(_config(run, "max_steps=4", "save_steps=2"), resume=True).global_step == 4
    with pytest.raises(ConfigError, match="estimator: 'fixed' -> 'auto'"):
        train(_config(run, "max_steps=6", "save_steps=2", "estimator=auto"), resume=True)


class _Pickle:
    """What a hostile checkpoint file holds: a pickle that, loaded unsafely, would create
    `marker` (by running code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_checkpoint_file_that_would_run_code_is_refused_before_anything_is_written(
    tmp_path, capsys
):
    """checkpoint-4's optimizer.pt, then its rng_state.pth, is a pickle that would run code:
    `--resume` of it exits 2 with one line naming the file (no traceback), nothing in it
    runs, and the run folder is byte-identical afterwards (config.yaml and metrics.jsonl
    included)."""
    from stablemdm.cli import main

    run, marker = tmp_path / "run", tmp_path / "ran"
    train(_config(run, "max_steps=4", "save_steps=2"))
    checkpoint = run / "checkpoint-4"
    cli = ["train", *SMALL, "eval_strategy=no", "max_steps=6", "save_steps=2", f"output_dir={run}"]
    for name in ("optimizer.pt", "rng_state.pth"):
        own = (checkpoint / name).read_bytes()
        torch.save({"state": _Pickle(marker)}, checkpoint / name)
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        capsys.readouterr()
        assert main([*cli, "--resume", str(checkpoint)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert f"checkpoint {checkpoint} is corrupted: {name} cannot be read" in err
        assert "more than tensors and plain data (exec), which only an unsafe load" in err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        assert not marker.exists()
        (checkpoint / name).write_bytes(own)
