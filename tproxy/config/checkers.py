"""Value checkers: a raw TOML value in, the typed value out, or :class:`BadValueError` saying why.

Each checker is a :class:`Check` that also carries the name ``docs/configuration.md`` gives the
values it accepts (its *kind*: "seconds", "size", "address"...), so the reference's type column
is tested against the checker a key really uses. A path is checked against the directory a
relative one is taken from, so it is a :class:`PathCheck` bound to that directory when a file is
read.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tproxy.config.addresses import format_host_port, normalise_url, parse_host_port
from tproxy.config.messages import BadValueError, hint, show, toml_key
from tproxy.core.clientauth import HASH_PREFIX, parse_key_hash
from tproxy.core.headers import HOP_BY_HOP

Parse = Callable[[object], Any]

# More worker processes than this is a typo, not a machine.
MAX_WORKERS = 256

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
DISCONNECT_POLICIES = ("cancel", "finish")

# Headers the proxy writes itself on the upstream leg: configuring them would break framing,
# the identity encoding the cache relies on, or the request id.
_PROXY_OWNED_HEADERS = frozenset(name.decode() for name in HOP_BY_HOP) | {
    "content-length",
    "accept-encoding",
    "x-request-id",
    "x-forwarded-proto",
}

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


@dataclass(frozen=True, slots=True)
class Check:
    """A checker, and the kind of value it accepts as the reference names it."""

    kind: str
    parse: Parse

    def __call__(self, value: object) -> Any:
        return self.parse(value)

    def bind(self, base: Path) -> Parse:
        """The checker for a file in ``base``: this one, which reads no path."""
        return self.parse


@dataclass(frozen=True, slots=True)
class PathCheck:
    """A local path: ``~`` expanded, a relative one taken from the directory it is bound to."""

    what: str  # "file" (may not end in a separator) or "directory"
    kind: str = "path"

    def bind(self, base: Path) -> Parse:
        """The checker of this path for a file in the directory ``base``."""
        what = self.what

        def check(value: object) -> Path:
            text = string(value)
            is_file = what == "file"
            if not text or "\x00" in text or (is_file and text.endswith(("/", os.sep))):
                raise BadValueError(f"expected a {what} path, got {show(text)}")
            try:
                path = Path(text).expanduser()
            except RuntimeError:
                raise BadValueError(f"cannot expand ~ in {show(text)}: no home directory") from None
            return Path(os.path.abspath(base / path))

        return check


KeyCheck = Check | PathCheck

FILE = PathCheck("file")
DIRECTORY = PathCheck("directory")


def string(value: object) -> str:
    """Any string; the other checkers start here."""
    if not isinstance(value, str):
        raise BadValueError(f"expected a string, got {show(value)}")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise BadValueError(f"expected a positive number, got {show(value)}")
    if not math.isfinite(value):
        raise BadValueError(f"expected a finite number, got {show(value)}")
    return float(value)


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadValueError(f"expected an integer >= 1, got {show(value)}")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadValueError(f"expected an integer >= 0, got {show(value)}")
    return value


def _workers(value: object) -> int | None:
    """``server.workers``: a count of processes, or ``"auto"`` (None): one per core."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise BadValueError(
            f'expected "auto" or an integer from 1 to {MAX_WORKERS}, got {show(value)}'
        )
    return value


def workers_flag(value: object) -> int | None:
    """``--workers``: the same values as ``server.workers``, written on a command line."""
    text = string(value)
    return _workers(int(text) if text.isdigit() else text)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise BadValueError(f"expected true or false, got {show(value)}")
    return value


def _text(value: object) -> str:
    """A non-empty, printable string: model patterns, body field names."""
    text = string(value)
    if not text or not text.isprintable():
        raise BadValueError(f"expected a non-empty printable string, got {show(value)}")
    return text


def _name(value: object) -> str:
    text = string(value)
    if not _NAME.fullmatch(text):
        raise BadValueError(
            f'expected a name of 1 to 64 letters, digits, "_" or "-", got {show(text)}'
        )
    return text


def _path(value: object) -> str:
    text = string(value)
    if not text.startswith("/") or not text.isprintable() or any(c in text for c in " ?#"):
        raise BadValueError(
            f'expected a path starting with "/" (no spaces, "?" or "#"), got {show(text)}'
        )
    return text


def _env_name(value: object) -> str:
    text = string(value)
    if not _ENV_NAME.fullmatch(text):
        raise BadValueError(
            "expected an environment variable name (letters, digits and _, not starting with a"
            f" digit), got {show(text)}"
        )
    return text


def _address(value: object) -> str:
    try:
        host, port = parse_host_port(string(value))
    except ValueError as error:
        raise BadValueError(str(error)) from None
    return format_host_port(host, port)


def _url(value: object) -> str:
    try:
        return normalise_url(string(value))
    except ValueError as error:
        raise BadValueError(str(error)) from None


def _upstream_url(value: object) -> str:
    """An upstream's URL, to which each request's whole path is appended as the client sent it.

    A URL ending in ``/v1`` (the way an SDK's ``base_url`` is written) would send every request
    to ``/v1/v1/...``, and each would fail upstream with a 404: refused here, with the fix.
    """
    url = _url(value)
    path = urlsplit(url).path
    if path.lower().endswith("/v1"):
        base = url.removesuffix(path[-3:])
        raise BadValueError(
            f"ends in /v1, so a client's /v1/chat/completions would go to"
            f" {path}/v1/chat/completions (a 404): tproxy passes the client's whole path on;"
            f" write {show(base)}"
        )
    return url


def _redis_url(value: object) -> str:
    """A Valkey/Redis URL; a password in it is refused (``password_env`` holds its name)."""
    text = string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise BadValueError(f"expected a redis://, rediss:// or unix:// URL, got {show(text)}")
    if parts.password is not None:
        # Not echoed: it holds a credential.
        raise BadValueError("a URL must not hold a password; name a variable in password_env")
    if parts.scheme == "unix" and not parts.path.startswith("/"):
        raise BadValueError(f"expected unix:///absolute/path.sock, got {show(text)}")
    if parts.scheme != "unix" and not parts.hostname:
        raise BadValueError(f"expected a host in the URL, got {show(text)}")
    if parts.fragment or any(name != "db" for name in parse_qs(parts.query)):
        raise BadValueError(
            f"expected no query but ?db=N (the other settings are keys of the table),"
            f" got {show(text)}"
        )
    return text


def _key_prefix(value: object) -> str:
    text = string(value)
    if not text.isprintable() or len(text) > 64 or "{" in text or "}" in text:
        raise BadValueError(
            f"expected up to 64 printable characters without braces, got {show(text)}"
        )
    return text


def _key_hash(value: object) -> str:
    """``sha256:<hex>`` with the hex in lower case; the value is never echoed (it may be a key)."""
    if not isinstance(value, str):
        raise BadValueError(f"expected a string, got {show(value)}")
    try:
        digest = parse_key_hash(value)
    except ValueError as error:
        raise BadValueError(str(error)) from None
    return HASH_PREFIX + digest.hex()


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise BadValueError(f"expected a table of header names and values, got {show(value)}")
    accepted: list[tuple[str, str]] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, raw in value.items():
        where = "." + toml_key(name)
        lowered = name.lower()
        if not _HEADER_NAME.fullmatch(name):
            refused.append((where, "not a valid header name (letters, digits and !#$%&'*+-.^_`|~)"))
        elif lowered in _PROXY_OWNED_HEADERS:
            refused.append((where, "the proxy sets this header itself; it cannot be configured"))
        elif lowered in seen:
            refused.append((where, "given twice (header names are case-insensitive)"))
        elif not isinstance(raw, str):
            refused.append((where, f"expected a string, got {show(raw)}"))
        elif not _HEADER_VALUE.fullmatch(raw):
            # The value is not echoed: headers often carry secrets.
            refused.append((where, "a header value must be printable ASCII (no CR, LF or NUL)"))
        else:
            accepted.append((name, raw))
        seen.add(lowered)
    if refused:
        raise BadValueError(reasons=refused)
    return tuple(accepted)


def choice(options: Sequence[str]) -> Check:
    """One of ``options``, with a hint for a near miss."""

    def check(value: object) -> str:
        text = string(value)
        if text not in options:
            listed = ", ".join(options)
            raise BadValueError(
                f"expected one of {listed}, got {show(text)}{hint(text.lower(), options)}"
            )
        return text

    return Check("string", check)


def array(item: Check, kind: str, *, non_empty: bool = False) -> Check:
    """An array whose every item passes ``item``; all bad items are reported."""

    def check(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise BadValueError(f"expected an array, got {show(value)}")
        if non_empty and not value:
            raise BadValueError("expected at least one item, got an empty array")
        accepted: list[Any] = []
        refused: list[tuple[str, str]] = []
        for index, raw in enumerate(value):
            try:
                accepted.append(item(raw))
            except BadValueError as invalid:
                refused.extend((f"[{index}]{suffix}", reason) for suffix, reason in invalid.reasons)
        if refused:
            raise BadValueError(reasons=refused)
        return tuple(accepted)

    return Check(kind, check)


SECONDS = Check("seconds", _seconds)
SIZE = Check("size", _size)
COUNT = Check("integer ≥ 0", _count)
WORKERS = Check('integer or `"auto"`', _workers)
BOOLEAN = Check("bool", _boolean)
TEXT = Check("string", _text)
NAME = Check("name", _name)
URL_PATH = Check("path", _path)
ENV_NAME = Check("string", _env_name)
ADDRESS = Check("address", _address)
URL = Check("URL", _url)
UPSTREAM_URL = Check("URL", _upstream_url)
REDIS_URL = Check("string", _redis_url)
KEY_PREFIX = Check("string", _key_prefix)
KEY_HASH = Check("key hash", _key_hash)
HEADERS = Check("table of strings", _headers)
