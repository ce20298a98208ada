"""The read-only checker behind ``tproxy cache verify``: do an LMDB store's records agree?

:meth:`tproxy.store.lmdb.LmdbStore.verify` walks LMDB's page structure first, then hands this
module the records of one read transaction: every entry, every ``entry_info`` record, every
``lru`` key and the recorded byte total. Nothing here touches LMDB, so the rules are plain code.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from tproxy.core.entry import StoredEntry, decode_entry
from tproxy.core.errors import CorruptEntry
from tproxy.store.records import (
    MAX_KEY_BYTES,
    STAMP,
    EntryInfo,
    VerifyReport,
    decode_info,
    info_of,
)


def check_records(
    path: str,
    entries: Iterable[tuple[bytes, bytes]],
    infos: Iterable[tuple[bytes, bytes]],
    lru_keys: Iterable[bytes],
    recorded: int,
    now: float,
) -> VerifyReport:
    """Every problem in one snapshot's records: each entry decodes and has its ``entry_info``
    record (same size, times, status, kind and model) and its ``lru`` record at its last use;
    no record points to a missing entry; ``recorded`` (``meta.total_bytes``) is the sum."""
    found: list[str] = []
    stored: dict[bytes, tuple[int, StoredEntry | None]] = {}
    for key, value in entries:
        try:
            entry: StoredEntry | None = decode_entry(value)
        except CorruptEntry as error:
            found.append(f"entry {_shown(key)}: cannot be decoded ({error})")
            entry = None
        stored[key] = (len(value), entry)
        if len(key) > MAX_KEY_BYTES:
            found.append(f"entry {_shown(key)}: key longer than {MAX_KEY_BYTES} bytes")
    decoded_infos: dict[bytes, EntryInfo] = {}
    malformed: set[bytes] = set()
    for key, raw in infos:
        try:
            decoded_infos[key] = decode_info(key, raw)
        except (struct.error, UnicodeDecodeError):
            found.append(f"entry_info {_shown(key)}: malformed record")
            malformed.add(key)
    indexed = list(lru_keys)
    for key, (size, entry) in stored.items():
        info = decoded_infos.get(key)
        if info is not None:
            found += _disagreements(key, size, entry, info)
        elif key not in malformed:
            found.append(f"entry {_shown(key)}: no entry_info record")
    for key in sorted(decoded_infos.keys() - stored.keys()):
        found.append(f"entry_info {_shown(key)}: no such entry")
    found += _lru_problems(indexed, decoded_infos, malformed)
    total = sum(size for size, _ in stored.values())
    if recorded != total:
        found.append(f"meta total_bytes is {recorded}, the entries hold {total}")
    decoded = [entry for _, entry in stored.values() if entry is not None]
    return VerifyReport(
        path=path,
        entries=len(stored),
        streamed=sum(1 for entry in decoded if entry.streamed),
        expired=sum(1 for entry in decoded if entry.expires_at <= now),
        bytes=total,
        recorded_bytes=recorded,
        problems=tuple(found),
    )


def structure_report(path: str, structure: Sequence[str]) -> VerifyReport:
    """The report for a store whose page structure is damaged: its entries are not read."""
    problems = tuple(f"LMDB structure: {problem}" for problem in structure)
    return VerifyReport(path, 0, 0, 0, 0, 0, problems)


def _shown(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def _disagreements(key: bytes, size: int, entry: StoredEntry | None, info: EntryInfo) -> list[str]:
    """Where an entry's ``entry_info`` record disagrees with the entry itself."""
    problems: list[str] = []
    if info.size != size:
        problems.append(f"entry_info {_shown(key)}: size {info.size}, the entry is {size} bytes")
    if entry is not None:
        expected = info_of(key, entry, last_used_at=info.last_used_at, size=info.size)
        fields = [
            name
            for name in ("created_at", "expires_at", "streamed", "model", "status")
            if getattr(expected, name) != getattr(info, name)
        ]
        if fields:
            problems.append(
                f"entry_info {_shown(key)}: {', '.join(fields)} differ from the entry's"
            )
    return problems


def _lru_problems(
    indexed: Sequence[bytes], infos: dict[bytes, EntryInfo], malformed: set[bytes]
) -> list[str]:
    """The LRU index must hold exactly one record per entry, at its last_used_at."""
    problems: list[str] = []
    expected = {STAMP.pack(info.last_used_at) + key: key for key, info in infos.items()}
    present = set(indexed)
    for lru_key in indexed:
        key = lru_key[STAMP.size :]
        if lru_key not in expected and key not in malformed:
            what = "not at the entry's last use" if key in infos else "no such entry"
            problems.append(f"lru record for {_shown(key)}: {what}")
    for lru_key, key in expected.items():
        if lru_key not in present:
            problems.append(f"entry {_shown(key)}: missing from the LRU index")
    return problems
