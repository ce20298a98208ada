"""Settings: one TOML file and a few command-line flags, read once into a frozen object.

Theory of operation: :func:`load_settings` parses the file with :mod:`tomllib`, then walks it table
by table. Every key goes through a checker that either returns the typed value or refuses it with
a reason; a refusal is written down with the file and the key path (``upstreams.local.url``) and
the walk goes on, so one run shows every mistake. Unknown keys are refused with a did-you-mean
hint. Checks that relate keys to each other (a route naming an upstream, two routes with one
name, a route that can never be chosen) run on what was accepted. The flags are checked the same
way and then replace what they name. Only when nothing was refused is a :class:`Settings` built;
otherwise one :class:`~tproxy.core.errors.ConfigError` carries every problem.

The dataclasses below are the single source of the defaults: the loader starts from an instance
and replaces what the file sets, and ``docs/configuration.md`` is tested against their fields.
Nothing here reads the environment variables an upstream names: those are read when the upstream
clients are built, so ``check-config`` never needs secrets.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import platformdirs

from tproxy.core.clientauth import HASH_PREFIX, parse_key_hash
from tproxy.core.dialects import DEFAULT_PATHS, JSON_ONLY, dialect_for
from tproxy.core.errors import ConfigError
from tproxy.core.headers import HOP_BY_HOP
from tproxy.tls import check_ca_file, check_certificate_pair

DEFAULTS_SOURCE = "<defaults>"
DEFAULT_NAME = "default"


def default_cache_dir() -> Path:
    """The per-user cache directory of this platform, e.g. ``~/.cache/tproxy/store`` on Linux."""
    return platformdirs.user_cache_path("tproxy", appauthor=False) / "store"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """One upstream server; requests go to ``url`` followed by the client's request path."""

    name: str
    url: str
    connect_timeout: float = 10.0
    first_byte_timeout: float = 300.0
    idle_timeout: float = 120.0
    total_timeout: float = 3600.0
    headers: tuple[tuple[str, str], ...] = ()
    api_key_env: str | None = None
    max_connections: int = 512
    http2: bool = False
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    tls_server_name: str | None = None
    verify: bool = True


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """Which requests go to which upstreams, and whether their answers are cached."""

    upstreams: tuple[str, ...]
    path_prefix: str = "/"
    models: tuple[str, ...] = ()
    retries: int = 1
    cache: bool = True
    ttl: float | None = None
    name: str = ""
    # Store answers even when the upstream's Cache-Control says no-store or private.
    ignore_upstream_no_store: bool = False


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The listening side: addresses, request limits, shutdown."""

    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:9090"
    max_body_bytes: int = 16 * 1024 * 1024
    graceful_timeout: float = 10.0
    stream_buffer_chunks: int = 64
    keep_alive_timeout: float = 75.0
    max_header_bytes: int = 65536
    body_timeout: float = 60.0
    client_stall_timeout: float = 60.0
    reuse_port: bool = False
    # Worker processes on ``listen``; None: one per core the process may run on.
    workers: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @property
    def tls(self) -> ListenerTLS | None:
        return ListenerTLS.of(self.tls_cert, self.tls_key, self.tls_client_ca)


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The response cache: where it lives, how big it may grow, what it keeps."""

    enabled: bool = True
    dir: Path = field(default_factory=default_cache_dir)
    default_ttl: float = 86400.0
    max_entry_bytes: int = 8 * 1024 * 1024
    max_total_bytes: int = 1024 * 1024 * 1024
    paths: tuple[str, ...] = DEFAULT_PATHS
    ignore_fields: tuple[str, ...] = ("user",)
    shared: bool = False
    max_line_bytes: int = 1024 * 1024
    coalesce: bool = True
    on_disconnect: str = "cancel"
    finish_timeout: float = 300.0
    max_background: int = 16


@dataclass(frozen=True, slots=True)
class SharedStoreSettings:
    """The shared cache tier (Valkey/Redis) behind the local store; see docs/operations.md.

    Exactly one of ``url`` and ``cluster_nodes`` is set. The password is read from the
    environment variable ``password_env`` names when the tier is opened, never from the file.
    """

    url: str | None = None
    cluster_nodes: tuple[str, ...] = ()
    password_env: str | None = None
    ca_file: Path | None = None  # for rediss://: the CAs to check the server against
    key_prefix: str = "tproxy:"
    lookup_timeout: float = 0.01
    write_timeout: float = 1.0
    connect_timeout: float = 1.0
    max_entry_bytes: int = 1024 * 1024
    queue_size: int = 256
    breaker_failures: int = 5
    breaker_reset: float = 5.0


@dataclass(frozen=True, slots=True)
class LogSettings:
    """How much is logged and in which form."""

    level: str = "info"
    format: str = "auto"
    libraries: str = "warning"  # the level of the loggers of the libraries tproxy uses


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The admin listener's access control, and its own certificate when it serves HTTPS."""

    token_env: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @property
    def tls(self) -> ListenerTLS | None:
        return ListenerTLS.of(self.tls_cert, self.tls_key, self.tls_client_ca)


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """A listener's certificate and key, and the CA its clients' certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None

    @classmethod
    def of(cls, cert: Path | None, key: Path | None, client_ca: Path | None) -> ListenerTLS | None:
        """The listener's TLS settings, or None when it serves plain HTTP."""
        if cert is None or key is None:
            return None
        return cls(cert, key, client_ca)


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Client authentication: the sha256 hashes of the keys clients may present.

    ``client_keys`` holds every accepted hash, ``sha256:<64 lower-case hex digits>``: those
    listed in the file's ``client_keys`` followed by those read from ``client_keys_file``
    (duplicates dropped). Authentication is on when either key is set.
    """

    client_keys: tuple[str, ...] = ()
    client_keys_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.client_keys) or self.client_keys_file is not None


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """The access log and the queues that keep telemetry off the client's path."""

    access_log: bool = True
    queue_size: int = 4096
    flush_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class PayloadLogSettings:
    """The payload log: request bodies and whole answers, for audit and evaluation."""

    enabled: bool = False
    file: Path | None = None
    max_bytes: int = 100 * 1024 * 1024
    keep: int = 5
    http_url: str | None = None
    http_token_env: str | None = None
    http_timeout: float = 10.0
    http_retries: int = 3
    http_backoff: float = 1.0
    batch_size: int = 64
    queue_size: int = 256
    max_record_bytes: int = 1024 * 1024
    raw_events: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything tproxy was configured with; built once at start and passed down."""

    server: ServerSettings
    cache: CacheSettings
    log: LogSettings
    upstreams: tuple[UpstreamSettings, ...]
    routes: tuple[RouteSettings, ...]
    source: str
    admin: AdminSettings = field(default_factory=AdminSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    payload_log: PayloadLogSettings = field(default_factory=PayloadLogSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    shared_store: SharedStoreSettings | None = None  # None: no [shared_store] table, no tier 2
    # Settings that are allowed but unsafe: shown by check-config and logged at start.
    warnings: tuple[str, ...] = ()

    def upstream(self, name: str) -> UpstreamSettings:
        """The upstream called ``name``; raises KeyError when there is none."""
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values from command-line flags; None means the flag was not given."""

    listen: str | None = None
    upstream: str | None = None
    cache_dir: Path | None = None
    admin_listen: str | None = None
    workers: str | None = None


_NO_OVERRIDES = Overrides()

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
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHOWN_CHARS = 80


class _BadValueError(Exception):
    """A value was refused. ``reasons`` pairs a key-path suffix ("" or "[2]") with the reason."""

    def __init__(self, reason: str = "", *, reasons: Sequence[tuple[str, str]] = ()) -> None:
        self.reasons = tuple(reasons) or (("", reason),)
        super().__init__(reason)


_Checker = Callable[[object], Any]


class _Problems:
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


def _show(value: object) -> str:
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


def _key(name: str) -> str:
    """A key as TOML needs it written: bare when it can be, quoted otherwise."""
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _join(path: str, name: str) -> str:
    return f"{path}.{_key(name)}" if path else _key(name)


def _hint(word: str, choices: Collection[str]) -> str:
    """`` (did you mean "x"?)`` for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _unknown_key(name: str, known: Collection[str]) -> str:
    hint = _hint(name, known)
    return f"unknown key{hint}" if hint else f"unknown key (known keys: {', '.join(known)})"


# --- checkers: raw TOML value -> typed value, or _BadValueError ---------------------------------


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _BadValueError(f"expected a positive number, got {_show(value)}")
    if not math.isfinite(value):
        raise _BadValueError(f"expected a finite number, got {_show(value)}")
    return float(value)


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadValueError(f"expected an integer >= 1, got {_show(value)}")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadValueError(f"expected an integer >= 0, got {_show(value)}")
    return value


def _workers(value: object) -> int | None:
    """``server.workers``: a count of processes, or ``"auto"`` (None): one per core."""
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise _BadValueError(
            f'expected "auto" or an integer from 1 to {MAX_WORKERS}, got {_show(value)}'
        )
    return value


def _workers_flag(value: object) -> int | None:
    """``--workers``: the same values as ``server.workers``, written on a command line."""
    text = _string(value)
    return _workers(int(text) if text.isdigit() else text)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _BadValueError(f"expected true or false, got {_show(value)}")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _BadValueError(f"expected a string, got {_show(value)}")
    return value


def _text(value: object) -> str:
    """A non-empty, printable string: model patterns, body field names."""
    text = _string(value)
    if not text or not text.isprintable():
        raise _BadValueError(f"expected a non-empty printable string, got {_show(value)}")
    return text


def _name(value: object) -> str:
    text = _string(value)
    if not _NAME.fullmatch(text):
        raise _BadValueError(
            f'expected a name of 1 to 64 letters, digits, "_" or "-", got {_show(text)}'
        )
    return text


def _path(value: object) -> str:
    text = _string(value)
    if not text.startswith("/") or not text.isprintable() or any(c in text for c in " ?#"):
        raise _BadValueError(
            f'expected a path starting with "/" (no spaces, "?" or "#"), got {_show(text)}'
        )
    return text


def _env_name(value: object) -> str:
    text = _string(value)
    if not _ENV_NAME.fullmatch(text):
        raise _BadValueError(
            "expected an environment variable name (letters, digits and _, not starting with a"
            f" digit), got {_show(text)}"
        )
    return text


def _address(value: object) -> str:
    try:
        host, port = parse_host_port(_string(value))
    except ValueError as error:
        raise _BadValueError(str(error)) from None
    return _format_host_port(host, port)


def _url(value: object) -> str:
    try:
        return _normalise_url(_string(value))
    except ValueError as error:
        raise _BadValueError(str(error)) from None


def _upstream_url(value: object) -> str:
    """An upstream's URL, to which each request's whole path is appended as the client sent it.

    A URL ending in ``/v1`` (the way an SDK's ``base_url`` is written) would send every request
    to ``/v1/v1/...``, and each would fail upstream with a 404: refused here, with the fix.
    """
    url = _url(value)
    path = urlsplit(url).path
    if path.lower().endswith("/v1"):
        base = url.removesuffix(path[-3:])
        raise _BadValueError(
            f"ends in /v1, so a client's /v1/chat/completions would go to"
            f" {path}/v1/chat/completions (a 404): tproxy passes the client's whole path on;"
            f" write {_show(base)}"
        )
    return url


def _redis_url(value: object) -> str:
    """A Valkey/Redis URL; a password in it is refused (``password_env`` holds its name)."""
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise _BadValueError(f"expected a redis://, rediss:// or unix:// URL, got {_show(text)}")
    if parts.password is not None:
        # Not echoed: it holds a credential.
        raise _BadValueError("a URL must not hold a password; name a variable in password_env")
    if parts.scheme == "unix" and not parts.path.startswith("/"):
        raise _BadValueError(f"expected unix:///absolute/path.sock, got {_show(text)}")
    if parts.scheme != "unix" and not parts.hostname:
        raise _BadValueError(f"expected a host in the URL, got {_show(text)}")
    if parts.fragment or any(name != "db" for name in parse_qs(parts.query)):
        raise _BadValueError(
            f"expected no query but ?db=N (the other settings are keys of the table),"
            f" got {_show(text)}"
        )
    return text


def _key_prefix(value: object) -> str:
    text = _string(value)
    if not text.isprintable() or len(text) > 64 or "{" in text or "}" in text:
        raise _BadValueError(
            f"expected up to 64 printable characters without braces, got {_show(text)}"
        )
    return text


def _choice(options: Sequence[str]) -> _Checker:
    def check(value: object) -> str:
        text = _string(value)
        if text not in options:
            listed = ", ".join(options)
            hint = _hint(text.lower(), options)
            raise _BadValueError(f"expected one of {listed}, got {_show(text)}{hint}")
        return text

    return check


def _array(item: _Checker, *, non_empty: bool = False) -> _Checker:
    """A checker for an array whose every item passes ``item``; all bad items are reported."""

    def check(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _BadValueError(f"expected an array, got {_show(value)}")
        if non_empty and not value:
            raise _BadValueError("expected at least one item, got an empty array")
        accepted: list[Any] = []
        refused: list[tuple[str, str]] = []
        for index, raw in enumerate(value):
            try:
                accepted.append(item(raw))
            except _BadValueError as invalid:
                refused.extend((f"[{index}]{suffix}", reason) for suffix, reason in invalid.reasons)
        if refused:
            raise _BadValueError(reasons=refused)
        return tuple(accepted)

    return check


def _local_path(base: Path, what: str, *, is_file: bool) -> _Checker:
    """A checker for a path: ``~`` expanded, a relative one taken from ``base``. A file path may
    not end in a separator."""

    def check(value: object) -> Path:
        text = _string(value)
        if not text or "\x00" in text or (is_file and text.endswith(("/", os.sep))):
            raise _BadValueError(f"expected a {what} path, got {_show(text)}")
        try:
            path = Path(text).expanduser()
        except RuntimeError:
            raise _BadValueError(f"cannot expand ~ in {_show(text)}: no home directory") from None
        return Path(os.path.abspath(base / path))

    return check


def _file(base: Path) -> _Checker:
    return _local_path(base, "file", is_file=True)


def _directory(base: Path) -> _Checker:
    return _local_path(base, "directory", is_file=False)


def _key_hash(value: object) -> str:
    """``sha256:<hex>`` with the hex in lower case; the value is never echoed (it may be a key)."""
    if not isinstance(value, str):
        raise _BadValueError(f"expected a string, got {_show(value)}")
    try:
        digest = parse_key_hash(value)
    except ValueError as error:
        raise _BadValueError(str(error)) from None
    return HASH_PREFIX + digest.hex()


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _BadValueError(f"expected a table of header names and values, got {_show(value)}")
    accepted: list[tuple[str, str]] = []
    refused: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, raw in value.items():
        where = "." + _key(name)
        lowered = name.lower()
        if not _HEADER_NAME.fullmatch(name):
            refused.append((where, "not a valid header name (letters, digits and !#$%&'*+-.^_`|~)"))
        elif lowered in _PROXY_OWNED_HEADERS:
            refused.append((where, "the proxy sets this header itself; it cannot be configured"))
        elif lowered in seen:
            refused.append((where, "given twice (header names are case-insensitive)"))
        elif not isinstance(raw, str):
            refused.append((where, f"expected a string, got {_show(raw)}"))
        elif not _HEADER_VALUE.fullmatch(raw):
            # The value is not echoed: headers often carry secrets.
            refused.append((where, "a header value must be printable ASCII (no CR, LF or NUL)"))
        else:
            accepted.append((name, raw))
        seen.add(lowered)
    if refused:
        raise _BadValueError(reasons=refused)
    return tuple(accepted)


# --- addresses and URLs ------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _valid_host(host: str) -> bool:
    """An IP address, or a host name whose dot-separated labels are letters, digits, - and _."""
    if _is_ip(host):
        return True
    if _DOTTED_NUMBERS.fullmatch(host):
        return False  # looks like an IPv4 address but is not one: refuse rather than resolve it
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _format_host_port(host: str, port: int) -> str:
    return f"{_bracketed(host)}:{port}"


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` into its host and port; raises ValueError saying what is wrong.

    The host is an IPv4 address, a host name, or an IPv6 address in brackets (``[::1]:8080``).
    A host is required: ``:8080`` is refused rather than read as "every interface", because
    exposing the proxy beyond this machine should be written down (``0.0.0.0:8080``). Port 0
    asks the system for a free port.
    """
    shown = _show(text)
    if text.startswith("["):
        host, separator, port = text[1:].partition("]:")
        if not separator:
            raise ValueError(
                f"expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080, got {shown}"
            )
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected an IPv6 address inside the brackets, got {shown}") from None
    else:
        host, separator, port = text.rpartition(":")
        if not separator:
            raise ValueError(
                f"expected HOST:PORT such as 127.0.0.1:8080 or [::1]:8080, got {shown}"
            )
        if not host:
            raise ValueError(
                f"a host is required: 127.0.0.1{text} for this machine only,"
                f" 0.0.0.0{text} for every IPv4 interface"
            )
        if ":" in host:
            raise ValueError(f"put an IPv6 address in brackets, as in [::1]:8080, got {shown}")
        if not _valid_host(host):
            raise ValueError(f"invalid host {_show(host)} in {shown}")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"invalid port {_show(port)} in {shown}: expected 0 to 65535")
    return host, int(port)


def _normalise_url(text: str) -> str:
    """``scheme://host[:port][/base]`` in lower case with no trailing slash; ValueError if not."""
    if not text.isprintable() or " " in text:
        raise ValueError(f"a URL must not contain spaces or control characters, got {_show(text)}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid URL {_show(text)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {_show(text)}")
    if parts.username is not None or parts.password is not None:
        # Not echoed: it holds a credential.
        raise ValueError("a URL must not hold a user name or password; use api_key_env or headers")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError(f"a URL must not have a query (?) or fragment (#), got {_show(text)}")
    host = parts.hostname or ""
    if not _valid_host(host):
        raise ValueError(f"invalid host {_show(host)} in URL {_show(text)}")
    netloc = _format_host_port(host, port) if port is not None else _bracketed(host)
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


# --- the tables ------------------------------------------------------------------------------

_TIMEOUTS: dict[str, _Checker] = {
    "connect_timeout": _seconds,
    "first_byte_timeout": _seconds,
    "idle_timeout": _seconds,
    "total_timeout": _seconds,
}
_SERVER: dict[str, _Checker] = {
    "listen": _address,
    "admin_listen": _address,
    "max_body_bytes": _size,
    "graceful_timeout": _seconds,
    "stream_buffer_chunks": _size,
    "keep_alive_timeout": _seconds,
    "max_header_bytes": _size,
    "body_timeout": _seconds,
    "client_stall_timeout": _seconds,
    "reuse_port": _boolean,
    "workers": _workers,
}
_CACHE: dict[str, _Checker] = {
    "enabled": _boolean,
    "default_ttl": _seconds,
    "max_entry_bytes": _size,
    "max_total_bytes": _size,
    "paths": _array(_path),
    "ignore_fields": _array(_text),
    "shared": _boolean,
    "max_line_bytes": _size,
    "coalesce": _boolean,
    "on_disconnect": _choice(DISCONNECT_POLICIES),
    "finish_timeout": _seconds,
    "max_background": _count,
}
_LOG: dict[str, _Checker] = {
    "level": _choice(LOG_LEVELS),
    "format": _choice(LOG_FORMATS),
    "libraries": _choice(LOG_LEVELS),
}
_UPSTREAM: dict[str, _Checker] = {
    "url": _upstream_url,
    **_TIMEOUTS,
    "headers": _headers,
    "api_key_env": _env_name,
    "max_connections": _size,
    "http2": _boolean,
    "tls_server_name": _text,
    "verify": _boolean,
}
_UPSTREAM_FILES = ("ca_file", "client_cert", "client_key")
_LISTENER_FILES = ("tls_cert", "tls_key", "tls_client_ca")
_ROUTE: dict[str, _Checker] = {
    "name": _name,
    "path_prefix": _path,
    "models": _array(_text),
    "upstreams": _array(_name, non_empty=True),
    "retries": _count,
    "cache": _boolean,
    "ttl": _seconds,
    "ignore_upstream_no_store": _boolean,
}
_ADMIN: dict[str, _Checker] = {"token_env": _env_name}
_AUTH_KEYS: dict[str, _Checker] = {"client_keys": _array(_key_hash)}
_TELEMETRY: dict[str, _Checker] = {
    "access_log": _boolean,
    "queue_size": _size,
    "flush_timeout": _seconds,
}
_PAYLOAD_LOG: dict[str, _Checker] = {
    "enabled": _boolean,
    "max_bytes": _size,
    "keep": _count,
    "http_url": _url,
    "http_token_env": _env_name,
    "http_timeout": _seconds,
    "http_retries": _count,
    "http_backoff": _seconds,
    "batch_size": _size,
    "queue_size": _size,
    "max_record_bytes": _size,
    "raw_events": _boolean,
}
_SHARED_STORE: dict[str, _Checker] = {
    "url": _redis_url,
    "cluster_nodes": _array(_address, non_empty=True),
    "password_env": _env_name,
    "key_prefix": _key_prefix,
    "lookup_timeout": _seconds,
    "write_timeout": _seconds,
    "connect_timeout": _seconds,
    "max_entry_bytes": _size,
    "queue_size": _size,
    "breaker_failures": _size,
    "breaker_reset": _seconds,
}
_SECTIONS = (
    "server",
    "cache",
    "log",
    "upstreams",
    "routes",
    "admin",
    "telemetry",
    "payload_log",
    "auth",
    "shared_store",
)


def _read_table(
    table: Mapping[str, object], path: str, checkers: Mapping[str, _Checker], problems: _Problems
) -> dict[str, Any]:
    """Check every key of one table; return the accepted values and report the others."""
    accepted: dict[str, Any] = {}
    for name, raw in table.items():
        where = _join(path, name)
        checker = checkers.get(name)
        if checker is None:
            problems.at(where, _unknown_key(name, checkers))
            continue
        try:
            accepted[name] = checker(raw)
        except _BadValueError as invalid:
            for suffix, reason in invalid.reasons:
                problems.at(where + suffix, reason)
    return accepted


def _read_auth(table: Mapping[str, object], base: Path, problems: _Problems) -> AuthSettings:
    """The ``[auth]`` table, with the hashes of ``client_keys_file`` read and checked now, so
    ``check-config`` finds a bad line and the running server never reads the file again."""
    problems_before = len(problems.items)
    values = _read_table(table, "auth", {**_AUTH_KEYS, "client_keys_file": _file(base)}, problems)
    hashes: list[str] = list(values.get("client_keys", ()))
    keys_file: Path | None = values.get("client_keys_file")
    if keys_file is not None:
        hashes += _read_key_file(keys_file, problems)
    auth = AuthSettings(tuple(dict.fromkeys(hashes)), keys_file)
    configured = "client_keys" in table or "client_keys_file" in table
    if configured and not auth.client_keys and len(problems.items) == problems_before:
        if keys_file is not None:
            problems.at(
                "auth.client_keys_file",
                f"{keys_file} holds no key hash, so every request would be refused",
            )
        else:
            problems.at(
                "auth.client_keys",
                "expected at least one key hash, got an empty array (leave [auth] out to turn"
                " client authentication off)",
            )
    return auth


def _read_shared_store(
    document: Mapping[str, object], base: Path, problems: _Problems
) -> SharedStoreSettings | None:
    """The ``[shared_store]`` table, or None when the file has none (no shared tier)."""
    if "shared_store" not in document:
        return None
    table = _table(document, "shared_store", problems)
    checkers = {**_SHARED_STORE, "ca_file": _file(base)}
    values = _read_table(table, "shared_store", checkers, problems)
    if ("url" in table) == ("cluster_nodes" in table):
        problems.at("shared_store", "set exactly one of url and cluster_nodes")
    if "ca_file" in values and not str(values.get("url", "")).startswith("rediss://"):
        problems.at("shared_store.ca_file", "only used with a rediss:// url")
    return dataclasses.replace(SharedStoreSettings(), **values)


def _read_key_file(path: Path, problems: _Problems) -> list[str]:
    """The hashes in a keys file: one ``sha256:<hex>`` per line; blank lines and ``#`` comments
    (whole lines or after a hash) are skipped. A bad line is named by number, never shown."""
    where = "auth.client_keys_file"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        problems.at(where, f"cannot read {path}: {error.strerror or error}")
        return []
    except UnicodeDecodeError as error:
        problems.at(where, f"{path}: not UTF-8 text (invalid byte at offset {error.start})")
        return []
    hashes: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            hashes.append(_key_hash(entry))
        except _BadValueError as invalid:
            problems.at(where, f"{path} line {number}: {invalid}")
    return hashes


def _table(document: Mapping[str, object], name: str, problems: _Problems) -> dict[str, Any]:
    raw = document.get(name, {})
    if not isinstance(raw, dict):
        problems.at(name, f"expected a table, got {_show(raw)}")
        return {}
    return raw


def _read_upstreams(
    document: Mapping[str, object], base: Path, problems: _Problems, url_from_flag: str | None
) -> list[UpstreamSettings]:
    """The ``[upstreams.NAME]`` tables, in file order.

    With ``url_from_flag`` (``--upstream``), ``upstreams.default`` takes that URL and may leave
    out its own.
    """
    accepted: list[UpstreamSettings] = []
    for name, raw in _table(document, "upstreams", problems).items():
        where = _join("upstreams", name)
        try:
            _name(name)
        except _BadValueError as invalid:
            problems.at(where, f"invalid upstream name: {invalid}")
        if not isinstance(raw, dict):
            problems.at(where, f"expected a table, got {_show(raw)}")
            continue
        checkers = {**_UPSTREAM, **dict.fromkeys(_UPSTREAM_FILES, _file(base))}
        values = _read_table(raw, where, checkers, problems)
        if "api_key_env" in values and any(
            header.lower() == "authorization" for header, _ in values.get("headers", ())
        ):
            problems.at(
                _join(where, "headers"),
                "sets Authorization, which api_key_env also sets: keep one of the two",
            )
        if url_from_flag is not None and name == DEFAULT_NAME:
            values["url"] = url_from_flag
        if "url" not in values:
            if "url" not in raw:
                problems.at(_join(where, "url"), "required key is missing")
            continue
        accepted.append(dataclasses.replace(UpstreamSettings(name, values["url"]), **values))
    return accepted


@dataclass(frozen=True, slots=True)
class _FileRoute:
    """A route as read from ``routes[index]``; ``clean`` when none of its keys was refused."""

    index: int
    route: RouteSettings
    clean: bool


def _read_routes(document: Mapping[str, object], problems: _Problems) -> list[_FileRoute]:
    raw_routes = document.get("routes", [])
    if not isinstance(raw_routes, list):
        problems.at("routes", f"expected an array of tables ([[routes]]), got {_show(raw_routes)}")
        return []
    accepted: list[_FileRoute] = []
    for index, raw in enumerate(raw_routes):
        where = f"routes[{index}]"
        if not isinstance(raw, dict):
            problems.at(where, f"expected a table, got {_show(raw)}")
            continue
        problems_before = len(problems.items)
        values = _read_table(raw, where, _ROUTE, problems)
        if "upstreams" not in values:
            if "upstreams" not in raw:
                problems.at(f"{where}.upstreams", "required key is missing")
            continue
        values.setdefault("name", f"route{index}")
        route = dataclasses.replace(RouteSettings(values["upstreams"]), **values)
        accepted.append(_FileRoute(index, route, len(problems.items) == problems_before))
    return accepted


def _check_routes(routes: Sequence[_FileRoute], known: Sequence[str], problems: _Problems) -> None:
    """Relate the routes to the upstream tables and to each other.

    A route naming an unknown upstream is always reported; duplicate names and routes that can
    never be chosen only among routes whose own keys were all accepted, so that a refused value
    replaced by its default does not cause a second, misleading problem.
    """
    for position, current in enumerate(routes):
        where = f"routes[{current.index}]"
        names = current.route.upstreams
        for item, name in enumerate(names):
            if name not in known:
                listed = f" (the upstreams are: {', '.join(known)})" if known else ""
                hint = _hint(name, known) or listed
                problems.at(f"{where}.upstreams[{item}]", f"unknown upstream {_show(name)}{hint}")
        if len(set(names)) < len(names):
            problems.at(f"{where}.upstreams", "names one upstream more than once")
        if not current.clean:
            continue
        earlier = [other for other in routes[:position] if other.clean]
        for other in earlier:
            if other.route.name == current.route.name:
                problems.at(
                    f"{where}.name",
                    f"{_show(current.route.name)} is already the name of routes[{other.index}]",
                )
                break
        for other in earlier:
            if not other.route.models and current.route.path_prefix.startswith(
                other.route.path_prefix
            ):
                problems.at(
                    where,
                    f"never chosen: routes[{other.index}] comes first, accepts any model and"
                    f" its path_prefix {_show(other.route.path_prefix)} covers this route's",
                )
                break


def _upstreams_and_routes(
    document: Mapping[str, Any], base: Path, upstream_url: str | None, problems: _Problems
) -> tuple[list[UpstreamSettings], list[RouteSettings]]:
    """The upstreams and routes to use: the file's, or those ``--upstream`` (``upstream_url``) sets.

    ``--upstream`` gives one upstream called "default" with its URL, keeping the settings of a
    file's ``[upstreams.default]``, and one catch-all route to it. The file's other upstreams
    and its routes are still checked, but not against each other: they are not used. (When the
    flag was refused, its raw text stands in; the problem is already recorded.)
    """
    if upstream_url is not None:
        file_upstreams = _read_upstreams(document, base, problems, upstream_url)
        _read_routes(document, problems)
        kept = [upstream for upstream in file_upstreams if upstream.name == DEFAULT_NAME]
        upstreams = kept or [UpstreamSettings(DEFAULT_NAME, upstream_url)]
        return upstreams, [RouteSettings(upstreams=(DEFAULT_NAME,), name=DEFAULT_NAME)]
    upstreams = _read_upstreams(document, base, problems, None)
    file_routes = _read_routes(document, problems)
    tables = document.get("upstreams")
    if not tables:
        problems.at(
            "", "no upstream configured: pass --upstream URL or add an [upstreams.NAME] table"
        )
    _check_routes(file_routes, list(tables) if isinstance(tables, dict) else [], problems)
    if upstreams and not document.get("routes"):
        every = tuple(upstream.name for upstream in upstreams)
        return upstreams, [RouteSettings(upstreams=every, name=DEFAULT_NAME)]
    return upstreams, [file_route.route for file_route in file_routes]


def _load_document(path: Path, problems: _Problems) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except OSError as error:
        problems.at("", f"cannot read the file: {error.strerror or error}")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        problems.at(
            "", f"cannot read the file: not UTF-8 text (invalid byte at offset {error.start})"
        )
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        problems.at("", f"invalid TOML: {error}")
        return None


def load_settings(path: Path | None, overrides: Overrides = _NO_OVERRIDES) -> Settings:
    """Read ``path`` (None: defaults only), apply the flags, and return the settings.

    Raises :class:`ConfigError` listing every problem found in the file and the flags, or only
    the one that says why the file could not be read or parsed.
    """
    problems = _Problems(str(path) if path is not None else None)
    document: Mapping[str, Any] = {}
    if path is not None:
        loaded = _load_document(path, problems)
        if loaded is None:
            raise ConfigError(problems.items)
        document = loaded
    for name in document:
        if name not in _SECTIONS:
            problems.at(_key(name), _unknown_key(name, _SECTIONS))
    base = path.parent if path is not None else Path.cwd()
    listener_files = dict.fromkeys(_LISTENER_FILES, _file(base))
    server_values = _read_table(
        _table(document, "server", problems), "server", {**_SERVER, **listener_files}, problems
    )
    cache_checkers = {"dir": _directory(base), **_CACHE}
    cache_values = _read_table(
        _table(document, "cache", problems), "cache", cache_checkers, problems
    )
    log_values = _read_table(_table(document, "log", problems), "log", _LOG, problems)
    admin_values = _read_table(
        _table(document, "admin", problems), "admin", {**_ADMIN, **listener_files}, problems
    )
    telemetry_values = _read_table(
        _table(document, "telemetry", problems), "telemetry", _TELEMETRY, problems
    )
    payload_values = _read_table(
        _table(document, "payload_log", problems),
        "payload_log",
        {"file": _file(base), **_PAYLOAD_LOG},
        problems,
    )

    auth = _read_auth(_table(document, "auth", problems), base, problems)
    shared_store = _read_shared_store(document, base, problems)

    flags: dict[str, Any] = {}
    _apply_flag(flags, "url", "--upstream", _upstream_url, overrides.upstream, problems)
    _apply_flag(server_values, "listen", "--listen", _address, overrides.listen, problems)
    _apply_flag(
        server_values, "admin_listen", "--admin-listen", _address, overrides.admin_listen, problems
    )
    _apply_flag(server_values, "workers", "--workers", _workers_flag, overrides.workers, problems)
    cache_dir = None if overrides.cache_dir is None else str(overrides.cache_dir)
    _apply_flag(cache_values, "dir", "--cache-dir", _directory(Path.cwd()), cache_dir, problems)

    upstream_url = None if overrides.upstream is None else flags.get("url", overrides.upstream)
    upstreams, routes = _upstreams_and_routes(document, base, upstream_url, problems)

    server = dataclasses.replace(ServerSettings(), **server_values)
    cache = dataclasses.replace(CacheSettings(), **cache_values)
    if server.listen == server.admin_listen and not server.listen.endswith(":0"):
        listen_source = "--listen" if overrides.listen is not None else "server.listen"
        reason = f"the same address as {listen_source} ({server.listen})"
        if overrides.admin_listen is not None:
            problems.flag("--admin-listen", reason)
        else:
            problems.at("server.admin_listen", reason)
    if cache.max_entry_bytes > cache.max_total_bytes:
        problems.at(
            "cache.max_entry_bytes",
            f"larger than cache.max_total_bytes"
            f" ({cache.max_entry_bytes} > {cache.max_total_bytes})",
        )
    admin = dataclasses.replace(AdminSettings(), **admin_values)
    payload_log = dataclasses.replace(PayloadLogSettings(), **payload_values)
    _check_admin_access(server, admin, overrides, problems)
    _check_payload_log(payload_log, problems)
    now = datetime.datetime.now(datetime.UTC)
    _check_listener_tls("server", server_values, now, problems)
    _check_listener_tls("admin", admin_values, now, problems)
    warnings = [_check_upstream_tls(upstream, now, problems) for upstream in upstreams]
    if problems.items:
        raise ConfigError(problems.items)
    return Settings(
        server=server,
        cache=cache,
        log=dataclasses.replace(LogSettings(), **log_values),
        upstreams=tuple(upstreams),
        routes=tuple(routes),
        source=str(path) if path is not None else DEFAULTS_SOURCE,
        admin=admin,
        telemetry=dataclasses.replace(TelemetrySettings(), **telemetry_values),
        payload_log=payload_log,
        auth=auth,
        shared_store=shared_store,
        warnings=tuple(warning for warning in warnings if warning is not None),
    )


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` listens on this machine only (127.0.0.0/8, ::1 or localhost)."""
    host, _port = parse_host_port(address)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _check_admin_access(
    server: ServerSettings, admin: AdminSettings, overrides: Overrides, problems: _Problems
) -> None:
    """An admin listener reachable from other machines must ask for a token."""
    if admin.token_env is not None or is_loopback(server.admin_listen):
        return
    reason = (
        f"the admin listener {server.admin_listen} is not a loopback address, so it needs a"
        " bearer token: set admin.token_env"
    )
    if overrides.admin_listen is not None:
        problems.flag("--admin-listen", reason)
    else:
        problems.at("admin.token_env", f"required: {reason}")


def _check_payload_log(payload_log: PayloadLogSettings, problems: _Problems) -> None:
    if payload_log.enabled and payload_log.file is None and payload_log.http_url is None:
        problems.at("payload_log.enabled", "the payload log needs a sink: set file or http_url")


def _apply_flag(
    values: dict[str, Any],
    key: str,
    flag: str,
    checker: _Checker,
    raw: str | None,
    problems: _Problems,
) -> None:
    """Check a given flag like the file's value it replaces, and put it in ``values``."""
    if raw is None:
        return
    try:
        values[key] = checker(raw)
    except _BadValueError as invalid:
        for _suffix, reason in invalid.reasons:
            problems.flag(flag, reason)


def json_only_paths(cache: CacheSettings) -> list[str]:
    """The ``cache.paths`` no API family claims: their answers are cached only as whole JSON
    bodies, since nothing says how a stream there ends (``check-config`` says so)."""
    return [path for path in cache.paths if dialect_for(path) is JSON_ONLY]


def _check_listener_tls(
    table: str, values: Mapping[str, Any], now: datetime.datetime, problems: _Problems
) -> None:
    """A listener's certificate needs its key (and the reverse); both must be usable now."""
    cert, key, client_ca = (values.get(name) for name in _LISTENER_FILES)
    if (cert is None) != (key is None):
        missing = "tls_key" if key is None else "tls_cert"
        problems.at(f"{table}.{missing}", "required: tls_cert and tls_key are set together")
        return
    if client_ca is not None and cert is None:
        problems.at(f"{table}.tls_client_ca", "requires tls_cert and tls_key (HTTPS)")
        return
    if cert is not None:
        found = check_certificate_pair(
            cert,
            values["tls_key"],
            now=now,
            cert_setting=f"{table}.tls_cert",
            key_setting=f"{table}.tls_key",
        )
        if client_ca is not None:
            found += check_ca_file(client_ca, setting=f"{table}.tls_client_ca")
        for setting, reason in found:
            problems.at(setting, reason)


def _check_upstream_tls(
    upstream: UpstreamSettings, now: datetime.datetime, problems: _Problems
) -> str | None:
    """Problems with an upstream's TLS settings; the warning ``verify = false`` earns, if set."""
    where = _join("upstreams", upstream.name)
    chosen = [
        name
        for name in (*_UPSTREAM_FILES, "tls_server_name")
        if getattr(upstream, name) is not None
    ] + ([] if upstream.verify else ["verify"])
    if chosen and not upstream.url.startswith("https://"):
        for name in chosen:
            problems.at(f"{where}.{name}", f"applies to https:// upstreams only ({upstream.url})")
        return None
    if upstream.client_key is not None and upstream.client_cert is None:
        problems.at(f"{where}.client_key", "requires client_cert")
    found: list[tuple[str, str]] = []
    if upstream.ca_file is not None:
        found += check_ca_file(upstream.ca_file, setting=f"{where}.ca_file")
    if upstream.client_cert is not None:
        found += check_certificate_pair(
            upstream.client_cert,
            upstream.client_key or upstream.client_cert,
            now=now,
            cert_setting=f"{where}.client_cert",
            key_setting=f"{where}.client_key" if upstream.client_key else f"{where}.client_cert",
        )
    for setting, reason in found:
        problems.at(setting, reason)
    if upstream.verify:
        return None
    return (
        f"{where}.verify = false: the upstream's certificate is not checked, so anyone on the"
        " network path can read and change its answers (and the answers tproxy caches)"
    )


@dataclass(frozen=True, slots=True)
class ConfigCheck:
    """What ``check-config`` reports: the problems that stop the file being used, the warnings
    its allowed but unsafe settings earn, and notes on how it will behave."""

    problems: list[str]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_config(path: Path) -> ConfigCheck:
    """Every problem in the settings file at ``path`` (none when it is valid), its warnings,
    and a note for each cached path no API family claims.

    The file is read as ``tproxy serve --config FILE`` with no other flag would read it, so a
    file that names no upstream is a problem.
    """
    try:
        settings = load_settings(path)
    except ConfigError as error:
        return ConfigCheck(list(error.problems))
    notes = [
        f"cache.paths: {unknown} belongs to no known API family; its answers are cached only as"
        " whole JSON bodies, never as streams (see docs/families.md)"
        for unknown in json_only_paths(settings.cache)
    ]
    return ConfigCheck([], list(settings.warnings), notes)
