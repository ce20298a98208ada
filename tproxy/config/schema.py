"""The settings: one frozen dataclass per table of the file, and the one statement of each key.

Each key is a field whose metadata holds its checker (``metadata=check(SECONDS)``) next to its
default; the loader's tables (:func:`checkers`), the known keys in its did-you-mean hints, and
the tests that keep ``docs/configuration.md`` and ``conf/tproxy.toml`` true (:func:`key_checks`:
every key, the checker's ``kind`` against the reference's type column, the reference's default
read through the checker) are all derived from these fields. A field without a checker (an
upstream's ``name``) is not a key of its table; the :class:`Settings` fields that are tables of
the file say so with :func:`table`. Adding a key is one line here, its row in the reference and
its line in the example file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import platformdirs

from tproxy.config.checkers import (
    ADDRESS,
    BOOLEAN,
    COUNT,
    DIRECTORY,
    DISCONNECT_POLICIES,
    ENV_NAME,
    FILE,
    HEADERS,
    KEY_HASH,
    KEY_PREFIX,
    LOG_FORMATS,
    LOG_LEVELS,
    NAME,
    REDIS_URL,
    SECONDS,
    SIZE,
    TEXT,
    UPSTREAM_URL,
    URL,
    URL_PATH,
    WORKERS,
    KeyCheck,
    Parse,
    array,
    choice,
)
from tproxy.core.dialects import DEFAULT_PATHS

_CHECK = "tproxy.config.check"
_TABLE = "tproxy.config.table"
_FIELDS = "__dataclass_fields__"


def check(checker: KeyCheck) -> Mapping[str, KeyCheck]:
    """A field's metadata making it a key of its table, checked by ``checker``."""
    return MappingProxyType({_CHECK: checker})


@dataclass(frozen=True, slots=True)
class Table:
    """A table of the file: the dataclass its keys are the fields of, and its heading as a file
    writes it (``[server]``, ``[upstreams.NAME]``, ``[[routes]]``)."""

    cls: type[Any]
    heading: str


def table(cls: type[Any], heading: str) -> Mapping[str, Table]:
    """A :class:`Settings` field's metadata making it a table of the file."""
    return MappingProxyType({_TABLE: Table(cls, heading)})


def key_checks(cls: type[Any]) -> dict[str, KeyCheck]:
    """The keys of the table ``cls`` describes and their checkers: its own fields in order, then
    those of its base (:class:`ListenerKeys`), as the file's tables write them."""
    inherited = {name for base in cls.__mro__[1:] for name in getattr(base, _FIELDS, ())}
    ordered = sorted(fields(cls), key=lambda item: item.name in inherited)
    return {item.name: item.metadata[_CHECK] for item in ordered if _CHECK in item.metadata}


def checkers(cls: type[Any], base: Path) -> dict[str, Parse]:
    """The checker of each key of ``cls``'s table, paths taken from the directory ``base``."""
    return {name: checker.bind(base) for name, checker in key_checks(cls).items()}


def default_cache_dir() -> Path:
    """The per-user cache directory of this platform, e.g. ``~/.cache/tproxy/store`` on Linux."""
    return platformdirs.user_cache_path("tproxy", appauthor=False) / "store"


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """One upstream server; requests go to ``url`` followed by the client's request path."""

    name: str
    url: str = field(metadata=check(UPSTREAM_URL))
    connect_timeout: float = field(default=10.0, metadata=check(SECONDS))
    first_byte_timeout: float = field(default=300.0, metadata=check(SECONDS))
    idle_timeout: float = field(default=120.0, metadata=check(SECONDS))
    total_timeout: float = field(default=3600.0, metadata=check(SECONDS))
    headers: tuple[tuple[str, str], ...] = field(default=(), metadata=check(HEADERS))
    api_key_env: str | None = field(default=None, metadata=check(ENV_NAME))
    max_connections: int = field(default=512, metadata=check(SIZE))
    http2: bool = field(default=False, metadata=check(BOOLEAN))
    ca_file: Path | None = field(default=None, metadata=check(FILE))
    client_cert: Path | None = field(default=None, metadata=check(FILE))
    client_key: Path | None = field(default=None, metadata=check(FILE))
    tls_server_name: str | None = field(default=None, metadata=check(TEXT))
    verify: bool = field(default=True, metadata=check(BOOLEAN))


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """Which requests go to which upstreams, and whether their answers are cached."""

    upstreams: tuple[str, ...] = field(
        metadata=check(array(NAME, "array of names", non_empty=True))
    )
    path_prefix: str = field(default="/", metadata=check(URL_PATH))
    models: tuple[str, ...] = field(default=(), metadata=check(array(TEXT, "array of strings")))
    retries: int = field(default=1, metadata=check(COUNT))
    cache: bool = field(default=True, metadata=check(BOOLEAN))
    ttl: float | None = field(default=None, metadata=check(SECONDS))
    name: str = field(default="", metadata=check(NAME))
    # Store answers even when the upstream's Cache-Control says no-store or private.
    ignore_upstream_no_store: bool = field(default=False, metadata=check(BOOLEAN))


@dataclass(frozen=True, slots=True)
class ListenerKeys:
    """The keys of a listener's HTTPS, stated once for ``[server]`` and ``[admin]``, which take
    them as a base class (their own keys come first: :func:`key_checks`). The checks between
    them (the key needs its certificate, the files must be usable) are
    ``load._check_listener_tls``."""

    tls_cert: Path | None = field(default=None, metadata=check(FILE))
    tls_key: Path | None = field(default=None, metadata=check(FILE))
    tls_client_ca: Path | None = field(default=None, metadata=check(FILE))

    @property
    def tls(self) -> ListenerTLS | None:
        return ListenerTLS.of(self.tls_cert, self.tls_key, self.tls_client_ca)


@dataclass(frozen=True, slots=True)
class ServerSettings(ListenerKeys):
    """The listening side: addresses, request limits, shutdown, and HTTPS."""

    listen: str = field(default="127.0.0.1:8080", metadata=check(ADDRESS))
    admin_listen: str = field(default="127.0.0.1:9090", metadata=check(ADDRESS))
    max_body_bytes: int = field(default=16 * 1024 * 1024, metadata=check(SIZE))
    graceful_timeout: float = field(default=10.0, metadata=check(SECONDS))
    stream_buffer_chunks: int = field(default=64, metadata=check(SIZE))
    keep_alive_timeout: float = field(default=75.0, metadata=check(SECONDS))
    max_header_bytes: int = field(default=65536, metadata=check(SIZE))
    body_timeout: float = field(default=60.0, metadata=check(SECONDS))
    client_stall_timeout: float = field(default=60.0, metadata=check(SECONDS))
    reuse_port: bool = field(default=False, metadata=check(BOOLEAN))
    # Worker processes on ``listen``; None: one per core the process may run on.
    workers: int | None = field(default=None, metadata=check(WORKERS))


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The response cache: where it lives, how big it may grow, what it keeps."""

    enabled: bool = field(default=True, metadata=check(BOOLEAN))
    dir: Path = field(default_factory=default_cache_dir, metadata=check(DIRECTORY))
    default_ttl: float = field(default=86400.0, metadata=check(SECONDS))
    max_entry_bytes: int = field(default=8 * 1024 * 1024, metadata=check(SIZE))
    max_total_bytes: int = field(default=1024 * 1024 * 1024, metadata=check(SIZE))
    paths: tuple[str, ...] = field(
        default=DEFAULT_PATHS, metadata=check(array(URL_PATH, "array of paths"))
    )
    ignore_fields: tuple[str, ...] = field(
        default=("user",), metadata=check(array(TEXT, "array of strings"))
    )
    shared: bool = field(default=False, metadata=check(BOOLEAN))
    max_line_bytes: int = field(default=1024 * 1024, metadata=check(SIZE))
    coalesce: bool = field(default=True, metadata=check(BOOLEAN))
    on_disconnect: str = field(default="cancel", metadata=check(choice(DISCONNECT_POLICIES)))
    finish_timeout: float = field(default=300.0, metadata=check(SECONDS))
    max_background: int = field(default=16, metadata=check(COUNT))


@dataclass(frozen=True, slots=True)
class SharedStoreSettings:
    """The shared cache tier (Valkey/Redis) behind the local store; see docs/operations.md.

    Exactly one of ``url``, ``cluster_nodes`` and ``sentinels`` is set. Passwords are read from
    the environment variables ``password_env`` and ``sentinel_password_env`` name when the tier
    is opened, never from the file.
    """

    url: str | None = field(default=None, metadata=check(REDIS_URL))
    cluster_nodes: tuple[str, ...] = field(
        default=(), metadata=check(array(ADDRESS, "array of `HOST:PORT`", non_empty=True))
    )
    sentinels: tuple[str, ...] = field(
        default=(), metadata=check(array(ADDRESS, "array of `HOST:PORT`", non_empty=True))
    )
    sentinel_primary: str | None = field(default=None, metadata=check(TEXT))
    sentinel_password_env: str | None = field(default=None, metadata=check(ENV_NAME))
    tls: bool = field(default=False, metadata=check(BOOLEAN))  # for cluster_nodes or sentinels
    password_env: str | None = field(default=None, metadata=check(ENV_NAME))
    # for rediss:// or tls: the CAs to check the servers against
    ca_file: Path | None = field(default=None, metadata=check(FILE))
    key_prefix: str = field(default="tproxy:", metadata=check(KEY_PREFIX))
    lookup_timeout: float = field(default=0.01, metadata=check(SECONDS))
    write_timeout: float = field(default=1.0, metadata=check(SECONDS))
    connect_timeout: float = field(default=1.0, metadata=check(SECONDS))
    max_entry_bytes: int = field(default=1024 * 1024, metadata=check(SIZE))
    queue_size: int = field(default=256, metadata=check(SIZE))
    breaker_failures: int = field(default=5, metadata=check(SIZE))
    breaker_reset: float = field(default=5.0, metadata=check(SECONDS))

    @property
    def over_tls(self) -> bool:
        """Whether the tier is reached over TLS: a ``rediss://`` URL, or ``tls`` for a cluster's
        or sentinels' nodes."""
        return self.tls or (self.url or "").startswith("rediss://")


@dataclass(frozen=True, slots=True)
class LogSettings:
    """How much is logged and in which form."""

    level: str = field(default="info", metadata=check(choice(LOG_LEVELS)))
    format: str = field(default="auto", metadata=check(choice(LOG_FORMATS)))
    # the level of the loggers of the libraries tproxy uses
    libraries: str = field(default="warning", metadata=check(choice(LOG_LEVELS)))


@dataclass(frozen=True, slots=True)
class AdminSettings(ListenerKeys):
    """The admin listener's access control, and its own certificate when it serves HTTPS."""

    token_env: str | None = field(default=None, metadata=check(ENV_NAME))


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

    client_keys: tuple[str, ...] = field(
        default=(), metadata=check(array(KEY_HASH, "array of key hashes"))
    )
    client_keys_file: Path | None = field(default=None, metadata=check(FILE))

    @property
    def enabled(self) -> bool:
        return bool(self.client_keys) or self.client_keys_file is not None


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """The access log and the queues that keep telemetry off the client's path."""

    access_log: bool = field(default=True, metadata=check(BOOLEAN))
    queue_size: int = field(default=4096, metadata=check(SIZE))
    flush_timeout: float = field(default=5.0, metadata=check(SECONDS))


@dataclass(frozen=True, slots=True)
class PayloadLogSettings:
    """The payload log: request bodies and whole answers, for audit and evaluation."""

    enabled: bool = field(default=False, metadata=check(BOOLEAN))
    file: Path | None = field(default=None, metadata=check(FILE))
    max_bytes: int = field(default=100 * 1024 * 1024, metadata=check(SIZE))
    keep: int = field(default=5, metadata=check(COUNT))
    http_url: str | None = field(default=None, metadata=check(URL))
    http_token_env: str | None = field(default=None, metadata=check(ENV_NAME))
    http_timeout: float = field(default=10.0, metadata=check(SECONDS))
    http_retries: int = field(default=3, metadata=check(COUNT))
    http_backoff: float = field(default=1.0, metadata=check(SECONDS))
    batch_size: int = field(default=64, metadata=check(SIZE))
    queue_size: int = field(default=256, metadata=check(SIZE))
    max_record_bytes: int = field(default=1024 * 1024, metadata=check(SIZE))
    raw_events: bool = field(default=False, metadata=check(BOOLEAN))


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything tproxy was configured with; built once at start and passed down."""

    server: ServerSettings = field(metadata=table(ServerSettings, "[server]"))
    cache: CacheSettings = field(metadata=table(CacheSettings, "[cache]"))
    log: LogSettings = field(metadata=table(LogSettings, "[log]"))
    upstreams: tuple[UpstreamSettings, ...] = field(
        metadata=table(UpstreamSettings, "[upstreams.NAME]")
    )
    routes: tuple[RouteSettings, ...] = field(metadata=table(RouteSettings, "[[routes]]"))
    source: str
    admin: AdminSettings = field(
        default_factory=AdminSettings, metadata=table(AdminSettings, "[admin]")
    )
    telemetry: TelemetrySettings = field(
        default_factory=TelemetrySettings, metadata=table(TelemetrySettings, "[telemetry]")
    )
    payload_log: PayloadLogSettings = field(
        default_factory=PayloadLogSettings, metadata=table(PayloadLogSettings, "[payload_log]")
    )
    auth: AuthSettings = field(default_factory=AuthSettings, metadata=table(AuthSettings, "[auth]"))
    # None: no [shared_store] table, no tier 2.
    shared_store: SharedStoreSettings | None = field(
        default=None, metadata=table(SharedStoreSettings, "[shared_store]")
    )
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


def tables() -> dict[str, Table]:
    """The tables a file may hold, by name, in field order."""
    return {
        item.name: item.metadata[_TABLE] for item in fields(Settings) if _TABLE in item.metadata
    }
