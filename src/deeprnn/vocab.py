"""Tokenisation and the vocabulary (book section 8.2), with vectorised encode/decode.

Indices follow the book's ``d2l.Vocab`` exactly: ``<unk>`` is 0, reserved tokens come next, then
the corpus tokens by descending frequency, ties in first-seen order (``collections.Counter`` keeps
insertion order and ``sorted`` is stable), so the same text gives the same indices as the book.
"""

from __future__ import annotations

import collections
import json
import re
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from deeprnn.errors import ConfigError, VocabError

TOKEN_KINDS = ("char", "word")
_FORMAT = "deeprnn.vocab"
_FORMAT_VERSION = 1


EOL = "<eol>"
# Words: numbers with inner . or , (3.5, 1,000), runs of letters/digits with inner apostrophes
# (don't, o'er); every other non-space
# character is a token of its own (punctuation). Each line break becomes the EOL token.
_WORD_RE = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:['\u2019][^\W_]+)*|\S")
_NO_SPACE_BEFORE = set(".,;:!?)]}'\u2019\u201d%")
_NO_SPACE_AFTER = set("([{\u201c\u2018$")


def split_words(text: str, eol: bool = True) -> list[str]:
    """Punctuation-aware word tokenisation (the rule for ``--token word`` without ``d2l``
    normalisation): words keep inner apostrophes, each punctuation mark is a token, and each line
    break is :data:`EOL`. ``join_words`` inverts it up to whitespace.
    """
    out: list[str] = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        out.extend(_WORD_RE.findall(line))
        if eol and i < len(lines) - 1:
            out.append(EOL)
    return out


def word_piece(prev: str | None, word: str) -> str:
    """The text ``word`` adds after ``prev`` (``None``: at the start): a line break for :data:`EOL`, the word
    alone after a line break, before closing punctuation or after an opening bracket, else a space and it."""
    if word == EOL:
        return "\n"
    if prev is None or prev == EOL or word in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER:
        return word
    return " " + word


def join_words(words: Sequence[str]) -> str:
    """Words back to text: spaces between words, none before closing punctuation or after opening
    brackets, :data:`EOL` as a line break (:func:`word_piece` for each)."""
    return "".join(word_piece(prev, w) for prev, w in zip([None, *words[:-1]], words))


def tokenize(lines: Iterable[str], token: str = "char") -> list[list[str]]:
    """Split each line into characters (``list(line)``) or words (``line.split()``), as the book does."""
    if token == "word":
        return [line.split() for line in lines]
    if token == "char":
        return [list(line) for line in lines]
    raise ConfigError(f"token must be one of {', '.join(TOKEN_KINDS)}, got {token!r}")


def count_corpus(tokens) -> collections.Counter:
    """Count token frequencies of a flat sequence (or a string of characters) or a list of token lists."""
    if len(tokens) > 0 and isinstance(tokens[0], list):
        tokens = [tok for line in tokens for tok in line]
    return collections.Counter(tokens)


class Vocab:
    """Token <-> index mapping with the book's ordering.

    ``tokens`` is a flat list, a list of token lists, or a ``str`` (its characters). ``token`` says
    whether this is a ``"char"`` or ``"word"`` vocabulary (it decides how ``encode``/``decode`` treat
    strings); by default it is ``"char"`` when every counted token is a single character.
    """

    def __init__(self, tokens=None, min_freq: int = 0, reserved_tokens=None, *, token: str | None = None):
        self._build(count_corpus([] if tokens is None else tokens), min_freq, reserved_tokens, token)

    @classmethod
    def from_counts(cls, counts, min_freq: int = 0, reserved_tokens=None, *, token: str | None = None) -> Vocab:
        """The vocabulary of a text known only by its token counts: ``counts`` maps each token to its
        frequency *in first-seen order* (a ``dict``/``Counter`` filled while reading, or ``(token,
        count)`` pairs), which gives the same indices as ``Vocab(text)`` on the text itself."""
        vocab = cls.__new__(cls)
        vocab._build(dict(counts), min_freq, reserved_tokens, token)
        return vocab

    def _build(self, counter: dict, min_freq: int, reserved_tokens, token: str | None) -> None:
        reserved = list(reserved_tokens or [])
        # sorted() is stable: equal counts keep the counter's (first-seen) order, as in the book.
        self._token_freqs = sorted(counter.items(), key=lambda item: item[1], reverse=True)
        self.idx_to_token: list[str] = ["<unk>"] + reserved
        self.token_to_idx: dict[str, int] = {tok: idx for idx, tok in enumerate(self.idx_to_token)}
        for tok, freq in self._token_freqs:
            if freq < min_freq:
                break
            if tok not in self.token_to_idx:
                self.idx_to_token.append(tok)
                self.token_to_idx[tok] = len(self.idx_to_token) - 1
        if token is None:
            # any hashable token, as the book's Vocab takes (ints, None): only one-character strings are characters
            token = "char" if all(isinstance(tok, str) and len(tok) == 1 for tok in counter) else "word"
        if token not in TOKEN_KINDS:
            raise ConfigError(f"token must be one of {', '.join(TOKEN_KINDS)}, got {token!r}")
        self.token = token
        self._table: np.ndarray | None = None

    # --- the book's interface -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        if not isinstance(tokens, (list, tuple)):
            return self.token_to_idx.get(tokens, self.unk)
        return [self.__getitem__(tok) for tok in tokens]

    def __contains__(self, token) -> bool:
        return token in self.token_to_idx

    def to_tokens(self, indices):
        if isinstance(indices, (torch.Tensor, np.ndarray)):
            indices = indices.tolist()
        if not isinstance(indices, (list, tuple)):
            return self.idx_to_token[indices]
        return [self.idx_to_token[index] for index in indices]

    @property
    def unk(self) -> int:
        return 0

    @property
    def token_freqs(self) -> list[tuple[str, int]]:
        return self._token_freqs

    def __repr__(self) -> str:
        return f"Vocab(token={self.token!r}, size={len(self)})"

    # --- encode / decode ------------------------------------------------------------------------
    def _lookup_table(self) -> np.ndarray:
        """Codepoint -> index table for single-character tokens; the last slot catches the rest as unk."""
        if self._table is None:
            singles = [(ord(tok), idx) for tok, idx in self.token_to_idx.items() if len(tok) == 1]
            size = max((cp for cp, _ in singles), default=-1) + 1
            table = np.full(size + 1, self.unk, dtype=np.int64)
            for cp, idx in singles:
                table[cp] = idx
            self._table = table
        return self._table

    def encode(self, text_or_tokens: str | Sequence[str], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Indices of a text or token sequence as a 1-D tensor; unknown tokens map to ``unk`` (0).

        A ``str`` is split into characters for a char vocabulary (vectorised through a codepoint
        table, about 10 ms per million characters) and by :func:`split_words` for a word vocabulary.
        ``dtype`` is the integer dtype of the result (default int64); raises :class:`ConfigError` when
        it cannot hold this vocabulary's largest index.
        """
        dtype = torch.long if dtype is None else dtype
        integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        if not integer or torch.iinfo(dtype).max < len(self) - 1:
            raise ConfigError(f"dtype must be an integer type that holds indices up to {len(self) - 1}, got {dtype}")
        if isinstance(text_or_tokens, str):
            if self.token == "char":
                table = self._lookup_table()
                if dtype != torch.long:  # look up in the narrow type: no int64 copy of the text
                    table = table.astype(torch.empty(0, dtype=dtype).numpy().dtype)
                codepoints = np.frombuffer(text_or_tokens.encode("utf-32-le"), dtype=np.uint32)
                ids = table[np.minimum(codepoints, len(table) - 1)]
                return torch.from_numpy(ids)
            text_or_tokens = split_words(text_or_tokens)
        get, unk = self.token_to_idx.get, self.unk
        return torch.tensor([get(tok, unk) for tok in text_or_tokens], dtype=dtype)

    def decode(self, ids) -> str:
        """Text of a 1-D sequence of indices: characters joined with ``''``, words by :func:`join_words`."""
        arr = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= len(self)):
            bad = int(arr[(arr < 0) | (arr >= len(self))][0])
            raise VocabError(f"index {bad} is out of range for a vocabulary of {len(self)} tokens")
        tokens = [self.idx_to_token[i] for i in arr.tolist()]
        return "".join(tokens) if self.token == "char" else join_words(tokens)

    # --- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-able description that :meth:`from_dict` restores exactly (indices and frequencies)."""
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "token": self.token,
            "idx_to_token": list(self.idx_to_token),
            "token_freqs": [[tok, freq] for tok, freq in self._token_freqs],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        try:
            if data.get("format") != _FORMAT:
                raise KeyError("format")
            idx_to_token = [str(tok) for tok in data["idx_to_token"]]
            freqs = [(str(tok), int(freq)) for tok, freq in data["token_freqs"]]
            token = data["token"]
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise VocabError(
                f"not a deeprnn vocabulary (bad or missing field {err}); save it with Vocab.save"
            ) from None
        if not idx_to_token or idx_to_token[0] != "<unk>" or len(set(idx_to_token)) != len(idx_to_token):
            raise VocabError("vocabulary must start with '<unk>' and list each token once; save it with Vocab.save")
        vocab = cls(token=token)
        vocab.idx_to_token = idx_to_token
        vocab.token_to_idx = {tok: idx for idx, tok in enumerate(idx_to_token)}
        vocab._token_freqs = freqs
        return vocab

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON (atomically: a temp file renamed into place)."""
        from deeprnn.files import write_text_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VocabError(f"no vocabulary file at {path}; check the path") from None
        except (OSError, ValueError) as err:
            raise VocabError(f"cannot read vocabulary {path}: {err}; re-save it with Vocab.save") from None
        return cls.from_dict(data)
