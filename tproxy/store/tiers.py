"""The cache's tiers as the rest of tproxy sees them: async protocols, and the lookup across them.

Tier 1 is the local LMDB store (:class:`LocalTier` around :class:`~tproxy.store.lmdb.LmdbStore`),
tier 2 the optional shared Valkey/Redis store (:mod:`tproxy.store.redis`). Two protocols, one per
kind of caller:

- :class:`CacheTier` is what a request's lookup asks: ``get``. It is async because tier 2 awaits
  the network (under its own short deadline); tier 1 answers inline, without a hop to a thread: a
  10 KB LMDB read on the event loop costs ~2 µs, through a worker thread 110–200 µs (FACTS.md),
  and awaiting the coroutine around it adds ~0.1 µs. :func:`look_up` asks the tiers in order.
- :class:`TierAdmin` is what ``tproxy cache stats|ls|show|purge`` ask of either tier: whole-tier
  reads and deletes, allowed to take a while, run in a worker thread for LMDB and with ``SCAN``
  for Redis. ``verify`` is LMDB's alone (:meth:`LmdbStore.verify`): Redis has no structure of
  ours to check.

Writes are not tier calls: a finished answer is handed to queues that write it off every
client's path, each with its own contract (the store writer's batches for tier 1, whose
per-entry outcomes a request waits for; :meth:`SharedTier.submit` for tier 2, which nobody
waits for). :class:`CacheStore` is LMDB's own blocking interface under :class:`LocalTier`, for
the writer's thread and for synchronous gauges (a Prometheus collector); docs/store.md says why
it is not folded into the tier protocols.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import trio

from tproxy.core.entry import StoredEntry
from tproxy.store.records import EntryInfo, PutResult, StoreStats


class CacheStore(Protocol):
    """The local store's blocking interface: for :class:`LocalTier`, the store writer's thread
    and the gauges (``/metrics``, ``/readyz``, the status line), which read ``stats`` inline."""

    @property
    def path(self) -> Path: ...

    def get(self, key: str, now: float) -> StoredEntry | None:
        """The live entry under ``key``, or None. Fast enough to call on the event loop."""
        ...

    def put_many(self, items: Sequence[tuple[str, StoredEntry]], now: float) -> PutResult:
        """Store a batch in one transaction. Blocks: call it in a worker thread."""
        ...

    def peek(self, key: str) -> StoredEntry | None:
        """The entry under ``key`` whatever its expiry, noting nothing; raises CorruptEntry."""
        ...

    def purge(self, *, older_than: float | None, now: float) -> int:
        """Remove expired entries and those at least ``older_than`` seconds old (None: all)."""
        ...

    def stats(self) -> StoreStats: ...

    def entries(self) -> Iterator[EntryInfo]: ...

    def close(self) -> None: ...


class CacheTier(Protocol):
    """One tier as a lookup sees it."""

    @property
    def name(self) -> str:
        """How ``Cache-Status`` names the tier when it answered (``local``, ``shared``)."""
        ...

    async def get(self, key: str, now: float) -> StoredEntry | None:
        """The live entry under ``key``, or None; never raises (a failing tier is a miss)."""
        ...


@dataclass(frozen=True, slots=True)
class TierStats:
    """What one tier holds, for ``tproxy cache stats``; None where the tier has no such figure."""

    where: str  # the store's directory, or the server's address (never a credential)
    entries: int
    streamed: int
    expired: int
    bytes: int
    oldest_created_at: float | None
    foreign: int = 0  # values under the tier's keys that are not tproxy entries
    max_bytes: int | None = None
    map_size: int | None = None
    schema_version: int | None = None

    @classmethod
    def of(cls, where: str, infos: Sequence[EntryInfo], stored: int, now: float) -> TierStats:
        """The counts of the entries ``infos`` describe, holding ``stored`` bytes."""
        return cls(
            where=where,
            entries=len(infos),
            streamed=sum(1 for info in infos if info.streamed),
            expired=sum(1 for info in infos if info.expires_at <= now),
            bytes=stored,
            oldest_created_at=min((info.created_at for info in infos), default=None),
        )


class TierAdmin(Protocol):
    """One tier as the cache commands see it. Raises the tier's error when it cannot answer
    (:class:`~tproxy.core.errors.StoreError`, or ``SharedStoreUnavailable``)."""

    @property
    def where(self) -> str:
        """The store's directory, or the server's address (never a credential)."""
        ...

    @property
    def keeps_last_use(self) -> bool:
        """Whether entries carry a last-use time (LMDB's LRU does; Redis expires by TTL)."""
        ...

    async def stats(self, now: float) -> TierStats: ...

    async def scan(self) -> list[EntryInfo]:
        """Every entry's metadata (values that are not tproxy entries are left out)."""
        ...

    async def peek(self, key: str) -> StoredEntry | None:
        """The entry under ``key`` whatever its expiry; raises CorruptEntry when it is torn."""
        ...

    async def purge(self, *, older_than: float | None, now: float) -> int:
        """Remove entries at least ``older_than`` seconds old, and expired ones (None: all)."""
        ...


class LocalTier:
    """Tier 1: the LMDB store, plus answers on their way into it.

    ``landed`` finds an answer whose flight completed but which the store writer has not
    committed yet, so a request for it is a hit from memory rather than a second upstream call.
    Implements :class:`CacheTier` and :class:`TierAdmin`.
    """

    name = "local"
    keeps_last_use = True

    def __init__(
        self,
        store: CacheStore,
        landed: Callable[[str], Awaitable[StoredEntry | None]] | None = None,
    ) -> None:
        self._store = store
        self._landed = landed

    @property
    def where(self) -> str:
        return str(self._store.path)

    async def get(self, key: str, now: float) -> StoredEntry | None:
        entry = self._store.get(key, now)  # inline: see the module docstring
        if entry is None and self._landed is not None:
            entry = await self._landed(key)
        return entry

    async def stats(self, now: float) -> TierStats:
        stats, infos = await trio.to_thread.run_sync(self._counted)
        return replace(
            TierStats.of(stats.path, infos, stats.bytes, now),
            entries=stats.entries,  # LMDB's own count, as before the tiers had a protocol
            max_bytes=stats.max_bytes,
            map_size=stats.map_size,
            schema_version=stats.schema_version,
        )

    def _counted(self) -> tuple[StoreStats, list[EntryInfo]]:
        return self._store.stats(), list(self._store.entries())

    async def scan(self) -> list[EntryInfo]:
        return await trio.to_thread.run_sync(lambda: list(self._store.entries()))

    async def peek(self, key: str) -> StoredEntry | None:
        return self._store.peek(key)

    async def purge(self, *, older_than: float | None, now: float) -> int:
        return await trio.to_thread.run_sync(
            lambda: self._store.purge(older_than=older_than, now=now)
        )


@dataclass(frozen=True, slots=True)
class Found:
    """What a lookup across the tiers found."""

    entry: StoredEntry | None  # a usable entry, or None
    tier: int  # the index of the tier that answered (0: tier 1); -1 when none did
    stale: bool  # a tier asked before held an entry too old for the request


async def look_up(
    tiers: Sequence[CacheTier], key: str, now: float, usable: Callable[[StoredEntry], bool]
) -> Found:
    """Ask the tiers in order; the first usable entry wins. An entry that is not ``usable``
    (older than the request accepts) is passed over for the next tier, and remembered."""
    stale = False
    for index, tier in enumerate(tiers):
        entry = await tier.get(key, now)
        if entry is None:
            continue
        if usable(entry):
            return Found(entry, index, stale)
        stale = True
    return Found(None, -1, stale)
