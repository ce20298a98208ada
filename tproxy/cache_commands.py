"""`tproxy cache stats|ls|show|verify|purge`: look into the response cache, check it, clean it.

``stats``, ``ls``, ``show`` and ``purge`` work on either tier through
:class:`~tproxy.store.TierAdmin`: the local LMDB store (the default) or, with ``--tier shared
--config FILE``, the shared tier that file's ``[shared_store]`` names (its keys found with
``SCAN``, never ``KEYS``). ``verify`` checks the local store's LMDB structure and records, so it
is LMDB's alone (:func:`_verify_lmdb`) and exits 1 when it finds a problem.

The local store is opened only if it exists (:meth:`LmdbStore.open_existing`): never created,
and a store written by another schema is reported, not moved aside, because a server of another
version may be using it. Every command but ``purge`` opens it read-only. Human output is aligned
for reading at a glance; ``--json`` prints one JSON document instead.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict
from pathlib import Path

import trio

from tproxy.config import load_settings
from tproxy.core.entry import StoredEntry
from tproxy.core.errors import ConfigError, CorruptEntry, StoreError
from tproxy.store import (
    EntryInfo,
    LmdbStore,
    LocalTier,
    SharedStoreUnavailable,
    TierAdmin,
    TierStats,
    VerifyReport,
    open_shared_admin,
)

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
    directory: Path = args.cache_dir if args.cache_dir is not None else default_cache_dir
    command: str = args.cache_command
    try:
        if args.tier == "shared":
            tier = _shared_tier(args)
        elif command == "verify":
            return _verify_lmdb(directory, args.json)
        else:
            tier = _local_tier(directory, writable=command == "purge")
        older_than = _purge_age(args) if command == "purge" else None
        return trio.run(_tier_command, tier, args, older_than)
    except _UsageError as error:
        return _fail(str(error), EXIT_USAGE)
    except (StoreError, SharedStoreUnavailable, ConfigError) as error:
        return _fail(str(error), EXIT_FAILURE)


@asynccontextmanager
async def _local_tier(directory: Path, *, writable: bool) -> AsyncIterator[TierAdmin]:
    store = LmdbStore.open_existing(directory, readonly=not writable)
    try:
        yield LocalTier(store)
    finally:
        store.close()


async def _tier_command(
    opening: AbstractAsyncContextManager[TierAdmin],
    args: argparse.Namespace,
    older_than: float | None,
) -> int:
    async with opening as tier:
        now = time.time()
        command: str = args.cache_command
        try:
            if command == "stats":
                return _stats(await tier.stats(now), now, args.json)
            if command == "purge":
                removed = await tier.purge(older_than=older_than, now=now)
                return _report_purge(removed, older_than, args.json)
            infos = await tier.scan()
            if command == "ls":
                return _ls(infos, tier, now, args.json)
            return await _show(infos, tier, args.key, now, args.json)
        except _UsageError as error:  # inside the block: the shared tier's client is a task group
            return _fail(str(error), EXIT_USAGE)


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


def _stats(stats: TierStats, now: float, as_json: bool) -> int:
    local = stats.schema_version is not None  # the LMDB tier's directory, not a server
    if as_json:
        document: dict[str, object] = {
            "path" if local else "where": stats.where,
            "entries": stats.entries,
            "streamed_entries": stats.streamed,
            "expired_entries": stats.expired,
            "bytes": stats.bytes,
            "oldest_created_at": stats.oldest_created_at,
        }
        extras = {
            "schema_version": stats.schema_version,
            "max_bytes": stats.max_bytes,
            "map_size": stats.map_size,
            "foreign_values": None if local else stats.foreign,
        }
        document.update((name, value) for name, value in extras.items() if value is not None)
        return _emit(document)
    rows = [("path" if local else "where", stats.where)]
    if stats.schema_version is not None:
        rows.append(("schema version", str(stats.schema_version)))
    counts = f"{stats.streamed} streamed, {stats.expired} expired"
    rows.append(("entries", f"{stats.entries} ({counts})"))
    stored = format_size(stats.bytes)
    if stats.max_bytes is not None:
        share = f" ({100 * stats.bytes / stats.max_bytes:.1f}%)" if stats.max_bytes else ""
        stored += f" of {format_size(stats.max_bytes)}{share}"
    rows.append(("stored", stored))
    if stats.map_size is not None:
        rows.append(("map size", format_size(stats.map_size)))
    if stats.foreign:
        rows.append(
            ("not entries", f"{stats.foreign} values under the prefix (ignored by lookups)")
        )
    if stats.oldest_created_at is not None:
        rows.append(("oldest entry", f"{format_age(now - stats.oldest_created_at)} old"))
    _print_pairs(rows)
    return EXIT_OK


def _ls(infos: list[EntryInfo], tier: TierAdmin, now: float, as_json: bool) -> int:
    last_used = tier.keeps_last_use
    infos = sorted(infos, key=lambda info: info.created_at, reverse=True)
    if as_json:
        return _emit({"entries": [_info_document(info, now, last_used) for info in infos]})
    if not infos:
        print(f"no entries in {tier.where}")
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


async def _show(
    infos: list[EntryInfo], tier: TierAdmin, prefix: str, now: float, as_json: bool
) -> int:
    last_used = tier.keeps_last_use
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
        entry = await tier.peek(info.key)
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


def _report_purge(removed: int, older_than: float | None, as_json: bool) -> int:
    if as_json:
        return _emit({"removed": removed})
    what = "every entry" if older_than is None else f"expired or {format_age(older_than)} old"
    print(f"removed {removed} {'entry' if removed == 1 else 'entries'} ({what})")
    return EXIT_OK


# -- LMDB only ------------------------------------------------------------------------


def _verify_lmdb(directory: Path, as_json: bool) -> int:
    """``verify``: LMDB's page structure and the records of the local store (read-only)."""
    store = LmdbStore.open_existing(directory, readonly=True)
    try:
        report = store.verify(time.time())
    finally:
        store.close()
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


# -- the shared tier --------------------------------------------------------------------


def _shared_tier(args: argparse.Namespace) -> AbstractAsyncContextManager[TierAdmin]:
    """The shared tier of ``--config``'s ``[shared_store]``; raises _UsageError when there is
    none, or for ``verify``."""
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
    return open_shared_admin(settings)


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
