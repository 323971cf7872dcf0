"""Reading corpora: the book-equal Time Machine, named corpora, encodings, errors and splits."""

import codecs
import collections
import hashlib
import importlib.resources
import io
import random
import re
import urllib.error
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeprnn import corpus as corpus_mod
from deeprnn.corpus import (
    NAMED_CORPORA,
    build_corpus,
    data_dir,
    load_sources,
    normalize,
    read_text,
    repeat_tokens,
    strip_gutenberg,
    token_dtype,
)
from deeprnn.errors import ConfigError, CorpusError
from deeprnn.vocab import Vocab

KNOWN = "timemachine, war-of-the-worlds, tinyshakespeare"


def book_load_corpus_time_machine(max_tokens=-1):
    """Section 8.2's pipeline written out: readlines, the regex per line, characters, counts, order."""
    path = importlib.resources.files("deeprnn") / "data" / "timemachine.txt"
    with open(path) as f:
        lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in f.readlines()]
    chars = [ch for line in lines for ch in line]
    ranked = sorted(collections.Counter(chars).items(), key=lambda kv: kv[1], reverse=True)
    idx_to_token = ["<unk>"] + [tok for tok, _ in ranked]
    token_to_idx = {tok: i for i, tok in enumerate(idx_to_token)}
    ids = [token_to_idx[ch] for ch in chars]
    if max_tokens > 0:
        ids = ids[:max_tokens]
    return ids, idx_to_token


# --- The Time Machine, as the book has it ----------------------------------------------------------
def test_time_machine_matches_the_book():
    corpus = build_corpus("timemachine")
    expected_ids, expected_vocab = book_load_corpus_time_machine()
    assert len(corpus.tokens) == 170580 and len(corpus.vocab) == 28
    assert corpus.tokens.dtype == torch.uint8 and corpus.tokens.dim() == 1  # token_dtype(28)
    assert corpus.vocab.idx_to_token == expected_vocab
    assert corpus.tokens.tolist() == expected_ids
    assert corpus.vocab.idx_to_token[:11] == ["<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h", "r"]
    assert [corpus.vocab[ch] for ch in "thez"] == [3, 9, 2, 25]
    assert corpus.vocab.decode(corpus.tokens[:29]) == "the time machine by h g wells"
    assert corpus.spans == [("timemachine", 0, 170580)]
    assert (corpus.token, corpus.normalization) == ("char", "d2l")


def test_time_machine_max_tokens_keeps_the_full_vocab():
    corpus = build_corpus("timemachine", max_tokens=10000)
    expected_ids, _ = book_load_corpus_time_machine(10000)
    assert corpus.tokens.tolist() == expected_ids
    assert len(corpus.vocab) == 28 and corpus.spans == [("timemachine", 0, 10000)]
    assert len(build_corpus("timemachine", max_tokens=-1).tokens) == 170580  # the book's "all"


def test_time_machine_words_like_the_book():
    corpus = build_corpus("timemachine", token="word")
    assert len(corpus.tokens) == 32775 and len(corpus.vocab) == 4580
    assert corpus.vocab.idx_to_token[:10] == ["<unk>", "the", "i", "and", "of", "a", "to", "was", "in", "that"]
    assert corpus.vocab.decode(corpus.tokens[:7]) == "the time machine by h g wells"


def test_bundled_file_is_checksummed(monkeypatch):
    monkeypatch.setattr(corpus_mod, "_read_bundled", lambda filename: b"tampered text\n")
    with pytest.raises(CorpusError, match=r"^bundled timemachine\.txt is corrupt \(sha1 [0-9a-f]{40}, expected "
                       r"090b5e7e70c295757f55df93cb0a180b9691891a\); reinstall or re-download it$"):
        build_corpus("timemachine")


# --- named corpora: data dir, offline, download ----------------------------------------------------
def test_data_dir_precedence(monkeypatch, tmp_path, shared_data):
    assert data_dir() == shared_data
    assert data_dir(tmp_path) == tmp_path
    monkeypatch.delenv("DEEPRNN_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_dir() == tmp_path / ".cache" / "deeprnn"


def test_named_corpora_from_the_data_dir():
    shakespeare = build_corpus("tinyshakespeare", normalization="raw")
    assert len(shakespeare.tokens) == 1115394 and len(shakespeare.vocab) == 66  # 65 symbols + <unk>
    train, valid, test = shakespeare.split((0.9, 0.1, 0.0))  # nanoGPT's shakespeare_char split
    assert (len(train), len(valid), len(test)) == (1003854, 111540, 0)
    assert torch.equal(torch.cat([train, valid]), shakespeare.tokens)


def test_offline_named_corpus_says_how_to_supply_it(tmp_path):
    msg = (f"corpus 'war-of-the-worlds' is not in {tmp_path} and downloads are off ($DEEPRNN_OFFLINE=1); "
           f"save https://www.gutenberg.org/files/36/36-0.txt as {tmp_path / 'war_of_the_worlds.txt'}, "
           "or pass the file's path instead of 'war-of-the-worlds'")
    with pytest.raises(CorpusError, match=f"^{re.escape(msg)}$"):
        build_corpus("war-of-the-worlds", data_dir=tmp_path)


def test_unknown_corpus_name_lists_the_known_ones():
    msg = f"unknown corpus 'shakespeare'; known corpora: {KNOWN} (or pass a file or directory path)"
    with pytest.raises(CorpusError, match=f"^{re.escape(msg)}$"):
        build_corpus("shakespeare")
    with pytest.raises(CorpusError, match=f"^{re.escape(msg)}$"):
        corpus_mod.fetch_corpus("shakespeare")


class _FakeResponse(io.BytesIO):
    def __init__(self, payload):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def _go_online(monkeypatch, payload=None, error=None):
    monkeypatch.delenv("DEEPRNN_OFFLINE")
    calls = []

    def urlopen(url, timeout):
        calls.append(url)
        if error is not None:
            raise error
        return _FakeResponse(payload)

    monkeypatch.setattr(corpus_mod.urllib.request, "urlopen", urlopen)
    return calls


def test_download_verifies_and_writes_atomically(monkeypatch, tmp_path):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    info = replace(NAMED_CORPORA["tinyshakespeare"], checksum=("sha256", hashlib.sha256(payload).hexdigest()))
    monkeypatch.setitem(NAMED_CORPORA, "tinyshakespeare", info)
    calls = _go_online(monkeypatch, payload)
    corpus = build_corpus("tinyshakespeare", normalization="raw", data_dir=tmp_path / "cache")
    assert calls == [info.url]
    assert (tmp_path / "cache" / "tinyshakespeare.txt").read_bytes() == payload
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tinyshakespeare.txt"]
    assert corpus.vocab.decode(corpus.tokens) == payload.decode()
    build_corpus("tinyshakespeare", normalization="raw", data_dir=tmp_path / "cache")
    assert len(calls) == 1  # cached


def test_download_with_a_bad_checksum_leaves_nothing(monkeypatch, tmp_path):
    _go_online(monkeypatch, b"not shakespeare\n")
    with pytest.raises(CorpusError, match=r"^download of tinyshakespeare from https://raw\.githubusercontent\.com/"
                       r"\S+ failed its sha256 check \(got [0-9a-f]{64}, expected 86c4e6aa9db7c042ec79f339dcb96d42b00"
                       r"75e16b8fc2e86bf0ca57e2dc565ed\); save \S+ as \S+tinyshakespeare\.txt yourself, "
                       r"or pass the file's path instead of 'tinyshakespeare'$"):
        build_corpus("tinyshakespeare", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_cached_copy_is_refused(tmp_path, shared_data):
    """A cached named corpus is checked on every read, not only when downloaded: a truncated copy would
    otherwise train silently on part of the text."""
    real = (shared_data / "tinyshakespeare.txt").read_bytes()
    (tmp_path / "tinyshakespeare.txt").write_bytes(real[:50_000])
    with pytest.raises(CorpusError) as err:
        build_corpus("tinyshakespeare", normalization="raw", data_dir=tmp_path)
    digest = hashlib.sha256(real[:50_000]).hexdigest()
    assert str(err.value) == (
        f"{tmp_path / 'tinyshakespeare.txt'} (tinyshakespeare) is corrupt (sha256 {digest}, expected "
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed); delete it to download it again, "
        "or pass the file's path instead of 'tinyshakespeare'")
    (tmp_path / "tinyshakespeare.txt").write_bytes(real)
    assert len(build_corpus("tinyshakespeare", normalization="raw", data_dir=tmp_path).tokens) == len(real.decode())


def test_download_failure_is_one_line(monkeypatch, tmp_path):
    _go_online(monkeypatch, error=urllib.error.URLError("no route to host"))
    target = tmp_path / "war_of_the_worlds.txt"
    msg = (f"could not download war-of-the-worlds from https://www.gutenberg.org/files/36/36-0.txt "
           f"(<urlopen error no route to host>); save https://www.gutenberg.org/files/36/36-0.txt as {target} "
           "yourself, or pass the file's path instead of 'war-of-the-worlds'")
    with pytest.raises(CorpusError, match=f"^{re.escape(msg)}$"):
        build_corpus("war-of-the-worlds", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- encodings and bad files -----------------------------------------------------------------------
def test_windows_1252_is_detected(shared_data):
    text = read_text(shared_data / "war_of_the_worlds.txt")
    assert text.startswith("?\nProject Gutenberg's The War of the Worlds, by H. G. Wells\n")
    counts = {ch: text.count(ch) for ch in "\u201c\u201d\u2018\u2019\u2014"}
    assert counts == {"\u201c": 407, "\u201d": 407, "\u2018": 4, "\u2019": 411, "\u2014": 311}
    assert "\ufffd" not in text and "\x93" not in text
    assert read_text(shared_data / "war_of_the_worlds.txt", encoding="cp1252") == text


def test_explicit_encoding_that_does_not_fit(shared_data):
    path = shared_data / "war_of_the_worlds.txt"
    with pytest.raises(CorpusError, match=r"^cannot decode \S+war_of_the_worlds\.txt as utf-8 \(byte 0x91 at offset "
                       r"805\); check the file's encoding and pass the right one with --encoding$"):
        read_text(path, encoding="utf-8")
    with pytest.raises(CorpusError, match=r"^unknown encoding 'klingon'; pass a Python codec name such as utf-8 "
                       r"or cp1252 to --encoding$"):
        read_text(path, encoding="klingon")


@pytest.mark.parametrize("payload", [b"hello \x81\x8d world\n", b"price \xa4\xa6\xa8 list\n", bytes(range(1, 256))])
def test_undecodable_text_is_refused_naming_encoding(tmp_path, payload):
    path = tmp_path / "odd.txt"
    path.write_bytes(payload)
    with pytest.raises(CorpusError, match=r"^\S+odd\.txt is not UTF-8 \(byte 0x[0-9a-f]{2} at offset \d+\) and does "
                       r"not look like Windows-1252 text; pass its encoding with --encoding \(e\.g\. --encoding latin-1\)$"):
        read_text(path)
    assert read_text(path, encoding="latin-1") == payload.decode("latin-1").replace("\r\n", "\n").replace("\r", "\n")


def test_utf8_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffcaf\u00e9 \u201cquoted\u201d\r\nline two\rthree".encode())
    assert read_text(path) == "caf\u00e9 \u201cquoted\u201d\nline two\nthree"


def test_binary_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(CorpusError, match=r"^\S+model\.bin looks binary \(it contains NUL bytes\); pass a text file, "
                       r"or its encoding with --encoding if it is UTF-16$"):
        build_corpus(str(path))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("hello world".encode("utf-16"))
    assert read_text(utf16, encoding="utf-16") == "hello world"


@pytest.mark.parametrize("encoding, bom", [
    ("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE),
    ("utf-32-le", codecs.BOM_UTF32_LE), ("utf-32-be", codecs.BOM_UTF32_BE),
])
def test_utf16_and_utf32_with_a_bom_are_read(monkeypatch, tmp_path, encoding, bom):
    """Their byte-order mark says how to decode them (Notepad's "Unicode" is UTF-16 LE with one); they used to be
    refused as binary. Read whole and read in chunks (of 1 to 3 bytes: the mark spans chunks), the same corpus."""
    text = "The Time Traveller \u00e9 \u201cquoted\u201d \U0001f600\r\nsecond line\n"
    path = tmp_path / "unicode.txt"
    path.write_bytes(bom + text.encode(encoding))
    assert read_text(path) == text.replace("\r\n", "\n")
    whole = build_corpus(str(path), normalization="raw")
    assert whole.vocab.decode(whole.tokens) == text.replace("\r\n", "\n")
    ids, vocab = reference_chars(str(path), "raw")
    for chunk in (1, 2, 3):
        assert_same_corpus(build_streamed(monkeypatch, str(path), chunk, normalization="raw"), ids, vocab,
                           [str(path)])


@pytest.mark.parametrize("content", [b"", b"  \n\t\r\n"])
def test_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=f"^{re.escape(repr(str(path)))} is empty; pass a file with some text$"):
        build_corpus(str(path))


def test_missing_path_and_directory_without_texts(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match=f"^no such file: {re.escape(repr(str(missing)))}; check the path$"):
        build_corpus(str(missing))
    with pytest.raises(CorpusError, match=f"^no such file: {re.escape(repr(str(missing)))}; check the path$"):
        build_corpus(missing)  # a Path is never taken for a corpus name
    (tmp_path / "notes.md").write_text("not a txt", encoding="utf-8")
    with pytest.raises(CorpusError, match=f"^directory {re.escape(repr(str(tmp_path)))} has no \\.txt files; "
                       "put the texts there as \\.txt files$"):
        build_corpus(str(tmp_path))


def test_nothing_left_after_normalisation(tmp_path):
    path = tmp_path / "digits.txt"
    path.write_text("1234 5678 !!!\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=f"^{re.escape(repr(str(path)))} has no tokens after 'd2l' normalisation; "
                       "pass another text or normalisation$"):
        build_corpus(str(path))
    assert build_corpus(str(path), normalization="raw").vocab.decode(build_corpus(str(path), normalization="raw").tokens) \
        == "1234 5678 !!!\n"


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"^normalization must be one of d2l, raw, lower, got 'upper'$"):
        build_corpus("timemachine", normalization="upper")
    with pytest.raises(ConfigError, match=r"^token must be one of char, word, got 'bpe'$"):
        build_corpus("timemachine", token="bpe")
    with pytest.raises(ConfigError, match=r"^token must match the given vocabulary's \('word'\), got 'char'$"):
        build_corpus("timemachine", vocab=Vocab(["the"], token="word"))


# --- text processing ---------------------------------------------------------------------------------
def test_strip_gutenberg():
    text = ("Project Gutenberg's Book\nlicence\n*** START OF THIS PROJECT GUTENBERG EBOOK BOOK ***\n\n"
            "Chapter 1\nIt was.\n*** END OF THIS PROJECT GUTENBERG EBOOK BOOK ***\nfooter licence\n")
    assert strip_gutenberg(text) == "Chapter 1\nIt was.\n"
    assert strip_gutenberg("no markers\n") == "no markers\n"
    older = "licence\n***START OF THE PROJECT GUTENBERG EBOOK***\nText.\n*** end of the project gutenberg ebook\nfooter"
    assert strip_gutenberg(older) == "Text.\n"


def test_a_gutenberg_file_with_nothing_between_its_markers_is_one_line(tmp_path):
    path = tmp_path / "empty_book.txt"
    path.write_bytes(GUTENBERG_EMPTY)
    with pytest.raises(CorpusError) as err:
        build_corpus(str(path))
    assert str(err.value) == (f"{str(path)!r} has no text between its Project Gutenberg markers (*** START OF … and "
                              "*** END OF … PROJECT GUTENBERG …); remove the markers, or pass another file")


def test_a_users_own_stars_are_not_a_gutenberg_marker(tmp_path):
    """'*** End of Part One ***' in a novel cut its second half away, silently; a poem that opened with
    '*** End of an era ***' was refused as having no text between Gutenberg markers."""
    novel = "Part one.\n\n*** End of Part One ***\n\nPart two.\n*** START OF the sequel ***\nThe sequel.\n"
    assert strip_gutenberg(novel) == novel
    split = "*** START OF THIS PROJECT\nGUTENBERG EBOOK ***\ntext\n"  # a marker is one line: this is none
    assert strip_gutenberg(split) == split
    path = tmp_path / "novel.txt"
    path.write_text(novel)
    assert build_corpus(str(path), normalization="raw").vocab.decode(build_corpus(str(path), normalization="raw")
                                                                     .tokens) == novel


def test_war_of_the_worlds_without_boilerplate(shared_data):
    (source,) = load_sources([str(shared_data / "war_of_the_worlds.txt")])
    assert source.text.startswith("cover \n\n\n\nThe War of the Worlds\n\nby H. G. Wells\n")
    assert source.text.endswith("End of the Project Gutenberg EBook of The War of the Worlds, by H. G. Wells\n\n")
    assert "*** START" not in source.text and "Project Gutenberg-tm" not in source.text
    (kept,) = load_sources([str(shared_data / "war_of_the_worlds.txt")], strip_boilerplate=False)
    assert kept.text.startswith("?\nProject Gutenberg's")


def test_normalize_modes():
    text = "The Time-Machine, 1895!\n\n  H. G. Wells\n"
    assert normalize(text, "d2l") == "the time machine\n\nh g wells\n"
    assert normalize(text, "raw") == text
    assert normalize(text, "lower") == "the time-machine, 1895!\n\n  h. g. wells\n"
    with pytest.raises(ConfigError, match=r"^normalization must be one of d2l, raw, lower, got 'nfkc'$"):
        normalize(text, "nfkc")


def test_d2l_char_stream_drops_line_breaks_words_split_per_line(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("Ab, c\n\nd-E\n", encoding="utf-8")
    chars = build_corpus(str(path))
    assert chars.vocab.decode(chars.tokens) == "ab cd e"
    words = build_corpus(str(path), token="word")
    assert words.vocab.decode(words.tokens) == "ab c d e"


# --- several sources and splits ----------------------------------------------------------------------
def _write_dir(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "b.txt").write_text("bbbb bbbb\n" * 10, encoding="utf-8")  # 100 raw chars
    (books / "a.txt").write_text("aaaaaaaaa\n" * 20, encoding="utf-8")  # 200 raw chars
    (books / "skip.md").write_text("ignored", encoding="utf-8")
    return books


def test_directory_and_merged_sources(tmp_path):
    books = _write_dir(tmp_path)
    corpus = build_corpus([str(books), "timemachine"], normalization="raw", max_tokens=400)
    a, b = str(books / "a.txt"), str(books / "b.txt")
    assert corpus.spans == [(a, 0, 200), (b, 200, 300), ("timemachine", 300, 400)]
    assert corpus.vocab.decode(corpus.tokens[195:205]) == "aaaa\nbbbb "
    sources = load_sources([str(books)])
    assert [s.name for s in sources] == [a, b]


def test_split_is_contiguous_per_source(tmp_path):
    books = _write_dir(tmp_path)
    corpus = build_corpus(str(books), normalization="raw")
    t = corpus.tokens
    train, valid, test = corpus.split()
    # a: 200 -> 180/10/10, b: 100 -> 90/5/5
    assert torch.equal(train, torch.cat([t[0:180], t[200:290]]))
    assert torch.equal(valid, torch.cat([t[180:190], t[290:295]]))
    assert torch.equal(test, torch.cat([t[190:200], t[295:300]]))
    a = str(books / "a.txt")
    train, valid, test = corpus.split((0.5, 0.25, 0.25), heldout_from=[a])
    assert torch.equal(train, torch.cat([t[0:100], t[200:300]]))
    assert torch.equal(valid, t[100:150]) and torch.equal(test, t[150:200])
    with pytest.raises(ConfigError, match=r"^fractions must be three non-negative numbers summing to 1, got \(0\.5, 0\.6, 0\.0\)$"):
        corpus.split((0.5, 0.6, 0.0))
    with pytest.raises(ConfigError, match=r"^heldout_from names unknown source 'timemachine'; sources: "):
        corpus.split(heldout_from=["timemachine"])


def test_train_weights_repeat_each_sources_training_text_only(tmp_path):
    books = _write_dir(tmp_path)
    corpus = build_corpus(str(books), normalization="raw")
    t = corpus.tokens
    train, valid, test = corpus.split(train_weights=[2, 0.5])
    # a trains on t[0:180] twice, b on the first half of t[200:290]; held-out text as without weights
    assert torch.equal(train, torch.cat([t[0:180], t[0:180], t[200:245]]))
    assert torch.equal(valid, torch.cat([t[180:190], t[290:295]]))
    assert torch.equal(test, torch.cat([t[190:200], t[295:300]]))
    # a source that is all held out has nothing to repeat
    a = str(books / "a.txt")
    train, _, _ = corpus.split((0.5, 0.25, 0.25), heldout_from=[a], train_weights=[3, 1.5])
    assert torch.equal(train, torch.cat([t[0:100]] * 3 + [t[200:300], t[200:250]]))
    with pytest.raises(ConfigError, match=r"^source_weights has 1 values but the corpus has 2 sources \(.*a\.txt, "
                                          r".*b\.txt\); give one weight per source, in that order$"):
        corpus.split(train_weights=[2])
    for w in (-1, 1e30):
        with pytest.raises(ConfigError, match=rf"^source weights must be in \(0, 1,000\], got {re.escape(f'{w:g}')}$"):
            corpus.split(train_weights=[1, w])


def test_repeat_tokens():
    ids = torch.arange(10, dtype=torch.uint8)
    assert repeat_tokens(ids, 1).tolist() == list(range(10))
    assert repeat_tokens(ids, 2.5).tolist() == list(range(10)) * 2 + [0, 1, 2, 3, 4]
    assert repeat_tokens(ids, 0.3).tolist() == [0, 1, 2]
    assert repeat_tokens(ids, 2.5).dtype == torch.uint8


def test_time_machine_split_defaults():
    corpus = build_corpus("timemachine")
    train, valid, test = corpus.split()
    assert (len(train), len(valid), len(test)) == (153522, 8529, 8529)
    assert torch.equal(torch.cat([train, valid, test]), corpus.tokens)


def test_given_vocab_is_used(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("the zebra", encoding="utf-8")
    vocab = build_corpus("timemachine").vocab
    corpus = build_corpus(str(path), vocab=vocab)
    assert corpus.vocab is vocab
    assert corpus.tokens.tolist() == [vocab[ch] for ch in "the zebra"]


def test_corpus_module_never_needs_shared_data(tmp_path, monkeypatch):
    """The product reads The Time Machine from the package, not from ../shared: with an empty data directory
    the whole book is there."""
    assert Path(str(importlib.resources.files("deeprnn") / "data" / "timemachine.txt")).is_file()
    monkeypatch.setenv("DEEPRNN_DATA_DIR", str(tmp_path))
    assert len(build_corpus("timemachine").tokens) == 170580


# --- large files: streamed in chunks, the same corpus as read whole ----------------------------------
def reference_chars(specs, normalization, **kwargs):
    """The whole-text character pipeline written out: load_sources, normalize, one Vocab over all the
    text (collections.Counter order), Vocab.encode per source."""
    streams = [normalize(s.text, normalization) for s in load_sources(specs, **kwargs)]
    if normalization == "d2l":
        streams = [s.replace("\n", "") for s in streams]
    vocab = Vocab("".join(streams), token="char")
    return [vocab.encode(s) for s in streams], vocab


def build_streamed(monkeypatch, specs, chunk=1000, long_line=5, **kwargs):
    """build_corpus with every file streamed in ``chunk``-byte reads (and never read whole), lines longer
    than ``long_line`` characters cut (with small chunks that happens in most lines)."""
    def no_whole_reads(path, encoding=None):
        raise AssertionError(f"{path} was read whole")

    with monkeypatch.context() as m:
        m.setattr(corpus_mod, "STREAM_MIN_BYTES", 0)
        m.setattr(corpus_mod, "CHUNK_BYTES", chunk)
        m.setattr(corpus_mod, "LONG_LINE_CHARS", long_line)
        m.setattr(corpus_mod, "read_text", no_whole_reads)
        return build_corpus(specs, **kwargs)


def assert_same_corpus(corpus, ids, vocab, names):
    assert corpus.tokens.tolist() == torch.cat(ids).tolist()
    assert corpus.vocab.idx_to_token == vocab.idx_to_token
    assert corpus.vocab.token_freqs == vocab.token_freqs
    ends = torch.tensor([len(i) for i in ids]).cumsum(0).tolist()
    assert corpus.spans == [(name, a, b) for name, a, b in zip(names, [0] + ends[:-1], ends)]


@pytest.mark.parametrize("normalization", ["d2l", "raw", "lower"])
@pytest.mark.parametrize("filename", ["timemachine.txt", "war_of_the_worlds.txt", "tinyshakespeare.txt"])
def test_streamed_file_equals_the_whole_text_pipeline(monkeypatch, shared_data, filename, normalization):
    path = str(shared_data / filename)
    corpus = build_streamed(monkeypatch, path, normalization=normalization)
    ids, vocab = reference_chars(path, normalization)
    assert_same_corpus(corpus, ids, vocab, [path])
    assert corpus.tokens.dtype == torch.uint8
    whole = build_corpus(path, normalization=normalization)  # small files are read whole by default
    assert torch.equal(whole.tokens, corpus.tokens) and whole.vocab.token_freqs == corpus.vocab.token_freqs


def test_streamed_sources_share_one_vocabulary(monkeypatch, shared_data):
    specs = [str(shared_data / "war_of_the_worlds.txt"), "timemachine", str(shared_data / "timemachine.txt")]
    corpus = build_streamed(monkeypatch, specs, chunk=777)  # the named corpus is read whole, the files are not
    ids, vocab = reference_chars(specs, "d2l")
    assert_same_corpus(corpus, ids, vocab, specs)
    cut = len(ids[0]) + 1000
    first = build_streamed(monkeypatch, specs, chunk=777, max_tokens=cut)
    assert torch.equal(first.tokens, corpus.tokens[:cut])
    assert first.spans == [(specs[0], 0, len(ids[0])), (specs[1], len(ids[0]), cut)]
    given = build_streamed(monkeypatch, specs[0], normalization="raw", vocab=vocab)  # a d2l vocabulary: unknowns
    assert given.vocab is vocab
    assert given.tokens.tolist() == vocab.encode(load_sources(specs[0])[0].text).tolist()


# Line breaks of every kind, multi-byte characters (2 and 3 bytes, and Σ, whose lowercase depends on
# its neighbours), markers split over lines, blank and non-letter lines.
MESSY = ("\ufeffThe Café — naïve\r\nΟΔΟΣ ΣΑΣ\r\n\r\n***\r\n  \r\n"
         "START OF THIS PROJECT GUTENBERG EBOOK ***\r\n\r\n\n"
         "It was — 1895!\rOld\tline\r\n  \r\n*** END OF THIS PROJECT GUTENBERG EBOOK\r\nfooter é\r\n")


@pytest.mark.parametrize("strip_boilerplate", [True, False])
@pytest.mark.parametrize("normalization", ["d2l", "raw", "lower"])
def test_chunk_ends_anywhere(monkeypatch, tmp_path, normalization, strip_boilerplate):
    path = tmp_path / "messy.txt"
    path.write_bytes(MESSY.encode() * 3)
    ids, vocab = reference_chars(str(path), normalization, strip_boilerplate=strip_boilerplate)
    for chunk in [*range(1, 18), 1000]:  # every split of "\r\n", of "é" (2 bytes) and "—" (3 bytes)
        corpus = build_streamed(monkeypatch, str(path), chunk, normalization=normalization,
                                strip_boilerplate=strip_boilerplate)
        assert_same_corpus(corpus, ids, vocab, [str(path)])


@pytest.mark.parametrize("normalization", ["d2l", "raw", "lower"])
def test_one_long_line_is_cut_into_bounded_pieces(monkeypatch, tmp_path, normalization):
    """A text8-like file (one line, no line break) streams in pieces no longer than the long-line limit
    plus a chunk, cut only between two ASCII letters, with the same result as reading it whole."""
    words = ["anarchism", "originated", "as", "a", "term", "of", "abuse", "ΟΔΟΣ", "ΣΑΣ", "1895", "—", "é"]
    rng = random.Random(0)
    line = " ".join(rng.choice(words) for _ in range(4000))  # about 25k characters, one line
    path = tmp_path / "one_line.txt"
    path.write_text(line, encoding="utf-8")
    with monkeypatch.context() as m:
        m.setattr(corpus_mod, "CHUNK_BYTES", 256)
        m.setattr(corpus_mod, "LONG_LINE_CHARS", 1000)
        pieces = list(corpus_mod._decoded_pieces(path, "utf-8-sig", strip_bom=False))
    assert "".join(pieces) == line
    assert len(pieces) >= len(line) // (1000 + 256) and max(len(p) for p in pieces) <= 1000 + 256
    for a, b in zip(pieces, pieces[1:]):
        assert re.fullmatch("[A-Za-z]", a[-1]) and re.fullmatch("[A-Za-z]", b[0])
    ids, vocab = reference_chars(str(path), normalization)
    assert_same_corpus(build_streamed(monkeypatch, str(path), 256, long_line=1000, normalization=normalization),
                       ids, vocab, [str(path)])


def test_a_long_line_that_may_be_a_marker_is_not_cut(monkeypatch, tmp_path):
    path = tmp_path / "marker.txt"
    path.write_text("before\n*** START OF THE PROJECT GUTENBERG EBOOK " + "x" * 3000 + " ***\nthe text\n"
                    "*** END OF THE PROJECT GUTENBERG EBOOK IT\n", encoding="utf-8")
    with monkeypatch.context() as m:
        m.setattr(corpus_mod, "CHUNK_BYTES", 64)
        m.setattr(corpus_mod, "LONG_LINE_CHARS", 100)
        pieces = list(corpus_mod._decoded_pieces(path, "utf-8-sig", strip_bom=False))
    marker = "*** START OF THE PROJECT GUTENBERG EBOOK " + "x" * 3000 + " ***\n"
    assert any(p.startswith(marker) for p in pieces)  # the line in one piece
    corpus = build_streamed(monkeypatch, str(path), 64, long_line=100, normalization="raw")
    assert corpus.vocab.decode(corpus.tokens) == "the text\n"


@pytest.mark.parametrize(("content", "encoding"), [
    ("Caf\u00e9 \u201cquoted\u201d\r\nline two\n", "cp1252"),
    ("\ufeffhello \u00e9 world\r\nagain\n", "utf-16"),
    ("\ufeff\ufeffdouble bom\n", "utf-8-sig"),  # the codec drops one BOM, read_text the other
])
def test_streamed_forced_encodings(monkeypatch, tmp_path, content, encoding):
    path = tmp_path / "forced.txt"
    path.write_bytes(content.encode(encoding))
    ids, vocab = reference_chars(str(path), "raw", encoding=encoding)
    for chunk in (1, 2, 3, 1000):
        corpus = build_streamed(monkeypatch, str(path), chunk, normalization="raw", encoding=encoding)
        assert_same_corpus(corpus, ids, vocab, [str(path)])


GUTENBERG_EMPTY = (b"header\n*** START OF THE PROJECT GUTENBERG EBOOK BOOK ***\n\n  \n"
                   b"*** END OF THE PROJECT GUTENBERG EBOOK BOOK ***\nlicence\n")


@pytest.mark.parametrize(("content", "kwargs"), [
    (b"", {}),
    (b"  \n\t\r\n", {}),
    (b"PK\x03\x04\x00\x00binary", {}),
    (b"\xff not utf-8, and a NUL later \x00", {}),  # NUL bytes are refused before decoding
    (b"\xff\xfe a UTF-16 BOM, then an odd byte", {}),  # a BOM says UTF-16: its decoding error, not "binary"
    (b"hello \x81\x8d world\n", {}),
    (b"price \xa4\xa6\xa8 list\n", {}),
    (bytes(range(1, 256)), {}),
    (b"\xef\xbb\xbfa BOM, then \x81", {}),
    (b"caf\xe9 au lait\n", {"encoding": "utf-8"}),
    (b"caf\xe9 \x00\n", {"encoding": "utf-8"}),  # the decoding error comes before the NUL
    (b"text with a NUL \x00 character\n", {"encoding": "latin-1"}),
    (b"text\n", {"encoding": "klingon"}),
    (b"text\n", {"encoding": "rot13"}),  # a codec, but not a text encoding
    (GUTENBERG_EMPTY, {}),
    (b"1234 5678 !!!\n", {}),
])
def test_streamed_errors_are_the_whole_text_errors(monkeypatch, tmp_path, content, kwargs):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError) as whole:
        build_corpus(str(path), **kwargs)
    with pytest.raises(CorpusError) as streamed:
        build_streamed(monkeypatch, str(path), chunk=5, **kwargs)
    assert str(streamed.value) == str(whole.value)
    assert "\n" not in str(whole.value)


def test_decoding_error_offsets_count_from_the_start_of_the_file(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfabc\xff")  # the BOM counts: 0xff is byte 6
    with pytest.raises(CorpusError, match=r"^\S+bom\.txt is not UTF-8 \(byte 0xff at offset 6\) "):
        read_text(path)
    with pytest.raises(CorpusError, match=r"^cannot decode \S+bom\.txt as utf-8-sig \(byte 0xff at offset 6\); "):
        read_text(path, encoding="utf-8-sig")


def test_large_vocabularies_take_wider_dtypes(monkeypatch, tmp_path):
    assert [token_dtype(n) for n in (1, 256, 257, 32768, 32769)] == [
        torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32]
    path = tmp_path / "han.txt"
    rare, common = "".join(map(chr, range(0x4E00, 0x4E64))), "".join(map(chr, range(0x5000, 0x50C8)))
    path.write_text(rare + common * 2, encoding="utf-8")  # 100 characters once, 200 twice
    ids, vocab = reference_chars(str(path), "raw")
    for corpus in (build_corpus(str(path), normalization="raw"), build_streamed(monkeypatch, str(path), 64,
                                                                                  normalization="raw")):
        assert len(corpus.vocab) == 301 and corpus.tokens.dtype == torch.int16
        assert_same_corpus(corpus, ids, vocab, [str(path)])
        kept = build_corpus(str(path), normalization="raw", min_freq=2)  # 201 tokens: back to uint8
        assert len(kept.vocab) == 201 and kept.tokens.dtype == torch.uint8
        assert kept.tokens.tolist() == [0] * 100 + list(range(1, 201)) * 2
    words = build_corpus("timemachine", token="word")
    assert words.tokens.dtype == torch.int16 and len(words.vocab) == 4580


TEXT_PARTS = ["***", " START OF it", "START OF", " END OF", " PROJECT GUTENBERG", " PROJECT\nGUTENBERG", "\r\n", "\n", "\r", "  ", "\t", "Ab",
              "zz", "é", "—", "Σ", "1,", "\x0b"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(TEXT_PARTS), max_size=40), bom=st.booleans(), chunk=st.integers(1, 12),
       normalization=st.sampled_from(["d2l", "raw", "lower"]))
def test_streamed_equals_whole_on_any_text(monkeypatch, tmp_path, parts, bom, chunk, normalization):
    path = tmp_path / "any.txt"
    path.write_bytes(("\ufeff" if bom else "").encode() + "".join(parts).encode())
    try:
        expected = reference_chars(str(path), normalization)
    except CorpusError as err:
        with pytest.raises(CorpusError) as streamed:
            build_streamed(monkeypatch, str(path), chunk, normalization=normalization)
        assert str(streamed.value) == str(err)
        return
    if not expected[0][0].numel():  # nothing left after normalisation: build_corpus refuses it
        with pytest.raises(CorpusError, match="has no tokens after"):
            build_streamed(monkeypatch, str(path), chunk, normalization=normalization)
        return
    assert_same_corpus(build_streamed(monkeypatch, str(path), chunk, normalization=normalization),
                       *expected, [str(path)])


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="aZ q.\n\r\t\x0b-é—Σ1", max_size=60))
def test_vectorised_d2l_is_the_books_per_line_regex(text):
    assert bytes(corpus_mod._d2l_chars(text)).decode() == normalize(text, "d2l").replace("\n", "")


def test_heldout_from_names_a_source_however_its_path_is_spelled(tmp_path, monkeypatch):
    """'./d/a.txt', an absolute path, or the directory itself were refused as unknown sources ('sources: d/a.txt,
    d/b.txt'); they name the same files."""
    from deeprnn.corpus import match_sources

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("the time machine " * 30)
    (tmp_path / "d" / "b.txt").write_text("the war of the worlds " * 30)
    (tmp_path / "c.txt").write_text("a third text here " * 30)
    corpus = build_corpus(["d", "c.txt", "timemachine"])
    names = [n for n, _, _ in corpus.spans]
    assert names == ["d/a.txt", "d/b.txt", "c.txt", "timemachine"]
    assert match_sources(names, ["./d/a.txt", str(tmp_path / "c.txt"), "d", "d/", "timemachine", "e.txt"]) == {
        "./d/a.txt": ["d/a.txt"], str(tmp_path / "c.txt"): ["c.txt"], "d": ["d/a.txt", "d/b.txt"],
        "d/": ["d/a.txt", "d/b.txt"], "timemachine": ["timemachine"], "e.txt": []}
    fractions = (0.8, 0.1, 0.1)
    assert corpus.split_ranges(fractions, ["./d/a.txt"]) == corpus.split_ranges(fractions, ["d/a.txt"])
    assert corpus.split_ranges(fractions, ["d"]) == corpus.split_ranges(fractions, ["d/a.txt", "d/b.txt"])
    (tmp_path / "elsewhere.txt").write_text("linked text here " * 30)
    (tmp_path / "d" / "link.txt").symlink_to(tmp_path / "elsewhere.txt")  # listed from d, lives elsewhere
    linked = build_corpus(["d"])
    names = [n for n, _, _ in linked.spans]
    assert match_sources(names, ["d"]) == {"d": ["d/a.txt", "d/b.txt", "d/link.txt"]}
    with pytest.raises(ConfigError) as err:
        corpus.split_ranges(fractions, ["e.txt"])
    assert str(err.value) == "heldout_from names unknown source 'e.txt'; sources: d/a.txt, d/b.txt, c.txt, timemachine"
