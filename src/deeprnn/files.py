"""Small files written whole or not at all: a temporary file in the same directory, renamed into place, so a
kill or a full disk mid-write leaves the previous version (or nothing), never half a JSON file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; set back at once, at import (one thread)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def new_file_mode(kind: str = "file") -> int:
    """The permissions ``open()`` or ``mkdir()`` would give a new file or directory under the process's umask:
    ``tempfile`` makes its files and directories readable by their owner only (0600, 0700), and a report, a run
    or a checkpoint renamed into place from one must not be."""
    return (0o777 if kind == "dir" else 0o666) & ~UMASK


def write_text_atomic(path: str | os.PathLike, text: str, newline: str | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed over it (``newline`` as for
    :func:`open`: ``""`` writes line ends as they are in ``text``), with the permissions a plain ``open()``
    would have given it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
