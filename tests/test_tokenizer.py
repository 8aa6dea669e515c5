"""The character tokenizer: round trip, special tokens, unseen characters, JSON save and load."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seemore_ds.errors import UserError
from seemore_ds.tokenizer import CharTokenizer

CAPTIONS = ["a small red circle at the top left", "a large blue cross in the center"]


def test_round_trip():
    tokenizer = CharTokenizer.from_captions(CAPTIONS)
    for caption in CAPTIONS:
        ids = tokenizer.encode(caption)
        assert len(ids) == len(caption)
        assert tokenizer.decode(ids) == caption


def test_special_tokens_come_first_and_decode_to_nothing():
    tokenizer = CharTokenizer.from_captions(CAPTIONS)
    assert tokenizer.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 4 + len(set("".join(CAPTIONS)))
    ids = tokenizer.encode("a red")
    # <bos> and <pad> are skipped; decoding stops at <eos>.
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, *tokenizer.encode("blue")]) == "a red"
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.pad_id, tokenizer.pad_id]) == "a red"


def test_unseen_character_becomes_unk_and_decodes_to_replacement_character():
    tokenizer = CharTokenizer.from_captions(CAPTIONS)
    ids = tokenizer.encode("a red Z!")
    assert ids[-2:] == [tokenizer.unk_id, tokenizer.unk_id]
    assert tokenizer.decode(ids) == "a red \ufffd\ufffd"
    assert tokenizer.unknown_chars("a red Z!") == {"Z", "!"}


def test_non_ascii_captions():
    captions = ["un café crème", "ein Würfel, grün", "赤い円", "🟥 square"]
    tokenizer = CharTokenizer.from_captions(captions)
    for caption in captions:
        assert tokenizer.decode(tokenizer.encode(caption)) == caption
    assert tokenizer.unk_id not in tokenizer.encode("".join(captions))


def test_json_save_and_load(tmp_path):
    tokenizer = CharTokenizer.from_captions(CAPTIONS + ["un café", "赤い円"])
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)

    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["type"] == "char" and saved["specials"] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert "é" in path.read_text(encoding="utf-8")  # readable, not \u-escaped

    loaded = CharTokenizer.load(path)
    assert loaded.itos == tokenizer.itos
    assert loaded.encode("un café 赤 Z") == tokenizer.encode("un café 赤 Z")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"type": "bpe", "merges": []}), json.dumps([1, 2])])
def test_loading_something_else_is_a_user_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="tokenizer"):
        CharTokenizer.load(path)


def test_loading_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read tokenizer"):
        CharTokenizer.load(tmp_path / "nope.json")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5))
def test_any_text_round_trips_through_its_own_vocabulary(captions):
    tokenizer = CharTokenizer.from_captions(captions)
    for caption in captions:
        assert tokenizer.decode(tokenizer.encode(caption)) == caption
