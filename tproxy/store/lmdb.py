"""Tier 1 of the cache: finished answers kept in LMDB; the only module that imports lmdb.

:class:`LmdbStore` holds one LMDB environment. Everything here is plain synchronous code, and
the caller decides which thread runs it (:class:`tproxy.store.tiers.LocalTier` is the async tier
around it):

- :meth:`LmdbStore.get` runs inline on the event loop. A read is a memory-mapped lookup taking
  microseconds, so it costs less than a hop to a thread would. It writes nothing: a hit is noted
  in memory and the note reaches the disk with the next write.
- Every write (:meth:`~LmdbStore.put_many`, :meth:`~LmdbStore.delete`,
  :meth:`~LmdbStore.purge`, :meth:`~LmdbStore.flush_touches`) is one LMDB write transaction that
  waits for the disk, so callers run it in a worker thread, one whole operation per call.

The environment holds four named databases::

    entries     key -> encoded StoredEntry (tproxy.core.entry)
    entry_info  key -> created_at, expires_at, last_used_at, size, status, flags, model
    lru         last_used_at (big-endian f64) + key -> b""      oldest first, for eviction
    meta        b"schema_version", b"total_bytes", b"max_total_bytes"

An entry's three records and the running byte total change in the same transaction, so they
always agree; :meth:`LmdbStore.verify` checks that they do (``tproxy cache verify``, the rules in
:mod:`tproxy.store.verify`). A full map or a full file system costs entries (evicted, or the
batch skipped and counted in :class:`PutResult`), never an exception out of ``put_many``.
docs/store.md explains the durability setting, the map sizing and the numbers measured for them.

Longer than ~500 lines on purpose: it is one class around one environment, and every line that
opens a transaction or catches an LMDB error belongs here, where lmdb is imported.
"""

from __future__ import annotations

import errno
import logging
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar, cast

import lmdb
import lmdb.verify

from tproxy.core.entry import StoredEntry, decode_entry, encode_entry
from tproxy.core.errors import CorruptEntry, StoreError
from tproxy.store.decoded import DecodedEntries
from tproxy.store.records import (
    MAX_KEY_BYTES,
    STAMP,
    EntryInfo,
    PutOutcome,
    PutResult,
    StoreStats,
    VerifyReport,
    decode_info,
    encode_info,
    info_of,
    stored_size,
)
from tproxy.store.verify import check_records, structure_report

log = logging.getLogger("tproxy.store")

SCHEMA_VERSION = 1
MIB = 1 << 20
DEFAULT_MAP_HEADROOM = 64 * MIB
MAX_READERS = 512
_MIN_MAP_SIZE = 256 * 1024

_ENTRIES = b"entries"
_ENTRY_INFO = b"entry_info"
_LRU = b"lru"
_META = b"meta"
_SCHEMA_KEY = b"schema_version"
_TOTAL_KEY = b"total_bytes"
_MAX_TOTAL_KEY = b"max_total_bytes"

_U64 = struct.Struct(">Q")

# Bounds on retries: another process growing the map, and a full map that eviction must clear.
_RESIZE_ATTEMPTS = 3
_MAP_FULL_ATTEMPTS = 6
# After the file system refused a commit: this many rounds of eviction, then the batch is skipped.
# Fewer than for a full map, because a disk filled by someone else is not ours to empty.
_DISK_FULL_EVICTIONS = 2
# Transactions one round of eviction may take (each evicts twice as many entries as the last).
_EVICTION_STEPS = 32

# A commit the file system refused for lack of room. py-lmdb raises DiskError for ENOSPC but a
# plain Error, with only the C library's message, for any other errno, and LMDB reports a write
# cut short by a full disk as EIO; os.strerror gives the same messages.
_NO_SPACE_MESSAGES = tuple(
    os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
)

# lmdb.verify (py-lmdb >= 3.0) walks the data file's pages without the engine; unannotated.
_verify_pages = cast(Callable[[str], list[str]], lmdb.verify.verify)
_VERIFY_ATTEMPTS = 5

# The LMDB errors that mean "these files are not a store we can read", as opposed to a
# transient problem (permissions, a second open in this process) that must not cost the data.
_NOT_OURS = (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError)

_T = TypeVar("_T")


class _DiskFullError(Exception):
    """The file system refused the pages a commit needed (no space, quota, a short write)."""


class _IncompatibleStoreError(Exception):
    """The directory holds something this schema cannot read; ``label`` names what."""

    def __init__(self, label: str) -> None:
        self.label = label
        super().__init__(label)


class LmdbStore:
    """A :class:`CacheStore` in one LMDB environment at ``path``.

    Open a path once per process (LMDB's rule); several processes may share it. The map is
    sized ``max_total_bytes + map_headroom`` and may grow to ``2 * max_total_bytes +
    map_headroom``. A directory written by another schema version is renamed to
    ``<path>.incompatible-<version>-<timestamp>`` and a fresh store is created in its place.

    Thread safety: :meth:`get` may run on the event loop while one or more worker threads
    write; writes are serialized by a lock. Raises :class:`StoreError` when LMDB fails.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_total_bytes: int,
        max_entry_bytes: int,
        map_headroom: int = DEFAULT_MAP_HEADROOM,
    ) -> None:
        self._setup(path, max_total_bytes, max_entry_bytes, map_headroom, readonly=False)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._env = self._open_compatible()
        except _IncompatibleStoreError as problem:
            self._move_aside(problem.label)
            path.mkdir(mode=0o700)
            self._env = self._open_compatible()
        self._open_databases(create=True)
        self._record_limits()

    @classmethod
    def open_existing(cls, path: Path, *, readonly: bool = True) -> LmdbStore:
        """Open a store that must already exist, for maintenance commands.

        Never creates a directory and never moves a store aside: a missing or incompatible
        store raises :class:`StoreError`. The byte cap is the one the server recorded.
        ``readonly`` stores refuse writes and note no hits.
        """
        if not (path / "data.mdb").is_file():
            raise StoreError(f"no cache store at {path}")
        store = cls.__new__(cls)
        store._setup(path, 0, 0, DEFAULT_MAP_HEADROOM, readonly=readonly)
        try:
            store._env = store._open_env(0)  # 0 adopts the size recorded in the file
            version = store._schema_version()
        except lmdb.Error as error:
            raise StoreError(f"cannot open the cache store at {path}: {error}") from error
        if version != SCHEMA_VERSION:
            store._env.close()
            raise StoreError(
                f"the cache store at {path} has schema version {version}; "
                f"this tproxy reads version {SCHEMA_VERSION}"
            )
        store._open_databases(create=False)
        with store._env.begin() as txn:
            recorded = txn.get(_MAX_TOTAL_KEY, db=store._meta)
        if recorded is not None:
            store._max_total_bytes = _U64.unpack(recorded)[0]
        store._map_bound = max(store._map_bound, store._env.info()["map_size"])
        return store

    def _setup(
        self,
        path: Path,
        max_total_bytes: int,
        max_entry_bytes: int,
        map_headroom: int,
        *,
        readonly: bool,
    ) -> None:
        self._path = path
        self._readonly = readonly
        self._max_total_bytes = max_total_bytes
        self._max_entry_bytes = max_entry_bytes
        self._initial_map = _round_to_page(max_total_bytes + map_headroom)
        self._map_bound = _round_to_page(2 * max_total_bytes + map_headroom)
        # Held around every read transaction and every remap, so a remap never pulls the map
        # out from under a reader of this process.
        self._remap_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._touched: dict[bytes, float] = {}
        self._corrupt: set[bytes] = set()
        self._decoded = DecodedEntries()
        self._hits = 0
        self._misses = 0
        self._expired = 0
        self._evictions = 0
        self._closed = False

    # -- opening -------------------------------------------------------------------------

    def _open_env(self, map_size: int) -> lmdb.Environment:
        return lmdb.open(
            str(self._path),
            map_size=map_size,
            max_dbs=4,
            max_readers=MAX_READERS,
            max_spare_txns=1,
            mode=0o600,
            readonly=self._readonly,
            create=False,
            sync=True,
            metasync=False,  # docs/store.md: one fsync per commit, integrity kept on power loss
            readahead=False,
        )

    def _open_compatible(self) -> lmdb.Environment:
        """Open the environment at our path; _IncompatibleStoreError if we must not use it."""
        try:
            env = self._open_env(self._initial_map)
        except _NOT_OURS as error:
            raise _IncompatibleStoreError("unreadable") from error
        except lmdb.Error as error:
            raise StoreError(f"cannot open the cache store at {self._path}: {error}") from error
        self._env = env
        try:
            version = self._schema_version()
        except _NOT_OURS as error:
            env.close()
            raise _IncompatibleStoreError("unreadable") from error
        except lmdb.Error as error:
            env.close()
            raise StoreError(f"cannot read the cache store at {self._path}: {error}") from error
        if version is None:
            self._initialize_schema()
        elif version != SCHEMA_VERSION:
            env.close()
            raise _IncompatibleStoreError(str(version))
        return env

    def _schema_version(self) -> int | str | None:
        """The stored schema version; None for an empty environment; "unknown" if foreign."""
        with self._env.begin() as txn, txn.cursor() as cursor:
            names = [bytes(name) for name, _ in cursor]
        if not names:
            return None
        if _META not in names:
            return "unknown"
        try:
            meta = self._env.open_db(_META, create=False)
        except lmdb.IncompatibleError:
            return "unknown"
        with self._env.begin() as txn:
            raw = txn.get(_SCHEMA_KEY, db=meta)
        if raw is None or len(raw) != _U64.size:
            return "unknown"
        version: int = _U64.unpack(raw)[0]
        return version

    def _initialize_schema(self) -> None:
        meta = self._env.open_db(_META, create=True)
        with self._env.begin(write=True) as txn:
            txn.put(_SCHEMA_KEY, _U64.pack(SCHEMA_VERSION), db=meta)
            txn.put(_TOTAL_KEY, _U64.pack(0), db=meta)

    def _open_databases(self, *, create: bool) -> None:
        try:
            self._entries = self._env.open_db(_ENTRIES, create=create)
            self._info = self._env.open_db(_ENTRY_INFO, create=create)
            self._lru = self._env.open_db(_LRU, create=create)
            self._meta = self._env.open_db(_META, create=create)
        except lmdb.Error as error:
            self._env.close()
            raise StoreError(f"the cache store at {self._path} is incomplete: {error}") from error

    def _record_limits(self) -> None:
        """Note the byte cap on disk, so `tproxy cache stats` can show it.

        Writes only when it changed: a restart with the same settings writes nothing, so it
        needs no room on a full disk.
        """
        packed = _U64.pack(self._max_total_bytes)
        if self._read(lambda txn: txn.get(_MAX_TOTAL_KEY, db=self._meta)) != packed:
            self._write_or_fail(lambda txn: txn.put(_MAX_TOTAL_KEY, packed, db=self._meta))

    def _move_aside(self, label: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self._path.with_name(f"{self._path.name}.incompatible-{label}-{stamp}")
        for attempt in range(1, 100):
            if not target.exists():
                break
            target = target.with_name(f"{target.name}-{attempt}")
        log.warning(
            "cache store at %s was written by schema %s, not %s: moved it to %s, starting empty",
            self._path,
            label,
            SCHEMA_VERSION,
            target,
        )
        self._path.rename(target)

    @property
    def path(self) -> Path:
        """The store's directory."""
        return self._path

    # -- reading -------------------------------------------------------------------------

    def get(self, key: str, now: float) -> StoredEntry | None:
        """The entry under ``key`` unless missing, expired or undecodable (all count as misses).

        Never raises: a store that cannot be read is logged and answers a miss.
        """
        key_bytes = key.encode()
        if len(key_bytes) > MAX_KEY_BYTES:
            self._misses += 1
            return None
        try:
            raw = self._read(lambda txn: txn.get(key_bytes, db=self._entries))
        except StoreError:
            log.warning("cache store read failed; answering a miss", exc_info=True)
            raw = None
        if raw is None:
            self._misses += 1
            return None
        try:
            entry = self._decoded.decode(raw)
        except CorruptEntry as error:
            log.warning("cache entry %s is corrupt (%s); it will be removed", key, error)
            with self._pending_lock:
                self._corrupt.add(key_bytes)
            self._misses += 1
            return None
        if entry.expires_at <= now:
            self._expired += 1
            self._misses += 1
            return None
        self._hits += 1
        if not self._readonly:
            with self._pending_lock:
                self._touched[key_bytes] = now
        return entry

    def peek(self, key: str) -> StoredEntry | None:
        """The entry under ``key`` whatever its expiry, noting nothing; raises CorruptEntry."""
        key_bytes = key.encode()
        raw = self._read(lambda txn: txn.get(key_bytes, db=self._entries))
        return None if raw is None else decode_entry(raw)

    def entries(self) -> Iterator[EntryInfo]:
        """Every entry's metadata, in key order, read in one transaction before yielding."""

        def collect(txn: lmdb.Transaction[bytes]) -> list[EntryInfo]:
            with txn.cursor(db=self._info) as cursor:
                return [decode_info(bytes(key), bytes(raw)) for key, raw in cursor]

        infos = self._read(collect)
        with self._pending_lock:
            touched = dict(self._touched)
        for info in infos:
            last_used = touched.get(info.key.encode(), info.last_used_at)
            yield replace(info, last_used_at=max(info.last_used_at, last_used))

    def stats(self) -> StoreStats:
        def count(txn: lmdb.Transaction[bytes]) -> tuple[int, int]:
            return txn.stat(self._entries)["entries"], _read_u64(txn, _TOTAL_KEY, self._meta)

        entries, total = self._read(count)
        return StoreStats(
            path=str(self._path),
            entries=entries,
            bytes=total,
            max_bytes=self._max_total_bytes,
            map_size=self._env.info()["map_size"],
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            expired=self._expired,
            schema_version=SCHEMA_VERSION,
        )

    def verify(self, now: float) -> VerifyReport:
        """Check the whole store and report every problem found; change nothing.

        First LMDB's own structure: every page of the data file reachable from the last commit,
        walked without the engine (``lmdb.verify``), so a damaged file is reported instead of
        crashing the walk that follows. Then, only if that is sound, every entry: it decodes,
        it has its ``entry_info`` record with the same size, times, status, kind and model, and
        its ``lru`` record; no record points to a missing entry; ``total_bytes`` is the sum.

        Everything runs under one read transaction, which keeps the pages of the snapshot
        checked from being reused by a writer meanwhile, so a serving store can be checked.
        Raises StoreError when the store cannot be read at all.
        """
        return self._read(lambda txn: self._verify(txn, now))

    def _structure_problems(self) -> list[str]:
        """What the page walk finds, from a walk no commit overlapped.

        The walk reads the data file itself, beside the engine: a commit made while it reads
        (by this process or another) shows as pages beyond the end of the file. A walk that
        overlapped a commit is done again; a store that never stands still long enough is
        reported sound rather than damaged, with a warning.
        """
        for _ in range(_VERIFY_ATTEMPTS):
            before = self._env.info()["last_txnid"]
            try:
                problems = _verify_pages(str(self._path))
            except (lmdb.verify.VerifyError, OSError) as error:
                problems = [str(error)]
            if not problems or self._env.info()["last_txnid"] == before:
                return problems
        log.warning(
            "store %s: written during every structure check; pages not verified", self._path
        )
        return []

    def _verify(self, txn: lmdb.Transaction[bytes], now: float) -> VerifyReport:
        structure = self._structure_problems()
        if structure:
            return structure_report(str(self._path), structure)
        with (
            txn.cursor(db=self._entries) as entries,
            txn.cursor(db=self._info) as infos,
            txn.cursor(db=self._lru) as lru,
        ):
            return check_records(
                str(self._path),
                ((bytes(key), value) for key, value in entries),
                ((bytes(key), bytes(raw)) for key, raw in infos),
                (bytes(lru_key) for lru_key, _ in lru),
                _read_u64(txn, _TOTAL_KEY, self._meta),
                now,
            )

    def _read(self, operation: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        """Run ``operation`` in a read transaction; adopt a map another process has grown."""
        for _ in range(_RESIZE_ATTEMPTS):
            with self._remap_lock:
                try:
                    with self._env.begin() as txn:
                        return operation(txn)
                except lmdb.MapResizedError:
                    self._adopt_map_size()
                except lmdb.Error as error:
                    raise StoreError(f"cache store read failed: {error}") from error
        raise StoreError("the cache store's map kept changing size during a read")

    def _adopt_map_size(self) -> None:
        """Take the size another process gave the map (caller holds the remap lock)."""
        try:
            self._env.set_mapsize(0)
        except lmdb.Error as error:
            raise StoreError(f"could not adopt the cache store's new map size: {error}") from error

    # -- writing -------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, StoredEntry]], now: float) -> PutResult:
        """Store ``items`` in one write transaction, evicting least recently used entries first.

        Entries whose body exceeds ``max_entry_bytes`` (or whose encoding exceeds the total cap,
        or whose key exceeds MAX_KEY_BYTES) are skipped. Pending hit notes and removals of
        corrupt values are applied in the same transaction. Blocks; raises StoreError.
        """
        batch: list[tuple[bytes, bytes, StoredEntry]] = []
        fits: list[bool] = []
        for key, entry in items:
            key_bytes = key.encode()
            value = encode_entry(entry)
            fits.append(
                entry.body_size <= self._max_entry_bytes
                and len(value) <= self._max_total_bytes
                and len(key_bytes) <= MAX_KEY_BYTES
            )
            if fits[-1]:
                batch.append((key_bytes, value, entry))
        too_large = len(items) - len(batch)

        def outcomes(of_batch: PutOutcome) -> tuple[PutOutcome, ...]:
            return tuple(of_batch if fit else PutOutcome.TOO_LARGE for fit in fits)

        incoming = sum(len(value) for _, value, _ in batch)
        with self._write_lock:
            touched, corrupt = self._take_pending()
            made_room = 0
            disk_full = 0
            for attempt in range(_MAP_FULL_ATTEMPTS):
                if disk_full > _DISK_FULL_EVICTIONS:
                    break
                if attempt:
                    made_room += self._make_room(
                        incoming, last_resort=attempt > 3 and not disk_full, disk_full=disk_full > 0
                    )
                try:
                    stored, evicted = self._write(
                        lambda txn: self._put_batch(txn, batch, touched, corrupt, now)
                    )
                except lmdb.MapFullError:
                    continue
                except _DiskFullError as error:
                    disk_full += 1
                    if disk_full == 1:
                        log.warning(
                            "cache store: the file system refused a write (%s); evicting the"
                            " least recently used entries to make room",
                            error,
                        )
                    continue
                self._evictions += evicted + made_room
                return PutResult(
                    stored,
                    too_large,
                    evicted + made_room,
                    disk_full=disk_full,
                    outcomes=outcomes(PutOutcome.WRITTEN),
                )
            self._evictions += made_room
        where = "the file system stayed full" if disk_full else "cache store map stayed full"
        log.warning("%s; %d cache entries not stored", where, len(batch))
        return PutResult(
            0,
            too_large,
            made_room,
            skipped_no_room=len(batch),
            disk_full=disk_full,
            outcomes=outcomes(PutOutcome.DISK_FULL if disk_full else PutOutcome.MAP_FULL),
        )

    def flush_touches(self) -> int:
        """Write the pending hit notes (and corrupt-value removals) now; returns how many.

        put_many applies them anyway; call this from the writer thread when no put is coming,
        e.g. on an idle timer. Blocks.
        """
        with self._write_lock:
            touched, corrupt = self._take_pending()
            if not touched and not corrupt:
                return 0
            try:
                self._write(lambda txn: self._apply_pending(txn, touched, corrupt))
            except (lmdb.MapFullError, _DiskFullError) as error:
                log.warning("cache store full (%s); %d hit notes dropped", error, len(touched))
                return 0
            return len(touched) + len(corrupt)

    def delete(self, key: str) -> bool:
        """Remove the entry under ``key``; False if there was none. Blocks."""
        key_bytes = key.encode()

        def remove(txn: lmdb.Transaction[bytes]) -> bool:
            size = self._remove(txn, key_bytes)
            if size is None:
                return False
            _add_total(txn, -size, self._meta)
            return True

        with self._write_lock:
            with self._pending_lock:
                self._touched.pop(key_bytes, None)
            return self._write_or_fail(remove)

    def purge(self, *, older_than: float | None, now: float) -> int:
        """Remove expired entries and, with ``older_than`` seconds, those at least that old.

        ``older_than=None`` removes everything. Returns how many entries went. Blocks.
        """

        def sweep(txn: lmdb.Transaction[bytes]) -> int:
            if older_than is None:
                removed = txn.stat(self._entries)["entries"]
                for db in (self._entries, self._info, self._lru):
                    txn.drop(db, delete=False)
                txn.put(_TOTAL_KEY, _U64.pack(0), db=self._meta)
                return removed
            with txn.cursor(db=self._info) as cursor:
                doomed = [
                    bytes(key)
                    for key, raw in cursor
                    if _doomed(decode_info(bytes(key), bytes(raw)), older_than, now)
                ]
            freed = 0
            for key in doomed:
                freed += self._remove(txn, key) or 0
            _add_total(txn, -freed, self._meta)
            return len(doomed)

        with self._write_lock:
            return self._write_or_fail(sweep)

    def close(self) -> None:
        """Write pending hit notes, then close. Later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if not self._readonly:
            try:
                self.flush_touches()
            except StoreError:
                log.warning("could not save cache hit notes on close", exc_info=True)
        self._env.close()

    def _write_or_fail(self, operation: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        try:
            return self._write(operation)
        except lmdb.MapFullError as error:
            raise StoreError(f"cache store map is full: {error}") from error
        except _DiskFullError as error:
            raise StoreError(f"no room for the cache store's write: {error}") from error

    def _write(self, operation: Callable[[lmdb.Transaction[bytes]], _T]) -> _T:
        """Run ``operation`` in one write transaction. MapFullError passes through, a commit the
        file system refused becomes _DiskFullError, other LMDB failures StoreError. A failed
        transaction is aborted whole: nothing of it is visible."""
        if self._readonly:
            raise StoreError(f"the cache store at {self._path} was opened read-only")
        for _ in range(_RESIZE_ATTEMPTS):
            try:
                with self._env.begin(write=True) as txn:
                    return operation(txn)
            except lmdb.MapResizedError:
                with self._remap_lock:
                    self._adopt_map_size()
            except lmdb.MapFullError:
                raise
            except lmdb.Error as error:
                if isinstance(error, lmdb.DiskError) or str(error).endswith(_NO_SPACE_MESSAGES):
                    raise _DiskFullError(str(error)) from error
                raise StoreError(f"cache store write failed: {error}") from error
        raise StoreError("the cache store's map kept changing size during a write")

    def _take_pending(self) -> tuple[dict[bytes, float], set[bytes]]:
        with self._pending_lock:
            touched, self._touched = self._touched, {}
            corrupt, self._corrupt = self._corrupt, set()
        return touched, corrupt

    def _put_batch(
        self,
        txn: lmdb.Transaction[bytes],
        batch: list[tuple[bytes, bytes, StoredEntry]],
        touched: dict[bytes, float],
        corrupt: set[bytes],
        now: float,
    ) -> tuple[int, int]:
        self._apply_pending(txn, touched, corrupt)
        total = _read_u64(txn, _TOTAL_KEY, self._meta)
        evicted = 0
        for key, value, entry in batch:
            total -= self._remove(txn, key) or 0
            freed, count = self._evict(txn, needed=total + len(value) - self._max_total_bytes)
            total -= freed
            evicted += count
            info = info_of(key, entry, last_used_at=max(now, 0.0), size=len(value))
            txn.put(key, value, db=self._entries)
            txn.put(key, encode_info(info), db=self._info)
            txn.put(STAMP.pack(info.last_used_at) + key, b"", db=self._lru)
            total += len(value)
        txn.put(_TOTAL_KEY, _U64.pack(total), db=self._meta)
        return len(batch), evicted

    def _evict(
        self, txn: lmdb.Transaction[bytes], *, needed: int, most: float = math.inf
    ) -> tuple[int, int]:
        """Remove least recently used entries until ``needed`` bytes are freed, or ``most``
        entries went; returns the bytes freed and the entries removed."""
        if needed <= 0:
            return 0, 0
        victims: list[bytes] = []
        with txn.cursor(db=self._lru) as cursor:
            planned = 0
            for lru_key, _ in cursor:
                if planned >= needed or len(victims) >= most:
                    break
                key = bytes(lru_key[STAMP.size :])
                info = txn.get(key, db=self._info)
                planned += stored_size(info) if info is not None else 0
                victims.append(key)
        freed = 0
        for key in victims:
            freed += self._remove(txn, key) or 0
        return freed, len(victims)

    def _apply_pending(
        self, txn: lmdb.Transaction[bytes], touched: dict[bytes, float], corrupt: set[bytes]
    ) -> None:
        for key, used in touched.items():
            raw = txn.get(key, db=self._info)
            if raw is None:
                continue
            info = decode_info(key, raw)
            if used <= info.last_used_at:
                continue
            txn.delete(STAMP.pack(info.last_used_at) + key, db=self._lru)
            txn.put(STAMP.pack(used) + key, b"", db=self._lru)
            txn.put(key, encode_info(replace(info, last_used_at=used)), db=self._info)
        freed = 0
        for key in corrupt:
            value = txn.get(key, db=self._entries)
            if value is None:
                continue
            try:
                decode_entry(value)
            except CorruptEntry:
                freed += self._remove(txn, key) or 0
        if freed:
            _add_total(txn, -freed, self._meta)

    def _remove(self, txn: lmdb.Transaction[bytes], key: bytes) -> int | None:
        """Delete an entry's three records; its stored size, or None if it was not there."""
        raw = txn.get(key, db=self._info)
        txn.delete(key, db=self._entries)
        if raw is None:
            return None
        info = decode_info(key, raw)
        txn.delete(key, db=self._info)
        txn.delete(STAMP.pack(info.last_used_at) + key, db=self._lru)
        return info.size

    def _make_room(self, incoming: int, *, last_resort: bool, disk_full: bool) -> int:
        """After MapFullError: grow the map while under its bound, else evict the batch's size
        plus the oldest quarter (everything, as a last resort); returns how many entries went.
        Eviction runs in growing transactions (:meth:`_evict_in_steps`).

        After a refusal by the file system (``disk_full``) only eviction helps, and an eighth is
        evicted: the pages it frees are reused instead of new ones at the end of the file, but
        only from the commit after next (LMDB keeps the previous snapshot whole), so the batch
        usually needs two rounds.
        """
        current = self._env.info()["map_size"]
        if not disk_full and current < self._map_bound:
            size = min(self._map_bound, _round_to_page(max(2 * current, current + 2 * incoming)))
            log.info("cache store map full at %d bytes; growing it to %d", current, size)
            with self._remap_lock:
                self._adopt_size(size)
            return 0
        if not disk_full:
            log.info("cache store map full at its bound (%d bytes); evicting to make room", current)
        if last_resort:
            try:
                return self._write(self._clear)
            except (lmdb.MapFullError, _DiskFullError):
                return 0
        total = self._read(lambda txn: _read_u64(txn, _TOTAL_KEY, self._meta))
        share = total // 8 if disk_full else total // 4
        return self._evict_in_steps(max(incoming, 1) + share)

    def _clear(self, txn: lmdb.Transaction[bytes]) -> int:
        removed: int = txn.stat(self._entries)["entries"]
        for db in (self._entries, self._info, self._lru):
            txn.drop(db, delete=False)
        txn.put(_TOTAL_KEY, _U64.pack(0), db=self._meta)
        return removed

    def _evict_and_count(
        self, txn: lmdb.Transaction[bytes], *, needed: int, most: int
    ) -> tuple[int, int]:
        freed, count = self._evict(txn, needed=needed, most=most)
        _add_total(txn, -freed, self._meta)
        return freed, count

    def _evict_in_steps(self, needed: int) -> int:
        """Evict the least recently used entries until ``needed`` bytes went, in transactions
        of 1, 2, 4... entries; returns how many went.

        A transaction that removes many entries needs many new pages for its copies of the
        B-tree pages it changes, and a full map or file has few to give: the pages a commit
        frees are reusable only from the commit after next, and less while readers hold older
        snapshots. One entry needs a handful, and each commit frees more pages than it used, so
        the next step may take twice as many. A step refused for room is retried with half as
        many entries; when even one entry cannot go, nothing more can be done here.
        """
        freed = evicted = 0
        count = 1
        for _ in range(_EVICTION_STEPS):
            if freed >= needed:
                break
            step = partial(self._evict_and_count, needed=needed - freed, most=count)
            try:
                step_freed, step_count = self._write(step)
            except (lmdb.MapFullError, _DiskFullError):
                if count == 1:
                    log.warning(
                        "cache store at %s: no room left even to remove one entry; answers are"
                        " not stored until its file system has free space (or its map grows)",
                        self._path,
                    )
                    break
                count //= 2
                continue
            if not step_count:
                break
            freed += step_freed
            evicted += step_count
            count *= 2
        return evicted

    def _adopt_size(self, size: int) -> None:
        try:
            self._env.set_mapsize(size)
        except lmdb.Error as error:
            raise StoreError(f"could not grow the cache store's map: {error}") from error


def _doomed(info: EntryInfo, older_than: float, now: float) -> bool:
    return info.expires_at <= now or now - info.created_at >= older_than


def _read_u64(txn: lmdb.Transaction[bytes], key: bytes, db: lmdb._Database) -> int:
    raw = txn.get(key, db=db)
    value: int = _U64.unpack(raw)[0] if raw is not None else 0
    return value


def _add_total(txn: lmdb.Transaction[bytes], delta: int, meta: lmdb._Database) -> None:
    total = max(0, _read_u64(txn, _TOTAL_KEY, meta) + delta)
    txn.put(_TOTAL_KEY, _U64.pack(total), db=meta)


def _round_to_page(size: int) -> int:
    """A map size LMDB accepts: whole pages, and room for its own bookkeeping pages."""
    return max(_MIN_MAP_SIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
