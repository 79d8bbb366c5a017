"""`stablemdm variance --checkpoint RUN` and `eval RUN` read the run as it was trained (issue 28,
items 6 and 11): the run's task, task_options and lengths, not the default task; its data by
the resolved paths saved in config.yaml, from any working directory; and, when the data has
moved, one line naming the option that points at it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from test_variance_hf import DESIGN  # the smallest design that measures every component

from stablemdm.cli import main

TINY = [
    "d_model=32",
    "n_layers=1",
    "n_heads=2",
    "per_device_train_batch_size=4",
    "max_steps=1",
    "disable_tqdm=true",
]
WORDS = ("cab", "dog", "fig", "hen", "jam", "kid", "log", "mud", "nap", "owl")


def _chdir(path: Path) -> Path:
    before = Path.cwd()
    os.chdir(path)
    return before


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder with its own letters-only JSONL data and a run of task jsonl trained
    from it with relative data paths."""
    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    rows = [{"prompt": w, "response": f"{w[::-1]} #### {w[::-1]}"} for w in WORDS * 4]
    for split in ("train", "test"):
        lines = [json.dumps(r) for r in rows]
        (root / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    before = _chdir(root)
    try:
        options = "task_options={train: data/train.jsonl, test: data/test.jsonl}"
        assert main(["train", "task=jsonl", options, *TINY, "output_dir=run"]) == 0
    finally:
        os.chdir(before)
    return root


@pytest.fixture
def elsewhere(tmp_path):
    """The working directory is another folder for the test."""
    before = _chdir(tmp_path)
    yield tmp_path
    os.chdir(before)


def test_the_saved_config_names_the_data_by_resolved_paths(project):
    saved = yaml.safe_load((project / "run" / "config.yaml").read_text())
    data = (project / "data").resolve()
    assert saved["task_options"] == {
        "train": str(data / "train.jsonl"),
        "test": str(data / "test.jsonl"),
    }


def test_eval_of_a_run_from_another_directory(project, elsewhere, capsys):
    assert main(["eval", str(project / "run"), "--limit", "2", "--output", "e.jsonl"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["task"], summary["n"]) == ("jsonl", 2)


def test_variance_measures_the_runs_task_from_another_directory(project, elsewhere):
    """No --config: the run's task (jsonl), options and lengths, not the default chain_sum."""
    assert main(["variance", f"--checkpoint={project / 'run'}", *DESIGN, "--output=v"]) == 0
    report = json.loads((elsewhere / "v" / "variance.json").read_text())
    saved = yaml.safe_load((project / "run" / "config.yaml").read_text())
    assert report["config"]["task"] == "jsonl"
    assert report["config"]["task_options"] == saved["task_options"]
    lengths = ("max_length", "gen_length")
    assert [report["config"][k] for k in lengths] == [saved[k] for k in lengths]


def test_a_run_whose_data_moved_names_the_option_that_points_at_it(project, elsewhere, capsys):
    run = shutil.copytree(project / "run", elsewhere / "copied-run")
    moved = shutil.copytree(project / "data", elsewhere / "moved-data")
    config = run / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    saved["task_options"]["train"] = str(project / "gone" / "train.jsonl")
    config.write_text(yaml.safe_dump(saved))
    for argv in (["eval", str(run)], ["variance", f"--checkpoint={run}", *DESIGN]):
        assert main(argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"stablemdm {argv[0]}: error: the run {run} trained on ")
        assert str(project / "gone" / "train.jsonl") in line
        assert line.endswith("--task-option train=PATH")
    fixed = ["eval", str(run), f"--task-option=train={moved / 'train.jsonl'}", "--limit=2"]
    assert main(fixed) == 0
