"""Hugging Face models end to end: fine-tune through the CLI and the Python API, save, reload,
evaluate and generate; bad model or data input fails with one line before training starts."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hf_fixtures import bert_tokenizer
from test_hf_models import _llama
from transformers import (
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    TrainerCallback,
)

from stablemdm.cli import main
from stablemdm.models.hf import adapter_spec
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train
from stablemdm.training.saved import load_checkpoint, objective_of

TINY = [
    "task=chain_sum",
    "task_options={n_train: 64, n_test: 6}",
    "per_device_train_batch_size=4",
    "max_steps=2",
    "save_steps=2",
    "logging_steps=1",
    "disable_tqdm=true",
    "ppots_sequences=3",
    "ppots_rates=6",
    "ppots_masks=2",
]


def _save(model: torch.nn.Module, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Llama causal LM with a chat template and no mask token."""
    return _llama(tmp_path_factory.mktemp("hf") / "llama", positions=128)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    tok = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return _save(BertForMaskedLM(config), tok, tmp_path_factory.mktemp("hf") / "bert")


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory) -> Path:
    tok = bert_tokenizer()
    config = ModernBertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    torch.manual_seed(0)
    return _save(ModernBertForMaskedLM(config), tok, tmp_path_factory.mktemp("hf") / "mbert")


def _train_cli(out: Path, *overrides: str) -> None:
    assert main(["train", *TINY, *overrides, f"output_dir={out}"]) == 0


def _eval_cli(folder: Path, capsys) -> dict:
    capsys.readouterr()
    args = ["eval", str(folder), "--task", "chain_sum", "--limit", "3"]
    assert main([*args, "--task-option", "n_train=64", "--task-option", "n_test=6"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "name,extra",
    [
        ("llama", ["add_mask_token=true", "chat_template=true"]),
        ("bert", []),
        ("modernbert", []),
    ],
)
def test_mdm_fine_tune_with_ppots_mirror_saves_reloads_and_decodes(
    name, extra, request, tmp_path, capsys
):
    folder = request.getfixturevalue(name)
    out = tmp_path / name
    _train_cli(out, f"model={folder}", "sampler=ppots", "masking=mirror", *extra)
    assert (out / "ppots.json").is_file() and (out / "config.yaml").is_file()
    model, tokenizer = load_checkpoint(out)
    spec = adapter_spec(model)
    assert objective_of(model) == "mdm" and spec.mask_token_id == tokenizer.mask_token_id
    assert spec.bidirectional == (name == "llama") and not spec.shift_logits
    assert load_config(out / "config.yaml").shift_logits is spec.shift_logits  # not null
    result = _eval_cli(out, capsys)
    assert result["objective"] == "mdm" and result["n"] == 3
    assert (out / "eval-chain_sum-test.jsonl").is_file()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "4+1-2", "--gen-length", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_count_mode_and_arm_fine_tunes_through_the_python_api(llama, tmp_path):
    mdm = load_config(None, [*TINY, f"model={llama}", "add_mask_token=true", "rate=count"])
    mdm.output_dir = str(tmp_path / "count")
    assert train(mdm).global_step == 2
    arm = load_config(None, [*TINY, f"model={llama}", "objective=arm"])
    arm.output_dir = str(tmp_path / "arm")
    assert train(arm).global_step == 2
    model, tokenizer = load_checkpoint(tmp_path / "arm")
    assert objective_of(model) == "arm" and tokenizer.mask_token_id is None
    assert load_config(tmp_path / "arm" / "config.yaml").shift_logits is False


def test_lora_trains_adapters_only_and_reloads(llama, tmp_path, capsys):
    out = tmp_path / "lora"
    _train_cli(out, f"model={llama}", "add_mask_token=true", "lora_r=4", "masking=mirror")
    assert (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").is_file()
    assert _eval_cli(out, capsys)["n"] == 3


class _Kill(TrainerCallback):
    """Stops the process (an exception out of train) after step `at`."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


def test_resume_reproduces_the_uninterrupted_hf_run(llama, tmp_path):
    common = [*TINY, f"model={llama}", "add_mask_token=true", "max_steps=4", "save_steps=2"]
    assert_resume_reproduces([*common, "sampler=ppots", "masking=mirror"], tmp_path)


def assert_resume_reproduces(common: list[str], tmp_path: Path) -> None:
    """A run of `common` killed after step 3 and resumed ends with the uninterrupted run's
    weights, bit for bit."""
    train(load_config(None, [*common, f"output_dir={tmp_path / 'whole'}"]))
    cut = [*common, f"output_dir={tmp_path / 'cut'}"]
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, cut), callbacks=[_Kill(3)])
    train(load_config(None, cut), resume=True)
    a, _ = load_checkpoint(tmp_path / "whole")
    b, _ = load_checkpoint(tmp_path / "cut")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "mask"),  # a causal LM has no mask token and none was added
        (["add_mask_token=true", "max_length=8"], "max_length"),  # no room for the response
        (["mask_token=<eos>"], "eos"),  # an existing token with another job as the mask
    ],
)
def test_bad_llama_input_fails_before_training(llama, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(["train", *TINY, f"model={llama}", *extra, f"output_dir={out}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if not line.startswith("stablemdm: ")]  # notes, warnings
    assert len(errors) == 1 and errors[0].startswith("stablemdm train: error:")
    assert message in errors[0].lower()
    assert not list(out.glob("checkpoint-*"))


def test_chat_template_without_one_in_the_tokenizer_is_refused(bert, tmp_path, capsys):
    assert main(["train", *TINY, f"model={bert}", "chat_template=true"]) == 2
    assert "chat template" in capsys.readouterr().err


def test_dataset_missing_a_named_column_is_refused(bert, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1", "response": "2"}) + "\n")
    options = f"task_options={{train: {data}, test: {data}}}"
    assert main(["train", *TINY, f"model={bert}", "task=dataset", options]) == 2
    err = capsys.readouterr().err
    assert "prompt" in err and "question" in err


def test_variance_tool_decomposes_an_adapted_causal_lm(llama, tmp_path):
    out = tmp_path / "variance"
    args = [
        "variance",
        "task_options={n_train: 40, n_test: 4}",
        f"model={llama}",
        "add_mask_token=true",
        "ppots_sequences=2",
        "ppots_rates=4",
        "ppots_masks=2",
        "--methods=ppots_mirror,count",
        "--sequences=4",
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
        "--params=lm_head|embed",
        "--project=8",
        f"--output={out}",
    ]
    assert main(args) == 0
    report = json.loads((out / "variance.json").read_text())
    assert {"standard", "ppots_mirror", "count"} <= set(report["decomposition"])
    assert report["arm"]["loss"]["A"] == pytest.approx(0.0, abs=1e-6)  # an ARM has no mask noise


def test_streamed_chat_dataset_trains_with_a_template(llama, tmp_path, capsys):
    def chat(i: int) -> dict:
        turns = [
            {"role": "user", "content": f"{i}+1"},
            {"role": "assistant", "content": f"{i + 1}"},
        ]
        return {"messages": turns}

    for name, ids in (("train", range(40)), ("test", range(10, 14))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(chat(i)) + "\n" for i in ids))
    options = (
        f"task_options={{train: {tmp_path / 'train.jsonl'}, test: {tmp_path / 'test.jsonl'}, "
        "messages_column: messages, streaming: true}"
    )
    out = tmp_path / "run"
    _train_cli(
        out,
        f"model={llama}",
        "add_mask_token=true",
        "chat_template=true",
        "task=dataset",
        options,
        "loss_normalizer=response",
    )
    saved = load_config(out / "config.yaml")
    assert saved.chat_template and saved.gen_length == 4  # "40" <|end|> <eos>, measured
    capsys.readouterr()
    args = ["eval", str(out), "--task", "dataset", "--limit", "2"]
    args += ["--task-option", f"train={tmp_path / 'train.jsonl'}"]
    args += ["--task-option", f"test={tmp_path / 'test.jsonl'}"]
    assert main([*args, "--task-option", "messages_column=messages"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 2


@pytest.mark.parametrize(
    "method",
    [
        ["scheme=stratified"],
        ["scheme=mirrored"],
        ["sampler=ema", "ema_refresh_every=1"],
        ["masking=isad", "isad_tokens=['-']"],
        ["sampler=ppots", "ppots_target=grad", "ppots_params=lm_head"],
        ["rate=count", "sampler=ppots", "masking=mirror", "scheme=stratified"],
        ["activation_checkpointing=true", "masking=mirror"],
    ],
    ids=["strats", "syrm", "ema", "isad", "ppots_grad", "count_ppots_mirror_strats", "ckpt"],
)
def test_every_method_trains_an_adapted_causal_lm(llama, tmp_path, method):
    config = load_config(None, [*TINY, f"model={llama}", "add_mask_token=true", *method])
    config.output_dir = str(tmp_path / "run")
    result = train(config)
    losses = [r["loss"] for r in result.log_history if "loss" in r]
    assert result.global_step == 2 and all(map(math.isfinite, losses))


def test_lora_run_loads_from_another_directory_and_names_a_missing_base(
    llama, tmp_path, monkeypatch, capsys
):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(llama, work / "base")
    elsewhere.mkdir()
    monkeypatch.chdir(work)  # the base model typed as a relative path, as users do
    _train_cli(Path("run"), "model=base", "add_mask_token=true", "lora_r=4")
    monkeypatch.chdir(elsewhere)
    assert _eval_cli(work / "run", capsys)["n"] == 3
    (work / "base").rename(work / "moved")
    capsys.readouterr()
    assert main(["generate", str(work / "run"), "--prompt", "1+2", "--gen-length", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(work / "base") in err[0] and "huggingface.co" not in err[0]


def test_an_empty_prompt_without_bos_under_shift_logits_is_refused(tmp_path, capsys):
    """A causal LM whose tokenizer adds no BOS (ChatML family), adapted with shifted logits:
    an example with an empty prompt has no position before its first response token."""
    from hf_fixtures import chatml_tokenizer

    tok = chatml_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = _save(LlamaForCausalLM(config), tok, tmp_path / "nobos")
    rows = [{"prompt": f"{i}+1", "response": f"{i + 1}"} for i in range(8)]
    rows[3]["prompt"] = ""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = f"task_options={{train: {data}, test: {data}}}"
    out = tmp_path / "run"
    args = ["train", *TINY, f"model={model}", "add_mask_token=true", "task=dataset", options]
    args.append("shift_logits=true")  # not the default since the shift was measured
    assert main([*args, f"output_dir={out}"]) == 2
    errors = [e for e in capsys.readouterr().err.splitlines() if "error:" in e]
    assert len(errors) == 1 and "prompt is empty" in errors[0] and "d.jsonl:row 3" in errors[0]
    assert not out.exists()
    assert main([*args, "shift_logits=false", "max_steps=1", f"output_dir={out}"]) == 0
