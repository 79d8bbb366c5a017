"""The command line: every shipped recipe trains, and eval, generate and fit-t work on what
train wrote; bad input ends with one clear line and exit status 2."""

import json
from pathlib import Path

import pytest

from stablemdm.cli import main
from stablemdm.estimators.ppots import PPOTS
from stablemdm.training.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
SMALL_DATA = "task_options={n_train: 200, n_test: 10}"
TINY = [
    SMALL_DATA,
    "d_model=32",
    "n_layers=1",
    "per_device_train_batch_size=8",
    "max_steps=2",
    "save_steps=2",
    "logging_steps=1",
    "disable_tqdm=true",
    "eval_strategy=no",
    "eval_accuracy=false",
    "ppots_sequences=3",
    "ppots_rates=6",
    "ppots_masks=2",
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_trains(recipe, tmp_path):
    text = recipe.read_text()
    assert text.startswith("#") and "Launch:" in text, "a recipe opens with its launch command"
    config = load_config(recipe)
    task = config.task
    if config.model is not None:  # Hugging Face recipes: checked where the weights are local
        if not Path(config.model).is_dir():
            pytest.skip(f"{config.model} is not available offline here")
        small = ["max_steps=1", "save_steps=1", "per_device_train_batch_size=2", "max_length=48"]
        out = tmp_path / "run"
        assert main(["train", "--config", str(recipe), *small, f"output_dir={out}"]) == 0
        return
    if task == "gsm8k" and not GSM8K.is_dir():
        pytest.skip(f"GSM8K data not found at {GSM8K}")
    own_data = ("gsm8k", "jsonl", "digits_t2i", "text")  # tasks without n_train/n_test options
    overrides = TINY if task not in own_data else [o for o in TINY if o != SMALL_DATA]
    if task == "gsm8k":
        overrides = [*overrides, "bf16=false", "per_device_train_batch_size=2", "n_heads=2"]
    if config.estimator == "auto":  # 2 steps cannot pay for a measurement: on top of them
        overrides = [*overrides, "auto_budget=extra"]
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), *overrides, f"output_dir={out}"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mdm"
    assert (
        main(
            [
                "train",
                "--config",
                str(ROOT / "recipes/chain_sum_mdm.yaml"),
                *TINY,
                f"output_dir={out}",
            ]
        )
        == 0
    )
    return out


def test_eval_writes_records_and_prints_accuracy(trained, capsys):
    assert (
        main(
            [
                "eval",
                str(trained),
                "--task",
                "chain_sum",
                "--task-option",
                "n_train=200",
                "--task-option",
                "n_test=10",
                "--limit",
                "4",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 4 and 0 <= summary["accuracy"] <= 1 and summary["objective"] == "mdm"
    records = (trained / "eval-chain_sum-test.jsonl").read_text().splitlines()
    assert (
        len(records) == 4
        and {"prompt", "output", "extracted", "gold", "correct"} <= json.loads(records[0]).keys()
    )


def test_generate_decodes_prompts_from_arguments_and_files(trained, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+2"}\n\n{"prompt": "3-1"}\n')
    assert (
        main(
            [
                "generate",
                str(trained),
                "--prompt",
                "4+4",
                "--file",
                str(prompts),
                "--gen-length",
                "5",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_fit_t_writes_a_reusable_density(tmp_path, capsys):
    out = tmp_path / "density.json"
    assert (
        main(
            [
                "fit-t",
                "--config",
                str(ROOT / "recipes/methods/ppots.yaml"),
                *TINY,
                "--output",
                str(out),
            ]
        )
        == 0
    )
    density = PPOTS.from_dict(json.loads(out.read_text()))
    assert density.source["method"] == "counts" and "written to" in capsys.readouterr().out
    assert density.source["fitted_for"] == {
        "model": "built-in model_preset=tiny d_model=32 n_layers=1",
        "rate": "t",
        "task": "chain_sum",
    }
    run = tmp_path / "reuse"
    assert (
        main(
            [
                "train",
                "--config",
                str(ROOT / "recipes/methods/ppots.yaml"),
                *TINY,
                f"ppots_file={out}",
                f"output_dir={run}",
            ]
        )
        == 0
    )
    assert json.loads((run / "ppots.json").read_text())["heights"] == density.to_dict()["heights"]
    assert "ppots_file" not in capsys.readouterr().err  # fitted for this very run


def test_a_density_fitted_for_another_run_is_named_on_loading(tmp_path, capsys):
    """A density records the model, rate mode and task it was fitted for (fit-t and in-run
    fits); loading it for another one, or loading one that records none, is one warning."""
    from stablemdm.tasks.registry import get_task
    from stablemdm.training.build import build_model, fit_density, load_density

    config = load_config(None, ["sampler=ppots", *TINY, f"output_dir={tmp_path / 'r'}"])
    task = get_task(config.task, **config.task_options)
    model, tokenizer, canvas = build_model(config, task)
    path = tmp_path / "density.json"
    path.write_text(json.dumps(fit_density(config, model, task, tokenizer, canvas).to_dict()))
    capsys.readouterr()
    load_density(path, config)
    assert capsys.readouterr().err == ""
    other = ["rate=count", "d_model=16", "task=mini_sudoku", "task_options={}"]
    elsewhere = load_config(None, ["sampler=ppots", *TINY, *other])
    capsys.readouterr()
    load_density(path, elsewhere)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stablemdm: warning: ppots_file {path} was fitted")
    assert "model 'built-in model_preset=tiny d_model=32 n_layers=1' (this run: " in err[0]
    assert "rate 't' (this run: 'count'); task 'chain_sum' (this run: 'mini_sudoku')" in err[0]
    bare = json.loads(path.read_text())
    del bare["source"]["fitted_for"]
    path.write_text(json.dumps(bare))
    load_density(path, config)
    assert "does not record the model, rate mode and task" in capsys.readouterr().err


def test_fit_t_on_the_gradient_norm(tmp_path):
    out = tmp_path / "grad.json"
    assert (
        main(
            [
                "fit-t",
                "--config",
                str(ROOT / "recipes/methods/ppots.yaml"),
                *TINY,
                "ppots_target=grad",
                "ppots_params=lm_head",
                "ppots_method=grid",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert PPOTS.from_dict(json.loads(out.read_text())).source["target"] == "grad"
    assert (
        main(
            [
                "fit-t",
                *TINY,
                "ppots_target=grad",
                "ppots_params=nothing_matches",
                "--output",
                str(out),
            ]
        )
        == 2
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "learning_rat=1"], "unknown config key 'learning_rat'"),
        (["train", "task=nope"], "unknown task 'nope'"),
        (
            ["train", "sampler=ppots", "ppots_file=/nonexistent.json"],
            "ppots_file /nonexistent.json does not exist",
        ),
        (["eval", "/nonexistent", "--task", "chain_sum"], "does not exist"),
        (["generate", "/nonexistent", "--prompt", "x"], "does not exist"),
        (["train", "masking=isad", "isad_tokens=['\u00e9']"], "not in the tokenizer's alphabet"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys, tmp_path):
    argv = [*argv, f"output_dir={tmp_path / 'x'}"] if argv[0] == "train" else argv
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_density_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"heights": [1, 2], "mix": 0.1}')
    assert (
        main(["train", "sampler=ppots", f"ppots_file={bad}", *TINY, f"output_dir={tmp_path / 'r'}"])
        == 2
    )
    assert "integrate" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["train", "eval", "generate", "fit-t", "demo", "variance"])
def test_help_explains_every_option(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([verb, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: stablemdm" in text
    if verb == "train":
        assert "ppots_method" in text and "isad_q_max" in text


def test_eval_defaults_to_the_runs_task_and_options(trained, tmp_path, capsys):
    """No --task and no --task-option retyped: the run's config.yaml names them (chain_sum,
    n_test=10); one --task-option replaces one of them."""
    assert main(["eval", str(trained), "--output", str(tmp_path / "all.jsonl")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["task"], summary["n"]) == ("chain_sum", 10)
    args = ["eval", str(trained), "--task-option", "n_test=3"]
    assert main([*args, "--output", str(tmp_path / "three.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 3


def test_eval_decodes_into_the_canvas_the_run_trained_on(tmp_path):
    """A run trained with its own gen_length (a longer, <eos>-filled canvas) is decoded into
    that canvas; another task keeps its own."""
    from stablemdm.data.tokenizer import CharTokenizer
    from stablemdm.tasks.registry import get_task
    from stablemdm.training.datasets import decode_length

    (tmp_path / "config.yaml").write_text("task: chain_sum\ngen_length: 40\n")
    chain_sum = get_task("chain_sum", n_train=20, n_test=5)
    assert chain_sum.gen_length != 40
    assert decode_length(chain_sum, CharTokenizer(), tmp_path) == 40
    sudoku = get_task("mini_sudoku", n_train=20, n_test=5)
    assert decode_length(sudoku, CharTokenizer(), tmp_path) == sudoku.gen_length


def test_eval_without_a_task_or_a_run_config_is_one_line(trained, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if (trained / name).is_file():
            (bare / name).write_bytes((trained / name).read_bytes())
    assert main(["eval", str(bare)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no --task given" in err[0] and "config.yaml" in err[0]


def test_an_arm_generates_past_its_training_length(tmp_path, capsys):
    out = tmp_path / "arm"
    recipe = str(ROOT / "recipes/chain_sum_arm.yaml")
    assert main(["train", "--config", recipe, *TINY, f"output_dir={out}"]) == 0
    limit = load_config(out / "config.yaml").max_length
    capsys.readouterr()
    args = ["generate", str(out), "--prompt", "1+2", "--gen-length", str(3 * limit)]
    assert main([*args, "--temperature", "1"]) == 0  # sampling: no early <eos>
    (line,) = capsys.readouterr().out.splitlines()
    assert len(line) > limit  # character tokenizer: one token per character
    assert main(["generate", str(out), "--prompt", "1" * (limit + 1)]) == 2
    assert "longer than the" in capsys.readouterr().err


def test_a_canvas_longer_than_the_models_positions_is_one_line(tmp_path, capsys):
    """A tiny BERT with 64 positions. Before training (max_length) and before decoding (eval
    --gen-length): one line naming the model's positions and the option that fixes it, not a
    traceback from inside the model."""
    from test_hf_models import _bert

    short_bert, run = _bert(tmp_path / "bert64"), tmp_path / "run"
    base = ["train", f"model={short_bert}", SMALL_DATA, "per_device_train_batch_size=4"]
    base += ["max_steps=1", "disable_tqdm=true"]
    assert main([*base, "max_length=80", f"output_dir={tmp_path / 'long'}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the sequences are 80 tokens" in line and "the model has 64 positions" in line
    assert "max_position_embeddings" in line and "set max_length" in line
    assert not (tmp_path / "long").exists()
    assert main([*base, f"output_dir={run}"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--gen-length", "60", "--limit", "2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "more than the 64 the model has (max_position_embeddings" in line
    assert "lower --gen-length" in line and not list(run.glob("eval-*"))
