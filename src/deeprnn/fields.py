"""The types a configuration dataclass declares, checked on values that come from outside the program: a
config file, ``compare --set``, a checkpoint's JSON. A wrong type is one line naming the field, not a
``TypeError`` deep inside training.

The annotations are the strings ``from __future__ import annotations`` leaves: ``int``, ``float | None``,
``list[str]`` and so on (see :class:`deeprnn.train.TrainConfig` and :class:`deeprnn.models.ModelConfig`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

from deeprnn.errors import ConfigError


def is_number(v: object) -> bool:
    """An int or a float, not a bool (JSON's and TOML's numbers)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_CHECKS: dict[str, Callable[[object], bool]] = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": is_number,  # an integer is a number too (a config file's lr = 2)
    "str": lambda v: isinstance(v, str),
    "list[str]": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
    "list[float]": lambda v: isinstance(v, (list, tuple)) and all(is_number(x) for x in v),
}
_LISTS = {"list[str]": "a list of strings", "list[float]": "a list of numbers"}


def type_error(name: str, annotation: str, value: object) -> str | None:
    """The message for ``value`` in field ``name`` declared as ``annotation``, or None when it fits."""
    base, _, rest = str(annotation).partition("|")
    base = base.strip()
    if (value is None and "None" in rest) or _CHECKS[base](value):
        if base == "float" and isinstance(value, int) and not -2**63 < value < 2**63:
            # torch takes a Python int as an int64 scalar and overflows; int fields have their own ranges
            return f"{name} must be a number of magnitude < 2**63, got {shorten(repr(value))}"
        return None
    if base in _LISTS:
        return f"{name} must be {_LISTS[base]}, got {shorten(repr(value))}"
    return f"{name} must be of type {base}, got {type(value).__name__} {shorten(repr(value))}"


def check_types(cls: type, values: Mapping[str, Any], where: str = "") -> None:
    """Raise ``ConfigError`` (``where`` + the message) for the first of ``cls``'s fields in ``values`` whose
    value is not of the declared type; names that are not fields are left to the caller."""
    for f in dataclasses.fields(cls):
        if f.name in values:
            problem = type_error(f.name, f.type, values[f.name])
            if problem:
                raise ConfigError(where + problem)


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis: a value quoted in a one-line message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
