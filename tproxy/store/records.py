"""What the cache's tiers hand out, and the layout of an LMDB entry's metadata record.

Plain values and byte layouts, no I/O: the LMDB tier (:mod:`tproxy.store.lmdb`), the checker
(:mod:`tproxy.store.verify`) and the cache commands all read them.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from tproxy.core.entry import StoredEntry

# LMDB keys are at most 511 bytes and the LRU index prefixes eight bytes of timestamp.
MAX_KEY_BYTES = 400

# entry_info: created_at, expires_at, last_used_at, size, status, flags; then the model.
STAMP = struct.Struct(">d")
_INFO = struct.Struct(">dddQHB")
_STREAMED = 1
_HAS_MODEL = 2


class PutOutcome(enum.Enum):
    """What became of one entry handed to :meth:`CacheStore.put_many`; values are metric labels."""

    WRITTEN = "written"  # committed: a later get finds it
    TOO_LARGE = "too_large"  # over max_entry_bytes, the byte cap, or MAX_KEY_BYTES
    MAP_FULL = "map_full"  # the map stayed full even after eviction
    DISK_FULL = "disk_full"  # the file system refused the pages even after eviction
    FAILED = "failed"  # the store failed otherwise (StoreError, reported by the caller)


@dataclass(frozen=True, slots=True)
class PutResult:
    """What one :meth:`CacheStore.put_many` did with its batch.

    ``outcomes`` has one member per item handed over, in the same order.
    """

    stored: int
    skipped_too_large: int
    evicted: int
    skipped_no_room: int = 0  # the map or the disk stayed full even after eviction
    disk_full: int = 0  # commits the file system refused for lack of room; see docs/store.md
    outcomes: tuple[PutOutcome, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot of the store. hits, misses, evictions and expired count this process only."""

    path: str
    entries: int
    bytes: int
    max_bytes: int
    map_size: int
    hits: int
    misses: int
    evictions: int
    expired: int
    schema_version: int


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """One stored entry's metadata, read without decoding the entry itself."""

    key: str
    size: int
    created_at: float
    expires_at: float
    last_used_at: float
    streamed: bool
    model: str | None
    status: int


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What :meth:`LmdbStore.verify` found. ``problems`` is empty for a sound store.

    ``entries``, ``streamed``, ``expired`` and ``bytes`` describe the values actually stored;
    ``recorded_bytes`` is the running total the store keeps, which must equal ``bytes``. When
    LMDB's page structure is damaged the entries are not read at all, and these are 0.
    """

    path: str
    entries: int
    streamed: int
    expired: int
    bytes: int
    recorded_bytes: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def info_of(key: bytes, entry: StoredEntry, *, last_used_at: float, size: int) -> EntryInfo:
    """The metadata of ``entry`` stored under ``key`` in ``size`` bytes."""
    return EntryInfo(
        key=key.decode(),
        size=size,
        created_at=entry.created_at,
        expires_at=entry.expires_at,
        last_used_at=last_used_at,
        streamed=entry.streamed,
        model=entry.model,
        status=entry.status,
    )


def encode_info(info: EntryInfo) -> bytes:
    flags = (_STREAMED if info.streamed else 0) | (_HAS_MODEL if info.model is not None else 0)
    model = info.model.encode() if info.model is not None else b""
    fixed = _INFO.pack(
        info.created_at, info.expires_at, info.last_used_at, info.size, info.status, flags
    )
    return fixed + model


def decode_info(key: bytes, raw: bytes) -> EntryInfo:
    created_at, expires_at, last_used, size, status, flags = _INFO.unpack_from(raw)
    model = raw[_INFO.size :].decode() if flags & _HAS_MODEL else None
    return EntryInfo(
        key=key.decode(),
        size=size,
        created_at=created_at,
        expires_at=expires_at,
        last_used_at=last_used,
        streamed=bool(flags & _STREAMED),
        model=model,
        status=status,
    )


def stored_size(raw: bytes) -> int:
    """The stored size an ``entry_info`` record gives, without decoding the rest."""
    size: int = _INFO.unpack_from(raw)[3]
    return size
