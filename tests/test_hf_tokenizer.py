"""HFTokenizer: prompt/response boundaries with and without chat templates, EOS fill, padding
that equals EOS, the response-length normaliser key, and the errors."""

import pytest
import torch
from hf_fixtures import bert_tokenizer, chatml_tokenizer, llama_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from stablemdm.data import DataError, Example, encode_examples
from stablemdm.data.hf_tokenizer import HFTokenizer
from stablemdm.data.tokenizer import CharTokenizer
from stablemdm.errors import ConfigError

EXAMPLES = [Example("2+2", "4", "4", "a"), Example("10+20=?", "30", "30", "b")]


@pytest.mark.parametrize("chat", [False, True])
def test_only_the_response_is_eligible_and_it_decodes_back(chat):
    tok = HFTokenizer(llama_tokenizer(), mask_token_id=7, chat_template=chat)
    batch = encode_examples(EXAMPLES, tok, max_length=40, gen_length=10)
    for row, example in enumerate(EXAMPLES):
        prompt = tok.encode_prompt(example)
        eligible = batch["eligible"][row]
        assert not eligible[: len(prompt)].any()  # no prompt or template token is scored
        ids = batch["input_ids"][row][eligible]
        assert tok.decode(ids, skip_special_tokens=True).endswith(example.response)
        assert ids[-1] == tok.eos_token_id and len(ids) == 10  # the EOS-filled canvas
        assert batch["n_response"][row] == len(tok.encode_response(example))


def test_chat_prompts_are_rendered_by_the_template():
    tok = HFTokenizer(llama_tokenizer(), 7, chat_template=True, system_prompt="Be brief.")
    text = tok.decode(tok.encode_prompt(EXAMPLES[0]), skip_special_tokens=False)
    assert text == "<|system|>Be brief.<|end|><|user|>2+2<|end|><|assistant|>"
    response = tok.decode(tok.encode_response(EXAMPLES[0]), skip_special_tokens=False)
    assert response == "4<|end|><eos>"


def test_a_chatml_response_ends_on_one_end_of_turn_token():
    """ChatML ends a turn with `<|im_end|>` and a newline; `<|im_end|>` is also EOS, so the
    response must not be `3<|im_end|>\n<|im_end|>` (two ends of turn)."""
    tok = HFTokenizer(chatml_tokenizer(), mask_token_id=0, chat_template=True)
    ids = tok.encode_response(EXAMPLES[0])
    assert tok.decode(ids, skip_special_tokens=False) == "4<|im_end|>"
    assert tok.decode(tok.encode_prompt(EXAMPLES[0]), skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n"
    )


def test_messages_in_meta_are_used_whole():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
    ]
    tok = HFTokenizer(llama_tokenizer(), 7, chat_template=True)
    example = Example("1+1", "2", "2", "m", meta={"messages": messages})
    prompt = tok.decode(tok.encode_prompt(example), skip_special_tokens=False)
    assert prompt.count("<|assistant|>") == 2 and prompt.endswith("<|assistant|>")


def test_pad_equal_to_eos_keeps_the_eos_fill_attended():
    tok = HFTokenizer(llama_tokenizer(), 7)  # no pad token: pad is EOS
    assert tok.pad_token_id == tok.eos_token_id
    batch = encode_examples(EXAMPLES, tok, max_length=40, gen_length=10)
    end = [len(tok.encode_prompt(e)) + 10 for e in EXAMPLES]
    for row, stop in enumerate(end):
        assert batch["attention_mask"][row, :stop].all()
        assert not batch["attention_mask"][row, stop:].any()


def test_without_eos_fill_the_canvas_is_padding():
    tok = HFTokenizer(bert_tokenizer(), mask_token_id=4)
    batch = encode_examples(EXAMPLES, tok, max_length=30, gen_length=8, eos_fill=False)
    for row, example in enumerate(EXAMPLES):
        n = len(tok.encode_response(example))
        assert batch["eligible"][row].sum() == n == batch["n_response"][row]
        assert batch["attention_mask"][row].sum() == len(tok.encode_prompt(example)) + n


def test_bert_separates_prompt_and_response_with_sep_and_ends_on_it():
    tok = HFTokenizer(bert_tokenizer(), mask_token_id=4)
    assert tok.eos_token_id == bert_tokenizer().sep_token_id
    prompt = tok.decode(tok.encode_prompt(EXAMPLES[0]), skip_special_tokens=False)
    assert prompt == "[CLS]2+2[SEP]"


def test_a_template_that_is_not_prefix_stable_is_refused():
    hf = llama_tokenizer()
    hf.chat_template = (  # the generation prompt differs from how the answer's turn renders
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|user|>{% endif %}"
    )
    tok = HFTokenizer(hf, 7, chat_template=True)
    with pytest.raises(DataError, match="prefix-stable"):
        tok.encode_response(EXAMPLES[0])


def test_missing_chat_template_and_missing_end_token_are_refused():
    with pytest.raises(ConfigError, match="no chat template"):
        HFTokenizer(bert_tokenizer(), 4, chat_template=True)
    hf = llama_tokenizer()
    hf.eos_token = None
    with pytest.raises(ConfigError, match="EOS"):
        HFTokenizer(hf, 7)


def test_token_ids_must_be_single_tokens():
    tok = HFTokenizer(llama_tokenizer(), 7)
    assert tok.token_id("#", where="isad_tokens") == llama_tokenizer().convert_tokens_to_ids("#")
    with pytest.raises(ValueError, match="isad_tokens"):
        tok.token_id("####", where="isad_tokens")


def test_empty_response_is_named():
    with pytest.raises(DataError, match="empty response"):
        HFTokenizer(llama_tokenizer(), 7).encode_response(Example("1", "", "", "here:3"))


text = st.text(alphabet="abc019+-= ", min_size=1, max_size=12)


@settings(max_examples=50, deadline=None)
@given(pairs=st.lists(st.tuples(text, text), min_size=1, max_size=4), fill=st.booleans())
def test_encoding_property_for_both_tokenizers(pairs, fill):
    for tok in (CharTokenizer(), HFTokenizer(llama_tokenizer(), 7, chat_template=True)):
        examples = [Example(p, r, r, f"x{i}") for i, (p, r) in enumerate(pairs)]
        gen = max(len(tok.encode_response(e)) for e in examples)
        length = max(len(tok.encode_prompt(e)) for e in examples) + gen
        batch = encode_examples(examples, tok, length, gen, eos_fill=fill)
        for row, e in enumerate(examples):
            head, tail = len(tok.encode_prompt(e)), tok.encode_response(e)
            eligible = batch["eligible"][row]
            assert not eligible[:head].any()
            scored = batch["input_ids"][row][eligible].tolist()
            assert scored[: len(tail)] == tail
            assert set(scored[len(tail) :]) <= {tok.eos_token_id}
            assert len(scored) == (gen if fill else len(tail))
            assert torch.equal(
                batch["attention_mask"][row].nonzero().flatten(), torch.arange(head + len(scored))
            )


@pytest.mark.parametrize("make", [CharTokenizer, lambda: HFTokenizer(bert_tokenizer(), 4)])
def test_both_tokenizers_satisfy_the_protocol_and_save(make, tmp_path):
    tok = make()
    ids = {tok.pad_token_id, tok.mask_token_id, tok.eos_token_id}
    assert len(ids) == 3 and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    example = Example("1+2", "3", "3", "p")
    response = tok.encode_response(example)
    assert response[-1] == tok.eos_token_id and tok.decode(response) == "3"
    assert tok.decode(tok.encode_prompt(example)) == "1+2"
    assert tok.decode([tok.token_id("7", where="t")]) == "7"
    tok.save_pretrained(tmp_path)
    assert any(tmp_path.iterdir())


def test_saved_tokenizer_encodes_the_same(tmp_path):
    from transformers import AutoTokenizer

    tok = HFTokenizer(llama_tokenizer(), 7, chat_template=True)
    tok.save_pretrained(tmp_path)
    again = HFTokenizer(AutoTokenizer.from_pretrained(tmp_path), 7, chat_template=True)
    for example in EXAMPLES:
        assert again.encode_prompt(example) == tok.encode_prompt(example)
        assert again.encode_response(example) == tok.encode_response(example)
