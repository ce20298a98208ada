"""Loading the settings: the file and the flags in; one frozen Settings or every problem out.

:func:`load_settings` parses the file with :mod:`tomllib` and reads it table by table
(:mod:`tproxy.config.tables`), each key through the checker its field declares
(:mod:`tproxy.config.schema`). The flags are checked like the keys they replace, then replace
them. The checks between tables (two listeners on one address, an admin listener beyond loopback
without a token, a payload log without a sink) and the TLS files (readable, private, matching,
valid now) run on what was accepted. Only when nothing was refused is a :class:`Settings` built.
"""

from __future__ import annotations

import dataclasses
import datetime
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tproxy.config import schema
from tproxy.config.addresses import is_loopback
from tproxy.config.checkers import ADDRESS, DIRECTORY, UPSTREAM_URL, Parse, workers_flag
from tproxy.config.messages import BadValueError, Problems, join, toml_key, unknown_key
from tproxy.config.schema import (
    AdminSettings,
    CacheSettings,
    LogSettings,
    Overrides,
    PayloadLogSettings,
    ServerSettings,
    Settings,
    TelemetrySettings,
    UpstreamSettings,
)
from tproxy.config.tables import (
    read_auth,
    read_section,
    read_shared_store,
    read_table,
    read_upstreams_and_routes,
)
from tproxy.core.dialects import JSON_ONLY, dialect_for
from tproxy.core.errors import ConfigError
from tproxy.tls import check_ca_file, check_certificate_pair

DEFAULTS_SOURCE = "<defaults>"

_NO_FLAGS = Overrides()
_LISTENER_FILES = ("tls_cert", "tls_key", "tls_client_ca")
# The tables read key by key with nothing more to them, in the order their problems are listed.
_PLAIN_TABLES = ("server", "cache", "log", "admin", "telemetry", "payload_log")


def _load_document(path: Path, problems: Problems) -> dict[str, Any] | None:
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


def load_settings(path: Path | None, overrides: Overrides = _NO_FLAGS) -> Settings:
    """Read ``path`` (None: defaults only), apply the flags, and return the settings.

    Raises :class:`ConfigError` listing every problem found in the file and the flags, or only
    the one that says why the file could not be read or parsed.
    """
    problems = Problems(str(path) if path is not None else None)
    document: Mapping[str, Any] = {}
    if path is not None:
        loaded = _load_document(path, problems)
        if loaded is None:
            raise ConfigError(problems.items)
        document = loaded
    tables = schema.tables()
    for name in document:
        if name not in tables:
            problems.at(toml_key(name), unknown_key(name, tables))
    base = path.parent if path is not None else Path.cwd()
    values = {
        name: read_table(
            read_section(document, name, problems), name, tables[name].cls, base, problems
        )
        for name in _PLAIN_TABLES
    }
    server_values, cache_values = values["server"], values["cache"]

    auth = read_auth(read_section(document, "auth", problems), base, problems)
    shared_store = read_shared_store(document, base, problems)

    flags: dict[str, Any] = {}
    _apply_flag(flags, "url", "--upstream", UPSTREAM_URL, overrides.upstream, problems)
    _apply_flag(server_values, "listen", "--listen", ADDRESS, overrides.listen, problems)
    _apply_flag(
        server_values, "admin_listen", "--admin-listen", ADDRESS, overrides.admin_listen, problems
    )
    _apply_flag(server_values, "workers", "--workers", workers_flag, overrides.workers, problems)
    cache_dir = None if overrides.cache_dir is None else str(overrides.cache_dir)
    _apply_flag(cache_values, "dir", "--cache-dir", DIRECTORY.bind(Path.cwd()), cache_dir, problems)

    upstream_url = None if overrides.upstream is None else flags.get("url", overrides.upstream)
    upstreams, routes = read_upstreams_and_routes(document, base, upstream_url, problems)

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
    admin = dataclasses.replace(AdminSettings(), **values["admin"])
    payload_log = dataclasses.replace(PayloadLogSettings(), **values["payload_log"])
    _check_admin_access(server, admin, overrides, problems)
    _check_payload_log(payload_log, problems)
    now = datetime.datetime.now(datetime.UTC)
    _check_listener_tls("server", server_values, now, problems)
    _check_listener_tls("admin", values["admin"], now, problems)
    warnings = [_check_upstream_tls(upstream, now, problems) for upstream in upstreams]
    if problems.items:
        raise ConfigError(problems.items)
    return Settings(
        server=server,
        cache=cache,
        log=dataclasses.replace(LogSettings(), **values["log"]),
        upstreams=tuple(upstreams),
        routes=tuple(routes),
        source=str(path) if path is not None else DEFAULTS_SOURCE,
        admin=admin,
        telemetry=dataclasses.replace(TelemetrySettings(), **values["telemetry"]),
        payload_log=payload_log,
        auth=auth,
        shared_store=shared_store,
        warnings=tuple(warning for warning in warnings if warning is not None),
    )


def _check_admin_access(
    server: ServerSettings, admin: AdminSettings, overrides: Overrides, problems: Problems
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


def _check_payload_log(payload_log: PayloadLogSettings, problems: Problems) -> None:
    if payload_log.enabled and payload_log.file is None and payload_log.http_url is None:
        problems.at("payload_log.enabled", "the payload log needs a sink: set file or http_url")


def _apply_flag(
    values: dict[str, Any],
    key: str,
    flag: str,
    checker: Parse,
    raw: str | None,
    problems: Problems,
) -> None:
    """Check a given flag like the file's value it replaces, and put it in ``values``."""
    if raw is None:
        return
    try:
        values[key] = checker(raw)
    except BadValueError as invalid:
        for _suffix, reason in invalid.reasons:
            problems.flag(flag, reason)


def json_only_paths(cache: CacheSettings) -> list[str]:
    """The ``cache.paths`` no API family claims: their answers are cached only as whole JSON
    bodies, since nothing says how a stream there ends (``check-config`` says so)."""
    return [path for path in cache.paths if dialect_for(path) is JSON_ONLY]


def _check_listener_tls(
    table: str, values: Mapping[str, Any], now: datetime.datetime, problems: Problems
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
    upstream: UpstreamSettings, now: datetime.datetime, problems: Problems
) -> str | None:
    """Problems with an upstream's TLS settings; the warning ``verify = false`` earns, if set."""
    where = join("upstreams", upstream.name)
    chosen = [
        name
        for name in ("ca_file", "client_cert", "client_key", "tls_server_name")
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
