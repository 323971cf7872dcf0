"""Reading text: named corpora, files, encodings, normalisation, sources and splits.

The pipeline is ``specs -> load_sources -> normalize -> tokens -> Corpus``. With the defaults
(``token="char"``, ``normalization="d2l"``) on The Time Machine it reproduces the book's
``load_corpus_time_machine`` (section 8.2): 170,580 characters over a 28-token vocabulary.

Tokens are stored in the smallest integer dtype that holds the vocabulary (:func:`token_dtype`).
At character level a large file (:data:`STREAM_MIN_BYTES`) is read in chunks, never whole, with the
same result as reading it whole: a 100 MB file takes about its own size in memory, also when it is one
long line (text8): such a line is cut into pieces between two ASCII letters.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.resources
import os
import re
import tempfile
import unicodedata
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from deeprnn.errors import ConfigError, CorpusError
from deeprnn.fields import is_number
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
STREAM_MIN_BYTES = 16 * 2**20  # at char level, files this large are read in chunks, never whole
LONG_LINE_CHARS = 2**20  # a line longer than this is cut, between two ASCII letters, into pieces
CHUNK_BYTES = 2**20  # bytes per read (more makes the per-chunk numpy temporaries dominate memory)


# --- where corpora live --------------------------------------------------------------------------
def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The corpus cache: the argument, else ``$DEEPRNN_DATA_DIR``, else ``~/.cache/deeprnn``. An empty argument
    (an unset shell variable) or a path that is a file is a ``ConfigError``: they meant the current directory
    and a cache nothing could be saved in."""
    if data_dir is not None and not os.fspath(data_dir).strip():
        raise ConfigError(f"--data-dir is empty; name a directory, or drop it for the default (${_DATA_DIR_ENV}, "
                          "else ~/.cache/deeprnn)")
    if data_dir is None:
        data_dir = os.environ.get(_DATA_DIR_ENV) or Path.home() / ".cache" / "deeprnn"
    path = Path(data_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"the corpus cache {path} is a file, not a directory; pass a directory to --data-dir (or "
                          f"${_DATA_DIR_ENV})")
    return path


_data_dir = data_dir  # for functions whose ``data_dir`` argument shadows the function


def offline() -> bool:
    """True when ``$DEEPRNN_OFFLINE`` forbids downloads (tests set it)."""
    return os.environ.get(_OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def respell_encoding_option(message: str, example: str, generic: str) -> str:
    """A corpus message's fix names the command line's ``--encoding``; a caller that spells the option otherwise
    (compare's ``--set encoding=``, the book API's ``encoding`` argument) gives its own: ``example`` formats the
    codec a message suggests (``{}``), ``generic`` stands where no codec is named."""
    message = re.sub(r"--encoding ([\w.-]+)(?=\))", lambda m: example.format(m.group(1)), message)  # "(e.g. …)"
    return re.sub(r"\b(with|to) --encoding\b", lambda m: f"{m.group(1)} {generic}", message)


def _unknown_corpus(name: str) -> CorpusError:
    known = ", ".join(NAMED_CORPORA)
    return CorpusError(f"unknown corpus {name!r}; known corpora: {known} (or pass a file or directory path)")


def _digest(data: bytes, checksum: tuple[str, str]) -> str:
    return hashlib.new(checksum[0], data).hexdigest()


def digest_matches(data: bytes, checksum: tuple[str, str]) -> bool:
    """Whether ``data`` has the ``(algorithm, hex digest)`` a named corpus's file must have."""
    return _digest(data, checksum) == checksum[1]


def _check_digest(data: bytes, checksum: tuple[str, str], what: str,
                  fix: str = "reinstall or re-download it") -> None:
    actual = _digest(data, checksum)  # hashed once, for the check and the message
    if actual != checksum[1]:
        raise CorpusError(f"{what} is corrupt ({checksum[0]} {actual}, expected {checksum[1]}); {fix}")


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
    path = fetch_corpus(name, data_dir)
    if info.checksum is not None:  # a cached copy too: a truncated or edited file would train silently
        _check_digest(path.read_bytes(), info.checksum, f"{path} ({name})",
                      f"delete it to download it again, or pass the file's path instead of {name!r}")
    return read_text(path, encoding)


# --- decoding ------------------------------------------------------------------------------------
# The messages are built in one place each: the whole-file path (decode_bytes, read_text) and the
# chunked path for large files (_scan_file) must fail alike.
def _binary_error(what: str, forced: bool) -> CorpusError:
    if forced:  # the codec decoded it, into NUL characters
        return CorpusError(f"{what} looks binary (it contains NUL characters); pass a text file")
    return CorpusError(
        f"{what} looks binary (it contains NUL bytes); "
        "pass a text file, or its encoding with --encoding if it is UTF-16"
    )


def unknown_encoding_message(encoding: str) -> str:
    return f"unknown encoding {encoding!r}; pass a Python codec name such as utf-8 or cp1252 to --encoding"


def _unknown_encoding_error(encoding: str) -> CorpusError:
    return CorpusError(unknown_encoding_message(encoding))


def known_encoding(encoding: str) -> bool:
    """Whether ``encoding`` names a text codec (bytes.decode's check: not an unknown name, not rot13)."""
    try:
        return getattr(codecs.lookup(encoding), "_is_text_encoding", True)
    except LookupError:
        return False


def _undecodable_error(what: str, encoding: str, byte: int, offset: int) -> CorpusError:
    return CorpusError(
        f"cannot decode {what} as {encoding} (byte 0x{byte:02x} at offset {offset}); "
        "check the file's encoding and pass the right one with --encoding"
    )


def _not_utf8_error(what: str, byte: int, offset: int) -> CorpusError:
    return CorpusError(
        f"{what} is not UTF-8 (byte 0x{byte:02x} at offset {offset}) and does not look like "
        "Windows-1252 text; pass its encoding with --encoding (e.g. --encoding latin-1)"
    )


def _empty_error(path: Path) -> CorpusError:
    return CorpusError(f"{str(path)!r} is empty; pass a file with some text")


def _read_error(path: Path, err: OSError) -> CorpusError:
    if isinstance(err, FileNotFoundError):
        return CorpusError(f"no such file: {str(path)!r}; check the path")
    if isinstance(err, IsADirectoryError):
        return CorpusError(
            f"{str(path)!r} is a directory, not a file; pass a .txt file or the directory itself as a source"
        )
    reason = err.strerror or err
    return CorpusError(f"cannot read {str(path)!r}: {reason}; check the path and its permissions")


def _failure_at(err: UnicodeDecodeError, end: int) -> tuple[int, int]:
    """``(byte, offset)`` of a decoding failure, the offset counted in the input, of which ``end`` bytes
    were fed to the decoder: ``err.object`` ends there but may lack a prefix (a BOM the codec dropped) or
    start with bytes an incremental decoder kept from earlier input."""
    return err.object[err.start], end - len(err.object) + err.start


def _reads_as_cp1252(byte_counts: np.ndarray) -> bool:
    """Whether bytes occurring ``byte_counts[b]`` times each decode as cp1252 to text: letters and
    punctuation such as smart quotes and dashes beyond ASCII (and no-break spaces), at most a quarter
    of the characters. cp1252 gives one character per byte, non-ASCII exactly for bytes >= 0x80."""
    try:
        present = bytes(np.flatnonzero(byte_counts).tolist()).decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90 and 0x9d are not cp1252
        return False
    if int(byte_counts[128:].sum()) > 0.25 * int(byte_counts.sum()):
        return False
    return all(unicodedata.category(ch)[0] in "LP" or ch == "\xa0" for ch in present if ord(ch) > 127)


def _byte_counts(data: bytes) -> np.ndarray:
    """How often each byte value occurs in ``data`` (a chunk at a time: bincount counts via int64 indices)."""
    codes = np.frombuffer(data, dtype=np.uint8)
    counts = np.zeros(256, dtype=np.int64)
    for a in range(0, len(codes), CHUNK_BYTES):
        counts += np.bincount(codes[a : a + CHUNK_BYTES], minlength=256)
    return counts


def _looks_like_cp1252(data: bytes) -> str | None:
    """The cp1252 decoding of ``data`` when it reads as text (see :func:`_reads_as_cp1252`), else None."""
    return data.decode("cp1252") if _reads_as_cp1252(_byte_counts(data)) else None


# UTF-32 first: its little-endian BOM begins with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _bom_codec(head: bytes) -> str | None:
    """``"utf-16"`` or ``"utf-32"`` when ``head`` (a file's first bytes) starts with that encoding's byte-order
    mark; the codec reads the mark, decodes in its byte order and drops it. None otherwise."""
    return next((codec for bom, codec in _BOMS if head.startswith(bom)), None)


def decode_bytes(data: bytes, encoding: str | None = None, *, what: str = "input") -> str:
    """Decode file contents like :func:`read_text` (``what`` names the input in error messages)."""
    encoding = encoding or _bom_codec(data[:4])
    if encoding is not None:
        try:
            text = data.decode(encoding)
        except LookupError:
            raise _unknown_encoding_error(encoding) from None
        except UnicodeDecodeError as err:
            raise _undecodable_error(what, encoding, *_failure_at(err, len(data))) from None
        if text.startswith("\ufeff"):
            text = text[1:]
        if "\x00" in text:
            raise _binary_error(what, forced=True)
        return text
    if b"\x00" in data:
        raise _binary_error(what, forced=False)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        text = _looks_like_cp1252(data)
        if text is None:
            raise _not_utf8_error(what, *_failure_at(err, len(data))) from None
        return text


def _translate_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: str | os.PathLike, encoding: str | None = None) -> str:
    """Read a text file: UTF-8 by default (a BOM is stripped); UTF-16 or UTF-32 when the file starts with
    their byte-order mark; Windows-1252 when the bytes are not UTF-8 but read as cp1252 text (smart quotes,
    dashes); ``encoding`` forces a codec. Newlines are
    translated to ``\\n`` as Python's text mode does.

    Raises :class:`CorpusError` for a missing, unreadable, binary, undecodable or empty file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _read_error(path, err) from None
    text = decode_bytes(data, encoding, what=str(path))
    if not text.strip():
        raise _empty_error(path)
    return _translate_newlines(text)


# Project Gutenberg's markers, "*** START OF THE PROJECT GUTENBERG EBOOK …" (THIS, or the older "*** START OF THE
# PROJECT GUTENBERG EBOOK" without a title): the line must say so. "*** End of Part One ***" in a user's novel had
# cut its second half away, silently.
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF\b(?=[^\n]*PROJECT[^\S\n]+GUTENBERG).*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF\b(?=[^\n]*PROJECT[^\S\n]+GUTENBERG)", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (through the ``*** START OF THE PROJECT GUTENBERG EBOOK … ***`` line) and
    footer (from the ``*** END OF THE PROJECT GUTENBERG EBOOK … ***`` line on). Text without such markers (a line
    ``*** End of Part One ***`` is not one) is returned unchanged."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():].lstrip("\n")
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def _no_text_between_markers_error(name: str) -> CorpusError:
    return CorpusError(
        f"{name!r} has no text between its Project Gutenberg markers (*** START OF … and *** END OF … PROJECT "
        "GUTENBERG …); remove the markers, or pass another file"
    )


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
        lines = _translate_newlines(text).split("\n")
        return "\n".join(_NON_LETTERS.sub(" ", line).strip().lower() for line in lines)
    raise ConfigError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")


def _d2l_chars(text: str) -> np.ndarray:
    """The d2l character stream of ``text`` as ASCII codes (uint8): ``normalize(text, "d2l")`` with
    its line breaks dropped, vectorised. Per line, letters are lowercased and each run of other
    characters becomes one space, except at the line's ends (where ``strip()`` drops it)."""
    # UTF-8 spells a non-ASCII character with bytes >= 0x80: as many non-letters, in the same run.
    codes = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    lowered = codes | 0x20
    letter = (lowered - np.uint8(ord("a"))) < 26  # uint8 wraps around: only A-Z and a-z land in [0, 26)
    run_starts = np.flatnonzero(letter[:-1] & ~letter[1:]) + 1  # first non-letter after a letter
    run_ends = np.flatnonzero(~letter[:-1] & letter[1:]) + 1  # first letter after a non-letter
    # Runs and letters alternate, so the k-th end after the first start closes the k-th run; a run
    # before the first letter or after the last has no partner and is stripped.
    run_ends = run_ends[run_ends > run_starts[0]] if len(run_starts) else run_ends[:0]
    run_starts = run_starts[: len(run_ends)]
    # A run holding a line break ("\r" too, as normalize translates it) joins two lines: no space.
    breaks = np.flatnonzero((codes == ord("\n")) | (codes == ord("\r")))
    inside_a_line = np.searchsorted(breaks, run_starts) == np.searchsorted(breaks, run_ends)
    keep = letter.copy()
    keep[run_starts[inside_a_line]] = True  # the run's first character stands for it, as a space
    return np.where(letter, lowered, np.uint8(ord(" ")))[keep]


def _codepoints(text: str) -> np.ndarray:
    """The code points of ``text``: uint8 when all are below 256 (most texts), else uint32."""
    try:
        return np.frombuffer(text.encode("latin-1"), dtype=np.uint8)
    except UnicodeEncodeError:
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _char_stream(text: str, mode: str) -> np.ndarray:
    """The code points of the character tokens of ``text`` (whole lines) under normalisation ``mode``."""
    if mode == "d2l":
        return _d2l_chars(text)
    return _codepoints(text.lower() if mode == "lower" else text)


# --- sources -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One input text and the name it is known by (a corpus name or a file path)."""

    name: str
    text: str


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or "." in spec or spec.startswith("~")


def _source_items(specs) -> Iterator[tuple[str, Path | None]]:
    """The sources ``specs`` name, as ``(name, file)`` (``None`` for a named corpus), lazily: a spec is
    resolved only after the previous one's sources were read, so errors come in spec order."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise CorpusError("no corpus given; pass a corpus name or a path")
    for spec in specs:
        if isinstance(spec, str) and spec in NAMED_CORPORA:
            yield spec, None
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
            if not files:
                raise CorpusError(f"directory {str(spec)!r} has no .txt files; put the texts there as .txt files")
            empty = next((p for p in files if p.stat().st_size == 0), None)
            if empty is not None:  # "pass a file with some text" did not say why a file no one named was read
                raise CorpusError(f"{str(empty)!r} is empty, and every .txt file in directory {str(spec)!r} is "
                                  "read as part of the corpus; put text in it, or move it out of the directory")
            yield from ((str(p), p) for p in files)
        elif path.is_char_device() or path.is_block_device():  # /dev/zero: read until memory runs out
            raise CorpusError(f"{str(spec)!r} is a device, not a text file; pass a file, or save the text to one")
        elif path.exists() or not isinstance(spec, str) or _looks_like_path(spec):
            yield str(spec), path
        else:
            raise _unknown_corpus(spec)


def absolute_spec(spec: str) -> str:
    """``spec`` as a run's config stores it: a named corpus as its name, a file or directory as its absolute
    path (``~`` expanded, symbolic links kept), so that the run reads the same text from any directory."""
    if spec in NAMED_CORPORA:
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def _real_path(spec: str) -> str:
    """Where a path spec leads from the current directory: ``~`` expanded, symbolic links resolved."""
    return os.path.realpath(os.path.expanduser(spec))


def match_sources(names: list[str], specs) -> dict[str, list[str]]:
    """For each spec, the source names (of a corpus's spans) it names: the name itself, else every source that is
    the same file (``./d/a.txt`` for ``d/a.txt``, an absolute path) or was listed from that directory (``d`` for
    all of ``d``'s ``.txt`` files, symbolic links included). A spec that names none of them maps to ``[]``."""
    # A file by what it is; a directory by where its files are listed (a symbolic link in it points elsewhere).
    files = {name: (_real_path(name), _real_path(os.path.dirname(name) or "."))
             for name in names if name not in NAMED_CORPORA}
    out: dict[str, list[str]] = {}
    for spec in specs:
        if spec in names:
            out[spec] = [spec]
        elif spec in NAMED_CORPORA:
            out[spec] = []
        else:
            where = _real_path(spec)
            out[spec] = [n for n, (path, parent) in files.items() if where in (path, parent)]
    return out


def same_sources(a: list[str] | None, b: list[str] | None) -> bool:
    """Whether two lists of specs name the same sources in the same order: names equal, paths leading to
    the same file from the current directory (``wotw.txt`` and ``../w/wotw.txt`` may)."""
    if a is None or b is None:
        return a is b

    def key(spec: str) -> str:
        return spec if spec in NAMED_CORPORA else _real_path(spec)

    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b))


def _read_sources(specs, data_dir, encoding, strip_boilerplate: bool, stream_large: bool,
                  ) -> list[Source | _StreamedFile]:
    """:func:`load_sources`; with ``stream_large``, files of :data:`STREAM_MIN_BYTES` or more are
    checked (same errors) but not read: they come back as :class:`_StreamedFile`."""
    sources = []
    for name, path in _source_items(specs):
        if stream_large and path is not None and path.is_file() and path.stat().st_size >= STREAM_MIN_BYTES:
            sources.append(_scan_file(name, path, encoding, strip_boilerplate))
            continue
        text = _read_named(name, data_dir, encoding) if path is None else read_text(path, encoding)
        if strip_boilerplate:
            text = strip_gutenberg(text)
            if not text.strip():
                raise _no_text_between_markers_error(name)
        sources.append(Source(name, text))
    return sources


def check_sources(specs) -> None:
    """Raise the :class:`CorpusError` that reading ``specs`` would raise for a source that names nothing (an
    unknown corpus name, a missing path, a directory without ``.txt`` files), without reading any text: a
    command checks this before work that takes long (``compare`` before its first run)."""
    source_names(specs)


def source_names(specs) -> list[str]:
    """The names the sources of ``specs`` go by in a corpus's spans (what ``heldout_from`` and
    ``source_weights`` refer to), without reading any text: a named corpus's name, a file as given, each
    ``.txt`` file of a directory. Raises what :func:`check_sources` describes for a spec that names nothing."""
    names = []
    for name, path in _source_items(specs):
        if path is not None and not path.exists():
            raise _read_error(path, FileNotFoundError())
        names.append(name)
    return names


def load_sources(specs, data_dir=None, encoding: str | None = None, strip_boilerplate: bool = True) -> list[Source]:
    """Read each spec — a named corpus, a file path or a directory of ``.txt`` files (each file one
    source, in sorted order) — into a :class:`Source`. Raises :class:`CorpusError`."""
    return _read_sources(specs, data_dir, encoding, strip_boilerplate, stream_large=False)


# --- large files, read in chunks -----------------------------------------------------------------
# A character-level build does not hold a large file: its bytes, the decoded text and the normalised
# copies would take several times its size. It reads the file twice, CHUNK_BYTES at a time: a scan
# settles what read_text and strip_gutenberg decide (encoding, errors, the span between the Gutenberg
# markers), then _CharEncoder takes the kept text piece by piece.
class _DecodeFailure(Exception):
    """The file does not decode: ``byte`` at ``offset`` bytes from its start."""

    def __init__(self, byte: int, offset: int):
        super().__init__(byte, offset)
        self.byte, self.offset = byte, offset


def _file_chunks(path: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk
    except OSError as err:
        raise _read_error(path, err) from None


def _file_head(path: Path, size: int = 4) -> bytes:
    """The first ``size`` bytes of ``path`` (enough for any byte-order mark)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as err:
        raise _read_error(path, err) from None


def _piece_end(text: str) -> int:
    """Where a piece of ``text`` (which begins at a line start) may end: after its last line break,
    or 0 when there is none. A last line ``***`` followed by nothing but whitespace stays with the next
    piece too, since a Gutenberg marker's ``\\s*`` may go on to ``START OF`` lines later."""
    end = text.rfind("\n") + 1
    body = text[:end].rstrip()
    if body.endswith("***") and (len(body) == 3 or body[-4] == "\n"):
        return len(body) - 3
    return end


def _decoded_pieces(path: Path, codec: str, strip_bom: bool) -> Iterator[str]:
    """The text read_text gives for ``path`` — decoded with ``codec``, a leading BOM dropped when
    ``strip_bom``, ``\\r\\n`` and ``\\r`` translated to ``\\n`` — in pieces of about CHUNK_BYTES that
    each begin at a line start, and such that no Gutenberg marker spans two (see :func:`_piece_end`);
    a line longer than LONG_LINE_CHARS is cut between two ASCII letters (see :func:`_long_line_cut`).

    Raises :class:`_DecodeFailure`, or :class:`CorpusError` when the file cannot be read.
    """
    decoder = codecs.getincrementaldecoder(codec)()
    chunks = _file_chunks(path)
    pending: list[str] = []  # text after the last piece, waiting for a line end
    pending_len = 0  # characters in pending
    at_line_start = True  # pending begins at a line start (not after a cut inside a long line)
    held_cr = ""  # a "\r" that ended the last chunk: a "\n" opening the next one belongs to it
    fed, final = 0, False
    while not final:
        data = next(chunks, b"")
        final = not data
        fed += len(data)
        try:
            text = decoder.decode(data, final)
        except UnicodeDecodeError as err:
            raise _DecodeFailure(*_failure_at(err, fed)) from None
        if strip_bom and text:
            text, strip_bom = text.removeprefix("\ufeff"), False
        text = held_cr + text
        held_cr = "\r" if text.endswith("\r") and not final else ""
        pending.append(_translate_newlines(text[: len(text) - len(held_cr)]))
        pending_len += len(pending[-1])
        if "\n" in pending[-1] or final:
            text = "".join(pending)
            end = len(text) if final else _piece_end(text)
            at_line_start = end > 0 or at_line_start
        elif pending_len > LONG_LINE_CHARS:
            # One line longer than LONG_LINE_CHARS so far (text8 is one 100 MB line): cut it where no
            # per-line rule can see the cut, between two ASCII letters (not in a run that d2l turns into
            # a space or strips, not next to a Σ whose lower case looks at its neighbours). A line that
            # could be a Gutenberg marker stays whole: the marker's pattern runs to the line's end.
            text = "".join(pending)
            if at_line_start and text.startswith("***"):
                pending = [text]
                continue
            end = _long_line_cut(text)
            at_line_start = at_line_start and not end
        else:
            continue
        pending = [text[end:]]
        pending_len = len(pending[0])
        if end:
            yield text[:end]


_LETTER_PAIR = re.compile("[A-Za-z](?=[A-Za-z])")


def _long_line_cut(text: str) -> int:
    """The last place in ``text``'s final 64 KiB between two ASCII letters (0: none there)."""
    cut = 0
    for m in _LETTER_PAIR.finditer(text, max(0, len(text) - 2**16)):
        cut = m.end()
    return cut


class _TextScan:
    """What read_text and strip_gutenberg would decide about a text, from one pass over its pieces
    (each beginning at a line start, no Gutenberg marker spanning two). Offsets count characters."""

    def __init__(self):
        self.length = 0
        self.nul = False  # it has NUL characters
        self.first_text = None  # the first non-whitespace character (None: the text is blank)
        self.start = None  # end of the first START marker
        self.keep_from = None  # the first character after that which is not "\n": where the kept text begins
        self.text_after_start = None  # the first non-whitespace character after the START marker
        self.first_end = None  # the first END marker (it ends the kept text when there is no START)
        self.end_after_start = None  # the first END marker after the START marker

    def feed(self, piece: str) -> None:
        offset = self.length
        self.length += len(piece)
        self.nul = self.nul or "\x00" in piece
        if self.first_text is None:
            self.first_text = _first_not_in(piece, None, 0, offset)
        if "***" in piece:  # every marker begins with it; a search per piece would be slow
            if self.start is None and (m := _GUTENBERG_START.search(piece)):
                self.start = offset + m.end()
            if self.first_end is None and (m := _GUTENBERG_END.search(piece)):
                self.first_end = offset + m.start()
            if self.start is not None and self.end_after_start is None:
                if m := _GUTENBERG_END.search(piece, max(self.start - offset, 0)):
                    self.end_after_start = offset + m.start()
        if self.start is not None:
            after = max(self.start - offset, 0)
            if self.keep_from is None:
                self.keep_from = _first_not_in(piece, "\n", after, offset)
            if self.text_after_start is None:
                self.text_after_start = _first_not_in(piece, None, after, offset)

    def kept(self, strip_boilerplate: bool) -> tuple[int, int, bool]:
        """``(begin, end, has_text)``: the span load_sources keeps and whether it is not blank."""
        if not strip_boilerplate:
            return 0, self.length, self.first_text is not None
        if self.start is None:
            begin, end, first_text = 0, self.first_end, self.first_text
        else:
            begin, end, first_text = self.keep_from, self.end_after_start, self.text_after_start
        begin = self.length if begin is None else begin
        end = self.length if end is None else end
        return begin, end, first_text is not None and first_text < end


def _first_not_in(text: str, chars: str | None, pos: int, offset: int) -> int | None:
    """``offset`` plus the index of the first character of ``text[pos:]`` not in ``chars`` (``None``:
    whitespace), or None when there is none."""
    rest = text[pos:]
    skipped = len(rest) - len(rest.lstrip(chars))
    return offset + pos + skipped if skipped < len(rest) else None


@dataclass(frozen=True)
class _StreamedFile:
    """A large source: its file, how to decode it, and which characters of its text load_sources keeps."""

    name: str
    path: Path
    codec: str
    strip_bom: bool
    begin: int
    end: int

    def pieces(self) -> Iterator[str]:
        """The kept text in pieces that begin at line starts (the span's ends are line starts too)."""
        offset = 0
        for piece in _decoded_pieces(self.path, self.codec, self.strip_bom):
            a, b = max(self.begin - offset, 0), min(self.end - offset, len(piece))
            if a < b:
                yield piece[a:b]
            offset += len(piece)
            if offset >= self.end:
                return


def _scan(path: Path, codec: str, strip_bom: bool) -> _TextScan:
    scan = _TextScan()
    for piece in _decoded_pieces(path, codec, strip_bom):
        scan.feed(piece)
    return scan


def _scan_file(name: str, path: Path, encoding: str | None, strip_boilerplate: bool) -> _StreamedFile:
    """Check a large file as :func:`read_text` and :func:`load_sources` would, without holding it: the
    same decoding, the same :class:`CorpusError` in the same order."""
    what = str(path)
    encoding = encoding or _bom_codec(_file_head(path))  # as decode_bytes
    if encoding is None:
        if any(b"\x00" in chunk for chunk in _file_chunks(path)):
            raise _binary_error(what, forced=False)
        try:
            codec, scan = "utf-8-sig", _scan(path, "utf-8-sig", strip_bom=False)
        except _DecodeFailure as err:
            counts = sum(_byte_counts(chunk) for chunk in _file_chunks(path))
            if not _reads_as_cp1252(counts):
                raise _not_utf8_error(what, err.byte, err.offset) from None
            codec, scan = "cp1252", _scan(path, "cp1252", strip_bom=False)
    else:
        if not known_encoding(encoding):
            raise _unknown_encoding_error(encoding)
        try:
            codec, scan = encoding, _scan(path, encoding, strip_bom=True)
        except _DecodeFailure as err:
            raise _undecodable_error(what, encoding, err.byte, err.offset) from None
        if scan.nul:
            raise _binary_error(what, forced=True)
    if scan.first_text is None:
        raise _empty_error(path)
    begin, end, has_text = scan.kept(strip_boilerplate)
    if not has_text:
        raise _no_text_between_markers_error(name)
    return _StreamedFile(name, path, codec, encoding is not None, begin, end)


def _line_pieces(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters that end at line ends (a longer line is one piece)."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            end = text.rfind("\n", start, end) + 1
            if end <= start:
                end = text.find("\n", start + size) + 1 or len(text)
        else:
            end = len(text)
        yield text[start:end]
        start = end


def _pieces(source: Source | _StreamedFile) -> Iterator[str]:
    if isinstance(source, _StreamedFile):
        return source.pieces()
    return _line_pieces(source.text, CHUNK_BYTES)


# --- tokens --------------------------------------------------------------------------------------
_INDEX_DTYPES = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}


def token_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds the indices of a ``vocab_size``-token vocabulary:
    ``torch.uint8`` up to 256 tokens, ``torch.int16`` up to 32,768, else ``torch.int32``. It is the
    dtype of :attr:`Corpus.tokens`; whatever feeds a model widens its batches to int64."""
    return next(dtype for dtype in _INDEX_DTYPES if torch.iinfo(dtype).max >= vocab_size - 1)


class _CharEncoder:
    """Character code points to ids in one compact buffer, counted as they come.

    Each new character gets the next provisional id, so ids follow first-seen order, the order in
    which :class:`Vocab` breaks frequency ties; :meth:`finish` builds the vocabulary from the counts
    and rewrites the ids in place as its indices. The buffer starts with room for ``capacity`` ids,
    grows when a text turns out longer, and widens its dtype when the ids outgrow it.
    """

    def __init__(self, capacity: int):
        self.size = 0
        self._ids = np.empty(capacity, dtype=np.uint8)
        self._table = np.full(0, -1, dtype=np.int32)  # code point -> provisional id, -1: not seen yet
        self._chars: list[str] = []  # the characters, by provisional id
        self._counts = np.zeros(0, dtype=np.int64)  # occurrences, by provisional id

    def add(self, codes: np.ndarray) -> None:
        """Append characters given as code points (1-D, uint8 or uint32)."""
        if not len(codes):
            return
        top = int(codes.max())
        if top >= len(self._table):
            self._table = np.concatenate([self._table, np.full(top + 1 - len(self._table), -1, dtype=np.int32)])
        ids = self._table[codes]
        unseen = ids < 0
        if unseen.any():
            fresh, first = np.unique(codes[unseen], return_index=True)
            fresh = fresh[np.argsort(first)]  # in order of appearance
            self._table[fresh] = np.arange(len(self._chars), len(self._chars) + len(fresh))
            self._chars.extend(map(chr, fresh.tolist()))
            self._counts = np.concatenate([self._counts, np.zeros(len(fresh), dtype=np.int64)])
            ids = self._table[codes]
        self._counts += np.bincount(ids, minlength=len(self._chars))
        self._reserve(self.size + len(ids), _INDEX_DTYPES[token_dtype(len(self._chars) + 1)])
        self._ids[self.size : self.size + len(ids)] = ids
        self.size += len(ids)

    def _reserve(self, needed: int, dtype) -> None:
        if needed <= len(self._ids) and dtype == self._ids.dtype:
            return
        capacity = len(self._ids) if needed <= len(self._ids) else max(needed, len(self._ids) * 5 // 4)
        grown = np.empty(capacity, dtype=dtype)
        grown[: self.size] = self._ids[: self.size]
        self._ids = grown

    def finish(self, vocab: Vocab | None, min_freq: int) -> tuple[torch.Tensor, Vocab]:
        """The ids as indices of ``vocab`` (built from the counts when None) in :func:`token_dtype`."""
        if vocab is None:
            vocab = Vocab.from_counts(zip(self._chars, self._counts.tolist()), min_freq, token="char")
        index = [vocab.token_to_idx.get(ch, vocab.unk) for ch in self._chars]
        lookup = np.array(index, dtype=_INDEX_DTYPES[token_dtype(len(vocab))])
        ids, n = self._ids, self.size
        self._ids = None
        out = ids if ids.dtype == lookup.dtype else np.empty(n, dtype=lookup.dtype)
        for a in range(0, n, CHUNK_BYTES):  # a block at a time: no second copy of the whole stream
            b = min(a + CHUNK_BYTES, n)
            out[a:b] = lookup[ids[a:b]]
        del ids
        out.resize(n, refcheck=False)  # give back the unused room (no views of `out` exist)
        return torch.from_numpy(out), vocab


class NoTokensError(CorpusError):
    """A source that normalisation leaves without a token (``source``: its name)."""

    def __init__(self, message: str, source: str) -> None:
        super().__init__(message)
        self.source = source


def _no_tokens_error(name: str, normalization: str) -> CorpusError:
    return NoTokensError(
        f"{name!r} has no tokens after {normalization!r} normalisation; pass another text or normalisation", name
    )


def _encode_chars(sources, normalization: str, vocab: Vocab | None, min_freq: int):
    """``(tokens, vocab, tokens per source)`` at character level, streaming each source's pieces."""
    capacity = sum(s.end - s.begin if isinstance(s, _StreamedFile) else len(s.text) for s in sources)
    encoder = _CharEncoder(capacity)
    lengths = []
    for source in sources:
        before = encoder.size
        for piece in _pieces(source):
            encoder.add(_char_stream(piece, normalization))
        if encoder.size == before:
            raise _no_tokens_error(source.name, normalization)
        lengths.append(encoder.size - before)
    tokens, vocab = encoder.finish(vocab, min_freq)
    return tokens, vocab, lengths


def _encode_words(sources, normalization: str, vocab: Vocab | None, min_freq: int):
    """``(tokens, vocab, tokens per source)`` at word level."""
    streams = []
    for source in sources:
        text = normalize(source.text, normalization)
        # d2l: the book's per-line line.split(), flattened; otherwise punctuation-aware with <eol>
        stream = text.split() if normalization == "d2l" else split_words(text)
        if not stream:
            raise _no_tokens_error(source.name, normalization)
        streams.append(stream)
    if vocab is None:
        vocab = Vocab([w for s in streams for w in s], min_freq=min_freq, token="word")
    dtype = token_dtype(len(vocab))
    encoded = [vocab.encode(stream, dtype=dtype) for stream in streams]
    return torch.cat(encoded), vocab, [len(ids) for ids in encoded]


# --- the corpus ----------------------------------------------------------------------------------
class Splits(NamedTuple):
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


@dataclass
class Corpus:
    """A token stream with its vocabulary; ``spans`` are ``(source name, start, end)`` in ``tokens``."""

    tokens: torch.Tensor  # (N,) in token_dtype(len(vocab)): uint8 for up to 256 tokens; batches are int64
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
        if heldout_from is None:
            held = set(names)
        else:
            matched = match_sources(names, heldout_from)
            unknown = [spec for spec in heldout_from if not matched[spec]]
            if unknown:
                raise ConfigError(f"heldout_from names unknown source {unknown[0]!r}; sources: {', '.join(names)}")
            held = {name for spec in heldout_from for name in matched[spec]}
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

    def split(self, fractions=(0.9, 0.05, 0.05), heldout_from=None, train_weights=None) -> Splits:
        """Contiguous train/valid/test parts of the token stream (no overlap, deterministic), cut as
        :meth:`split_ranges` says and concatenated per part.

        ``train_weights`` (one number > 0 per source, in ``spans`` order) repeats each source's
        training text that many times (see :func:`repeat_tokens`); held-out parts are never repeated.
        """
        ranges = self.split_ranges(fractions, heldout_from)
        parts = [[self.tokens[a:b] for _, a, b in ranges[p]] for p in ("train", "valid", "test")]
        if train_weights is not None:
            parts[0] = [repeat_tokens(self.tokens[a:b], w) for (a, b), w in
                        zip(self._train_range_per_source(ranges["train"]), self._check_weights(train_weights))]
        return Splits(*(torch.cat(part) if part else self.tokens[:0] for part in parts))

    def _check_weights(self, weights) -> list[float]:
        weights = [float(w) for w in weights]
        if len(weights) != len(self.spans):
            names = ", ".join(name for name, _, _ in self.spans)
            raise ConfigError(f"source_weights has {len(weights)} values but the corpus has {len(self.spans)} "
                              f"sources ({names}); give one weight per source, in that order")
        bad = [w for w in weights if not valid_source_weight(w)]
        if bad:
            raise ConfigError(f"source weights must be in (0, {MAX_SOURCE_WEIGHT:,}], got {bad[0]:g}")
        return weights

    def _train_range_per_source(self, train: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
        """Each source's training range ``(a, b)`` (empty ``(start, start)`` when it has none)."""
        out = []
        for _, start, end in self.spans:
            inside = [(a, b) for _, a, b in train if start <= a and b <= end]
            out.append(inside[0] if inside else (start, start))
        return out


# A source's training text repeated more often than this is a typo, not a recipe (1e30 overflowed the repeat).
MAX_SOURCE_WEIGHT = 1000


def valid_source_weight(w: object) -> bool:
    """A number in (0, MAX_SOURCE_WEIGHT]: what train, compare and Corpus.split accept as a source's weight."""
    return is_number(w) and 0 < w <= MAX_SOURCE_WEIGHT


def repeat_tokens(ids: torch.Tensor, weight: float) -> torch.Tensor:
    """``ids`` repeated ``weight`` times: ``int(weight)`` whole copies, then the first fraction of one
    more (2.5 = two copies and the first half of a third; 0.3 = the first 30%)."""
    whole, frac = int(weight), weight - int(weight)
    return torch.cat([ids.repeat(whole), ids[: round(frac * len(ids))]])


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
    At character level, files of :data:`STREAM_MIN_BYTES` or more are streamed (same result).
    """
    if token not in TOKEN_KINDS:
        raise ConfigError(f"token must be one of {', '.join(TOKEN_KINDS)}, got {token!r}")
    if normalization not in NORMALIZATIONS:
        raise ConfigError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")
    if vocab is not None and vocab.token != token:
        raise ConfigError(f"token must match the given vocabulary's ({vocab.token!r}), got {token!r}")
    sources = _read_sources(specs, data_dir, encoding, strip_boilerplate, stream_large=token == "char")
    encode = _encode_chars if token == "char" else _encode_words
    tokens, vocab, lengths = encode(sources, normalization, vocab, min_freq)
    spans, start = [], 0
    for source, n in zip(sources, lengths):
        spans.append((source.name, start, start + n))
        start += n
    if max_tokens is not None and max_tokens > 0 and max_tokens < len(tokens):
        tokens = tokens[:max_tokens].clone()
        spans = [(name, a, min(b, max_tokens)) for name, a, b in spans if a < max_tokens]
    return Corpus(tokens=tokens, vocab=vocab, spans=spans, token=token, normalization=normalization)
