import json

import pytest
import torch

from stablemdm.data.tokenizer import DEFAULT_ALPHABET, CharTokenizer


def test_default_alphabet_is_newline_and_printable_ascii():
    assert DEFAULT_ALPHABET[0] == "\n"
    assert DEFAULT_ALPHABET[1:] == "".join(chr(c) for c in range(32, 127))


def test_special_ids_and_vocab_size():
    tok = CharTokenizer()
    assert (tok.pad_token_id, tok.mask_token_id, tok.eos_token_id, tok.sep_token_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(tok) == 4 + len(DEFAULT_ALPHABET)
    assert tok.encode(DEFAULT_ALPHABET) == list(range(4, tok.vocab_size))


def test_round_trip_text_list_and_tensor():
    tok = CharTokenizer()
    text = "Natalia sold 48/2 = 24 clips.\n#### 72 ~{}|"
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_decode_special_tokens_skipped_or_spelled():
    tok = CharTokenizer()
    ids = [tok.sep_token_id, *tok.encode("ab"), tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "<sep>ab<eos><pad>"


def test_decode_rejects_out_of_range_and_2d():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


def test_unknown_character_error_names_char_position_and_where():
    tok = CharTokenizer()
    where = "gsm8k train item 17, field 'prompt'"
    with pytest.raises(ValueError) as info:
        tok.encode("costs 5\u20ac", where=where)
    message = str(info.value)
    assert "'\u20ac'" in message and "U+20AC" in message
    assert "position 7" in message
    assert where in message


def test_duplicate_alphabet_rejected():
    with pytest.raises(ValueError, match="more than once"):
        CharTokenizer("abca")


def test_save_and_load_round_trip(tmp_path):
    tok = CharTokenizer("01+-=\n")
    tok.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec == {
        "type": "char",
        "alphabet": "01+-=\n",
        "special_tokens": ["<pad>", "<mask>", "<eos>", "<sep>"],
    }
    loaded = CharTokenizer.from_pretrained(tmp_path)
    assert loaded.alphabet == tok.alphabet
    assert loaded.encode("10+1=11") == tok.encode("10+1=11")


def test_load_missing_and_malformed(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CharTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CharTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "bpe"}))
    with pytest.raises(ValueError, match='"type": "char"'):
        CharTokenizer.from_pretrained(tmp_path)
    bad_specials = {"type": "char", "alphabet": "ab", "special_tokens": ["<pad>"]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(bad_specials))
    with pytest.raises(ValueError, match="special_tokens"):
        CharTokenizer.from_pretrained(tmp_path)
    duplicate = {
        "type": "char",
        "alphabet": "aa",
        "special_tokens": list(CharTokenizer.SPECIAL_TOKENS),
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(duplicate))
    with pytest.raises(ValueError, match="more than once"):
        CharTokenizer.from_pretrained(tmp_path)
