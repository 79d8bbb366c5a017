"""Recipes and overrides as a user types them: string fields take the literal text, an ARM
or estimator=auto over a method recipe drops the estimator fields it decides with a note,
and every shipped recipe loads without warnings about its own keys."""

from pathlib import Path

import pytest

from stablemdm.cli import main
from stablemdm.errors import ConfigError
from stablemdm.estimators.registry import ESTIMATOR_DEFAULTS
from stablemdm.training.config import AUTO_CHOSEN, StableMDMConfig
from stablemdm.training.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
METHODS = sorted((ROOT / "recipes" / "methods").glob("*.yaml"))


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("mask_token=[MASK]", "mask_token", "[MASK]"),  # YAML would read a list
        ("mask_token={m}", "mask_token", "{m}"),  # ... or a mapping
        ("system_prompt=42", "system_prompt", "42"),  # ... or a number
        ("mask_token='<mask>'", "mask_token", "<mask>"),  # quotes still strip
        ("mask_token=null", "mask_token", None),  # null still unsets
        ("lora_target_modules=[q_proj, v_proj]", "lora_target_modules", ["q_proj", "v_proj"]),
    ],
)
def test_a_string_field_takes_the_literal_text(override, field, value):
    config = load_config(None, ["model=some/model", "chat_template=true", override])
    assert getattr(config, field) == value


def test_a_wrong_type_is_still_refused_where_text_does_not_fit():
    with pytest.raises(ValueError, match=r"max_steps=\[3\] has the wrong type"):
        load_config(None, ["max_steps=[3]"])


@pytest.mark.parametrize("recipe", METHODS, ids=lambda p: p.stem)
def test_an_arm_over_a_method_recipe_ignores_its_estimator_fields(recipe, capsys):
    config = load_config(recipe, ["objective=arm"])
    assert (config.objective, config.sampler, config.masking) == ("arm", "uniform", "iid")
    assert (config.rate, config.scheme, config.ppots_file) == ("t", "iid", None)
    err = capsys.readouterr().err.strip().splitlines()
    if recipe.stem != "standard":
        assert len(err) == 1 and err[0].startswith("stablemdm: note: objective=arm")
        assert str(recipe) in err[0]


@pytest.mark.parametrize("recipe", METHODS, ids=lambda p: p.stem)
def test_auto_over_a_method_recipe_ignores_what_auto_chooses_with_a_note(recipe, capsys):
    """`--config recipes/methods/X.yaml estimator=auto` trains auto (the command line cannot
    remove a key of the recipe): the fields auto chooses are dropped, and named in one note."""
    own = load_config(recipe)
    capsys.readouterr()
    config = load_config(recipe, ["estimator=auto"])
    assert config.estimator == "auto"
    assert all(getattr(config, k) == ESTIMATOR_DEFAULTS.get(k, 0) for k in AUTO_CHOSEN)
    notes = [x for x in capsys.readouterr().err.splitlines() if "note" in x]
    chosen = [
        f"{k}={getattr(own, k)}" for k in AUTO_CHOSEN if getattr(own, k) != getattr(config, k)
    ]
    if chosen:
        assert len(notes) == 1 and notes[0].startswith("stablemdm: note: estimator=auto chooses")
        assert all(c in notes[0] for c in chosen) and str(recipe) in notes[0]
    else:
        assert notes == []


def test_auto_over_estimator_fields_is_still_refused_in_python(tmp_path):
    with pytest.raises(ConfigError, match="remove masking='mirror'"):
        StableMDMConfig(output_dir=str(tmp_path), estimator="auto", masking="mirror")
    with pytest.raises(ConfigError, match="refits the P-POTS density at each"):
        StableMDMConfig(output_dir=str(tmp_path), estimator="auto", ppots_refit_steps=10)


def test_an_arm_over_a_method_recipe_trains(tmp_path, capsys):
    out = tmp_path / "arm"
    recipe = ROOT / "recipes" / "methods" / "ppots_mirror.yaml"
    small = ["task_options={n_train: 40, n_test: 4}", "d_model=32", "n_layers=1"]
    small += ["max_steps=1", "save_steps=1", "disable_tqdm=true", "per_device_train_batch_size=4"]
    args = ["train", "--config", str(recipe), "objective=arm", *small, f"output_dir={out}"]
    assert main(args) == 0
    assert load_config(out / "config.yaml").sampler == "uniform"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_no_shipped_recipe_warns_about_its_own_keys(recipe, capsys):
    load_config(recipe)
    assert "warning" not in capsys.readouterr().err
