"""Block diffusion as a run (issue 25): objective=block with block_size trains, checkpoints,
saves and says block_size in config.yaml, config.json and the log (its bit-identical resume:
tests/test_trainer.py); `eval` and `generate` decode it block-causally in its own blocks; the
estimators not built for blocks are refused in one line."""

import json
from pathlib import Path

import pytest
import torch
from test_trainer import SMALL

from stablemdm.cli import main
from stablemdm.errors import ConfigError
from stablemdm.evaluation.decoding import generate
from stablemdm.models import ModelConfig, Transformer
from stablemdm.training.memory import check_attention_memory
from stablemdm.training.recipe import load_config
from stablemdm.training.run import train
from stablemdm.training.saved import load_checkpoint, objective_of

BLOCK = ["objective=block", "block_size=4"]


def _config(tmp_path: Path, name: str, *extra: str):
    return load_config(None, [*SMALL, f"output_dir={tmp_path / name}", *BLOCK, *extra])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["objective=block"], "objective=block needs block_size"),
        (["block_size=4"], "objective=block needs block_size"),
        ([*BLOCK[:1], "block_size=0"], "block_size must be > 0"),
        ([*BLOCK, "sampler=ppots"], "set ppots_method=grid"),
        ([*BLOCK, "estimator=auto"], "a candidate of estimator=auto.*ppots_method=grid"),
        ([*BLOCK, "model=some/model", "shift_logits=true"], "leave shift_logits unset"),
    ],
)
def test_what_is_not_built_for_blocks_is_refused_in_one_line(extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, extra)
    assert "\n" not in str(err.value)


def test_a_block_run_says_its_block_size_everywhere(tmp_path):
    """(Its bit-identical resume: tests/test_trainer.py, block_count_clipped.)"""
    train(_config(tmp_path, "r", "max_steps=3", "save_steps=3"))
    run = tmp_path / "r"
    assert "block_size: 4" in (run / "config.yaml").read_text()
    assert "objective: block" in (run / "config.yaml").read_text()
    assert json.loads((run / "config.json").read_text())["block_size"] == 4
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(x["block_size"] == 4 for x in lines if "loss" in x)
    assert objective_of(load_checkpoint(run / "checkpoint-3")[0]) == "block"
    assert objective_of(load_checkpoint(run)[0]) == "block"


def test_a_block_run_evaluates_and_generates_in_its_own_blocks(tmp_path, capsys):
    extra = ["max_steps=2", "save_steps=2", "eval_strategy=steps", "eval_steps=2"]
    train(_config(tmp_path, "r", *extra, "eval_accuracy=true", "eval_limit=2"))
    run = tmp_path / "r"
    assert any("accuracy" in x for x in (run / "metrics.jsonl").read_text().splitlines())
    capsys.readouterr()
    assert main(["eval", str(run), "--limit", "2", "--output", str(tmp_path / "e.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["objective"] == "block"
    assert main(["generate", str(run), "--prompt", "3-4"]) == 0
    assert main(["generate", str(run), "--prompt", "3-4", "--block-length", "8"]) == 2
    err = capsys.readouterr().err
    assert "trained with block_size=4" in err and len(err.strip().splitlines()) == 1


def test_block_decoding_never_looks_at_later_blocks():
    """Each block is decoded from the prompt and the blocks before it only: while the first
    block is decoded, the model's outputs there do not depend on how many blocks follow (a
    short last block included), and neither do its tokens."""
    sizes = dict(vocab_size=12, d_model=16, n_layers=1, n_heads=2, max_seq_len=20)
    model = Transformer(
        ModelConfig(**sizes, mask_token_id=1, block_size=4),
        generator=torch.Generator().manual_seed(0),
    )
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out))
    prompts = [[5, 6, 7], [8, 9]]
    ids = dict(mask_token_id=1, eos_token_id=2, pad_token_id=0, kv_cache=False)  # the cache's:
    short = generate(model, prompts, objective="block", gen_length=4, **ids)  # test_kv_decoding
    first = [x[:, :7] for x in seen[:4]]  # the prompt and the first block, 4 calls
    seen.clear()
    long = generate(model, prompts, objective="block", gen_length=11, **ids)
    assert len(seen) == 11  # one token per call: 4 + 4 + 3 (a short last block)
    for a, b in zip(first, seen[:4], strict=True):
        torch.testing.assert_close(a[0], b[0, :7])
        torch.testing.assert_close(a[1, :6], b[1, :6])
    for a, b in zip(short, long, strict=True):
        assert b[: len(a)] == a and (len(a) == 4 or a == b)


def test_the_attention_memory_check_counts_both_halves(monkeypatch):
    """A block batch attends over 2 x max_length: four times the full canvas's plane."""
    monkeypatch.setattr("stablemdm.training.memory.available_memory", lambda: 30 * 2**30)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=8, mask_token_id=7))
    check_attention_memory(load_config(None, ["use_cpu=true"]), model, 10_003)  # 23.9 GiB
    with pytest.raises(ConfigError, match=r"95\.4 GiB .* x 20006\^2 x 4 bytes, objective=block"):
        check_attention_memory(load_config(None, ["use_cpu=true", *BLOCK]), model, 10_003)
