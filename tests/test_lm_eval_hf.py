"""The lm-eval model on Hugging Face models (issue 26, item 2): `pretrained=` loads an MDM
from a folder (its own code only with trust_remote_code; its mask token from its tokenizer,
or mask_token=) and a causal LM by Hub name from the local cache as an exact ARM, offline.
Skipped where the `lm-eval` extra is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "lm_eval", reason='the lm-eval extra is not installed: pip install ".[lm-eval]"'
)

from hf_caches import cached_model  # noqa: E402
from hf_fixtures import LLADA_CODE, custom_code_model, llada_model, llama_tokenizer  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from stablemdm.cli import main  # noqa: E402
from stablemdm.errors import ConfigError  # noqa: E402
from stablemdm.lmeval.model import StableMDMLM  # noqa: E402
from stablemdm.models.toy import save_llama  # noqa: E402

TASKS = Path(__file__).resolve().parent / "fixtures" / "lm_eval"
SMALL = "estimator=count_mirror,mc_batch=4,max_passes=8,min_draws=2"


def _lm_eval(model_args: str) -> int:
    """`stablemdm lm-eval` on two questions of the local multiple-choice task."""
    tasks = ["--tasks", "stablemdm_choices", "--include_path", str(TASKS), "--limit", "2"]
    return main(["lm-eval", "--model", "stablemdm", "--model_args", model_args, *tasks])


def test_an_mdm_folder_runs_only_with_trust_remote_code(tmp_path, monkeypatch, capsys, one_thread):
    folder = llada_model(tmp_path / "llada")  # its config.json names its own modules
    monkeypatch.chdir(TASKS)  # the task's data_files are relative to it
    assert _lm_eval(f"pretrained={folder},{SMALL}") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("stablemdm lm-eval: error:") and "trust_remote_code=true" in err
    records = tmp_path / "records.jsonl"
    model_args = f"pretrained={folder},trust_remote_code=true,{SMALL},records={records}"
    assert _lm_eval(model_args) == 0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(rows) == 2 * 3  # two questions of three choices
    assert all(r["se"] > 0 and r["passes"] == 8 and r["estimator"] == "count_mirror" for r in rows)


def test_an_mdm_masks_with_its_tokenizers_mask_token_or_the_one_named(tmp_path):
    with_mask = llada_model(tmp_path / "with_mask")
    lm = StableMDMLM(pretrained=str(with_mask), trust_remote_code=True)
    vocab = lm.tokenizer.tokenizer.get_vocab()
    assert lm.objective == "mdm" and lm.tokenizer.mask_token_id == vocab["<|mdm_mask|>"]
    tokenizer = llama_tokenizer(chat=True, mask=False)
    plain = custom_code_model(LLADA_CODE, tmp_path / "plain", tokenizer, vocab_size=len(tokenizer))
    with pytest.raises(ConfigError, match="names no mask token .* mask_token=TOKEN"):
        StableMDMLM(pretrained=str(plain), trust_remote_code=True)
    lm = StableMDMLM(pretrained=str(plain), trust_remote_code=True, mask_token="<|system|>")
    assert lm.tokenizer.mask_token_id == tokenizer.convert_tokens_to_ids("<|system|>")


def test_a_causal_lm_by_hub_name_is_an_exact_arm_from_the_local_cache(
    tmp_path, monkeypatch, one_thread
):
    from huggingface_hub import constants

    save_llama(tmp_path / "llama")
    hub = tmp_path / "hub"
    cached_model(hub, "someone/tiny-llama", tmp_path / "llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read both at its import, before this test: what it read is set too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    lm = StableMDMLM(pretrained="someone/tiny-llama")
    assert lm.objective == "arm" and lm.model.name_or_path == "someone/tiny-llama"
    context, continuation = "Once a", " mouse"
    request = Instance("loglikelihood", {}, (context, continuation), 0, metadata=("t", 0, 1))
    ((value, _),) = lm.loglikelihood([request], disable_tqdm=True)
    encode = lm.tokenizer.tokenizer
    head = encode(context, add_special_tokens=False)["input_ids"]
    whole = encode(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = lm.model(torch.tensor([whole])).logits[0].log_softmax(-1)
    exact = sum(logp[i - 1, whole[i]].item() for i in range(len(head), len(whole)))
    assert value == pytest.approx(exact, abs=1e-5)
    assert lm.records.rows[0]["se"] == 0 and lm.records.rows[0]["estimator"] == "exact"
    with pytest.raises(ConfigError, match="scored as an ARM"):
        StableMDMLM(pretrained="someone/tiny-llama", mask_token="<unk>")


def test_dtype_and_max_length_apply_to_the_model_and_its_requests(tmp_path, one_thread):
    """dtype=bfloat16 loads the weights in bfloat16, and the value is that model's own exact
    log-likelihood of the continuation after the context cut to max_length; an unknown dtype
    is one line."""
    folder = tmp_path / "llama"
    save_llama(folder)
    context, continuation = "Once a", " mouse"
    request = Instance("loglikelihood", {}, (context, continuation), 0, metadata=("t", 0, 1))
    lm = StableMDMLM(pretrained=str(folder), dtype="bfloat16", max_length=8)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    ((value, _),) = lm.loglikelihood([request], disable_tqdm=True)
    encode = lm.tokenizer.tokenizer
    head = encode(context, add_special_tokens=False)["input_ids"][-2:]  # 8 - 6 tokens
    tail = encode(continuation, add_special_tokens=False)["input_ids"]
    whole = head + tail
    with torch.no_grad():
        logp = lm.model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    exact = sum(logp[i - 1, whole[i]].item() for i in range(len(head), len(whole)))
    assert value == pytest.approx(exact, abs=1e-5)
    with pytest.raises(ConfigError, match="dtype='int8' in --model_args must be one of"):
        StableMDMLM(pretrained=str(folder), dtype="int8")
