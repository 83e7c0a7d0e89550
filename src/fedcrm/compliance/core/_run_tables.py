"""Typed reading of a run's parsed ``config.toml`` tables, collecting every problem.

A missing or mistyped value adds a problem naming the table and key, and returns a harmless
placeholder, so that a caller can read on and report every problem at once before it raises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_PLACEHOLDER_TEXT = "?"
_PLACEHOLDER_NUMBER = 1.0


def as_float(value: object) -> float | None:
    """``value`` as a finite float, or ``None`` (booleans and non-numbers are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class Section:
    """One table of a parsed TOML (or JSON) document, read with types checked.

    Args:
        data: The table.
        where: Its name in problems (``config.toml [dp]``).
        problems: Where problems are added.
    """

    def __init__(self, data: Mapping[str, Any], where: str, problems: list[str]) -> None:
        self.data = data
        self.where = where
        self.problems = problems

    def has(self, key: str) -> bool:
        """Whether the table sets ``key``."""
        return key in self.data

    def _missing(self, key: str, what: str) -> None:
        self.problems.append(f"{self.where}: {key} must be {what}, got {self.data.get(key)!r}")

    def text(self, key: str, default: str | None = None) -> str:
        """A non-empty string (``default`` if absent; a problem if absent without one)."""
        value = self.data.get(key, default)
        if isinstance(value, str) and value:
            return value
        self._missing(key, "a non-empty string")
        return _PLACEHOLDER_TEXT

    def number(self, key: str, default: float | None = None) -> float:
        """A finite number (``default`` if absent; a problem if absent without one)."""
        value = as_float(self.data.get(key, default))
        if value is not None:
            return value
        self._missing(key, "a finite number")
        return _PLACEHOLDER_NUMBER

    def optional_number(self, key: str) -> float | None:
        """A finite number, or ``None`` if absent."""
        return self.number(key) if key in self.data else None

    def integer(self, key: str, default: int | None = None) -> int:
        """A whole number (``default`` if absent; a problem if absent without one)."""
        value = self.data.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        self._missing(key, "a whole number")
        return int(_PLACEHOLDER_NUMBER)

    def optional_integer(self, key: str) -> int | None:
        """A whole number, or ``None`` if absent."""
        return self.integer(key) if key in self.data else None

    def flag(self, key: str, default: bool) -> bool:
        """A boolean (``default`` if absent)."""
        value = self.data.get(key, default)
        if isinstance(value, bool):
            return value
        self._missing(key, "true or false")
        return default

    def section(self, key: str) -> Section | None:
        """The sub-table ``key``, or ``None`` if absent (a problem if it is not a table)."""
        if key not in self.data:
            return None
        value = self.data[key]
        if not isinstance(value, Mapping):
            self._missing(key, "a table")
            return None
        return Section(value, f"{self.where} [{key}]", self.problems)
