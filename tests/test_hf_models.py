"""models.hf: kinds, mask tokens, bidirectional adaptation, shifted logits, t-conditioning,
the objective on every kind, save/reload and LoRA, with tiny models built from config."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_fixtures import bert_tokenizer, llada_model, llama_tokenizer
from transformers import (
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
)

from stablemdm.cli import main
from stablemdm.errors import ConfigError
from stablemdm.estimators.losses import logits_of
from stablemdm.estimators.objective import Objective
from stablemdm.estimators.ppots import PPOTS
from stablemdm.evaluation.decoding import generate_arm, generate_mdm
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


def _llama(folder: Path, attn: str = "sdpa", positions: int = 64) -> Path:
    """A tiny seeded Llama causal LM with a chat template and no mask token, saved in
    `folder`."""
    tok = llama_tokenizer(chat=True)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=positions,
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


def _modernbert(folder: Path) -> Path:
    tok = bert_tokenizer()
    config = ModernBertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    torch.manual_seed(0)
    ModernBertForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": _llama(root / "llama"),
        "llama_eager": _llama(root / "llama_eager", "eager"),
        "bert": _bert(root / "bert"),
        "modernbert": _modernbert(root / "modernbert"),
        "llada": llada_model(root / "llada"),
        "llada_t": llada_model(root / "llada_t", conditions_on_t=True),
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
    assert detect_kind(ModernBertConfig(architectures=["ModernBertForMaskedLM"])) == "masked_lm"


@pytest.mark.parametrize(
    ("name", "kind", "mask"),
    [("bert", "masked_lm", "[MASK]"), ("modernbert", "masked_lm", "[MASK]")]
    + [("llada", "diffusion", "<|mdm_mask|>"), ("llama", "causal", "<|mask|>")],
)
def test_each_family_loads_with_its_kind_and_mask_token(folders, name, kind, mask):
    model, tok, spec = load_hf_model(
        str(folders[name]), objective="mdm", add_mask_token=True, trust_remote_code=True
    )
    assert spec.kind == kind and spec.mask_token_id == tok.convert_tokens_to_ids(mask)
    assert spec.mask_token_added == (name == "llama")  # only the causal LM lacks one
    assert spec.bidirectional == (kind == "causal") and not spec.shift_logits  # only Dream's
    assert adapter_spec(model) == spec and model.config.stablemdm == spec.to_dict()


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
    with pytest.raises(ConfigError, match="outside"):
        check_mask_token_id(-1, len(tok), tok)


@pytest.mark.parametrize("role", ["pad", "sep", "cls"])
def test_bert_special_tokens_are_refused_as_masks_but_its_mask_is_not(role):
    tok = bert_tokenizer()
    check_mask_token_id(tok.mask_token_id, len(tok), tok)
    with pytest.raises(ConfigError, match=role.upper()):
        check_mask_token_id(getattr(tok, f"{role}_token_id"), len(tok), tok)


def test_a_tokenizer_that_pads_with_its_mask_token_may_mask_with_it():
    tok = bert_tokenizer()
    tok.pad_token = "[MASK]"  # padded positions are never attended nor scored
    check_mask_token_id(tok.mask_token_id, len(tok), tok)


def test_loading_refuses_a_missing_or_misplaced_mask_token(folders):
    llama = str(folders["llama"])
    with pytest.raises(ConfigError, match="no mask token.*add_mask_token=true"):
        load_hf_model(llama, objective="mdm")
    with pytest.raises(ConfigError, match="EOS token '<eos>'.*add_mask_token=true"):
        load_hf_model(llama, objective="mdm", mask_token="<eos>")
    rows = len(llama_tokenizer())
    with pytest.raises(ConfigError, match=f"outside the model's {rows} embeddings"):
        load_hf_model(llama, objective="mdm", mask_token_id=rows)
    with pytest.raises(ConfigError, match="not one token"):
        load_hf_model(llama, objective="mdm", mask_token="<eos><eos>")
    _, tok, spec = load_hf_model(llama, objective="mdm", mask_token="<|end|>")
    assert spec.mask_token_id == tok.convert_tokens_to_ids("<|end|>") and not spec.mask_token_added


def test_a_missing_model_fails_at_once_with_the_download_policy(tmp_path, monkeypatch):
    """Local files only unless allow_downloads: a missing folder or an uncached Hub name is
    one line saying so; with allow_downloads, HF_HUB_OFFLINE=1 still forbids a download."""
    with pytest.raises(ConfigError, match=f"model folder {tmp_path / 'absent'} does not exist"):
        load_hf_model(str(tmp_path / "absent"), objective="mdm")
    with pytest.raises(ConfigError, match="stablemdm downloads nothing unless asked"):
        load_hf_model("nobody/no-such-model", objective="mdm")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set, so it was not downloaded"):
        load_hf_model("nobody/no-such-model", objective="mdm", allow_downloads=True)


NO_NETWORK = """
import time
from stablemdm.cli import main
from stablemdm.models.hf import load_hf_model
start = time.perf_counter()
try:
    load_hf_model("nobody/no-such-model", objective="mdm")
except Exception as err:
    print(type(err).__name__, err)
print("seconds", time.perf_counter() - start)
start = time.perf_counter()
print("exit", main(["train", "model=nobody/no-such-model", "output_dir={out}"]))
print("seconds", time.perf_counter() - start)
"""


def test_a_hub_name_never_reaches_the_network_unless_asked(tmp_path):
    """Without HF_HUB_OFFLINE in the environment (as a user runs it), a Hub name the machine
    lacks fails within seconds with the policy's line, from the library and the CLI; before
    the policy the library call waited ~25 s on the network here."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DAT"))}
    code = NO_NETWORK.format(out=tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ConfigError model nobody/no-such-model is neither a local folder")
    assert "downloads nothing unless asked: set allow_downloads=true" in lines[0]
    assert lines[2] == "exit 2" and "downloads nothing unless asked" in done.stderr
    assert all(float(x.split()[1]) < 5 for x in (lines[1], lines[3])), done.stdout
    assert not (tmp_path / "run").exists()


NO_SOCKET = """
import socket
from stablemdm.models.hf import load_hf_model
tried = []
def refuse(*args, **kwargs):
    tried.append(args[:2])
    raise OSError("this test allows no network")
socket.getaddrinfo = socket.socket.connect = socket.create_connection = refuse
for name in ("nobody/no-such-model", "someone/tiny-llama"):
    try:
        model, _, spec = load_hf_model(name, objective="arm")
        print("loaded", spec.kind, model.name_or_path)
    except Exception as err:
        print(type(err).__name__, err)
print("network calls", tried)
"""


def test_a_hub_name_is_looked_up_in_the_cache_without_the_network(folders, tmp_path):
    """Without HF_HUB_OFFLINE (as a user runs it) and with every socket refused: an uncached
    Hub name is the policy's one line and a cached one loads from its snapshot folder, and
    neither attempts a network call (huggingface_hub's own calls, local_files_only=True
    too, fetch a registry from the Hub for their request headers)."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "hf" / "hub" / "models--someone--tiny-llama"
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folders["llama"], cache / "snapshots" / ("0" * 40))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB", "HF_HOME"))}
    env["HF_HOME"] = str(tmp_path / "hf")  # its own cache, and no cached registry
    done = subprocess.run(
        [sys.executable, "-c", NO_SOCKET], env=env, capture_output=True, text=True, timeout=300
    )
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ConfigError model nobody/no-such-model is neither"), done
    assert lines[1] == "loaded causal someone/tiny-llama", done
    assert lines[2] == "network calls []", done


def test_a_damaged_model_folder_is_one_line_naming_the_file(tmp_path):
    """Truncated weights, a broken config.json, no tokenizer files: each names the file or
    folder; add_mask_token with a mask id is refused rather than masking with that token."""
    good = _llama(tmp_path / "llama")
    cases = {
        "weights": ("model.safetensors", "model.safetensors is not a readable safetensors file"),
        "config": ("config.json", "config.json is not valid JSON"),
        "tokenizer": ("tokenizer*", "holds no tokenizer .none of tokenizer.json"),
    }
    for name, (damaged, message) in cases.items():
        folder = tmp_path / name
        shutil.copytree(good, folder)
        for path in folder.glob(damaged):
            if name == "tokenizer":
                path.unlink()
            else:
                path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        with pytest.raises(ConfigError, match=message) as err:
            load_hf_model(str(folder), objective="mdm", add_mask_token=True)
        assert str(folder) in str(err.value)
    with pytest.raises(ConfigError, match="add_mask_token=true adds a new mask token"):
        load_hf_model(str(good), objective="mdm", add_mask_token=True, mask_token_id=50)


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


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", ["llama", "llama_eager"])
def test_adapted_causal_lm_attends_both_ways(folders, name, padded):
    adapted, _, spec = load_hf_model(str(folders[name]), objective="mdm", add_mask_token=True)
    plain = LlamaForCausalLM.from_pretrained(folders[name])
    assert spec.bidirectional and not spec.shift_logits
    x = _batch(90)["input_ids"]
    mask = torch.ones_like(x, dtype=torch.bool)
    last = x.shape[1] - 1
    if padded:  # row 0 right-padded by two: its last real token is two earlier
        mask[0, -2:] = False
    y = x.clone()
    y[:, last - 2] = (y[:, last - 2] + 1) % 90  # change one LATE (real) token
    with torch.no_grad():
        first = [
            m(input_ids=v, attention_mask=mask).logits[:, : last - 2]
            for m in (adapted, plain)
            for v in (x, y)
        ]
    for b in range(x.shape[0]):  # the adapted model sees the future, in every row
        assert not torch.allclose(first[0][b], first[1][b])
    assert torch.equal(first[2], first[3])  # the causal one does not


def test_shifted_logits_move_predictions_one_position(folders):
    shifted, _, _ = load_hf_model(
        str(folders["llama"]), objective="mdm", add_mask_token=True, shift_logits=True
    )
    unshifted, _, spec = load_hf_model(str(folders["llama"]), objective="mdm", add_mask_token=True)
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


@pytest.mark.parametrize("name", ["llama", "bert", "modernbert", "llada", "llada_t"])
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
    assert spec2 == spec and len(tok2) == len(tok) and spec.mask_token_added
    assert adapter_spec(again) == spec and again.config.is_causal is False
    x = _batch(len(tok))["input_ids"]
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % len(tok)
    with torch.no_grad():
        assert torch.equal(logits_of(model, x, None), logits_of(again, x, None))
        assert not torch.allclose(again(input_ids=x).logits[:, 0], again(input_ids=y).logits[:, 0])
    resumed, _, spec3 = load_hf_model(str(tmp_path), objective="mdm")  # reapplied, not re-derived
    assert spec3 == spec
    with torch.no_grad():
        assert torch.equal(logits_of(model, x, None), logits_of(resumed, x, None))


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"shift_logits": True}, "shift_logits=True conflicts"),
        ({"mask_token_id": 3}, "mask_token_id=3 conflicts"),
        ({"mask_token": "<|end|>"}, "mask_token_id=6 conflicts"),
        ({"kind": "masked_lm"}, "model_kind=masked_lm conflicts"),
        ({"objective": "arm"}, "trained as an MDM"),
    ],
)
def test_a_saved_model_refuses_options_that_contradict_its_spec(folders, tmp_path, option, match):
    model, tok, _ = load_hf_model(str(folders["llama"]), objective="mdm", add_mask_token=True)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=match):
        load_hf_model(str(tmp_path), **{"objective": "mdm", **option})


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


def test_lora_freezes_the_embedding_when_the_mask_token_is_pretrained(folders):
    base, tok, spec = load_hf_model(str(folders["llada"]), objective="mdm", trust_remote_code=True)
    assert not spec.mask_token_added
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["qkv", "up", "head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    Objective(mask_token_id=spec.mask_token_id)(
        model, _batch(len(tok)), torch.Generator(), torch.Generator()
    ).loss.backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())


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
    argv = ["eval", str(out), "--task", "chain_sum", "--task-option", "n_test=4"]
    assert main(argv) == 2  # the folder's code runs only when the command line allows it
    assert "--trust-remote-code" in capsys.readouterr().err
    assert main([*argv, "--trust-remote-code"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 4
    bad = [a for a in args if a != "trust_remote_code=true"]
    assert main([*bad[:-1], f"output_dir={tmp_path / 'bad'}"]) == 2
    assert "trust_remote_code=true" in capsys.readouterr().err


def _eos_on_top(model, eos: int) -> None:
    """Make EOS the most likely token everywhere (a hook on the output head)."""

    def hook(module, args, out):
        out = out.clone()
        out[..., eos] += 100.0
        return out

    model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("name", ["llama", "bert", "modernbert", "llada_t"])
def test_mdm_decoding_runs_on_each_kind(folders, name):
    model, tok, spec = load_hf_model(
        str(folders[name]), objective="mdm", add_mask_token=True, trust_remote_code=True
    )
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rates = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: rates.append(kwargs.get("t")), with_kwargs=True
    )
    prompts = [tok("1+2=")["input_ids"], tok("ab")["input_ids"]]
    options = dict(mask_token_id=spec.mask_token_id, eos_token_id=eos, pad_token_id=pad)
    out = generate_mdm(model, prompts, **options, gen_length=8, steps=8, block_length=4)
    assert len(out) == 2
    for row in out:
        assert len(row) <= 8 and eos not in row and spec.mask_token_id not in row
        assert all(0 <= token < model.get_input_embeddings().num_embeddings for token in row)
    if spec.conditions_on_t:  # t = the fraction of the canvas still masked, one unmask a call
        assert all(t.shape == (2,) for t in rates)
        expected = [torch.full((2,), 1 - k / 8) for k in range(len(rates))]
        assert all(torch.allclose(t, e) for t, e in zip(rates, expected, strict=True))
    else:
        assert all(t is None for t in rates)


def test_decoding_may_choose_eos_when_it_is_also_pad(folders):
    mdm, tok, spec = load_hf_model(str(folders["llama"]), objective="mdm", add_mask_token=True)
    arm, _, _ = load_hf_model(str(folders["llama"]), objective="arm")
    eos = tok.eos_token_id
    assert tok.pad_token_id is None  # Llama-family: padding uses EOS
    prompts = [tok("1+2=")["input_ids"], tok("ab")["input_ids"]]
    calls = []
    for model in (mdm, arm):
        _eos_on_top(model, eos)
        model.register_forward_pre_hook(lambda m, args: calls.append(1))
    options = dict(mask_token_id=spec.mask_token_id, eos_token_id=eos, pad_token_id=eos)
    assert generate_mdm(mdm, prompts, **options, gen_length=8, steps=8, block_length=4) == [[], []]
    assert len(calls) == 4  # every row ended in the first block: the second is skipped
    assert generate_arm(arm, prompts, eos_token_id=eos, pad_token_id=eos, max_new_tokens=5) == [
        [],
        [],
    ]
    assert len(calls) == 5  # both rows stopped at their first token


def test_arm_decoding_with_a_causal_lm(folders):
    model, tok, _ = load_hf_model(str(folders["llama"]), objective="arm")
    prompts = [tok("1+2=")["input_ids"], tok("abc de")["input_ids"]]
    eos = tok.eos_token_id
    out = generate_arm(model, prompts, eos_token_id=eos, pad_token_id=eos, max_new_tokens=5)
    assert len(out) == 2 and all(len(row) <= 5 and eos not in row for row in out)
    alone = generate_arm(model, prompts[:1], eos_token_id=eos, pad_token_id=eos, max_new_tokens=5)
    assert alone == out[:1]  # right padding of the batch does not change a row's decoding
