"""A folder someone else made is only read: a received run folder runs none of its code
unless the person running the command says `--trust-remote-code` (its own config.yaml may
say anything), and `--overwrite` never replaces a model, tokenizer or checkpoint file.
docs/reliability.md lists these guarantees."""

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from hf_fixtures import llada_model
from test_trainer import SMALL

from stablemdm.cli import main
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_llada"


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and ": error: " in lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def received(tmp_path) -> tuple[Path, Path]:
    """A run folder as someone might send it: a Hugging Face model whose config.json names
    a code module (which would write `marker` when imported), and a config.yaml that says
    trust_remote_code: true. Returns (folder, marker)."""
    folder, marker = tmp_path / f"received_{tmp_path.name}", tmp_path / "code-ran"
    shutil.copytree(FIXTURE, folder)
    module = folder / "configuration_tiny_llada.py"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    module.write_text(payload + module.read_text())
    (folder / "config.yaml").write_text(
        f"model: {folder}\ntrust_remote_code: true\ntask: chain_sum\nobjective: mdm\n"
    )
    return folder, marker


def test_a_received_run_folder_runs_no_code_without_the_flag(received, tmp_path, capsys):
    folder, marker = received
    commands = [
        ["eval", str(folder), "--task", "chain_sum", "--output", str(tmp_path / "e.jsonl")],
        ["generate", str(folder), "--prompt", "1+1"],
        ["variance", "--checkpoint", str(folder), "--output", str(tmp_path / "v")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert f"{folder} ships its own code" in line and "--trust-remote-code" in line
        assert "configuration_tiny_llada" in line and not marker.exists()
    config = folder / "config.yaml"
    assert main(["variance", "--config", str(config), "--output", str(tmp_path / "v")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "only with --trust-remote-code on its command line" in line
    assert main(["train", f"init_from={folder}", f"output_dir={tmp_path / 'r'}"]) == 2
    assert "holds a Hugging Face model" in _one_error_line(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "e.jsonl").exists()
    assert not (tmp_path / "v").exists() and not (tmp_path / "r").exists()
    # the person running it may allow it: then the folder's code runs
    main(["eval", str(folder), "--task", "chain_sum", "--trust-remote-code", "--limit", "1"])
    assert marker.read_text() == "ran"


# --- a run's saved config never switches a model's code on -----------------------------------


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory) -> tuple[Path, Path, Path, str]:
    """A finished 2-step run of a model with its own code, trained from a hand-written recipe
    saying trust_remote_code: true; the model's code is then edited to write a marker file
    when imported, as a received folder's could be. Returns (run, model, marker, the
    training's stderr)."""
    root = tmp_path_factory.mktemp("custom")
    model, run, marker = llada_model(root / f"llada_{root.name}"), root / "run", root / "ran"
    recipe = root / "recipes" / "llada.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        f"model: {model}\ntrust_remote_code: true\ntask: chain_sum\n"
        "task_options: {n_train: 32, n_test: 4}\nper_device_train_batch_size: 4\n"
        "max_steps: 2\nsave_steps: 2\ndisable_tqdm: true\n"
    )
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        assert main(["train", "--config", str(recipe), f"output_dir={run}"]) == 0
    module = model / "configuration_tiny_llada.py"
    module.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + module.read_text())
    return run, model, marker, log.getvalue()


def test_a_runs_saved_config_never_runs_the_models_code(custom_run, tmp_path, capsys):
    """`train --config RUN/config.yaml` (a new run, --resume of the finished run, --resume
    further), the same from a checkpoint's config or a copy of it, and `fit-t` each exit 2
    with one line naming the module, before anything is imported; `--trust-remote-code`
    allows it. A hand-written recipe may allow it, and the run log names the code."""
    run, model, marker, log = custom_run
    code = f"{model}/config.json: configuration_tiny_llada.TinyLLaDAConfig"
    before = _hashes(run)
    shutil.copy(run / "config.yaml", tmp_path / "copied.yaml")
    saved = ["--config", str(run / "config.yaml")]
    commands = [
        ["train", *saved, f"output_dir={tmp_path / 'new'}"],
        ["train", *saved, "--resume"],
        ["train", *saved, "max_steps=3", "--resume"],
        ["train", "--config", str(run / "checkpoint-2" / "config.yaml"), "--resume"],
        ["train", "--config", str(tmp_path / "copied.yaml"), f"output_dir={tmp_path / 'new'}"],
        ["fit-t", *saved, "--output", str(tmp_path / "density.json")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert (
            f"{model} ships its own code ({code}), which runs only with --trust-remote-code" in line
        )
        assert not marker.exists(), argv
    assert _hashes(run) == before and not (tmp_path / "new").exists()
    assert not (tmp_path / "density.json").exists()
    assert main(["train", *saved, "--resume", "--trust-remote-code"]) == 0
    assert "already trained to step 2" in capsys.readouterr().out
    assert marker.read_text() == "ran" and _hashes(run) == before
    assert f"(from {run.parent / 'recipes' / 'llada.yaml'}): this run imports {code}" in log


def test_a_study_file_in_a_received_folder_runs_no_code(received, tmp_path, capsys):
    folder, marker = received
    study = folder / "study.yaml"
    study.write_text(
        f"name: received\noutput_dir: {tmp_path / 'study'}\ntasks: [chain_sum]\nseeds: [1]\n"
        f"methods: [standard]\ntrain: {{model: {folder}, trust_remote_code: true, max_steps: 2}}\n"
    )
    assert main(["study", "--config", str(study)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{folder} ships its own code" in line and "configuration_tiny_llada" in line
    assert not marker.exists() and not (tmp_path / "study").exists()
    main(["study", "--config", str(study), "--trust-remote-code"])  # then the code runs
    assert marker.read_text() == "ran"


# --- --overwrite never replaces a model, tokenizer or checkpoint file ---------------------------


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two finished 2-step runs with a checkpoint each: `run` and `other`."""
    root = tmp_path_factory.mktemp("runs")
    for name in ("run", "other"):
        args = [*SMALL, "eval_strategy=no", "max_steps=2", "save_steps=2"]
        train(load_config(None, [*args, f"output_dir={root / name}"]))
    return root


PROTECTED = [
    "run/model.safetensors",
    "run/tokenizer.json",
    "run/config.json",
    "run/config.yaml",
    "run/metrics.jsonl",
    "run/trainer_state.json",
    "run/sampler_state.pt",
    "other/checkpoint-2/optimizer.pt",
    "other/checkpoint-2/trainer_state.json",
    "other/checkpoint-2/rng_state.pth",
]


@pytest.mark.parametrize("target", PROTECTED)
def test_overwrite_never_replaces_a_model_tokenizer_or_checkpoint_file(runs, target, capsys):
    """`eval RUN/checkpoint-2 --output RUN/model.safetensors --overwrite` (the output beside,
    not inside, the checkpoint it reads) and the like are refused; `fit-t` too."""
    before = _hashes(runs)
    for argv in (
        ["eval", str(runs / "run" / "checkpoint-2"), "--task", "chain_sum"],
        ["fit-t"],
    ):
        assert main([*argv, "--output", str(runs / target), "--overwrite"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "is a model, tokenizer or checkpoint file" in line
        assert "refused even with --overwrite" in line
    assert _hashes(runs) == before


def test_overwrite_still_replaces_an_earlier_output(runs, capsys):
    records = runs / "run" / "eval-old.jsonl"
    records.write_text("earlier\n")
    argv = ["eval", str(runs / "run" / "checkpoint-2"), "--task", "chain_sum", "--limit", "2"]
    assert main([*argv, "--output", str(records)]) == 2
    assert main([*argv, "--output", str(records), "--overwrite"]) == 0
    assert len([json.loads(x) for x in records.read_text().splitlines()]) == 2
