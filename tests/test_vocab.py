"""Tokenisation and Vocab: the book's ordering, vectorised encode/decode, JSON persistence."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deeprnn.errors import ConfigError, VocabError
from deeprnn.vocab import Vocab, count_corpus, tokenize

# The book's section 8.2 output for the character vocabulary of The Time Machine.
BOOK_TM_CHAR_HEAD = ["<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h", "r"]


def test_tokenize_like_the_book():
    lines = ["the time  machine", "", "by h g wells"]
    assert tokenize(lines, "word") == [["the", "time", "machine"], [], ["by", "h", "g", "wells"]]
    assert tokenize(lines[:2], "char") == [list("the time  machine"), []]
    assert tokenize(["ab"]) == [["a", "b"]]  # char is the default here
    with pytest.raises(ConfigError, match=r"^token must be one of char, word, got 'byte'$"):
        tokenize(lines, "byte")


def test_count_corpus_flat_nested_and_string():
    assert count_corpus([["a", "b"], ["b"]]) == {"a": 1, "b": 2}
    assert count_corpus(["a", "b", "b"]) == {"a": 1, "b": 2}
    assert count_corpus("abb") == {"a": 1, "b": 2}
    assert count_corpus([]) == {}


def test_order_unk_reserved_frequency_then_first_seen():
    vocab = Vocab(list("zyyxxx") + list("qq"), reserved_tokens=["<pad>", "<bos>"])
    # x:3, then y and q tie at 2 (y seen first), then z:1
    assert vocab.idx_to_token == ["<unk>", "<pad>", "<bos>", "x", "y", "q", "z"]
    assert vocab.token_to_idx == {t: i for i, t in enumerate(vocab.idx_to_token)}
    assert vocab.token_freqs == [("x", 3), ("y", 2), ("q", 2), ("z", 1)]
    assert vocab.unk == 0 and len(vocab) == 7


def test_min_freq_and_reserved_token_in_corpus():
    vocab = Vocab([["a", "b", "b"], ["<pad>", "<pad>", "<pad>", "c"]], min_freq=2, reserved_tokens=["<pad>"])
    assert vocab.idx_to_token == ["<unk>", "<pad>", "b"]
    assert Vocab().idx_to_token == ["<unk>"]


def test_getitem_to_tokens_and_contains():
    vocab = Vocab(list("hello"))  # l:2, h, e, o
    assert vocab["l"] == 1 and vocab["h"] == 2 and vocab["?"] == 0
    assert vocab[["h", "e", "?"]] == [2, 3, 0]
    assert vocab[("o",)] == [4]
    assert vocab.to_tokens(1) == "l"
    assert vocab.to_tokens([2, 3, 0]) == ["h", "e", "<unk>"]
    assert vocab.to_tokens(torch.tensor([4, 1])) == ["o", "l"]
    assert "h" in vocab and "z" not in vocab


def test_token_kind_inferred_or_given():
    assert Vocab(list("abc")).token == "char"
    assert Vocab(["ab", "c"]).token == "word"
    assert Vocab(["a", "b"], token="word").token == "word"
    with pytest.raises(ConfigError, match=r"^token must be one of char, word, got 'bpe'$"):
        Vocab(["a"], token="bpe")


def test_char_encode_is_the_dict_lookup_with_unknowns():
    vocab = Vocab("the time machine")
    text = "time? 😀 €the\n"
    ids = vocab.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert ids.tolist() == [vocab[ch] for ch in text]
    assert ids.tolist()[4:10] == [0, vocab[" "], 0, vocab[" "], 0, vocab["t"]]
    assert vocab.encode("").tolist() == []
    assert vocab.encode(["t", "zz", "e"]).tolist() == [vocab["t"], 0, vocab["e"]]


def test_decode_chars_and_words():
    chars = Vocab("abcab")
    assert chars.decode(torch.tensor([1, 2, 3, 0])) == "abc<unk>"
    assert chars.decode([2, 1]) == "ba"
    words = Vocab(["the", "time", "the"], token="word")
    assert words.encode("the time traveller").tolist() == [1, 2, 0]
    assert words.decode(torch.tensor([1, 2, 0])) == "the time <unk>"
    with pytest.raises(VocabError, match=r"^index 3 is out of range for a vocabulary of 3 tokens$"):
        words.decode([1, 3])
    with pytest.raises(VocabError, match=r"^index -1 is out of range for a vocabulary of 3 tokens$"):
        words.decode([-1])


def test_dict_and_json_round_trip(tmp_path):
    vocab = Vocab(list("mississippi"), reserved_tokens=["<eos>"])
    again = Vocab.from_dict(vocab.to_dict())
    assert again.idx_to_token == ["<unk>", "<eos>", "i", "s", "p", "m"]
    assert again.token_to_idx == vocab.token_to_idx
    assert again.token_freqs == [("i", 4), ("s", 4), ("p", 2), ("m", 1)]
    assert again.token == "char"
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored["format"] == "deeprnn.vocab" and stored["version"] == 1
    assert stored["idx_to_token"] == ["<unk>", "<eos>", "i", "s", "p", "m"]
    loaded = Vocab.load(path)
    assert loaded.idx_to_token == vocab.idx_to_token and loaded.token_freqs == vocab.token_freqs
    assert loaded.encode("miss").tolist() == [5, 2, 3, 3]
    assert [p.name for p in path.parent.iterdir()] == ["vocab.json"]  # no temp file left behind


def test_load_errors(tmp_path):
    with pytest.raises(VocabError, match=r"^no vocabulary file at .*missing\.json; check the path$"):
        Vocab.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(VocabError, match=r"^cannot read vocabulary .*bad\.json: .*; re-save it with Vocab\.save$"):
        Vocab.load(bad)
    with pytest.raises(VocabError, match=r"^not a deeprnn vocabulary \(bad or missing field 'format'\)"):
        Vocab.from_dict({"idx_to_token": ["<unk>"]})
    data = Vocab("ab").to_dict()
    data["idx_to_token"] = ["a", "<unk>", "b"]
    with pytest.raises(VocabError, match=r"^vocabulary must start with '<unk>' and list each token once"):
        Vocab.from_dict(data)


ALPHABET = "the quick brown fox jumps over a lazy dog\n“”’—é😀"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=200))
def test_char_round_trip(text):
    vocab = Vocab(ALPHABET)
    ids = vocab.encode(text)
    assert vocab.decode(ids) == text
    assert ids.tolist() == [vocab[ch] for ch in text]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=100))
def test_char_encode_matches_lookup_on_any_text(text):
    vocab = Vocab("hello wörld ✓")
    assert vocab.encode(text).tolist() == [vocab[ch] for ch in text]


def test_from_counts_orders_like_the_text():
    text = "zyyxxxqq" + "é" * 2
    counts = {}
    for ch in text:  # first-seen order, as a reader counting chunk by chunk keeps it
        counts[ch] = counts.get(ch, 0) + 1
    for kwargs in ({}, {"min_freq": 2}, {"reserved_tokens": ["<pad>"]}):
        vocab, again = Vocab(text, **kwargs), Vocab.from_counts(counts, **kwargs)
        assert again.idx_to_token == vocab.idx_to_token and again.token_freqs == vocab.token_freqs
        assert again.token == "char" and again.encode("xyé?").tolist() == vocab.encode("xyé?").tolist()
    assert Vocab.from_counts(counts).idx_to_token == ["<unk>", "x", "y", "q", "é", "z"]
    assert Vocab.from_counts([("the", 2), ("a", 2)]).token == "word"


def test_encode_in_a_narrow_dtype():
    vocab = Vocab("the time machine")
    for text in ("time? 😀 €the\n", ["t", "zz", "e"]):
        wide = vocab.encode(text)
        for dtype in (torch.uint8, torch.int16, torch.int32):
            narrow = vocab.encode(text, dtype=dtype)
            assert narrow.dtype == dtype and narrow.tolist() == wide.tolist()
    big = Vocab([f"w{i}" for i in range(300)], token="word")  # 301 tokens: index 300 needs more than uint8
    assert big.encode("w299 w0", dtype=torch.int16).tolist() == [300, 1]
    with pytest.raises(ConfigError, match=r"^dtype must be an integer type that holds indices up to 300, "
                       r"got torch\.uint8$"):
        big.encode("w1", dtype=torch.uint8)
    with pytest.raises(ConfigError, match=r"^dtype must be an integer type that holds indices up to 9, "
                       r"got torch\.float32$"):
        vocab.encode("time", dtype=torch.float32)
