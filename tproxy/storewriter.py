"""The one task that writes finished answers into the store, off every client's path.

Requests hand a complete entry over with :meth:`StoreWriter.submit`, which never waits: when the
queue is full the entry is dropped and counted, and the client is not slowed. The writer task takes
whatever has queued up and commits it as one batch, in one write transaction, in a worker thread:
an fsync is paid once per batch rather than once per entry, and the event loop never blocks on the
disk. Each entry's :class:`PendingWrite` then tells what the commit did with it (written, or
skipped and why), so logs and metrics report the commit, not the hand-over.

With a shared tier (:mod:`tproxy.store.redis`), :meth:`StoreWriter.submit` hands each entry to
it as well, to its own queue: a completed answer reaches both tiers, and the pipeline, which only
knows the store writer, does not learn about Redis. An entry that came from the shared tier is
copied locally with ``share=False``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import trio

from tproxy.batchqueue import BatchQueue
from tproxy.core.entry import StoredEntry
from tproxy.core.errors import StoreError
from tproxy.store import CacheStore, PutOutcome, SharedTier

log = logging.getLogger("tproxy.store")


@dataclass(frozen=True, slots=True)
class StoreWriterStatistics:
    """Entries by what became of them; every submitted entry ends in exactly one outcome."""

    submitted: int
    written: int
    dropped: int  # the queue was full: never submitted
    failed: int  # the store raised
    batches: int
    evicted: int
    too_large: int = 0
    map_full: int = 0
    disk_full: int = 0

    def outcomes(self) -> dict[str, int]:
        """Each outcome counted per entry, by name, in the order /metrics lists them."""
        return {outcome: getattr(self, outcome) for outcome in STORE_WRITER_OUTCOMES}


# The statistics counted per entry, in the order /metrics lists them.
STORE_WRITER_OUTCOMES = (
    "submitted",
    "written",
    "dropped",
    "failed",
    "too_large",
    "map_full",
    "disk_full",
)


class PendingWrite:
    """One submitted entry: :meth:`wait` returns what its batch's commit did with it."""

    def __init__(self) -> None:
        self._settled = trio.Event()
        self._outcome = PutOutcome.FAILED

    def settle(self, outcome: PutOutcome) -> None:
        """Record the commit's outcome (the writer calls this once)."""
        self._outcome = outcome
        self._settled.set()

    async def wait(self) -> PutOutcome:
        """Wait for the commit, then return its outcome for this entry."""
        await self._settled.wait()
        return self._outcome


_Queued = tuple[str, StoredEntry, PendingWrite]


class StoreWriter:
    """A bounded queue of entries to store, drained in batches by :meth:`serve`."""

    def __init__(
        self,
        store: CacheStore,
        *,
        capacity: int = 256,
        max_batch: int = 64,
        shared: SharedTier | None = None,
    ) -> None:
        self._store = store
        self.shared = shared
        self._queue = BatchQueue[_Queued](capacity, max_batch)
        self._outcomes: Counter[PutOutcome] = Counter()
        self._evicted = 0

    def submit(self, key: str, entry: StoredEntry, *, share: bool = True) -> PendingWrite | None:
        """Queue ``entry`` under ``key`` without waiting. None when it was dropped locally.

        With ``share`` (and a shared tier) the entry is queued for the shared tier too, whose
        own statistics count what becomes of it there.
        """
        if share and self.shared is not None:
            self.shared.submit(key, entry)
        pending = PendingWrite()
        return pending if self._queue.offer((key, entry, pending)) else None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until :meth:`close` is called and the queue is drained."""
        task_status.started()
        await self._queue.serve(self._write)

    async def _write(self, batch: list[_Queued]) -> None:
        items = [(key, entry) for key, entry, _ in batch]
        try:
            # Not abandoned on cancel: a transaction, once started, finishes on its thread.
            result = await trio.to_thread.run_sync(self._store.put_many, items, time.time())
        except StoreError:
            log.exception("could not store %d cache entries", len(batch))
            outcomes = [PutOutcome.FAILED] * len(batch)
        else:
            outcomes = list(result.outcomes)
            self._evicted += result.evicted
        for (_, _, pending), outcome in zip(batch, outcomes, strict=True):
            self._outcomes[outcome] += 1
            pending.settle(outcome)

    def close(self) -> None:
        """Accept no more entries; :meth:`serve` returns once the queue is written."""
        self._queue.close()

    async def flush(self) -> None:
        """Wait until every entry submitted so far has been committed or refused."""
        await self._queue.flush()

    def statistics(self) -> StoreWriterStatistics:
        queue = self._queue.statistics()
        return StoreWriterStatistics(
            submitted=queue.accepted,
            written=self._outcomes[PutOutcome.WRITTEN],
            dropped=queue.refused_full + queue.refused_closed,
            failed=self._outcomes[PutOutcome.FAILED],
            batches=queue.batches,
            evicted=self._evicted,
            too_large=self._outcomes[PutOutcome.TOO_LARGE],
            map_full=self._outcomes[PutOutcome.MAP_FULL],
            disk_full=self._outcomes[PutOutcome.DISK_FULL],
        )
