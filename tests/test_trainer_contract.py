"""What `StableMDMTrainer` relies on in `transformers.Trainer`, pinned so that an upgrade that
changes it fails here, loudly, instead of silently breaking atomic checkpoints, non-finite
step skipping or the learning rate of a resumed run.

Two private methods are overridden (`_save_checkpoint`, `_get_grad_norm`); everything else goes
through public extension points (`compute_loss`, `log`, the `TrainerHooks` callback)."""

import inspect
import json
from pathlib import Path

import pytest
import torch
from test_trainer import SMALL
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from stablemdm.tasks.registry import get_task
from stablemdm.training.build import build_model, build_objective, build_sampler
from stablemdm.training.datasets import collate, train_dataset
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train
from stablemdm.training.trainer import StableMDMTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

PRIVATE_OVERRIDES = {"_save_checkpoint", "_get_grad_norm"}

# Engine methods the overrides call or replace, with the parameters they are called with.
ENGINE_METHODS = {
    "_save_checkpoint": ["model", "trial"],
    "_get_grad_norm": ["model", "grad_norm"],
    "_get_output_dir": ["trial"],
    "_save_optimizer_and_scheduler": ["output_dir"],
    "_save_scaler": ["output_dir"],
    "_save_rng_state": ["output_dir"],
    "_push_from_checkpoint": ["checkpoint_folder"],
    "save_model": ["output_dir", "_internal_call"],
    "store_flos": [],
    "compute_loss": ["model", "inputs", "return_outputs", "num_items_in_batch"],
    "log": ["logs", "start_time"],
}


def _config(folder: Path, *extra: str):
    return load_config(None, [*SMALL, "eval_strategy=no", f"output_dir={folder}", *extra])


def test_the_private_overrides_are_exactly_the_pinned_ones():
    """A new private override must be justified in trainer.py and pinned here."""
    own = {
        name
        for name, value in vars(StableMDMTrainer).items()
        if name.startswith("_") and not name.startswith("__") and callable(value)
    }
    assert own & set(dir(Trainer)) == PRIVATE_OVERRIDES


@pytest.mark.parametrize("name", sorted(ENGINE_METHODS))
def test_engine_methods_keep_their_signatures(name):
    params = list(inspect.signature(getattr(Trainer, name)).parameters)
    assert params[0] == "self"
    assert params[1:] == ENGINE_METHODS[name]


def test_checkpoint_names_and_trainer_state():
    assert PREFIX_CHECKPOINT_DIR == "checkpoint"
    assert TRAINER_STATE_NAME == "trainer_state.json"
    assert "stateful_callbacks" in inspect.signature(TrainerState).parameters
    assert callable(getattr(ExportableState, "state", None))


class Events(TrainerCallback):
    """Records the engine's events of a run, interleaved with the calls of the overrides."""

    def __init__(self, monkeypatch) -> None:
        self.seen: list[str] = []
        self.norms: list[float] = []
        self.scheduler_step_at_begin: int | None = None
        for name in PRIVATE_OVERRIDES:
            real = getattr(StableMDMTrainer, name)

            def spy(trainer, *args, _real=real, _name=name, **kwargs):
                out = _real(trainer, *args, **kwargs)
                self.seen.append(_name)
                if _name == "_get_grad_norm":
                    self.norms.append(float(out))
                return out

            monkeypatch.setattr(StableMDMTrainer, name, spy)

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.seen.append("on_train_begin")
        self.scheduler_step_at_begin = lr_scheduler.last_epoch

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.seen.append("on_pre_optimizer_step")

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append("on_step_end")

    def on_save(self, args, state, control, **kwargs):
        self.seen.append("on_save")


def test_overrides_and_hooks_are_called_where_the_trainer_expects(tmp_path, monkeypatch):
    """Per optimizer step: the gradient norm (where a non-finite step is skipped) just before
    the optimizer step; the step's end (where `TrainerHooks` may veto the save) before the
    checkpoint is written; `on_save` after it. The norm judged is the one the engine logs."""
    events = Events(monkeypatch)
    train(_config(tmp_path, "max_steps=2", "save_steps=1"), callbacks=[events])
    step = ["_get_grad_norm", "on_pre_optimizer_step", "on_step_end", "_save_checkpoint"]
    assert events.seen == ["on_train_begin", *step, "on_save", *step, "on_save"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [x["grad_norm"] for x in lines if "grad_norm" in x]
    assert logged == pytest.approx(events.norms, rel=1e-6)


def test_on_train_begin_sees_the_loaded_optimizer_and_scheduler(tmp_path, monkeypatch):
    """`TrainerHooks.on_train_begin` rescales the learning rate of a resumed run: by then the
    engine has loaded the checkpoint's optimizer and scheduler states."""
    train(_config(tmp_path, "max_steps=2", "save_steps=2"))
    events = Events(monkeypatch)
    train(_config(tmp_path, "max_steps=3", "save_steps=2"), resume=True, callbacks=[events])
    assert events.scheduler_step_at_begin == 2  # loaded from checkpoint-2


def _trainer(folder: Path, cls: type[StableMDMTrainer]) -> StableMDMTrainer:
    config = _config(folder, "max_steps=1", "save_steps=1")
    task = get_task(config.task, **config.task_options)
    model, tokenizer, canvas = build_model(config, task)
    objective = build_objective(config, tokenizer, build_sampler(config))
    return cls(
        model=model,
        args=config,
        train_dataset=train_dataset(task, tokenizer, canvas, config.max_steps),
        data_collator=collate,
        objective=objective,
        eval_objective=objective,
    )


class EngineSaves(StableMDMTrainer):
    """The trainer with the engine's own checkpoint writer, for comparison."""

    _save_checkpoint = Trainer._save_checkpoint


def test_a_checkpoint_holds_what_the_engines_would(tmp_path):
    """Without stablemdm's extras, `_save_checkpoint` writes the files the engine's writes,
    and the same trainer state (an upgrade that adds a file to checkpoints fails here)."""
    folders = {}
    for name, cls in (("ours", StableMDMTrainer), ("engine", EngineSaves)):
        trainer = _trainer(tmp_path / name, cls)
        trainer.train()
        folders[name] = tmp_path / name / f"{PREFIX_CHECKPOINT_DIR}-1"
    names = {k: sorted(p.name for p in v.iterdir()) for k, v in folders.items()}
    assert names["ours"] == names["engine"]
    assert "model.safetensors" in names["ours"] and "optimizer.pt" in names["ours"]
    states = {k: json.loads((v / TRAINER_STATE_NAME).read_text()) for k, v in folders.items()}
    for state in states.values():
        state.pop("log_history")  # holds timings (tokens/s)
    assert states["ours"] == states["engine"]
    weights = {k: torch.load(v / "optimizer.pt")["state"][0]["step"] for k, v in folders.items()}
    assert weights["ours"] == weights["engine"] == 1
