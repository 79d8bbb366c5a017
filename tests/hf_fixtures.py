"""Tiny Hugging Face tokenizers and models built locally (no download), for offline tests.

The tokenizers are character level (a BPE with no merges) over printable ASCII, so any task
text encodes; they carry the special tokens of the model families they stand in for.
`wordpiece_tokenizer` is a real BERT-style WordPiece (punctuation split off, '##' pieces),
which decodes text with other spacing than it was written in. `llada_model` and
`custom_code_model` are model folders with their own code (tests/fixtures).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

LLADA_CODE = Path(__file__).parent / "fixtures" / "tiny_llada"

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def _fast(specials: list[str], template: str | None, **named: str) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(specials + list(CHARS))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=named.get("unk_token")))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    if template is not None:
        used = [s for s in specials if s in template]
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, vocab[s]) for s in used]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def llama_tokenizer(chat: bool = True, mask: bool = False) -> PreTrainedTokenizerFast:
    """Llama-like: `<bos>` prepended, `<eos>`, no pad token, a chat template; optionally a
    `<|mdm_mask|>` special token as LLaDA's tokenizer has."""
    specials = ["<unk>", "<bos>", "<eos>", *CHAT_TOKENS] + (["<|mdm_mask|>"] if mask else [])
    tok = _fast(specials, "<bos> $A", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def bert_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-like: `[CLS] text [SEP]`, `[PAD]`, `[MASK]`, no EOS and no chat template."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return _fast(
        specials,
        "[CLS] $A [SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2/Qwen-like: a ChatML template whose turns end in `<|im_end|>` then a newline,
    `<|im_end|>` being the EOS token; no BOS."""
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok = _fast(specials, None, eos_token="<|im_end|>", unk_token="<unk>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def wordpiece_tokenizer(lowercase: bool = False) -> PreTrainedTokenizerFast:
    """BERT-style WordPiece over printable ASCII: BERT's normaliser and pre-tokenizer (each
    punctuation mark its own word), one piece per character ('x' starts a word, '##x'
    continues one) and the WordPiece decoder, so '#### -5' decodes as '# # # # - 5'."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    printable = [chr(c) for c in range(33, 127)]
    vocab = {t: i for i, t in enumerate(specials + printable + [f"##{c}" for c in printable])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    ends = [(s, vocab[s]) for s in ("[CLS]", "[SEP]")]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=ends)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        clean_up_tokenization_spaces=True,  # as bert-base-uncased's tokenizer_config.json
    )


def llada_model(folder: Path, conditions_on_t: bool = False) -> Path:
    """The custom-code LLaDA mimic of tests/fixtures (its config.json's auto_map names its
    modules), with seeded weights and a tokenizer carrying LLaDA's `<|mdm_mask|>`."""
    tok = llama_tokenizer(chat=True, mask=True)
    return custom_code_model(
        LLADA_CODE, folder, tok, vocab_size=len(tok), conditions_on_t=conditions_on_t
    )


def custom_code_model(
    code: Path, folder: Path, tokenizer: PreTrainedTokenizerFast, **values: object
) -> Path:
    """The custom-code model folder `code` (of tests/fixtures) copied to `folder`, with
    `values` in its config.json, seeded weights and `tokenizer`."""
    shutil.copytree(code, folder)
    values = {**json.loads((folder / "config.json").read_text()), **values}
    (folder / "config.json").write_text(json.dumps(values))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
