"""Block diffusion on a Hugging Face causal LM (models/hf_blocks.py, docs/hf.md): the noised
copy sees exactly what block diffusion allows through the 4-D mask, the loss reads each noised
position's own logits, and a run trains, resumes, saves, reloads, evaluates and generates;
anything else is refused in one line."""

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from test_hf_models import _bert, _llama
from test_hf_train import TINY, assert_resume_reproduces

from stablemdm.cli import main
from stablemdm.estimators.blocks import block_loss, response_blocks
from stablemdm.estimators.losses import logits_of, token_nll
from stablemdm.models.hf import adapter_spec, apply_lora, load_hf_model
from stablemdm.models.hf_blocks import block_refusal
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train
from stablemdm.training.saved import load_checkpoint, objective_of

BLOCK = ["objective=block", "block_size=2", "add_mask_token=true"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _llama(tmp_path_factory.mktemp("hf") / "llama")


def _block_model(folder: Path, block_size: int, lora: bool = False):
    model, tokenizer, spec = load_hf_model(
        str(folder), objective="block", block_size=block_size, add_mask_token=True
    )
    if lora:  # peft's wrappers must pass block_ids through to the decoder's hook
        model = apply_lora(model, r=4, alpha=8.0, dropout=0.0)
    return model.eval(), spec.mask_token_id


def _noised_logits(model, noised: torch.Tensor, clean: torch.Tensor, block_ids) -> torch.Tensor:
    """The logits of the noised copy `[B, L, V]` in one `[noised | clean]` pass."""
    with torch.no_grad():
        both = logits_of(model, torch.cat([noised, clean], 1), None, block_ids=block_ids)
    return both[:, : clean.shape[1]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_block_size_1_noised_logits_are_the_causal_lm_reading_the_clean_prefix(attention, llama):
    """With blocks of one token, noised position i sees [MASK] at i and the clean tokens
    before it: exactly the unmodified causal LM's forward over x0[:i] + [MASK]."""
    model, mask_id = _block_model(llama, 1)
    model.set_attn_implementation(attention)  # eager adds the mask to the scores itself
    assert block_refusal(model) is None
    x0 = torch.tensor([[5, 9, 17, 30, 41]])
    eligible = torch.tensor([[False, True, True, True, True]])
    block_ids = response_blocks(eligible, 1)
    noised = torch.full_like(x0, mask_id)
    got = _noised_logits(model, noised, x0, block_ids)
    for i in range(x0.shape[1]):
        prefix = torch.cat([x0[:, :i], torch.tensor([[mask_id]])], 1)
        with torch.no_grad():
            want = model(input_ids=prefix).logits[:, -1]  # the plain causal forward
        torch.testing.assert_close(got[:, i], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_a_noised_block_sees_no_later_block_and_no_other_noised_block(llama, lora):
    model, mask_id = _block_model(llama, 2, lora)
    x0 = torch.tensor([[5, 9, 17, 30, 41, 52, 60]])  # prompt 5, 9; blocks (17 30) (41 52) (60)
    eligible = torch.tensor([[False, False, True, True, True, True, True]])
    block_ids = response_blocks(eligible, 2)
    noised = x0.masked_fill(torch.tensor([[0, 0, 1, 0, 1, 1, 0]]).bool(), mask_id)
    base = _noised_logits(model, noised, x0, block_ids)
    later = x0.clone()
    later[:, 4:] = 70  # the clean tokens of blocks 2 and 3 changed ...
    later_noised = noised.clone()
    later_noised[:, 4:] = 71  # ... and their noised tokens
    changed = _noised_logits(model, later_noised, later, block_ids)
    torch.testing.assert_close(changed[:, :4], base[:, :4], atol=0, rtol=0)
    other = noised.clone()
    other[:, 2:4] = 72  # the noised tokens of block 1 changed: block 2 reads block 1 clean
    moved = _noised_logits(model, other, x0, block_ids)
    torch.testing.assert_close(moved[:, 4:], base[:, 4:], atol=0, rtol=0)
    assert not torch.allclose(moved[:, 2:4], base[:, 2:4])  # the probe can see a change


def test_the_block_loss_reads_each_noised_positions_own_logits(llama):
    """The loss of the adapted model is the block formula on its unshifted noised logits."""
    model, mask_id = _block_model(llama, 2)
    x0 = torch.tensor([[5, 9, 17, 30, 41, 52], [6, 8, 22, 33, 44, 3]])
    eligible = torch.tensor([[False, False, True, True, True, True]] * 2)  # blocks 2:4, 4:6
    block_ids = response_blocks(eligible, 2)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 0, 1]]).bool()
    p = torch.tensor([[0.5, 0.7], [0.4, 0.6]])
    with torch.no_grad():
        loss, _ = block_loss(model, x0, eligible, mask, block_ids, p, mask_id)
    logits = _noised_logits(model, x0.masked_fill(mask, mask_id), x0, block_ids)
    nll = token_nll(logits, x0) * (mask & eligible)  # position i scored on token i
    blocks = torch.stack([nll[:, 2:4].sum(1), nll[:, 4:6].sum(1)], 1)
    want = (blocks / (eligible.sum(1, keepdim=True) * p)).sum(1)
    torch.testing.assert_close(loss.per_sequence, want)


@pytest.mark.parametrize("extra", [["masking=mirror"], ["rate=count", "lora_r=4"]])
def test_a_block_run_trains_saves_evaluates_and_generates(llama, tmp_path, capsys, extra):
    out = tmp_path / "run"
    args = ["train", *TINY, f"model={llama}", *BLOCK, *extra, f"output_dir={out}"]
    assert main(args) == 0
    losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").open()]
    assert all(math.isfinite(v) for v in losses if v is not None)
    model, tokenizer = load_checkpoint(out)
    assert objective_of(model) == "block" and adapter_spec(model).block_size == 2
    assert load_config(out / "config.yaml").block_size == 2
    capsys.readouterr()
    eval_args = ["eval", str(out), "--task", "chain_sum", "--limit", "2"]
    assert main([*eval_args, "--task-option", "n_train=64", "--task-option", "n_test=6"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["objective"] == "block"
    assert main(["generate", str(out), "--prompt", "4+1-2", "--gen-length", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_a_resumed_block_run_reproduces_the_uninterrupted_one(llama, tmp_path):
    common = [*TINY, f"model={llama}", *BLOCK, "max_steps=4", "save_steps=2"]
    assert_resume_reproduces([*common, "scheme=stratified_rows"], tmp_path)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return _bert(tmp_path_factory.mktemp("hf") / "bert")


@pytest.mark.parametrize(
    "model,extra,message",
    [
        ("bert", ["objective=block", "block_size=2"], "is a masked_lm model"),
        ("llama", [*BLOCK, "shift_logits=true"], "shift_logits"),
    ],
)
def test_what_cannot_train_block_causally_is_refused_in_one_line(
    model, extra, message, request, tmp_path, capsys
):
    folder = request.getfixturevalue(model)
    out = tmp_path / "bad"
    capsys.readouterr()  # the fixture's own output
    assert main(["train", *TINY, f"model={folder}", *extra, f"output_dir={out}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if not line.startswith("stablemdm: ")]
    assert len(errors) == 1 and errors[0].startswith("stablemdm train: error:")
    assert message in errors[0] and not out.exists()


def test_a_causal_lm_that_ignores_the_mask_is_refused(llama):
    """The check is behavioural: the same Llama without the hook that applies the mask (its
    forward swallows `block_ids`) is refused; with it, it passes."""
    model, _, _ = load_hf_model(str(llama), objective="mdm", add_mask_token=True)
    assert "mask" in block_refusal(model)
    hooked, _ = _block_model(llama, 2)
    assert block_refusal(hooked) is None


SMOLLM2 = Path(__file__).resolve().parents[1] / "runs" / "smollm2"


@pytest.mark.skipif(
    not SMOLLM2.is_dir() or os.environ.get("STABLEMDM_SMOLLM2") != "1",
    reason="SmolLM2 real weights: run `make smollm2` and set STABLEMDM_SMOLLM2=1 (minutes on CPU)",
)
def test_smollm2_trains_as_block_diffusion_for_a_few_steps(tmp_path):
    gguf = next(SMOLLM2.glob("*.gguf"))
    config = load_config(
        None,
        [*TINY, f"model={SMOLLM2}", f"gguf_file={gguf.name}", *BLOCK, "block_size=4"],
    )
    config.output_dir = str(tmp_path / "smollm2")
    start = time.perf_counter()
    result = train(config)
    print(f"SmolLM2 block diffusion: 2 steps in {time.perf_counter() - start:.1f} s")
    losses = [r["loss"] for r in result.log_history if "loss" in r]
    assert result.global_step == 2 and all(map(math.isfinite, losses))
