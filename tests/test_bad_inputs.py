"""The bad-input catalogue of docs/reliability.md: every case ends with exit status 2, one
line on stderr naming the field, file or line, no traceback, and no file created or changed.
Plus property tests of the JSONL reader, the character tokenizer and the config parser."""

import errno
import hashlib
import json
import math
import os
import re
import resource
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stablemdm.cli import describe_error, main
from stablemdm.data import DataError, Example, canvas_lengths, length_cap, read_jsonl
from stablemdm.data.examples import OUTLIER_FACTOR, OUTLIER_MIN_EXAMPLES
from stablemdm.data.images import read_png
from stablemdm.data.tokenizer import DEFAULT_ALPHABET, CharTokenizer
from stablemdm.errors import ConfigError
from stablemdm.models.transformer import ModelConfig, Transformer
from stablemdm.study.command import check_study_folder
from stablemdm.study.spec import load_study
from stablemdm.tasks.registry import get_task
from stablemdm.training.config import StableMDMConfig
from stablemdm.training.datasets import encode_split, resolve_canvas
from stablemdm.training.memory import check_attention_memory
from stablemdm.training.outputs import check_output_file, write_text
from stablemdm.training.recipe import load_config, parse_override, save_config

GOOD = '{"prompt": "1+1", "response": "2"}\n'
STUDY = (
    "name: s\noutput_dir: {tmp}/study\ntasks: [chain_sum]\nseeds: [1]\nmethods: [standard]\n"
    "task_options: {chain_sum: {n_train: 20, n_test: 4}}\ntrain: {max_steps: 2}\n"
)
# a "billion laughs" in a list field: six levels of nine aliases of the level below stand
# for 9**6 values in a 300-byte file (nine levels would stand for 387 million)
LAUGHS = "isad_tokens: [&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol], {}]\n".format(
    ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 6))
)
FILES = {
    "good.jsonl": GOOD * 3,
    "bad.jsonl": GOOD + '{"prompt": oops}\n' + GOOD,
    "notobject.jsonl": GOOD + "[1, 2]\n",
    "noresponse.jsonl": GOOD + '{"prompt": "3+4", "response": ""}\n',
    "longprompt.jsonl": GOOD + '{"prompt": "' + "9" * 80 + '", "response": "1"}\n',
    "prompts.jsonl": '{"prompt": "1+1"}\n{"text": "2+2"}\n',
    "empty.yaml": "# nothing but a comment\n",
    "dup.yaml": "max_steps: 5\nseed: 1\nmax_steps: 6\n",
    "invalid.yaml": "max_steps: [5\nseed: 1\n",
    "list.yaml": "- max_steps\n",
    "recipe.yaml": "max_steps: 5\n",
    "existing.json": "{}\n",
    "existing.jsonl": GOOD,
    "report/variance.json": "{}\n",
    "elsewhere/notes.txt": "not a study\n",
    "study_dup.yaml": STUDY + "seeds: [2]\n",
    "study_unknown.yaml": STUDY + "seed: 3\n",
    "study_empty.yaml": "",
    "study_seeds.yaml": STUDY.replace("seeds: [1]", "seeds: [1, 1]"),
    "study_method.yaml": STUDY.replace("[standard]", "{standard: {clip_low: 0.1}}"),
    "study_nomethod.yaml": STUDY.replace("[standard]", "[standrd]"),
    "study_points.yaml": STUDY + "eval_points: [1.5]\n",
    "study_elsewhere.yaml": STUDY.replace("{tmp}/study", "{tmp}/elsewhere"),
    "study_negative_seed.yaml": STUDY.replace("seeds: [1]", "seeds: [1, -1]"),
    "study_method_list.yaml": STUDY.replace("[standard]", "[standard, [ppots]]"),
    "study_renamed.yaml": STUDY.replace("[standard]", "{standard: {sampler: ppots}}"),
    # hostile inputs: each must be refused in one line without exhausting memory
    "laughs.yaml": LAUGHS,
    "long_value.yaml": f"auto_candidates: [{', '.join(map(str, range(5000)))}]\n",
    "deep.jsonl": GOOD + "[" * 200_000 + "]" * 200_000 + "\n",
}
STUDY_FILE = Path(__file__).resolve().parents[1] / "src/stablemdm/studies/demo.yaml"
JSONL = "task=jsonl"
SMALL = "task_options={n_train: 20, n_test: 4}"


def _opts(train: str, test: str = "good.jsonl", extra: str = "") -> str:
    return f"task_options={{train: {{tmp}}/{train}, test: {{tmp}}/{test}{extra}}}"


# (case id, argv with {tmp} and {ckpt} placeholders, text the one line must contain)
CASES = [
    # command line
    ("cli-unknown-verb", ["trian"], "invalid choice: 'trian'"),
    ("cli-unknown-flag", ["train", "--bogus"], "unrecognized arguments: --bogus"),
    ("cli-stray-word", ["train", "oops"], "override 'oops' is not of the form key=value"),
    ("cli-eval-needs-task", ["eval", "{ckpt}"], "--task"),
    ("cli-limit-zero", ["eval", "{ckpt}", "--task", "chain_sum", "--limit", "0"], "--limit"),
    ("cli-batch-negative", ["eval", "{ckpt}", "--task", "x", "--batch-size", "-1"], "--batch"),
    ("cli-gen-length-text", ["eval", "{ckpt}", "--task", "x", "--gen-length", "ab"], "integer"),
    ("cli-temperature-nan", ["generate", "{ckpt}", "--temperature", "nan"], "--temperature"),
    ("cli-temperature-inf", ["generate", "{ckpt}", "--temperature", "inf"], "finite"),
    ("cli-params-regex", ["variance", "--params", "(x"], "--params '(x'"),
    ("cli-variance-draws", ["variance", "--draws", "1"], "--draws"),
    ("cli-variance-method", ["variance", "--methods", "nope"], "'nope'"),
    ("cli-task-option", ["eval", "{ckpt}", "--task", "chain_sum", "--task-option", "n"], "'n'"),
    # config values
    ("config-lr-nan", ["train", "learning_rate=.nan"], "learning_rate must be a finite"),
    ("config-lr-inf", ["train", "learning_rate=.inf"], "learning_rate must be a finite"),
    ("config-lr-nan-word", ["train", "learning_rate=nan"], "learning_rate must be a finite"),
    ("config-lr-zero", ["train", "learning_rate=0"], "learning_rate must be > 0"),
    ("config-steps-zero", ["train", "max_steps=0"], "max_steps must be >= 1"),
    ("config-batch-zero", ["train", "per_device_train_batch_size=0"], "per_device_train"),
    ("config-warmup-negative", ["train", "warmup_steps=-1"], "warmup_steps must be >= 0"),
    ("config-clip-negative", ["train", "max_grad_norm=-1"], "max_grad_norm must be >= 0"),
    ("config-width-zero", ["train", "d_model=0"], "d_model must be > 0"),
    ("config-save-limit", ["train", "save_total_limit=0"], "save_total_limit must be > 0"),
    ("config-eps", ["train", "eps=1"], "eps must lie in [0, 1)"),
    ("config-mix", ["train", "sampler=ema", "mix=0"], "mix (lambda) must lie in (0, 1]"),
    ("config-ema-decay", ["train", "sampler=ema", "ema_decay=1"], "ema_decay"),
    ("config-clip-order", ["train", "sampler=clipped", "clip_low=0.9", "clip_high=0.1"], "clip"),
    ("config-regex", ["train", "sampler=ppots", "ppots_params=(x"], "ppots_params='(x'"),
    ("config-typo", ["train", "learnin_rate=1"], "did you mean learning_rate"),
    ("config-choice", ["train", "sampler=bogus"], "sampler must be one of"),
    ("config-type", ["train", "max_steps=abc"], "max_steps='abc' has the wrong type"),
    ("config-no-key", ["train", "=3"], "no key before '='"),
    ("config-override-yaml", ["train", "task_options={a: 1"], "task_options={a: 1"),
    ("config-isad-q", ["train", "masking=isad", "isad_tokens=[x]", "isad_q_max=1"], "isad_q"),
    ("config-seed-negative", ["train", "seed=-1"], "seed must be an integer in [0, 2**32)"),
    ("config-density-missing", ["train", "sampler=ppots", "ppots_file=/nope.json"], "/nope"),
    # config files
    ("yaml-missing", ["train", "--config", "{tmp}/none.yaml"], "none.yaml does not exist"),
    ("yaml-empty", ["train", "--config", "{tmp}/empty.yaml"], "empty.yaml is empty"),
    ("yaml-duplicate", ["train", "--config", "{tmp}/dup.yaml"], "line 3, column 1: duplicate"),
    ("yaml-invalid", ["train", "--config", "{tmp}/invalid.yaml"], "invalid.yaml: not valid YAML"),
    ("yaml-not-mapping", ["train", "--config", "{tmp}/list.yaml"], "not list"),
    (
        "yaml-alias-bomb",
        ["train", "--config", "{tmp}/laughs.yaml"],
        "laughs.yaml: not valid YAML: its aliases (*name) stand for more than 10,000 values",
    ),
    (
        "yaml-long-value",
        ["train", "--config", "{tmp}/long_value.yaml"],
        "auto_candidates=[0, 1, 2, 3, ...] has the wrong type",
    ),
    ("yaml-nested-deep", ["train", "task_options=" + "[" * 5000 + "]" * 5000], "nested too deep"),
    # data
    ("data-malformed", ["train", JSONL, _opts("bad.jsonl")], "bad.jsonl:2: invalid JSON"),
    ("data-not-object", ["train", JSONL, _opts("notobject.jsonl")], "notobject.jsonl:2:"),
    ("data-empty-response", ["train", JSONL, _opts("noresponse.jsonl")], "'response' is empty"),
    ("data-missing", ["train", JSONL, _opts("nofile.jsonl")], "nofile.jsonl"),
    (
        "data-prompt-too-long",
        ["train", JSONL, _opts("good.jsonl", "longprompt.jsonl", ", max_length: 20")],
        "longprompt.jsonl:2: prompt + <sep> is 81 tokens",
    ),
    (
        "data-dataset-malformed",
        ["train", "task=dataset", _opts("bad.jsonl")],
        "bad.jsonl: line 2: invalid JSON",
    ),
    ("data-yaml-spacing", ["train", JSONL, "task_options={train:x}"], "space after ':'"),
    ("data-nested-deep", ["train", JSONL, _opts("deep.jsonl")], "deep.jsonl:2: nested too deep"),
    (
        "data-dataset-nested-deep",
        ["train", "task=dataset", _opts("deep.jsonl")],
        "deep.jsonl: line 2: nested too deep",
    ),
    (
        "data-png-bomb",
        ["train", "task=image_folder_t2i", "task_options={path: {tmp}/bomb}"],
        "bomb/a/0.png: Image size (900000000 pixels) exceeds limit of 178956970 pixels",
    ),
    ("data-prompts-file", ["generate", "{ckpt}", "--file", "{tmp}/prompts.jsonl"], ":2:"),
    ("data-prompts-missing", ["generate", "{ckpt}", "--file", "{tmp}/no.txt"], "no.txt"),
    ("data-prompts-deep", ["generate", "{ckpt}", "--file", "{tmp}/deep.jsonl"], "deep.jsonl:2:"),
    # tokenizers
    ("tokenizer-isad-char", ["train", "masking=isad", "isad_tokens=['\u00e9']"], "alphabet"),
    ("tokenizer-no-mask", ["train", "model={llama}", SMALL], "has no mask token"),
    ("tokenizer-mask-unknown", ["train", "model={llama}", SMALL, "mask_token=<x>"], "<x>"),
    (
        "tokenizer-mask-added-and-named",
        ["train", "model={llama}", SMALL, "add_mask_token=true", "mask_token_id=50"],
        "add_mask_token=true adds a new mask token, while mask_token_id / mask_token name",
    ),
    # Hugging Face model folders and names
    (
        "hf-weights-truncated",
        ["train", "model={llama_weights}", SMALL, "add_mask_token=true"],
        "llama_weights/model.safetensors is not a readable safetensors file",
    ),
    (
        "hf-config-broken",
        ["train", "model={llama_config}", SMALL, "add_mask_token=true"],
        "llama_config/config.json is not valid JSON",
    ),
    (
        "hf-no-tokenizer",
        ["train", "model={llama_tokenizer}", SMALL, "add_mask_token=true"],
        "llama_tokenizer holds no tokenizer (none of tokenizer.json",
    ),
    ("hf-folder-missing", ["train", "model={tmp}/no/model", SMALL], "no/model does not exist"),
    (
        "hf-hub-name",
        ["train", "model=nobody/no-such-model", SMALL],
        "model nobody/no-such-model is neither a local folder nor in the local Hugging Face "
        "cache, and stablemdm downloads nothing unless asked: set allow_downloads=true",
    ),
    # checkpoints and outputs
    ("ckpt-missing", ["eval", "{tmp}/nothing", "--task", "chain_sum"], "nothing does not exist"),
    ("ckpt-no-model", ["eval", "{tmp}/report", "--task", "chain_sum"], "holds no saved model"),
    ("ckpt-weights", ["eval", "{tmp}/bad_weights", "--task", "chain_sum"], "model.safetensors"),
    ("ckpt-config", ["generate", "{tmp}/bad_config", "--prompt", "1"], "config.json"),
    ("ckpt-tokenizer", ["generate", "{tmp}/bad_tokenizer", "--prompt", "1"], "tokenizer.json"),
    ("ckpt-resume-missing", ["train", "--resume", "{tmp}/nothing", SMALL], "nothing"),
    (
        "out-into-checkpoint",
        ["eval", "{ckpt}", "--task", "chain_sum", "--output", "{ckpt}/model.safetensors"],
        "inside",
    ),
    (
        "out-into-checkpoint-overwrite",
        ["eval", "{ckpt}", "--task", "x", "--output", "{ckpt}/config.json", "--overwrite"],
        "refused even with --overwrite",
    ),
    (
        "out-eval-exists",
        ["eval", "{ckpt}", "--task", "chain_sum", "--output", "{tmp}/existing.jsonl"],
        "existing.jsonl already exists; pass --overwrite",
    ),
    ("out-fit-exists", ["fit-t", "--output", "{tmp}/existing.json"], "existing.json already"),
    (
        "out-fit-onto-recipe",
        ["fit-t", "--config", "{tmp}/recipe.yaml", "--output", "{tmp}/recipe.yaml", "--overwrite"],
        "is an input of this command",
    ),
    ("out-variance-folder", ["variance", "--output", "{tmp}/report"], "already holds files"),
    (
        "out-variance-in-checkpoint",
        ["variance", "--checkpoint", "{ckpt}", "--output", "{ckpt}/report", "--overwrite"],
        "which this command reads",
    ),
    # study files
    ("study-missing", ["study", "--config", "{tmp}/nope.yaml"], "nope.yaml does not exist"),
    ("study-empty", ["study", "--config", "{tmp}/study_empty.yaml"], "study_empty.yaml is empty"),
    ("study-duplicate", ["study", "--config", "{tmp}/study_dup.yaml"], "duplicate key 'seeds'"),
    ("study-unknown", ["study", "--config", "{tmp}/study_unknown.yaml"], "did you mean seeds"),
    ("study-seeds", ["study", "--config", "{tmp}/study_seeds.yaml"], "duplicate seeds [1]"),
    ("study-ignored", ["study", "--config", "{tmp}/study_method.yaml"], "clip_low=0.1 is ignored"),
    ("study-method", ["study", "--config", "{tmp}/study_nomethod.yaml"], "'standrd'"),
    ("study-points", ["study", "--config", "{tmp}/study_points.yaml"], "eval_points"),
    ("study-folder", ["study", "--config", "{tmp}/study_elsewhere.yaml"], "not this study's"),
    ("study-override", ["study", "--config", "demo", "seeds=[1,1]"], "duplicate seeds"),
    (
        "study-negative-seed",
        ["study", "--config", "{tmp}/study_negative_seed.yaml"],
        "seeds must be integers in [0, 2**32), got [-1]",
    ),
    (
        "study-method-list",
        ["study", "--config", "{tmp}/study_method_list.yaml"],
        "methods entry ['ppots'] is neither a method name nor one {name: {overrides}} mapping",
    ),
    (
        "study-renamed-standard",
        ["study", "--config", "{tmp}/study_renamed.yaml"],
        "method 'standard' sets sampler=ppots, which changes what 'standard' means",
    ),
]


def _fill(text: str, **places: Path) -> str:
    """`text` with each {name} placeholder replaced by its path."""
    for name, path in places.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def _checkpoint(folder: Path) -> Path:
    """A saved built-in model and its tokenizer (untrained: only read, never decoded)."""
    tokenizer = CharTokenizer()
    config = ModelConfig.from_preset(
        "tiny",
        vocab_size=tokenizer.vocab_size,
        max_seq_len=32,
        d_model=16,
        n_layers=1,
        mask_token_id=tokenizer.mask_token_id,
    )
    Transformer(config, generator=torch.Generator().manual_seed(0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Hugging Face Llama without a mask token."""
    from hf_fixtures import llama_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llama_tokenizer(chat=False)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def damaged_llamas(llama, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny Llama with truncated weights, a truncated config.json, and no
    tokenizer files."""
    out = {}
    for name, pattern in (("weights", "model.safetensors"), ("config", "config.json")):
        out[f"llama_{name}"] = folder = tmp_path_factory.mktemp("damaged") / f"llama_{name}"
        shutil.copytree(llama, folder)
        for path in folder.glob(pattern):
            path.write_bytes(path.read_bytes()[:40])
    out["llama_tokenizer"] = folder = tmp_path_factory.mktemp("damaged") / "llama_tokenizer"
    shutil.copytree(llama, folder)
    for path in folder.glob("tokenizer*"):
        path.unlink()
    return out


@pytest.fixture
def workspace(tmp_path) -> Path:
    """The files the catalogue refers to: data, recipes, study files, checkpoints."""
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(_fill(text, tmp=tmp_path))
    _checkpoint(tmp_path / "ckpt")
    for name, damaged in (
        ("bad_weights", "model.safetensors"),
        ("bad_config", "config.json"),
        ("bad_tokenizer", "tokenizer.json"),
    ):
        folder = _checkpoint(tmp_path / name)
        (folder / damaged).write_bytes((folder / damaged).read_bytes()[:40])
    for label in ("a", "b"):  # two classes of one 30,000 x 30,000 PNG each
        (tmp_path / "bomb" / label).mkdir(parents=True)
        (tmp_path / "bomb" / label / "0.png").write_bytes(_png_header(30_000, 30_000))
    return tmp_path


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a grey image of `width` x `height` and holds no pixels: what a
    decompression bomb shows before it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        check = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + check

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the hash of its bytes (folders as entries too)."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    case, argv, expected, workspace, request, capsys, monkeypatch
):
    monkeypatch.chdir(workspace)  # anything a default would write lands here, and is seen
    places = {"tmp": workspace, "ckpt": workspace / "ckpt"}
    if any("{llama}" in a for a in argv):
        places["llama"] = request.getfixturevalue("llama")
    if any("{llama_" in a for a in argv):
        places.update(request.getfixturevalue("damaged_llamas"))
    argv = [_fill(a, **places) for a in argv]
    assert expected in refused_in_one_line(argv, workspace, capsys)


def refused_in_one_line(argv: list[str], workspace: Path, capsys) -> str:
    """The one error line of `stablemdm ARGV`, which must exit 2 without a traceback and leave
    `workspace` as it was (train, fit-t and variance write to `workspace/run`)."""
    if argv[0] in ("train", "fit-t", "variance"):
        argv = [*argv, f"output_dir={workspace / 'run'}"]
    before = snapshot(workspace)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert errors[0] == err.strip().splitlines()[-1], err[-2000:]
    assert len(errors[0]) < 1000, errors[0][:2000]
    assert snapshot(workspace) == before
    return errors[0]


def test_the_catalogue_is_at_least_forty_cases_over_every_area():
    areas = {case.split("-")[0] for case, _, _ in CASES}
    assert len(CASES) >= 40 and {"cli", "config", "yaml", "data", "tokenizer", "ckpt"} <= areas
    assert {"out", "study", "hf"} <= areas and len({c[0] for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ConfigError, match="learning_rate must be a finite"):
        main(["--debug", "train", "learning_rate=.nan"])
    with pytest.raises(ConfigError, match="max_steps"):
        main(["train", "max_steps=0", "--debug"])


def test_an_ignored_option_is_a_one_line_warning(capsys):
    load_config(None, ["clip_low=0.1", "ppots_sequences=4", "sampler=ppots"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "stablemdm: warning: command line: clip_low=0.1 is ignored: it is used only with "
        "sampler=clipped"
    ]
    load_config(None, ["clip_low=0.2", "mix=0.3"], allow_unused=True)  # default, and allowed
    assert capsys.readouterr().err == ""


def test_overwrite_replaces_an_output_but_never_an_input(workspace, capsys):
    ckpt = workspace / "ckpt"
    weights = (ckpt / "model.safetensors").read_bytes()
    args = ["eval", str(ckpt), "--task", "chain_sum", "--output"]
    assert main([*args, str(ckpt / "model.safetensors"), "--overwrite"]) == 2
    assert (ckpt / "model.safetensors").read_bytes() == weights


def test_resume_followed_by_an_override_reads_it_as_one(workspace, capsys):
    out = workspace / "fresh"
    assert main(["train", "--resume", "max_steps=0", f"output_dir={out}"]) == 2
    assert "max_steps must be >= 1" in capsys.readouterr().err and not out.exists()


# --- properties ------------------------------------------------------------------------------

RECORD = st.builds(  # raw non-ASCII too: U+2028 inside a JSON string is not a line break
    lambda p, r, ascii_: json.dumps({"prompt": p, "response": r}, ensure_ascii=ascii_),
    st.text(max_size=8),
    st.text(min_size=1, max_size=8),
    st.booleans(),
)
LINE = st.one_of(RECORD, st.text(max_size=12).filter(lambda s: "\n" not in s and "\r" not in s))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(LINE, max_size=8), raw=st.one_of(st.none(), st.binary(max_size=24)))
def test_the_jsonl_reader_returns_records_or_names_the_bad_line(lines, raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        if raw is None:
            path.write_text("\n".join(lines), encoding="utf-8")
        else:
            path.write_bytes(raw)
        try:
            examples = read_jsonl(path)
        except DataError as err:
            message = str(err)
            assert str(path) in message and "Traceback" not in message
            lines = re.findall(rf"{re.escape(str(path))}:(\d+):", message)
            n_lines = len(path.read_bytes().split(b"\n"))
            assert all(1 <= int(n) <= n_lines for n in lines)
            assert lines or "no records" in message or "cannot read" in message
            return
        assert examples and all(isinstance(e.prompt, str) and e.response for e in examples)


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet=DEFAULT_ALPHABET, max_size=40), other=st.characters())
def test_the_char_tokenizer_round_trips_and_refuses_other_characters(text, other):
    tokenizer = CharTokenizer()
    ids = tokenizer.encode(text)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    if other not in DEFAULT_ALPHABET:
        with pytest.raises(ValueError, match="alphabet"):
            tokenizer.encode(text + other, where="field 'prompt'")


@settings(max_examples=30, deadline=None)
@given(
    steps=st.integers(-5, 10**6),
    lr=st.floats(allow_nan=True, allow_infinity=True, width=32),
    seed=st.integers(0, 2**31),
)
def test_the_config_parser_round_trips_or_refuses(steps, lr, seed):
    assert parse_override(f"max_steps={steps}") == ("max_steps", steps)
    overrides = [f"max_steps={steps}", f"learning_rate={lr!r}", f"seed={seed}"]
    valid = (steps >= 1 or steps == -1) and math.isfinite(lr) and lr > 0
    if not valid:
        with pytest.raises(ConfigError):
            load_config(None, overrides)
        return
    config = load_config(None, overrides)
    assert (config.max_steps, config.learning_rate, config.seed) == (steps, lr, seed)
    with tempfile.TemporaryDirectory() as folder:
        save_config(config, Path(folder) / "config.yaml")
        again = load_config(Path(folder) / "config.yaml")
    assert isinstance(again, StableMDMConfig) and again.resolved() == config.resolved()


# --- data surprises --------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 500), min_size=1, max_size=300))
def test_the_length_cap_sets_aside_at_most_one_percent(lengths):
    cap = length_cap(lengths)
    longer = sum(n > cap for n in lengths)
    assert cap <= max(lengths) and cap in lengths
    assert longer <= max(1, len(lengths) // 100)
    if len(lengths) < OUTLIER_MIN_EXAMPLES:
        assert cap == max(lengths)
    if longer:
        assert max(lengths) > OUTLIER_FACTOR * cap


def test_one_overlong_example_does_not_inflate_every_sequence(tmp_path, capsys):
    rows = [{"prompt": f"{i}+1", "response": str(i + 1)} for i in range(29)]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rows.append({"prompt": "9" * 300, "response": "7" * 400})  # one pasted log, say
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = get_task("jsonl", train=str(tmp_path / "train.jsonl"), test=str(tmp_path / "test.jsonl"))
    assert task.gen_length == 3 and task.max_length == 5 + 3
    assert len(task.notes) == 2 and "set gen_length=401 to keep them" in task.notes[0]
    assert "longest prompt (with <sep>) is 301 tokens" in task.notes[1]
    config = load_config(None, ["task=jsonl", f"output_dir={tmp_path / 'run'}"])
    canvas = resolve_canvas(config, task, CharTokenizer())
    assert (canvas.max_length, canvas.gen_length) == (8, 3)
    encode_split(task, CharTokenizer(), "train", canvas)
    err = capsys.readouterr().err
    assert "warning: the longest response (with <eos>) is 401 tokens" in err
    assert "1 of 30 train examples of task jsonl do not fit" in err


def test_measured_canvas_lengths_warn_about_an_outlier():
    tokenizer = CharTokenizer()
    examples = [Example("1+1", "2", "2", f"row {i}") for i in range(25)]
    examples.append(Example("1" * 90, "2", "2", "row 25"))
    notes: list[str] = []
    assert canvas_lengths(examples, tokenizer, notes=notes) == (4 + 2, 2)
    assert notes == [
        "the longest prompt (with <sep>) is 91 tokens, more than 1.5x the 99th-percentile length "
        "4: sequences are sized for 4 and the 1 longer example(s) are left out; set "
        "max_length=93 to keep them"
    ]
    assert canvas_lengths(examples[:18] + examples[-1:], tokenizer) == (93, 2)  # too few to cap


@pytest.mark.parametrize("given", [[], ["max_length=20"]], ids=["measured", "max_length-given"])
def test_following_the_length_warnings_keeps_the_long_example(given, tmp_path, capsys):
    """Each warning's `set ... to keep them`, applied literally on the command line, keeps
    every example, whether the lengths were measured or one was given."""
    rows = [{"prompt": f"{i}+1", "response": str(i + 1)} for i in range(29)]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rows.append({"prompt": "9" * 300, "response": "7" * 400})
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    options = f"task_options={{train: {tmp_path}/train.jsonl, test: {tmp_path}/test.jsonl}}"
    base = [JSONL, options, f"output_dir={tmp_path / 'run'}", *given]

    def train_rows(overrides: list[str]) -> tuple[int, str]:
        config = load_config(None, [*base, *overrides])
        task = get_task("jsonl", **config.task_options)
        canvas = resolve_canvas(config, task, CharTokenizer())
        return len(encode_split(task, CharTokenizer(), "train", canvas)), capsys.readouterr().err

    kept, err = train_rows([])
    advice = re.findall(r"set (.+?) to keep them", err)
    assert kept == 29 and advice and "1 of 30 train examples" in err, err
    kept, err = train_rows([setting for text in advice for setting in text.split()])
    assert kept == 30 and "warning" not in err and "do not fit" not in err, err


# --- outputs -----------------------------------------------------------------------------------


def test_a_full_disk_leaves_the_earlier_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "density.json"
    path.write_text("earlier")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(ConfigError, match=r"no space left on the device while writing .*density"):
        write_text(path, "new")
    assert path.read_text() == "earlier" and sorted(tmp_path.iterdir()) == [path]


def test_a_full_disk_elsewhere_is_one_line_with_the_way_out():
    err = OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoint-4/optimizer.pt")
    message = describe_error(err, "train")
    assert "optimizer.pt" in message and "--resume" in message
    assert describe_error(RuntimeError("a bug"), "train") is None  # keeps its traceback


def test_eval_records_may_go_beside_the_checkpoint_once(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    records = ckpt / "eval-chain_sum-test.jsonl"
    kwargs = {"reads": [ckpt], "allowed_in_reads": "eval-*.jsonl"}
    assert check_output_file(records, overwrite=False, **kwargs) == records
    records.write_text(GOOD)
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        check_output_file(records, overwrite=False, **kwargs)
    assert check_output_file(records, overwrite=True, **kwargs) == records
    with pytest.raises(ConfigError, match="refused even with --overwrite"):
        check_output_file(ckpt / "sub" / "eval-x.jsonl", overwrite=True, **kwargs)


def test_a_study_resumes_in_its_own_folder_and_refuses_another_studys(tmp_path):
    spec = load_study(STUDY_FILE, [f"output_dir={tmp_path / 'study'}"])
    check_study_folder(spec, overwrite=False)  # new
    (tmp_path / "study" / spec.tasks[0]).mkdir(parents=True)
    check_study_folder(spec, overwrite=False)  # its own runs: a re-run resumes them
    (tmp_path / "study" / "report.json").write_text(json.dumps({"study": "other"}))
    with pytest.raises(ConfigError, match="holds the report of study 'other'"):
        check_study_folder(spec, overwrite=False)
    check_study_folder(spec, overwrite=True)


# --- hostile inputs ----------------------------------------------------------------------------


def test_a_png_over_the_decompression_bomb_limit_is_refused_not_decoded(tmp_path, monkeypatch):
    """Between Pillow's limit and twice it Pillow only warns and decodes; refused here too."""
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), dtype=np.uint8), "L").save(tmp_path / "grey.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 16 pixels: over it, under twice it
    with pytest.raises(DataError, match=r"grey.png: Image size \(16 pixels\) exceeds limit"):
        read_png(tmp_path / "grey.png")


@pytest.fixture
def capped_memory():
    """This process's address space capped 2 GiB above what it holds, for the test only: a
    regression that reads without end then fails the test, not the machine."""
    import psutil

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + 2**31, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("task", ["jsonl", "dataset"])
def test_a_device_as_the_data_file_is_refused_before_it_is_read(
    task, workspace, capsys, capped_memory
):
    """/dev/zero, named directly or through a link, never ends: read whole, it exhausted
    memory."""
    (workspace / "zero.jsonl").symlink_to("/dev/zero")
    for train in ("/dev/zero", workspace / "zero.jsonl"):
        options = f"task_options={{train: {train}, test: {workspace / 'good.jsonl'}}}"
        line = refused_in_one_line(["train", f"task={task}", options], workspace, capsys)
        assert line.endswith(
            "is not a regular file (a device, pipe or socket): point at a data file"
        )
        assert "zero" in line


def test_prompts_too_long_for_the_memory_are_refused_before_training(
    workspace, monkeypatch, capsys
):
    """Three 10,000-character prompts: the attention of a batch of 32 needs at least
    2 layers x 32 x 10003^2 x 4 bytes = 23.9 GiB, refused against 8 GiB available."""
    rows = [{"prompt": str(i) * 10_000, "response": str(i)} for i in range(3)]
    (workspace / "long.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr("stablemdm.training.memory.available_memory", lambda: 8 * 2**30)
    options = f"task_options={{train: {workspace}/long.jsonl, test: {workspace}/long.jsonl}}"
    line = refused_in_one_line(["train", JSONL, options, "use_cpu=true"], workspace, capsys)
    assert "max_length=10003 with per_device_train_batch_size=32 needs at least 23.9 GiB" in line
    assert "more than the 8.0 GiB available: lower per_device_train_batch_size" in line


@pytest.mark.parametrize("gib, warned", [(100, False), (50, True)])
def test_attention_taking_a_third_of_the_memory_is_warned_about(gib, warned, monkeypatch, capsys):
    monkeypatch.setattr("stablemdm.training.memory.available_memory", lambda: gib * 2**30)
    config = load_config(None, ["use_cpu=true"])
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=8, mask_token_id=7))
    check_attention_memory(config, model, 10_003)  # 23.9 GiB, as above
    err = capsys.readouterr().err
    assert ("training may run out of memory" in err) == warned, err
