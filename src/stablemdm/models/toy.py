"""Hugging Face models built offline from a config, for smoke runs, examples and the GPU check:
a character-level tokenizer (printable ASCII, Llama-style `<bos>`/`<eos>`, a `<|mask|>` token
and a chat template) and a randomly initialised Llama of a named size."""

from __future__ import annotations

from pathlib import Path

import torch

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
SPECIALS = ("<unk>", "<bos>", "<eos>", "<|mask|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SIZES = {  # hidden, layers, heads, intermediate
    "tiny": (32, 2, 4, 64),
    "small": (256, 4, 4, 768),
    "125m": (768, 12, 12, 3072),
}


def char_tokenizer():
    """A `PreTrainedTokenizerFast` with one token per character (a BPE without merges)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_llama(folder: str | Path, size: str = "tiny", seed: int = 0) -> int:
    """Write a seeded random Llama causal LM of `size` with `char_tokenizer()` into `folder`;
    returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    hidden, layers, heads, inter = SIZES[size]
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())
