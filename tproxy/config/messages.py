"""How the loader writes a problem: values as the user wrote them, key paths, hints.

A refused value is a :class:`BadValueError`; the loader adds the file and the key path. Secrets
(header values, URL passwords, key hashes) are never passed to :func:`show`.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Collection, Sequence

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHOWN_CHARS = 80


class BadValueError(Exception):
    """A value was refused. ``reasons`` pairs a key-path suffix ("" or "[2]") with the reason."""

    def __init__(self, reason: str = "", *, reasons: Sequence[tuple[str, str]] = ()) -> None:
        self.reasons = tuple(reasons) or (("", reason),)
        super().__init__(reason)


def show(value: object) -> str:
    """A value as the user wrote it in TOML, short enough for one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 4] + '..."'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a date/time ({value})"


def toml_key(name: str) -> str:
    """A key as TOML needs it written: bare when it can be, quoted otherwise."""
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def join(path: str, name: str) -> str:
    """The key path of ``name`` inside the table at ``path`` ("" for the top level)."""
    return f"{path}.{toml_key(name)}" if path else toml_key(name)


def hint(word: str, choices: Collection[str]) -> str:
    """`` (did you mean "x"?)`` for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def unknown_key(name: str, known: Collection[str]) -> str:
    """Why ``name`` is refused: the closest known key, or every known key when none is close."""
    close = hint(name, known)
    return f"unknown key{close}" if close else f"unknown key (known keys: {', '.join(known)})"


class Problems:
    """Every problem found, each prefixed with where it was found."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.items: list[str] = []

    def at(self, key_path: str, reason: str) -> None:
        """A problem with a key of the file, or with the whole file when ``key_path`` is ""."""
        parts = [part for part in (self.file, key_path) if part]
        self.items.append(": ".join([*parts, reason]))

    def flag(self, flag: str, reason: str) -> None:
        self.items.append(f"{flag}: {reason}")


# --- showing values and keys in messages ---------------------------------------------------
