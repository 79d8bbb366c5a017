"""models.hf: kinds, mask tokens, bidirectional adaptation, shifted logits, t-conditioning,
the objective on every kind, save/reload and LoRA, with tiny models built from config."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_fixtures import bert_tokenizer, llama_tokenizer
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from stablemdm.cli import main
from stablemdm.config import ConfigError
from stablemdm.losses import logits_of
from stablemdm.models.hf import (
    AdapterSpec,
    adapter_spec,
    add_mask_token,
    apply_lora,
    check_mask_token_id,
    detect_kind,
    load_hf_model,
    load_trained,
    resolve_mask_token_id,
)
from stablemdm.objective import Objective
from stablemdm.samplers import PPOTS

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_llada"


def _llama(folder: Path, attn: str = "sdpa") -> Path:
    tok = llama_tokenizer(chat=True)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _bert(folder: Path) -> Path:
    tok = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _llada(folder: Path, conditions_on_t: bool = False) -> Path:
    """The custom-code LLaDA mimic of tests/fixtures, with seeded weights and a tokenizer
    carrying LLaDA's `<|mdm_mask|>`."""
    shutil.copytree(FIXTURE, folder)
    tok = llama_tokenizer(chat=True, mask=True)
    values = json.loads((folder / "config.json").read_text())
    values.update(vocab_size=len(tok), conditions_on_t=conditions_on_t)
    (folder / "config.json").write_text(json.dumps(values))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": _llama(root / "llama"),
        "llama_eager": _llama(root / "llama_eager", "eager"),
        "bert": _bert(root / "bert"),
        "llada": _llada(root / "llada"),
        "llada_t": _llada(root / "llada_t", conditions_on_t=True),
    }


def _batch(vocab: int, b: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 2, (b, length), generator=g)
    eligible = torch.zeros(b, length, dtype=torch.bool)
    eligible[:, 4:] = True  # a 4-token prompt, then the response
    return {"input_ids": ids, "attention_mask": torch.ones_like(eligible), "eligible": eligible}


def test_kinds_are_detected_from_the_architectures():
    assert detect_kind(BertConfig(architectures=["BertForMaskedLM"])) == "masked_lm"
    assert detect_kind(LlamaConfig(architectures=["LlamaForCausalLM"])) == "causal"
    assert detect_kind(LlamaConfig(architectures=["LLaDAModelLM"])) == "diffusion"
    assert detect_kind(LlamaConfig()) == "causal"  # no architectures (GGUF): the model type
    assert detect_kind(BertConfig()) == "masked_lm"


def test_mask_token_resolution_order():
    tok = llama_tokenizer(mask=True)
    llada_id = tok.convert_tokens_to_ids("<|mdm_mask|>")
    plain = LlamaConfig()
    assert resolve_mask_token_id(plain, tok, mask_token_id=5, mask_token="<|mdm_mask|>") == 5
    assert resolve_mask_token_id(plain, tok, mask_token="<|end|>") == tok.convert_tokens_to_ids(
        "<|end|>"
    )
    assert resolve_mask_token_id(LlamaConfig(mask_token_id=9), tok) == 9  # Dream's config
    assert resolve_mask_token_id(plain, bert_tokenizer()) == bert_tokenizer().mask_token_id
    assert resolve_mask_token_id(plain, tok) == llada_id  # a known mask string (LLaDA)
    assert resolve_mask_token_id(plain, llama_tokenizer()) is None
    with pytest.raises(ConfigError, match="not one token"):
        resolve_mask_token_id(plain, tok, mask_token="ab")


@pytest.mark.parametrize("role", ["eos", "bos", "unk"])
def test_a_mask_token_with_another_job_is_refused(role):
    tok = llama_tokenizer()
    with pytest.raises(ConfigError, match=role.upper()):
        check_mask_token_id(getattr(tok, f"{role}_token_id"), len(tok), tok)
    with pytest.raises(ConfigError, match="outside"):
        check_mask_token_id(len(tok), len(tok), tok)


def test_added_mask_token_is_new_with_mean_embeddings(folders):
    model = LlamaForCausalLM.from_pretrained(folders["llama"])
    tok = llama_tokenizer()
    before = model.get_input_embeddings().weight.detach().clone()
    new_id = add_mask_token(model, tok)
    assert new_id == before.shape[0] and len(tok) == new_id + 1
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == new_id + 1
    assert torch.allclose(rows[new_id], before.mean(dim=0))
    assert torch.equal(rows[:new_id], before)


@pytest.mark.parametrize("name", ["llama", "llama_eager"])
def test_adapted_causal_lm_attends_both_ways(folders, name):
    adapted, _, spec = load_hf_model(str(folders[name]), objective="mdm", add_mask_token=True)
    plain = LlamaForCausalLM.from_pretrained(folders[name])
    assert spec.bidirectional and spec.shift_logits
    x = _batch(90)["input_ids"]
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 90  # change only the LAST token
    with torch.no_grad():
        first = [m(input_ids=v).logits[:, :-1] for m in (adapted, plain) for v in (x, y)]
    assert not torch.allclose(first[0], first[1])  # the adapted model sees the future
    assert torch.equal(first[2], first[3])  # the causal one does not


def test_shifted_logits_move_predictions_one_position(folders):
    shifted, _, _ = load_hf_model(str(folders["llama"]), objective="mdm", add_mask_token=True)
    unshifted, _, spec = load_hf_model(
        str(folders["llama"]), objective="mdm", add_mask_token=True, shift_logits=False
    )
    assert not spec.shift_logits and spec.bidirectional
    x = _batch(90)["input_ids"]
    with torch.no_grad():
        raw = unshifted(input_ids=x).logits
        out = logits_of(shifted, x, None)
        plain = logits_of(unshifted, x, None)
    assert torch.allclose(out[:, 1:], raw[:, :-1], atol=1e-6)
    assert torch.allclose(plain, raw)


def test_a_model_that_conditions_on_t_is_given_t(folders):
    model, _, spec = load_hf_model(str(folders["llada_t"]), objective="mdm", trust_remote_code=True)
    assert spec == AdapterSpec("diffusion", False, False, spec.mask_token_id, True)
    x = _batch(model.config.vocab_size)["input_ids"]
    with torch.no_grad():
        a = logits_of(model, x, None, torch.full((3,), 0.1))
        b = logits_of(model, x, None, torch.full((3,), 0.9))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="no t was given"):
        logits_of(model, x, None)
    with pytest.raises(ValueError, match="conditions_on_t"):
        Objective(mask_token_id=spec.mask_token_id, rate="count")(
            model, _batch(model.config.vocab_size), torch.Generator(), torch.Generator()
        )


def test_custom_code_needs_trust_remote_code(folders):
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_hf_model(str(folders["llada"]), objective="mdm")


@pytest.mark.parametrize("name", ["llama", "bert", "llada", "llada_t"])
@pytest.mark.parametrize("mode", ["ppots_mirror", "count"])
def test_the_objective_trains_every_kind(folders, name, mode):
    if name == "llada_t" and mode == "count":
        pytest.skip("count mode integrates t out: refused for a t-conditioned model (above)")
    model, tok, spec = load_hf_model(
        str(folders[name]), objective="mdm", add_mask_token=True, trust_remote_code=True
    )
    density = PPOTS.from_function(lambda t: 1 + 3 * (1 - t) ** 2, mix=0.1)
    options = {"sampler": density, "masking": "mirror"} if mode == "ppots_mirror" else {}
    objective = Objective(
        mask_token_id=spec.mask_token_id, rate="t" if options else "count", **options
    )
    out = objective(model, _batch(len(tok)), torch.Generator().manual_seed(1), torch.Generator())
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.forward_passes == (6 if options else 3)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_a_causal_lm_trains_as_the_arm(folders):
    model, _, spec = load_hf_model(str(folders["llama"]), objective="arm")
    assert spec.mask_token_id is None and not spec.bidirectional and not spec.shift_logits
    out = Objective(mask_token_id=-1, kind="arm")(model, _batch(90))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    with pytest.raises(ConfigError, match="causal LM"):
        load_hf_model(str(folders["bert"]), objective="arm")


def test_save_and_reload_restore_the_adaptation(folders, tmp_path):
    model, tok, spec = load_hf_model(str(folders["llama"]), objective="mdm", add_mask_token=True)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2, spec2 = load_trained(tmp_path)
    assert spec2 == spec and len(tok2) == len(tok)
    x = _batch(len(tok))["input_ids"]
    with torch.no_grad():
        assert torch.equal(logits_of(model, x, None), logits_of(again, x, None))


def test_lora_trains_adapters_and_the_new_mask_row_only(folders, tmp_path):
    base, tok, spec = load_hf_model(str(folders["llama"]), objective="mdm", add_mask_token=True)
    model = apply_lora(base, r=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "embed_tokens" in n for n in trainable)
    assert any("embed_tokens" in n for n in trainable)  # the added mask row must be learned
    Objective(mask_token_id=spec.mask_token_id)(
        model, _batch(len(tok)), torch.Generator(), torch.Generator()
    ).loss.backward()
    frozen = [p for n, p in model.named_parameters() if n not in trainable]
    assert all(p.grad is None for p in frozen)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model.get_base_model().config.save_pretrained(tmp_path)  # the spec, as a run saves it
    again, _, spec2 = load_trained(tmp_path)
    assert spec2 == spec
    x = _batch(len(tok))["input_ids"]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(logits_of(model, x, None), logits_of(again, x, None), atol=1e-6)


def test_llada_style_model_fine_tunes_through_the_cli(folders, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        f"model={folders['llada']}",
        "trust_remote_code=true",
        "task=chain_sum",
        "task_options={n_train: 32, n_test: 4}",
        "sampler=ppots",
        "masking=mirror",
        "ppots_sequences=2",
        "ppots_rates=4",
        "ppots_masks=2",
        "per_device_train_batch_size=4",
        "max_steps=2",
        "save_steps=2",
        "disable_tqdm=true",
        f"output_dir={out}",
    ]
    assert main(args) == 0
    assert adapter_spec(load_trained(out, trust_remote_code=True)[0]).kind == "diffusion"
    capsys.readouterr()
    assert main(["eval", str(out), "--task", "chain_sum", "--task-option", "n_test=4"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 4
    bad = [a for a in args if a != "trust_remote_code=true"]
    assert main([*bad[:-1], f"output_dir={tmp_path / 'bad'}"]) == 2
    assert "trust_remote_code=true" in capsys.readouterr().err
