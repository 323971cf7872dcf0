"""Reading text: named corpora, files, encodings, normalisation, sources and splits.

The pipeline is ``specs -> load_sources -> normalize -> tokens (Vocab.encode) -> Corpus``. With the
defaults (``token="char"``, ``normalization="d2l"``) on The Time Machine it reproduces the book's
``load_corpus_time_machine`` (section 8.2): 170,580 characters over a 28-token vocabulary.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
import tempfile
import unicodedata
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from deeprnn.errors import ConfigError, CorpusError
from deeprnn.vocab import TOKEN_KINDS, Vocab, split_words


@dataclass(frozen=True)
class CorpusInfo:
    """A corpus known by name: where it comes from and how to check it."""

    name: str
    filename: str  # its file name in a data dir
    url: str
    checksum: tuple[str, str] | None  # (hashlib algorithm, hex digest); None where the source is not stable
    bundled: bool = False  # shipped inside the package as ``deeprnn/data/<filename>``


NAMED_CORPORA: dict[str, CorpusInfo] = {
    "timemachine": CorpusInfo(
        "timemachine",
        "timemachine.txt",
        "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
        ("sha1", "090b5e7e70c295757f55df93cb0a180b9691891a"),
        bundled=True,
    ),
    # Gutenberg now serves a re-encoded UTF-8 copy that differs byte-wise from the Windows-1252 one
    # the exercises were written against, so a download cannot be checked against a fixed digest.
    "war-of-the-worlds": CorpusInfo(
        "war-of-the-worlds",
        "war_of_the_worlds.txt",
        "https://www.gutenberg.org/files/36/36-0.txt",
        None,
    ),
    "tinyshakespeare": CorpusInfo(
        "tinyshakespeare",
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        ("sha256", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    ),
}

NORMALIZATIONS = ("d2l", "raw", "lower")
_DATA_DIR_ENV = "DEEPRNN_DATA_DIR"
_OFFLINE_ENV = "DEEPRNN_OFFLINE"
_DOWNLOAD_TIMEOUT_S = 30


# --- where corpora live --------------------------------------------------------------------------
def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The corpus cache: the argument, else ``$DEEPRNN_DATA_DIR``, else ``~/.cache/deeprnn``."""
    if data_dir is None:
        data_dir = os.environ.get(_DATA_DIR_ENV) or Path.home() / ".cache" / "deeprnn"
    return Path(data_dir).expanduser()


_data_dir = data_dir  # for functions whose ``data_dir`` argument shadows the function


def offline() -> bool:
    """True when ``$DEEPRNN_OFFLINE`` forbids downloads (tests set it)."""
    return os.environ.get(_OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _unknown_corpus(name: str) -> CorpusError:
    known = ", ".join(NAMED_CORPORA)
    return CorpusError(f"unknown corpus {name!r}; known corpora: {known} (or pass a file or directory path)")


def _check_digest(data: bytes, checksum: tuple[str, str], what: str) -> None:
    algorithm, expected = checksum
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != expected:
        raise CorpusError(f"{what} is corrupt ({algorithm} {actual}, expected {expected}); reinstall or re-download it")


def _read_bundled(filename: str) -> bytes:
    return importlib.resources.files("deeprnn").joinpath("data", filename).read_bytes()


def download(url: str, target: Path, checksum: tuple[str, str] | None = None, *, what: str | None = None,
             hint: str, progress: bool = True) -> Path:
    """Fetch ``url`` into ``target``: streamed to a temp file beside it, fsynced, checked against
    ``checksum`` (``(algorithm, hex digest)``; ``None``: not checked), then renamed into place, so a
    failed or interrupted download leaves nothing behind. ``what`` names the download in messages
    (default: the URL); ``hint`` says what the user can do instead. Raises :class:`CorpusError`.
    """
    from tqdm.auto import tqdm

    what = what or url
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.new(checksum[0]) if checksum else None
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if digest is not None and digest.hexdigest() != checksum[1]:
            raise CorpusError(
                f"download of {what} failed its {checksum[0]} check "
                f"(got {digest.hexdigest()}, expected {checksum[1]}); {hint}"
            )
        os.replace(tmp, target)
        tmp = None
    except CorpusError:
        raise
    except Exception as err:  # network, HTTP and file-system errors alike
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CorpusError(f"could not download {what} ({reason}); {hint}") from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return target


def fetch_corpus(name: str, data_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Path of the named corpus's file in the data dir, downloading it first when missing.

    Raises :class:`CorpusError` for an unknown name, or when the file is missing and downloads are
    off (``$DEEPRNN_OFFLINE=1``) or fail; the message says where to put the file.
    """
    if name not in NAMED_CORPORA:
        raise _unknown_corpus(name)
    info = NAMED_CORPORA[name]
    target = _data_dir(data_dir) / info.filename
    if target.is_file():
        return target
    if offline():
        raise CorpusError(
            f"corpus {name!r} is not in {target.parent} and downloads are off (${_OFFLINE_ENV}=1); "
            f"save {info.url} as {target}, or pass the file's path instead of {name!r}"
        )
    hint = f"save {info.url} as {target} yourself, or pass the file's path instead of {name!r}"
    return download(info.url, target, info.checksum, what=f"{name} from {info.url}", hint=hint, progress=progress)


def _read_named(name: str, data_dir, encoding: str | None) -> str:
    info = NAMED_CORPORA[name]
    if info.bundled:
        try:
            data = _read_bundled(info.filename)
        except OSError:
            data = None  # a stripped-down install: fall back to the data dir / download
        if data is not None:
            _check_digest(data, info.checksum, f"bundled {info.filename}")
            return decode_bytes(data, encoding, what=f"bundled {info.filename}")
    return read_text(fetch_corpus(name, data_dir), encoding)


# --- decoding ------------------------------------------------------------------------------------
def _looks_like_cp1252(data: bytes) -> str | None:
    """The cp1252 decoding of ``data`` when it reads as text (letters and punctuation such as smart
    quotes and dashes beyond ASCII, and not too many of them), else None."""
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        return None
    non_ascii = [ch for ch in text if ord(ch) > 127]
    if len(non_ascii) > 0.25 * len(text):
        return None
    for ch in set(non_ascii):
        if unicodedata.category(ch)[0] not in "LP" and ch != "\xa0":
            return None
    return text


def decode_bytes(data: bytes, encoding: str | None = None, *, what: str = "input") -> str:
    """Decode file contents like :func:`read_text` (``what`` names the input in error messages)."""
    if encoding is not None:
        try:
            text = data.decode(encoding)
        except LookupError:
            raise CorpusError(
                f"unknown encoding {encoding!r}; pass a Python codec name such as utf-8 or cp1252 to --encoding"
            ) from None
        except UnicodeDecodeError as err:
            raise CorpusError(
                f"cannot decode {what} as {encoding} (byte 0x{data[err.start]:02x} at offset {err.start}); "
                "check the file's encoding and pass the right one with --encoding"
            ) from None
        if text.startswith("\ufeff"):
            text = text[1:]
        if "\x00" in text:
            raise CorpusError(f"{what} looks binary (it contains NUL characters); pass a text file")
        return text
    if b"\x00" in data:
        raise CorpusError(
            f"{what} looks binary (it contains NUL bytes); "
            "pass a text file, or its encoding with --encoding if it is UTF-16"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        text = _looks_like_cp1252(data)
        if text is None:
            raise CorpusError(
                f"{what} is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}) and does not look like "
                "Windows-1252 text; pass its encoding with --encoding (e.g. --encoding latin-1)"
            ) from None
        return text


def read_text(path: str | os.PathLike, encoding: str | None = None) -> str:
    """Read a text file: UTF-8 by default (a BOM is stripped); Windows-1252 when the bytes are not
    UTF-8 but read as cp1252 text (smart quotes, dashes); ``encoding`` forces a codec. Newlines are
    translated to ``\\n`` as Python's text mode does.

    Raises :class:`CorpusError` for a missing, unreadable, binary, undecodable or empty file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"no such file: {str(path)!r}; check the path") from None
    except IsADirectoryError:
        raise CorpusError(
            f"{str(path)!r} is a directory, not a file; pass a .txt file or the directory itself as a source"
        ) from None
    except OSError as err:
        reason = err.strerror or err
        raise CorpusError(f"cannot read {str(path)!r}: {reason}; check the path and its permissions") from None
    text = decode_bytes(data, encoding, what=str(path))
    if not text.strip():
        raise CorpusError(f"{str(path)!r} is empty; pass a file with some text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF\b.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF\b", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (through the ``*** START OF … ***`` line) and footer (from the
    ``*** END OF … ***`` line on). Text without the markers is returned unchanged."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():].lstrip("\n")
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


# --- normalisation -------------------------------------------------------------------------------
_NON_LETTERS = re.compile("[^A-Za-z]+")


def normalize(text: str, mode: str) -> str:
    """Normalise text: ``raw`` (as is), ``lower``, or ``d2l`` — the book's
    ``re.sub('[^A-Za-z]+', ' ', line).strip().lower()`` on every line, lines joined with ``\\n``.

    Under ``d2l`` the character stream is the lines concatenated *without* separators (the book
    flattens its per-line tokens), so :func:`build_corpus` drops the ``\\n``; words split per line.
    """
    if mode == "raw":
        return text
    if mode == "lower":
        return text.lower()
    if mode == "d2l":
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return "\n".join(_NON_LETTERS.sub(" ", line).strip().lower() for line in lines)
    raise ConfigError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")


# --- sources -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One input text and the name it is known by (a corpus name or a file path)."""

    name: str
    text: str


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or "." in spec or spec.startswith("~")


def load_sources(specs, data_dir=None, encoding: str | None = None, strip_boilerplate: bool = True) -> list[Source]:
    """Read each spec — a named corpus, a file path or a directory of ``.txt`` files (each file one
    source, in sorted order) — into a :class:`Source`. Raises :class:`CorpusError`."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise CorpusError("no corpus given; pass a corpus name or a path")
    sources = []
    for spec in specs:
        if isinstance(spec, str) and spec in NAMED_CORPORA:
            items = [(spec, lambda spec=spec: _read_named(spec, data_dir, encoding))]
        else:
            path = Path(spec).expanduser()
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
                if not files:
                    raise CorpusError(f"directory {str(spec)!r} has no .txt files; put the texts there as .txt files")
                items = [(str(p), lambda p=p: read_text(p, encoding)) for p in files]
            elif path.exists() or not isinstance(spec, str) or _looks_like_path(spec):
                items = [(str(spec), lambda path=path: read_text(path, encoding))]
            else:
                raise _unknown_corpus(spec)
        for name, read in items:
            text = read()
            if strip_boilerplate:
                text = strip_gutenberg(text)
                if not text.strip():
                    raise CorpusError(
                        f"{name!r} has no text between its Gutenberg markers; "
                        "pass strip_boilerplate=False or another file"
                    )
            sources.append(Source(name, text))
    return sources


# --- the corpus ----------------------------------------------------------------------------------
class Splits(NamedTuple):
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


@dataclass
class Corpus:
    """A token stream with its vocabulary; ``spans`` are ``(source name, start, end)`` in ``tokens``."""

    tokens: torch.Tensor  # (N,) int64
    vocab: Vocab
    spans: list[tuple[str, int, int]]
    token: str
    normalization: str

    def __len__(self) -> int:
        return len(self.tokens)

    def split_ranges(self, fractions=(0.9, 0.05, 0.05), heldout_from=None) -> dict[str, list[tuple[str, int, int]]]:
        """Where :meth:`split` takes each part from: ``{"train"|"valid"|"test": [(source, start, end)]}``,
        half-open ranges of ``tokens`` in source order (empty ranges omitted).

        Each source's span is cut on its own at ``int(n*f_train)`` and ``int(n*(f_train+f_valid))``;
        with ``heldout_from`` only those sources give valid/test text (the others train in full).
        """
        fractions = tuple(float(f) for f in fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise ConfigError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
        names = [name for name, _, _ in self.spans]
        held = set(names) if heldout_from is None else set(heldout_from)
        unknown = sorted(held - set(names))
        if unknown:
            raise ConfigError(f"heldout_from names unknown source {unknown[0]!r}; sources: {', '.join(names)}")
        out: dict[str, list[tuple[str, int, int]]] = {"train": [], "valid": [], "test": []}
        for name, start, end in self.spans:
            n = end - start
            if name in held:
                cut1 = int(n * fractions[0])
                cut2 = n if fractions[2] == 0 else int(n * (fractions[0] + fractions[1]))
            else:
                cut1 = cut2 = n
            for part, (a, b) in zip(out, ((0, cut1), (cut1, cut2), (cut2, n))):
                if b > a:
                    out[part].append((name, start + a, start + b))
        return out

    def split(self, fractions=(0.9, 0.05, 0.05), heldout_from=None) -> Splits:
        """Contiguous train/valid/test parts of the token stream (no overlap, deterministic), cut as
        :meth:`split_ranges` says and concatenated per part."""
        ranges = self.split_ranges(fractions, heldout_from)
        parts = [[self.tokens[a:b] for _, a, b in ranges[p]] for p in ("train", "valid", "test")]
        return Splits(*(torch.cat(part) if part else self.tokens[:0] for part in parts))


def build_corpus(
    specs,
    token: str = "char",
    normalization: str = "d2l",
    min_freq: int = 0,
    vocab: Vocab | None = None,
    data_dir=None,
    encoding: str | None = None,
    max_tokens: int | None = None,
    *,
    strip_boilerplate: bool = True,
) -> Corpus:
    """Read, normalise, tokenise and encode ``specs`` into one :class:`Corpus`.

    The vocabulary (unless given) counts the whole text; ``max_tokens`` then keeps the first tokens
    as the book's ``load_corpus_time_machine(max_tokens)`` does (``None`` or ``<= 0``: all of them).
    """
    if token not in TOKEN_KINDS:
        raise ConfigError(f"token must be one of {', '.join(TOKEN_KINDS)}, got {token!r}")
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    if vocab is not None and vocab.token != token:
        raise ConfigError(f"token must match the given vocabulary's ({vocab.token!r}), got {token!r}")
    sources = load_sources(specs, data_dir=data_dir, encoding=encoding, strip_boilerplate=strip_boilerplate)
    streams = []  # per source: a str of characters or a list of words
    for source in sources:
        text = normalize(source.text, normalization)
        if token == "char":
            stream = text.replace("\n", "") if normalization == "d2l" else text
        else:
            # d2l: the book's per-line line.split(), flattened; otherwise punctuation-aware with <eol>
            stream = text.split() if normalization == "d2l" else split_words(text)
        if not stream:
            raise CorpusError(
                f"{source.name!r} has no tokens after {normalization!r} normalisation; "
                "pass another text or normalisation"
            )
        streams.append(stream)
    if vocab is None:
        everything = "".join(streams) if token == "char" else [w for s in streams for w in s]
        vocab = Vocab(everything, min_freq=min_freq, token=token)
    encoded = [vocab.encode(stream) for stream in streams]
    spans, start = [], 0
    for source, ids in zip(sources, encoded):
        spans.append((source.name, start, start + len(ids)))
        start += len(ids)
    tokens = torch.cat(encoded)
    if max_tokens is not None and max_tokens > 0 and max_tokens < len(tokens):
        tokens = tokens[:max_tokens].clone()
        spans = [(name, a, min(b, max_tokens)) for name, a, b in spans if a < max_tokens]
    return Corpus(tokens=tokens, vocab=vocab, spans=spans, token=token, normalization=normalization)
