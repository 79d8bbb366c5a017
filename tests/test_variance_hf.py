"""`stablemdm variance` on Hugging Face models as a user meets them (issue 20, item 3): a masked
LM has no ARM form (the report is still written, the ARM row skipped with a note); an
`--arm-checkpoint` with another vocabulary is refused before measuring; the ARM row is on the
run's loss normaliser; a LoRA run's checkpoint is measured over its adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_fixtures import bert_tokenizer, llama_tokenizer
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

from stablemdm.cli import main
from stablemdm.models.toy import save_llama
from stablemdm.training.recipe import load_config
from stablemdm.variance import measure as vm
from stablemdm.variance import report as vr

TASK = ["task_options={n_train: 40, n_test: 4}"]
TRAIN = [*TASK, "per_device_train_batch_size=4", "max_steps=1", "disable_tqdm=true"]
DESIGN = [
    "--methods=standard",
    "--sequences=3",
    "--rates=2",
    "--masks=2",
    "--grad-sequences=2",
    "--grad-rates=2",
    "--grad-masks=2",
    "--draws=3",
    "--batch=2",
    "--bootstrap=0",
    "--grid=3",
    "--grid-sequences=2",
    "--grid-masks=2",
    "--project=8",
]
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models saved as folders: a BERT, a Llama (tokenizer of hf_fixtures) and a Llama of
    `models.toy`, whose vocabulary has as many tokens as the first Llama's, in another order."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert_tok, llama_tok = bert_tokenizer(), llama_tokenizer(chat=False)
    bert = BertForMaskedLM(
        BertConfig(vocab_size=len(bert_tok), pad_token_id=bert_tok.pad_token_id, **SIZE)
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(llama_tok),
            num_key_value_heads=4,
            bos_token_id=llama_tok.bos_token_id,
            eos_token_id=llama_tok.eos_token_id,
            **SIZE,
        )
    )
    for name, model, tok in (("bert", bert, bert_tok), ("llama", llama, llama_tok)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    save_llama(root / "toy", "tiny")
    return {"bert": root / "bert", "llama": root / "llama", "toy": root / "toy"}


def _variance(out: Path, *args: str) -> int:
    return main(["variance", *TASK, *DESIGN, f"--output={out}", *args])


def _one_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in "".join(lines)
    return errors[0]


def test_masked_lm_report_is_written_with_the_arm_row_skipped(models, tmp_path):
    out = tmp_path / "variance"
    assert _variance(out, f"model={models['bert']}") == 0
    report = json.loads((out / "variance.json").read_text())
    assert report["arm"] is None and report["comparison"]["arm_floor"] is None
    assert report["decomposition"]["standard"]["loss"]["C"] is not None
    assert any(n.startswith("arm: skipped") and "masked_lm" in n for n in report["notes"])
    assert "arm: skipped" in (out / "variance.md").read_text()
    assert (out / "components.png").is_file()


@pytest.fixture(scope="module")
def arm_run(models, tmp_path_factory) -> Path:
    """An ARM trained from the hf_fixtures Llama (no mask token)."""
    out = tmp_path_factory.mktemp("arm") / "run"
    assert (
        main(["train", *TRAIN, f"model={models['llama']}", "objective=arm", f"output_dir={out}"])
        == 0
    )
    return out


def test_arm_checkpoint_of_the_same_vocabulary_is_the_reference(models, arm_run, tmp_path):
    """The MDM adds a mask token the ARM lacks: every other token is the same, so it is used."""
    out = tmp_path / "variance"
    args = [f"model={models['llama']}", "add_mask_token=true", f"--arm-checkpoint={arm_run}"]
    assert _variance(out, *args) == 0
    arm = json.loads((out / "variance.json").read_text())["arm"]
    assert arm["loss"]["A"] == pytest.approx(0.0, abs=1e-9) and arm["loss"]["C"] > 0


def test_arm_checkpoint_of_another_vocabulary_is_refused(models, arm_run, tmp_path, capsys):
    out = tmp_path / "variance"
    args = [f"model={models['toy']}", "mask_token=<|mask|>", f"--arm-checkpoint={arm_run}"]
    assert _variance(out, *args) == 2
    line = _one_error(capsys)
    assert "--arm-checkpoint" in line and "vocabulary" in line and str(arm_run) in line
    assert not out.exists()


def test_arm_row_uses_the_runs_loss_normaliser(tmp_path):
    """normalizer_length 1 -> 2 halves every per-sequence loss, so C falls 4-fold: for the
    MDM and, on the same scale, for the ARM (which ignored the normaliser before)."""
    options = vr.VarianceOptions(
        methods=("standard",),
        loss_design=vm.Design(3, 2, 2),
        grad_design=vm.Design(2, 2, 2),
        draws=3,
        batch=2,
        project=8,
        bootstrap=0,
        grid=3,
        grid_sequences=2,
        grid_masks=2,
    )
    small = [*TASK, "d_model=32", "n_layers=1", "n_heads=2", "loss_normalizer=fixed"]
    reports = [
        vr.run_variance(
            load_config(None, [*small, f"normalizer_length={n}", f"output_dir={tmp_path}"]),
            options,
        )
        for n in (1, 2)
    ]
    for row in ("arm", "standard"):
        one, two = (r["arm"] if row == "arm" else r["decomposition"][row] for r in reports)
        assert one["loss"]["C"] == pytest.approx(4 * two["loss"]["C"], rel=1e-6), row


def test_variance_of_a_lora_checkpoint_measures_its_adapters(models, tmp_path, capsys):
    run = tmp_path / "lora"
    train_args = [*TRAIN, f"model={models['llama']}", "add_mask_token=true", "lora_r=4"]
    assert main(["train", *train_args, f"output_dir={run}"]) == 0
    out = tmp_path / "variance"
    assert _variance(out, f"--checkpoint={run}") == 0
    report = json.loads((out / "variance.json").read_text())
    full = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(models["llama"]).parameters())
    assert 0 < report["feature"]["coordinates"] < full  # the adapters (and the mask row) only
    assert report["arm"]["loss"]["C"] > 0
