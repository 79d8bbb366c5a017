"""Non-finite steps: a step whose loss or gradient is not finite is skipped (no change to the
weights or the optimizer state, the schedule advancing with the step) and counted in the log;
after `max_nonfinite_steps` in a row the run stops with one line naming the step and the last
finite checkpoint, which a resumed run with a lower learning_rate continues."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_trainer import SMALL
from transformers import TrainerCallback

from stablemdm.cli import main
from stablemdm.errors import ConfigError
from stablemdm.estimators.objective import Objective
from stablemdm.training.checkpoints import checkpoints, missing_files
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(folder: Path, *extra: str):
    return load_config(None, [*SMALL, "eval_strategy=no", f"output_dir={folder}", *extra])


def _records(folder: Path) -> dict[int, dict]:
    """step -> its training log line in metrics.jsonl."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


class NaNSteps(TrainerCallback):
    """Test-only fault: the objective's loss (and so the gradient) is NaN in the optimizer
    steps `steps` (1-based); keeps the flat parameters after every step."""

    def __init__(self, steps, monkeypatch) -> None:
        self.steps, self.now, self.params = set(steps), 0, {}
        real = Objective.__call__

        def call(objective, *args, **kwargs):
            out = real(objective, *args, **kwargs)
            if self.now in self.steps and torch.is_grad_enabled():
                return dataclasses.replace(out, loss=out.loss * float("nan"))
            return out

        monkeypatch.setattr(Objective, "__call__", call)

    def on_step_begin(self, args, state, control, **kwargs):
        self.now = state.global_step + 1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params[state.global_step] = torch.cat(
            [p.detach().flatten() for p in model.parameters()]
        )


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    """NaN in steps 3 and 4: the weights and the optimizer state do not move there, no
    checkpoint is written there, the log counts them, and the learning rate keeps following
    the schedule of the clean run."""
    steps = ["max_steps=6", "save_steps=1", "max_nonfinite_steps=3"]
    train(_config(tmp_path / "clean", *steps))
    fault = NaNSteps({3, 4}, monkeypatch)
    train(_config(tmp_path / "nan", *steps), callbacks=[fault])
    p = fault.params
    assert torch.equal(p[2], p[3]) and torch.equal(p[3], p[4]) and not torch.equal(p[4], p[5])
    assert torch.isfinite(p[6]).all()
    assert sorted(c.name for c in checkpoints(tmp_path / "nan")) == [
        f"checkpoint-{s}" for s in (1, 2, 5, 6)
    ]
    optimizer = torch.load(tmp_path / "nan" / "checkpoint-6" / "optimizer.pt")
    assert all(s["step"] == 4 for s in optimizer["state"].values())  # 6 steps, 2 skipped
    nan, clean = _records(tmp_path / "nan"), _records(tmp_path / "clean")
    assert [nan[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 0, 0]
    assert all(nan[s]["grad_norm"] is None and nan[s]["loss"] is None for s in (3, 4))
    assert [nan[s]["learning_rate"] for s in nan] == [clean[s]["learning_rate"] for s in clean]
    assert [nan[s]["loss"] for s in (1, 2)] == [clean[s]["loss"] for s in (1, 2)]


def test_a_run_of_nonfinite_steps_stops_and_a_lower_learning_rate_continues_it(
    tmp_path, monkeypatch
):
    """NaN from step 3 on with max_nonfinite_steps=2: the run stops at step 4 with one line
    naming the step and checkpoint-2, which stays complete; resumed with half the learning
    rate it finishes, on the clean run's schedule scaled by one half."""
    run = tmp_path / "run"
    steps = ["max_steps=6", "save_steps=2", "save_total_limit=1", "max_nonfinite_steps=2"]
    train(_config(tmp_path / "clean", *steps))
    with pytest.raises(FloatingPointError) as err:
        train(_config(run, *steps), callbacks=[NaNSteps(range(3, 99), monkeypatch)])
    message = str(err.value)
    assert "\n" not in message
    assert "2 steps in a row up to step 4 had a non-finite loss or gradient" in message
    assert f"the last finite checkpoint, {run / 'checkpoint-2'}, is intact" in message
    assert "learning_rate=<lower> --resume" in message
    assert [c.name for c in checkpoints(run)] == ["checkpoint-2"]
    assert missing_files(run / "checkpoint-2") == []
    monkeypatch.undo()
    with pytest.raises(
        ConfigError, match=r"weight_decay: 0\.01 -> 0\.1\); only .*learning_rate.* may change"
    ):
        train(_config(run, *steps, "weight_decay=0.1"), resume=True)
    train(_config(run, *steps, "learning_rate=0.0015"), resume=True)
    resumed, clean = _records(run), _records(tmp_path / "clean")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s]["learning_rate"] for s in (1, 2)] == [
        clean[s]["learning_rate"] for s in (1, 2)
    ]
    for s in (3, 4, 5, 6):
        assert resumed[s]["learning_rate"] == pytest.approx(clean[s]["learning_rate"] / 2)
    assert all(resumed[s]["nonfinite_steps"] == 0 for s in resumed)


def test_max_nonfinite_steps_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="max_nonfinite_steps must be >= 1, got 0"):
        _config(tmp_path, "max_nonfinite_steps=0")


def _poison(checkpoint: Path) -> str:
    """Write NaN into the first weight tensor of `checkpoint` (as a bad earlier run or a
    damaged copy would leave it); returns its name."""
    path = checkpoint / "model.safetensors"
    weights = load_file(str(path))
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(path), metadata={"format": "pt"})
    return name


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("streak", [10, 1])
def test_a_checkpoint_with_nonfinite_weights_is_refused_when_resuming(tmp_path, capsys, streak):
    """A 4-step run whose checkpoint-4 holds NaN weights, continued to max_steps=6 from it
    (fewer steps left than max_nonfinite_steps=10, or more than 1): exits 2 with one line
    naming it, the tensor and checkpoint-2 to resume instead; nothing changes; bare --resume
    refuses it too."""
    run = tmp_path / "run"
    args = [*SMALL, "eval_strategy=no", "save_steps=2", f"max_nonfinite_steps={streak}"]
    train(load_config(None, [*args, "max_steps=4", f"output_dir={run}"]))
    name = _poison(run / "checkpoint-4")
    before = _snapshot(run)
    capsys.readouterr()
    cli = ["train", *args, "max_steps=6", f"output_dir={run}", "--resume"]
    assert main([*cli, str(run / "checkpoint-4")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "finite checkpoint" not in err
    assert (
        f"checkpoint {run / 'checkpoint-4'} holds non-finite weights (model.safetensors: {name} "
        f"has NaN or infinite values); the previous complete checkpoint is {run / 'checkpoint-2'}"
    ) in err
    assert _snapshot(run) == before
    assert main(cli) == 2
    assert f"{run / 'checkpoint-4'} holds non-finite weights" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_weights_that_become_infinite_are_never_published(tmp_path, capsys):
    """learning_rate=1e39 (finite, so accepted) makes the weights infinite at step 2, a step
    whose loss and gradient were finite; the later steps are skipped as non-finite. No
    checkpoint holds the infinite weights, the run exits 2 with one line naming
    checkpoint-1, the last finite one, and writes no final model."""
    run = tmp_path / "run"
    args = [*SMALL, "eval_strategy=no", "learning_rate=1e39", "max_steps=3", "save_steps=1"]
    assert main(["train", *args, f"output_dir={run}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the weights after step 3 are not finite" in err and "no final model was written" in err
    assert f"the last finite checkpoint, {run / 'checkpoint-1'}, is intact" in err
    assert f"--resume {run / 'checkpoint-1'}" in err
    assert [c.name for c in checkpoints(run)] == ["checkpoint-1"]
    assert not (run / "model.safetensors").exists()


def test_a_saved_model_with_nonfinite_weights_is_never_loaded(tmp_path, capsys):
    """A run whose final model.safetensors holds NaN: eval, generate, variance --checkpoint
    and a new run with init_from= it (every command loading a saved model, as a study's
    decoding does) exit 2 with one line naming the file and the tensor; nothing is written."""
    run, new = tmp_path / "run", tmp_path / "new"
    train(_config(run, "max_steps=2", "save_steps=2"))
    name = _poison(run)
    before = _snapshot(tmp_path)
    commands = [
        ["eval", str(run), "--limit", "2"],
        ["generate", str(run), "--prompt", "1+2"],
        ["variance", f"--checkpoint={run}", f"--output={tmp_path / 'report'}"],
        ["train", *SMALL, "eval_strategy=no", f"init_from={run}", f"output_dir={new}"],
    ]
    for command in commands:
        capsys.readouterr()
        assert main(command) == 2, command
        lines = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in str(lines) and [x for x in lines if "error:" in x] == lines[-1:]
        assert f"{run} holds non-finite weights (model.safetensors: {name} has NaN" in lines[-1]
        assert _snapshot(tmp_path) == before
