"""The library example (`examples/hf_trainer.py`) runs as a user would run it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_example(*args: str) -> list[str]:
    """The example's stdout lines; it must exit 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = ROOT / "examples" / "hf_trainer.py"
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_hf_trainer_example_trains_reloads_and_decodes(tmp_path):
    lines = _run_example("--output", str(tmp_path), "--steps", "3")
    assert any(line.startswith("trained 3 steps; losses [") for line in lines)
    assert sum(" -> " in line and "(gold " in line for line in lines) == 8
    assert (tmp_path / "run" / "config.json").is_file()


def test_hf_trainer_example_runs_a_model_without_a_chat_template(tmp_path):
    """`--model` a BERT-style masked LM: no chat template, its own [MASK] token."""
    import torch
    from hf_fixtures import bert_tokenizer
    from transformers import BertConfig, BertForMaskedLM

    tok = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    lines = _run_example("--output", str(tmp_path / "out"), "--model", str(tmp_path / "bert"))
    assert sum(" -> " in line and "(gold " in line for line in lines) == 8
