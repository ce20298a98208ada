"""Reading the file's tables: each key through its checker, then the checks between keys of one
table (an upstream's headers and ``api_key_env``, the shared store's ``url``,
``cluster_nodes`` and ``sentinels``) and between the routes and the upstreams.

Every function reports what it refuses to a :class:`~tproxy.config.messages.Problems` and goes
on with what it accepted, so one run of the loader shows every mistake.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tproxy.config import schema
from tproxy.config.checkers import KEY_HASH, NAME
from tproxy.config.messages import BadValueError, Problems, hint, join, show, unknown_key
from tproxy.config.schema import (
    AuthSettings,
    RouteSettings,
    SharedStoreSettings,
    UpstreamSettings,
)
from tproxy.tls import check_ca_file

DEFAULT_NAME = "default"


def read_table(
    table: Mapping[str, object], path: str, cls: type[Any], base: Path, problems: Problems
) -> dict[str, Any]:
    """Check every key of the table at ``path`` against the keys of ``cls``, paths taken from
    ``base``; return the accepted values and report the others."""
    checkers = schema.checkers(cls, base)
    accepted: dict[str, Any] = {}
    for name, raw in table.items():
        where = join(path, name)
        checker = checkers.get(name)
        if checker is None:
            problems.at(where, unknown_key(name, checkers))
            continue
        try:
            accepted[name] = checker(raw)
        except BadValueError as invalid:
            for suffix, reason in invalid.reasons:
                problems.at(where + suffix, reason)
    return accepted


def read_auth(table: Mapping[str, object], base: Path, problems: Problems) -> AuthSettings:
    """The ``[auth]`` table, with the hashes of ``client_keys_file`` read and checked now, so
    ``check-config`` finds a bad line and the running server never reads the file again."""
    problems_before = len(problems.items)
    values = read_table(table, "auth", AuthSettings, base, problems)
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


def read_shared_store(
    document: Mapping[str, object], base: Path, problems: Problems
) -> SharedStoreSettings | None:
    """The ``[shared_store]`` table, or None when the file has none (no shared tier)."""
    if "shared_store" not in document:
        return None
    table = read_section(document, "shared_store", problems)
    values = read_table(table, "shared_store", SharedStoreSettings, base, problems)
    if sum(key in table for key in ("url", "cluster_nodes", "sentinels")) != 1:
        problems.at("shared_store", "set exactly one of url, cluster_nodes and sentinels")
    if ("sentinels" in table) != ("sentinel_primary" in table):
        problems.at("shared_store", "sentinels and sentinel_primary go together")
    if "sentinel_password_env" in table and "sentinels" not in table:
        problems.at("shared_store.sentinel_password_env", "only used with sentinels")
    settings = dataclasses.replace(SharedStoreSettings(), **values)
    if settings.tls and "url" in table:
        problems.at("shared_store.tls", "not with a url: a url asks for TLS with rediss://")
    if settings.ca_file is not None and not settings.over_tls:
        problems.at("shared_store.ca_file", "only used with a rediss:// url or tls")
    elif settings.ca_file is not None:
        for setting, reason in check_ca_file(settings.ca_file, setting="shared_store.ca_file"):
            problems.at(setting, reason)
    return settings


def _read_key_file(path: Path, problems: Problems) -> list[str]:
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
            hashes.append(KEY_HASH(entry))
        except BadValueError as invalid:
            problems.at(where, f"{path} line {number}: {invalid}")
    return hashes


def read_section(document: Mapping[str, object], name: str, problems: Problems) -> dict[str, Any]:
    """The table ``name`` of the file, empty when it is missing or is not a table."""
    raw = document.get(name, {})
    if not isinstance(raw, dict):
        problems.at(name, f"expected a table, got {show(raw)}")
        return {}
    return raw


def _read_upstreams(
    document: Mapping[str, object], base: Path, problems: Problems, url_from_flag: str | None
) -> list[UpstreamSettings]:
    """The ``[upstreams.NAME]`` tables, in file order.

    With ``url_from_flag`` (``--upstream``), ``upstreams.default`` takes that URL and may leave
    out its own.
    """
    accepted: list[UpstreamSettings] = []
    for name, raw in read_section(document, "upstreams", problems).items():
        where = join("upstreams", name)
        try:
            NAME(name)
        except BadValueError as invalid:
            problems.at(where, f"invalid upstream name: {invalid}")
        if not isinstance(raw, dict):
            problems.at(where, f"expected a table, got {show(raw)}")
            continue
        values = read_table(raw, where, UpstreamSettings, base, problems)
        if "api_key_env" in values and any(
            header.lower() == "authorization" for header, _ in values.get("headers", ())
        ):
            problems.at(
                join(where, "headers"),
                "sets Authorization, which api_key_env also sets: keep one of the two",
            )
        if url_from_flag is not None and name == DEFAULT_NAME:
            values["url"] = url_from_flag
        if "url" not in values:
            if "url" not in raw:
                problems.at(join(where, "url"), "required key is missing")
            continue
        accepted.append(dataclasses.replace(UpstreamSettings(name, values["url"]), **values))
    return accepted


@dataclass(frozen=True, slots=True)
class _FileRoute:
    """A route as read from ``routes[index]``; ``clean`` when none of its keys was refused."""

    index: int
    route: RouteSettings
    clean: bool


def _read_routes(
    document: Mapping[str, object], base: Path, problems: Problems
) -> list[_FileRoute]:
    """The ``[[routes]]`` tables, each with its index and whether all its keys were accepted."""
    raw_routes = document.get("routes", [])
    if not isinstance(raw_routes, list):
        problems.at("routes", f"expected an array of tables ([[routes]]), got {show(raw_routes)}")
        return []
    accepted: list[_FileRoute] = []
    for index, raw in enumerate(raw_routes):
        where = f"routes[{index}]"
        if not isinstance(raw, dict):
            problems.at(where, f"expected a table, got {show(raw)}")
            continue
        problems_before = len(problems.items)
        values = read_table(raw, where, RouteSettings, base, problems)
        if "upstreams" not in values:
            if "upstreams" not in raw:
                problems.at(f"{where}.upstreams", "required key is missing")
            continue
        values.setdefault("name", f"route{index}")
        route = dataclasses.replace(RouteSettings(values["upstreams"]), **values)
        accepted.append(_FileRoute(index, route, len(problems.items) == problems_before))
    return accepted


def _check_routes(routes: Sequence[_FileRoute], known: Sequence[str], problems: Problems) -> None:
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
                close = hint(name, known) or listed
                problems.at(f"{where}.upstreams[{item}]", f"unknown upstream {show(name)}{close}")
        if len(set(names)) < len(names):
            problems.at(f"{where}.upstreams", "names one upstream more than once")
        if not current.clean:
            continue
        earlier = [other for other in routes[:position] if other.clean]
        for other in earlier:
            if other.route.name == current.route.name:
                problems.at(
                    f"{where}.name",
                    f"{show(current.route.name)} is already the name of routes[{other.index}]",
                )
                break
        for other in earlier:
            if not other.route.models and current.route.path_prefix.startswith(
                other.route.path_prefix
            ):
                problems.at(
                    where,
                    f"never chosen: routes[{other.index}] comes first, accepts any model and"
                    f" its path_prefix {show(other.route.path_prefix)} covers this route's",
                )
                break


def read_upstreams_and_routes(
    document: Mapping[str, Any], base: Path, upstream_url: str | None, problems: Problems
) -> tuple[list[UpstreamSettings], list[RouteSettings]]:
    """The upstreams and routes to use: the file's, or those ``--upstream`` (``upstream_url``) sets.

    ``--upstream`` gives one upstream called "default" with its URL, keeping the settings of a
    file's ``[upstreams.default]``, and one catch-all route to it. The file's other upstreams
    and its routes are still checked, but not against each other: they are not used. (When the
    flag was refused, its raw text stands in; the problem is already recorded.)
    """
    if upstream_url is not None:
        file_upstreams = _read_upstreams(document, base, problems, upstream_url)
        _read_routes(document, base, problems)
        kept = [upstream for upstream in file_upstreams if upstream.name == DEFAULT_NAME]
        upstreams = kept or [UpstreamSettings(DEFAULT_NAME, upstream_url)]
        return upstreams, [RouteSettings(upstreams=(DEFAULT_NAME,), name=DEFAULT_NAME)]
    upstreams = _read_upstreams(document, base, problems, None)
    file_routes = _read_routes(document, base, problems)
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
