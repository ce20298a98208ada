"""Tier 2 of the cache: finished answers in Valkey/Redis for a fleet.

Tier 1 is the local LMDB store (:mod:`tproxy.store.lmdb`); this is tier 2, asked when tier 1 has
no usable entry (:func:`tproxy.store.tiers.look_up`). :class:`SharedTier` is the proxy's
(a :class:`~tproxy.store.tiers.CacheTier`), :class:`SharedAdmin` the cache commands' (a
:class:`~tproxy.store.tiers.TierAdmin`). Both talk to the server through
:mod:`tproxy.store.redis`, the connection; this module is what they send when, and what they
count. The tier is an optimisation, never a dependency, so nothing here may cost a client more
than ``shared_store.lookup_timeout``:

- :meth:`SharedTier.get` runs under its own deadline; a timeout, an error, a missing, torn or
  foreign value are all a miss. A :class:`~tproxy.core.breaker.CircuitBreaker` stops asking a
  failing tier (one refused connection opens it, as do ``breaker_failures`` errors in a row) and
  lets one request probe it again after ``breaker_reset`` seconds.
- :meth:`SharedTier.submit` never waits: the entry joins a bounded queue (dropped and counted
  when full) that :meth:`SharedTier.serve` writes, one ``SET key value PX ttl`` per entry, each
  under ``write_timeout``.
- Values use the self-checking encoding of LMDB entries (:mod:`tproxy.core.entry`); the server
  expires them (``PX``), so no sweep is needed. One key per entry and no multi-key command: the
  same code works on a Redis Cluster.

A server that is down when tproxy starts is logged and tproxy serves without it; the breaker
keeps probing, so the tier comes back by itself.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio
from trio_util import AsyncValue

from tproxy.config import SharedStoreSettings
from tproxy.core.breaker import BreakerState, CircuitBreaker, Outcome
from tproxy.core.entry import StoredEntry, decode_entry, encode_entry
from tproxy.core.errors import CorruptEntry
from tproxy.store.records import EntryInfo, info_of
from tproxy.store.redis import (
    NO_PASSWORDS,
    AdminConnection,
    Passwords,
    SharedConnection,
    describe,
    open_admin_connection,
    read_passwords,
)
from tproxy.store.tiers import TierStats

log = logging.getLogger("tproxy.shared_store")

# Upper bounds (seconds) of the lookup latency histogram's buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

# Lookups by result and writes by outcome, in the order /metrics lists them.
LOOKUP_RESULTS = ("hit", "miss", "error", "timeout", "skipped")
WRITE_OUTCOMES = ("written", "dropped", "too_large", "failed", "skipped")


@dataclass(frozen=True, slots=True)
class SharedStatistics:
    """Counts of this process since it started, and the breaker's state now."""

    lookups: dict[str, int]  # by LOOKUP_RESULTS
    writes: dict[str, int]  # by WRITE_OUTCOMES
    bytes_written: int
    breaker: BreakerState
    latency_buckets: tuple[int, ...]  # cumulative counts, one per LATENCY_BUCKETS, then +Inf
    latency_sum: float
    queued: int


class SharedTier:
    """Tier 2 on one connection: deadline-bound lookups and a queue of writes.

    :meth:`connect` holds the connection open and :meth:`serve` writes; :func:`open_shared_tier`
    runs both. Raises ConfigError when ``ca_file`` cannot be used.
    """

    name = "shared"

    def __init__(self, settings: SharedStoreSettings, passwords: Passwords = NO_PASSWORDS) -> None:
        self._settings = settings
        self._connection = SharedConnection(settings, passwords)
        self._breaker = CircuitBreaker(
            threshold=settings.breaker_failures, reset_after=settings.breaker_reset
        )
        self._send, self._receive = trio.open_memory_channel[tuple[str, StoredEntry]](
            settings.queue_size
        )
        self._lookups: Counter[str] = Counter()
        self._writes: Counter[str] = Counter()
        self._bytes_written = 0
        self._latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._submitted = 0
        self._handled = AsyncValue(0)

    async def get(self, key: str, now: float) -> StoredEntry | None:
        """The live entry under ``key``, or None: missing, expired, undecodable, failed, late."""
        if not self._breaker.admit(trio.current_time()):
            self._lookups["skipped"] += 1
            return None
        started = trio.current_time()
        with trio.move_on_after(self._settings.lookup_timeout) as deadline:
            outcome, raw = await self._connection.get(_redis_key(self._settings, key))
        self._observe(trio.current_time() - started)
        if deadline.cancelled_caught:
            self._lookups["timeout"] += 1
            self._connection.last_error = TimeoutError("a lookup took longer than lookup_timeout")
            self._report(Outcome.FAILED)
            return None
        self._report(outcome)
        if outcome is not Outcome.SUCCEEDED:
            self._lookups["error"] += 1
            return None
        entry = _live_entry(key, raw, now)
        self._lookups["hit" if entry is not None else "miss"] += 1
        return entry

    def submit(self, key: str, entry: StoredEntry) -> bool:
        """Queue ``entry`` for the tier without waiting; False when the queue was full."""
        try:
            self._send.send_nowait((key, entry))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._writes["dropped"] += 1
            return False
        self._submitted += 1
        return True

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued entries until :meth:`close` is called and the queue is drained."""
        task_status.started()
        async with self._receive:
            async for key, entry in self._receive:
                self._writes[await self._write(key, entry)] += 1
                self._handled.value += 1

    async def _write(self, key: str, entry: StoredEntry) -> str:
        value = encode_entry(entry)
        if len(value) > self._settings.max_entry_bytes:
            log.info(
                "not sharing %s: %d bytes encoded, over shared_store.max_entry_bytes (%d)",
                key,
                len(value),
                self._settings.max_entry_bytes,
            )
            return "too_large"
        remaining = entry.expires_at - time.time()
        if remaining <= 0:
            return "skipped"
        if not self._breaker.admit(trio.current_time()):
            return "skipped"
        expiry = max(1, math.ceil(remaining * 1000)) if math.isfinite(remaining) else None
        with trio.move_on_after(self._settings.write_timeout) as deadline:
            outcome = await self._connection.set(_redis_key(self._settings, key), value, px=expiry)
        if deadline.cancelled_caught:
            self._connection.last_error = TimeoutError("a write took longer than write_timeout")
            self._report(Outcome.FAILED)
            return "failed"
        if outcome is Outcome.SUCCEEDED:
            self._report(outcome)
            self._bytes_written += len(value)
            return "written"
        if outcome is Outcome.UNREACHABLE:
            self._report(outcome)
        else:
            # The server answered (out of memory, read-only replica): it is up, lookups still work.
            log.warning("shared store refused a write of %s: %s", key, self._connection.last_error)
        return "failed"

    def _report(self, outcome: Outcome, *, starting: bool = False) -> None:
        """Tell the breaker; log when the tier starts failing and when it answers again (a
        probe that fails again is only a debug line: one every ``breaker_reset`` while down;
        so is a failure at start, which :meth:`_announce` reports)."""
        before = self._breaker.state
        change = self._breaker.handle(outcome, trio.current_time())
        if change is BreakerState.OPEN:
            log.log(
                logging.WARNING
                if before is BreakerState.CLOSED and not starting
                else logging.DEBUG,
                "shared store is failing (%s); not asking it for %gs",
                self._connection.last_error,
                self._settings.breaker_reset,
            )
        elif change is BreakerState.CLOSED:
            log.info("shared store answers again")

    def _observe(self, seconds: float) -> None:
        self._latency_sum += seconds
        for index, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self._latency[index] += 1
        self._latency[-1] += 1

    async def connect(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the connection open for the tier's life; started once the tier answered a PING
        or was found down (logged either way). A connection that cannot open is tried again
        every ``breaker_reset`` seconds, and the breaker keeps requests from waiting on it."""
        announced = False

        async def opened() -> None:
            nonlocal announced
            if not announced:
                self._announce(await self._ping())
                announced = True
                task_status.started()

        def lost() -> None:
            nonlocal announced
            self._report(Outcome.UNREACHABLE, starting=not announced)
            if not announced:
                self._announce(False)
                announced = True
                task_status.started()

        await self._connection.hold(opened, lost)

    async def _ping(self) -> bool:
        with trio.move_on_after(self._settings.connect_timeout):
            outcome = await self._connection.ping()
            self._report(outcome, starting=True)
            return outcome is Outcome.SUCCEEDED
        self._connection.last_error = TimeoutError("PING took longer than connect_timeout")
        self._report(Outcome.UNREACHABLE, starting=True)
        return False

    def _announce(self, answered: bool) -> None:
        where = describe(self._settings)
        if answered:
            log.info("shared store %s: connected", where)
        else:
            log.warning(
                "shared store %s is down (%s); serving from the local store until it answers",
                where,
                self._connection.last_error,
            )

    def close(self) -> None:
        """Accept no more entries; :meth:`serve` returns once the queue is written."""
        self._send.close()

    async def flush(self) -> None:
        """Wait until every entry submitted so far has been written or given up."""
        target = self._submitted
        await self._handled.wait_value(lambda handled: handled >= target)

    def statistics(self) -> SharedStatistics:
        cumulative = tuple(self._latency)
        return SharedStatistics(
            lookups={result: self._lookups[result] for result in LOOKUP_RESULTS},
            writes={outcome: self._writes[outcome] for outcome in WRITE_OUTCOMES},
            bytes_written=self._bytes_written,
            breaker=self._breaker.state,
            latency_buckets=cumulative,
            latency_sum=self._latency_sum,
            queued=self._submitted - self._handled.value,
        )


def _redis_key(settings: SharedStoreSettings, key: str) -> bytes:
    """The Redis key of the cache key ``key`` (tenants are already part of it)."""
    return (settings.key_prefix + key).encode()


def _live_entry(key: str, raw: bytes | None, now: float) -> StoredEntry | None:
    if raw is None:
        return None
    try:
        entry = decode_entry(raw)
    except CorruptEntry as error:
        log.warning("shared entry %s is not a tproxy entry (%s): a miss", key, error)
        return None
    return entry if entry.expires_at > now else None


@dataclass(frozen=True, slots=True)
class _Found:
    """One value found under the key prefix."""

    key: str  # the cache key, without the prefix
    size: int  # bytes of the encoded value
    entry: StoredEntry | None  # None: not a tproxy entry (foreign, torn or another version)


class SharedAdmin:
    """The shared tier as the cache commands see it (a :class:`~tproxy.store.tiers.TierAdmin`).

    Whole-tier reads and deletes: ``SCAN``, then one single-key command per entry, so it works
    on a Redis Cluster too. Raises SharedStoreUnavailable when a round trip fails or is late.
    Redis keeps no last-use time: it expires entries by their TTL, not by use.
    """

    keeps_last_use = False

    def __init__(self, connection: AdminConnection, settings: SharedStoreSettings) -> None:
        self._connection = connection
        self._settings = settings

    @property
    def where(self) -> str:
        return describe(self._settings)

    async def stats(self, now: float) -> TierStats:
        found = await self._found()
        infos = [_info(item) for item in found if item.entry is not None]
        stored = sum(info.size for info in infos)
        return replace(
            TierStats.of(self.where, infos, stored, now), foreign=len(found) - len(infos)
        )

    async def scan(self) -> list[EntryInfo]:
        return [_info(item) for item in await self._found() if item.entry is not None]

    async def peek(self, key: str) -> StoredEntry | None:
        raw = await self._connection.get(_redis_key(self._settings, key))
        return None if raw is None else decode_entry(raw)

    async def purge(self, *, older_than: float | None, now: float) -> int:
        """``older_than=None`` removes every value under the prefix, tproxy's or not; otherwise
        the entries that old (Redis removes expired ones itself). One ``DEL`` each."""
        doomed = [
            item.key
            for item in await self._found()
            if older_than is None
            or (item.entry is not None and now - item.entry.created_at >= older_than)
        ]
        removed = 0
        for key in doomed:
            removed += await self._connection.delete(_redis_key(self._settings, key))
        return removed

    async def _found(self) -> list[_Found]:
        """Every value under the key prefix (Redis has already dropped the expired ones)."""
        prefix = self._settings.key_prefix.encode()
        found: list[_Found] = []
        for redis_key in await self._connection.keys(prefix):
            raw = await self._connection.get(redis_key)
            if raw is None:
                continue  # expired or deleted since the scan
            try:
                entry: StoredEntry | None = decode_entry(raw)
            except CorruptEntry:
                entry = None
            key = redis_key[len(prefix) :].decode("utf-8", "replace")
            found.append(_Found(key, len(raw), entry))
        return found


def _info(item: _Found) -> EntryInfo:
    """An entry's metadata; its last use is its creation, as Redis keeps none."""
    assert item.entry is not None
    return info_of(
        item.key.encode(), item.entry, last_used_at=item.entry.created_at, size=item.size
    )


@asynccontextmanager
async def open_shared_admin(
    settings: SharedStoreSettings, environ: Mapping[str, str] | None = None
) -> AsyncIterator[SharedAdmin]:
    """The tier for a cache command; raises ConfigError for an unset ``password_env`` or a
    ``ca_file`` that cannot be used."""
    passwords = read_passwords(settings, os.environ if environ is None else environ)
    async with open_admin_connection(settings, passwords) as connection:
        yield SharedAdmin(connection, settings)


@asynccontextmanager
async def open_shared_tier(
    settings: SharedStoreSettings, environ: Mapping[str, str] | None = None
) -> AsyncIterator[SharedTier]:
    """The shared tier, its writer running; on exit the queue gets ``write_timeout`` to drain.

    Raises ConfigError when ``password_env`` names an unset variable or ``ca_file`` cannot be
    used. A tier that cannot be reached is logged, not raised: tproxy serves without it until
    it answers.
    """
    passwords = read_passwords(settings, os.environ if environ is None else environ)
    tier = SharedTier(settings, passwords)
    async with trio.open_nursery() as nursery:
        await nursery.start(tier.connect)
        try:
            async with trio.open_nursery() as writer:
                await writer.start(tier.serve)
                try:
                    yield tier
                finally:
                    tier.close()
                    writer.cancel_scope.deadline = trio.current_time() + settings.write_timeout
        finally:
            nursery.cancel_scope.cancel()
