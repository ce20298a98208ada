"""`tproxy cache stats|ls|show|verify|purge`: look into the response cache, check it, clean it.

These commands open an existing store only (:meth:`LmdbStore.open_existing`): they never
create a directory, and a store written by another schema is reported, not moved aside, because
a server of another version may be using it. Every command but ``purge`` opens it read-only.
Human output is aligned for reading at a glance; ``--json`` prints one JSON document instead.
``verify`` exits 1 when it finds a problem, so scripts and tests can rely on its status.

``--tier shared --config FILE`` runs ``stats``, ``ls``, ``show`` and ``purge`` on the shared
tier that file's ``[shared_store]`` names: its keys are found with ``SCAN`` (never ``KEYS``,
which blocks a server) and read and deleted one by one, so it works on a Redis Cluster. The
shared tier keeps no last-use time: Redis expires entries by their TTL, not by use.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import trio

from tproxy.config import SharedStoreSettings, load_settings
from tproxy.core.entry import StoredEntry
from tproxy.core.errors import ConfigError, CorruptEntry, StoreError
from tproxy.sharedstore import (
    SharedAdmin,
    SharedEntry,
    SharedStoreUnavailable,
    describe,
    open_shared_admin,
)
from tproxy.store import EntryInfo, LmdbStore, VerifyReport, info_of

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

SHORT_KEY = 16
SHOWN_DATA_LINES = 3
PREVIEW_CHARS = 120

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_UNIT_ORDER = "dhms"


class _UsageError(Exception):
    """The command line asks for something impossible; exit 2."""


def add_cache_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cache`` and its subcommands to the ``tproxy`` command line."""
    cache = subparsers.add_parser(
        "cache",
        help="inspect or clean the response cache",
        description="Inspect or clean the response cache store.",
    )
    commands = cache.add_subparsers(dest="cache_command", metavar="COMMAND", required=True)
    _with_common(commands.add_parser("stats", help="entry count, bytes used, limits"))
    _with_common(commands.add_parser("ls", help="list entries, newest first"))
    show = _with_common(commands.add_parser("show", help="one entry's metadata and first events"))
    show.add_argument("key", metavar="KEY", help="a cache key, or a unique prefix of one")
    _with_common(
        commands.add_parser(
            "verify",
            help="check every entry and index; exit 1 if anything is wrong",
            description=(
                "Check the store read-only: LMDB's page structure, then that every entry decodes"
                " and agrees with its metadata, the LRU index and the byte total. Reports every"
                " problem; exits 0 when there is none, 1 otherwise. Safe while a server runs."
            ),
        )
    )
    purge = _with_common(
        commands.add_parser(
            "purge",
            help="remove old entries (expired ones always go)",
            description="Remove expired entries and those older than a duration, or all.",
        )
    )
    which = purge.add_mutually_exclusive_group()
    which.add_argument(
        "--older-than",
        metavar="DURATION",
        help="remove entries at least this old: 90, 90s, 15m, 12h, 7d, 1d12h",
    )
    which.add_argument("--all", action="store_true", help="remove every entry")


def _with_common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the cache store directory (default: tproxy's default cache directory)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--tier",
        choices=("local", "shared"),
        default="local",
        help="the local LMDB store (default) or the shared tier of --config's [shared_store]",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="the settings file, for --tier shared"
    )
    return parser


def run_cache_command(args: argparse.Namespace, default_cache_dir: Path) -> int:
    """Run the parsed ``cache`` subcommand: 0 ok, 1 failure (e.g. no store), 2 usage error."""
    if args.tier == "shared":
        return _run_shared(args)
    directory: Path = args.cache_dir if args.cache_dir is not None else default_cache_dir
    command: str = args.cache_command
    try:
        older_than = _purge_age(args) if command == "purge" else None
        store = LmdbStore.open_existing(directory, readonly=command != "purge")
    except _UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except StoreError as error:
        return _fail(str(error), EXIT_FAILURE)
    now = time.time()
    try:
        if command == "stats":
            return _stats(store, now, args.json)
        if command == "ls":
            return _ls(list(store.entries()), store.stats().path, now, args.json)
        if command == "show":
            return _show(list(store.entries()), store.peek, args.key, now, args.json)
        if command == "verify":
            return _verify(store, now, args.json)
        return _purge(store, older_than, now, args.json)
    except _UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except StoreError as error:
        return _fail(str(error), EXIT_FAILURE)
    finally:
        store.close()


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a bare number of seconds, or parts like 1d12h, 15m, 90s.

    Units are d, h, m and s, each at most once and in that order. Raises ValueError.
    """
    cleaned = text.strip().lower()
    problem = (
        f"invalid duration {text!r}: use seconds (90) or numbers with the units d, h, m, s "
        "in that order (90s, 15m, 12h, 7d, 1d12h)"
    )
    if re.fullmatch(r"\d+(?:\.\d+)?", cleaned):
        return float(cleaned)
    parts = _DURATION_PART.findall(cleaned)
    if not parts or "".join(number + unit for number, unit in parts) != cleaned:
        raise ValueError(problem)
    positions = [_UNIT_ORDER.index(unit) for _, unit in parts]
    if positions != sorted(set(positions)):
        raise ValueError(problem)
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _purge_age(args: argparse.Namespace) -> float | None:
    if args.all:
        return None
    if args.older_than is None:
        raise _UsageError("purge needs --older-than DURATION or --all")
    try:
        return parse_duration(args.older_than)
    except ValueError as error:
        raise _UsageError(str(error)) from error


# -- the commands ----------------------------------------------------------------------


def _stats(store: LmdbStore, now: float, as_json: bool) -> int:
    stats = store.stats()
    infos = list(store.entries())
    expired = sum(1 for info in infos if info.expires_at <= now)
    streams = sum(1 for info in infos if info.streamed)
    if as_json:
        return _emit(
            {
                "path": stats.path,
                "schema_version": stats.schema_version,
                "entries": stats.entries,
                "streamed_entries": streams,
                "expired_entries": expired,
                "bytes": stats.bytes,
                "max_bytes": stats.max_bytes,
                "map_size": stats.map_size,
                "oldest_created_at": min((info.created_at for info in infos), default=None),
            }
        )
    share = f" ({100 * stats.bytes / stats.max_bytes:.1f}%)" if stats.max_bytes else ""
    rows = [
        ("path", stats.path),
        ("schema version", str(stats.schema_version)),
        ("entries", f"{stats.entries} ({streams} streamed, {expired} expired)"),
        ("stored", f"{format_size(stats.bytes)} of {format_size(stats.max_bytes)}{share}"),
        ("map size", format_size(stats.map_size)),
    ]
    if infos:
        oldest = min(info.created_at for info in infos)
        rows.append(("oldest entry", f"{format_age(now - oldest)} old"))
    _print_pairs(rows)
    return EXIT_OK


def _ls(
    infos: list[EntryInfo], where: str, now: float, as_json: bool, *, last_used: bool = True
) -> int:
    infos = sorted(infos, key=lambda info: info.created_at, reverse=True)
    if as_json:
        return _emit({"entries": [_info_document(info, now, last_used) for info in infos]})
    if not infos:
        print(f"no entries in {where}")
        return EXIT_OK
    header = ("KEY", "STATUS", "KIND", "SIZE", "AGE", "EXPIRES", "LAST USED", "MODEL")
    rows = [
        (
            info.key[:SHORT_KEY],
            str(info.status),
            "stream" if info.streamed else "body",
            format_size(info.size),
            format_age(now - info.created_at),
            _expiry(info.expires_at, now),
            f"{format_age(now - info.last_used_at)} ago" if last_used else "-",
            info.model or "-",
        )
        for info in infos
    ]
    _print_table(header, rows, right_aligned={1, 3})
    return EXIT_OK


def _show(
    infos: list[EntryInfo],
    peek: Callable[[str], StoredEntry | None],
    prefix: str,
    now: float,
    as_json: bool,
    *,
    last_used: bool = True,
) -> int:
    matches = [info for info in infos if info.key.startswith(prefix)]
    exact = [info for info in matches if info.key == prefix]
    matches = exact or matches
    if not matches:
        return _fail(f"no cache entry matches {prefix!r}", EXIT_FAILURE)
    if len(matches) > 1:
        raise _UsageError(
            f"{len(matches)} cache entries start with {prefix!r}; give more of the key"
        )
    info = matches[0]
    try:
        entry = peek(info.key)
    except CorruptEntry as error:
        return _fail(f"cache entry {info.key} is corrupt: {error}", EXIT_FAILURE)
    if entry is None:
        return _fail(f"cache entry {info.key} went away while reading it", EXIT_FAILURE)
    events = _count_events(entry) if entry.streamed else None
    data_lines = _data_lines(entry)[:SHOWN_DATA_LINES] if entry.streamed else []
    preview = None if entry.streamed else _preview(b"".join(entry.chunks))
    if as_json:
        document = _info_document(info, now, last_used)
        document.update(
            body_bytes=entry.body_size,
            headers={
                name.decode("latin-1"): value.decode("latin-1") for name, value in entry.headers
            },
            events=events,
            first_data_lines=data_lines,
            body_preview=preview,
        )
        return _emit(document)
    kind = f"stream, {events} events in {len(entry.chunks)} frames" if entry.streamed else "body"
    rows = [
        ("key", info.key),
        ("status", str(info.status)),
        ("kind", kind),
        ("model", info.model or "-"),
        ("size", f"{format_size(entry.body_size)} body, {format_size(info.size)} stored"),
        ("created", f"{_timestamp(info.created_at)} ({format_age(now - info.created_at)} ago)"),
        ("expires", _expiry(info.expires_at, now, long=True)),
    ]
    if last_used:
        rows.append(("last used", f"{format_age(now - info.last_used_at)} ago"))
    rows += [
        ("header", f"{name.decode('latin-1')}: {value.decode('latin-1')}")
        for name, value in entry.headers
    ]
    _print_pairs(rows)
    if entry.streamed:
        print("first data lines:")
        for line in data_lines:
            print(f"  {line}")
    else:
        print("body:")
        print(f"  {preview}")
    return EXIT_OK


def _verify(store: LmdbStore, now: float, as_json: bool) -> int:
    report = store.verify(now)
    code = EXIT_OK if report.ok else EXIT_FAILURE
    if as_json:
        _emit(_verify_document(report))
        return code
    rows = [
        ("path", report.path),
        ("entries", f"{report.entries} ({report.streamed} streamed, {report.expired} expired)"),
        ("stored", f"{format_size(report.bytes)} (recorded: {format_size(report.recorded_bytes)})"),
    ]
    count = len(report.problems)
    rows.append(("result", "clean" if report.ok else f"{count} problem{'s' if count > 1 else ''}"))
    _print_pairs(rows)
    for problem in report.problems:
        print(f"  {problem}")
    return code


def _verify_document(report: VerifyReport) -> dict[str, object]:
    document: dict[str, object] = asdict(report)
    document["problems"] = list(report.problems)
    document["ok"] = report.ok
    return document


def _purge(store: LmdbStore, older_than: float | None, now: float, as_json: bool) -> int:
    return _report_purge(store.purge(older_than=older_than, now=now), older_than, as_json)


def _report_purge(removed: int, older_than: float | None, as_json: bool) -> int:
    if as_json:
        return _emit({"removed": removed})
    what = "every entry" if older_than is None else f"expired or {format_age(older_than)} old"
    print(f"removed {removed} {'entry' if removed == 1 else 'entries'} ({what})")
    return EXIT_OK


# -- the shared tier --------------------------------------------------------------------


def _run_shared(args: argparse.Namespace) -> int:
    try:
        settings = _shared_settings(args)
        older_than = _purge_age(args) if args.cache_command == "purge" else None
        return trio.run(_shared_command, settings, args, older_than)
    except _UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except (SharedStoreUnavailable, ConfigError) as error:
        return _fail(str(error), EXIT_FAILURE)


def _shared_settings(args: argparse.Namespace) -> SharedStoreSettings:
    """The ``[shared_store]`` of ``--config``; raises _UsageError when there is none."""
    if args.cache_command == "verify":
        raise _UsageError("verify checks the local store; the shared tier has nothing to verify")
    if args.config is None:
        raise _UsageError("--tier shared needs --config FILE with a [shared_store] table")
    try:
        settings = load_settings(args.config).shared_store
    except ConfigError as error:
        raise _UsageError("\n".join(error.problems)) from error
    if settings is None:
        raise _UsageError(f"{args.config} has no [shared_store] table")
    return settings


async def _shared_command(
    settings: SharedStoreSettings, args: argparse.Namespace, older_than: float | None
) -> int:
    async with open_shared_admin(settings) as admin:
        found = await admin.entries()
        now = time.time()
        where = describe(settings)
        if args.cache_command == "purge":
            return await _purge_shared(admin, found, older_than, now, args.json)
    infos = [_shared_info(item) for item in found if item.entry is not None]
    if args.cache_command == "stats":
        return _shared_stats(infos, len(found) - len(infos), where, now, args.json)
    if args.cache_command == "ls":
        return _ls(infos, where, now, args.json, last_used=False)
    entries = {item.key: item.entry for item in found}
    return _show(infos, entries.get, args.key, now, args.json, last_used=False)


def _shared_info(item: SharedEntry) -> EntryInfo:
    assert item.entry is not None
    key = item.key.encode()
    return info_of(key, item.entry, last_used_at=item.entry.created_at, size=item.size)


def _shared_stats(
    infos: list[EntryInfo], foreign: int, where: str, now: float, as_json: bool
) -> int:
    stored = sum(info.size for info in infos)
    streams = sum(1 for info in infos if info.streamed)
    oldest = min((info.created_at for info in infos), default=None)
    if as_json:
        return _emit(
            {
                "where": where,
                "entries": len(infos),
                "streamed_entries": streams,
                "foreign_values": foreign,
                "bytes": stored,
                "oldest_created_at": oldest,
            }
        )
    rows = [
        ("where", where),
        ("entries", f"{len(infos)} ({streams} streamed)"),
        ("stored", format_size(stored)),
    ]
    if foreign:
        rows.append(("not entries", f"{foreign} values under the prefix (ignored by lookups)"))
    if oldest is not None:
        rows.append(("oldest entry", f"{format_age(now - oldest)} old"))
    _print_pairs(rows)
    return EXIT_OK


async def _purge_shared(
    admin: SharedAdmin,
    found: list[SharedEntry],
    older_than: float | None,
    now: float,
    as_json: bool,
) -> int:
    """``--all`` removes every value under the prefix; ``--older-than`` the entries that old
    (Redis removes expired ones itself)."""
    doomed = [
        item.key
        for item in found
        if older_than is None
        or (item.entry is not None and now - item.entry.created_at >= older_than)
    ]
    return _report_purge(await admin.delete(doomed), older_than, as_json)


# -- formatting ------------------------------------------------------------------------


def format_size(size: int) -> str:
    """Bytes for a person: "512 B", "12.3 KiB", "1.0 GiB"."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def format_age(seconds: float) -> str:
    """A duration for a person, two units at most: "45s", "12m 5s", "3h 12m", "2d 3h"."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _expiry(expires_at: float, now: float, *, long: bool = False) -> str:
    if math.isinf(expires_at):
        return "never"
    if expires_at <= now:
        return f"expired {format_age(now - expires_at)} ago"
    text = f"in {format_age(expires_at - now)}"
    return f"{text} ({_timestamp(expires_at)})" if long else text


def _timestamp(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def _info_document(info: EntryInfo, now: float, last_used: bool = True) -> dict[str, object]:
    document: dict[str, object] = asdict(info)
    if not last_used:
        del document["last_used_at"]
    document["expires_at"] = None if math.isinf(info.expires_at) else info.expires_at
    document["expired"] = info.expires_at <= now
    return document


def _data_lines(entry: StoredEntry) -> list[str]:
    lines: list[str] = []
    for chunk in entry.chunks:
        text = chunk.decode("utf-8", errors="replace")
        lines += [_shorten(line) for line in text.splitlines() if line.startswith("data:")]
    return lines


def _count_events(entry: StoredEntry) -> int:
    """Frames that carry data; comments and keep-alives are frames but not events."""
    return sum(
        1 for chunk in entry.chunks if any(line.startswith(b"data:") for line in chunk.splitlines())
    )


def _preview(body: bytes) -> str:
    return _shorten(body.decode("utf-8", errors="replace").replace("\n", " "))


def _shorten(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def _print_pairs(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def _print_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, right_aligned: set[int]
) -> None:
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    for row in (header, *rows):
        cells = [
            cell.rjust(width) if column in right_aligned else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())


def _emit(document: object) -> int:
    print(json.dumps(document, indent=2, sort_keys=True))
    return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"tproxy cache: {message}", file=sys.stderr)
    return code
