"""Small files written whole or not at all: a temporary file in the same directory, renamed into place, so a
kill or a full disk mid-write leaves the previous version (or nothing), never half a JSON file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str, newline: str | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed over it (``newline`` as for
    :func:`open`: ``""`` writes line ends as they are in ``text``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
