"""The one task that writes finished answers into the store, off every client's path.

Requests hand a complete entry over with :meth:`StoreWriter.submit`, which never waits: when the
queue is full the entry is dropped and counted, and the client is not slowed. The writer task takes
whatever has queued up and commits it as one batch, in one write transaction, in a worker thread:
an fsync is paid once per batch rather than once per entry, and the event loop never blocks on the
disk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio
from trio_util import AsyncValue

from tproxy.core.entry import StoredEntry
from tproxy.core.errors import StoreError
from tproxy.store import CacheStore

log = logging.getLogger("tproxy.store")


@dataclass(frozen=True, slots=True)
class StoreWriterStatistics:
    submitted: int
    written: int
    dropped: int
    failed: int
    batches: int
    evicted: int


class StoreWriter:
    """A bounded queue of entries to store, drained in batches by :meth:`serve`."""

    def __init__(self, store: CacheStore, *, capacity: int = 256, max_batch: int = 64) -> None:
        self._store = store
        self._max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[tuple[str, StoredEntry]](capacity)
        self._submitted = 0
        self._dropped = 0
        self._failed = 0
        self._batches = 0
        self._evicted = 0
        self._handled = AsyncValue(0)

    def submit(self, key: str, entry: StoredEntry) -> bool:
        """Queue ``entry`` under ``key`` without waiting. False when it was dropped."""
        try:
            self._send.send_nowait((key, entry))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._dropped += 1
            return False
        self._submitted += 1
        return True

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until :meth:`close` is called and the queue is drained."""
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break  # nothing more queued now, or ever: write what we have
                await self._write(batch)

    async def _write(self, batch: list[tuple[str, StoredEntry]]) -> None:
        try:
            # Not abandoned on cancel: a transaction, once started, finishes on its thread.
            result = await trio.to_thread.run_sync(self._store.put_many, batch, time.time())
        except StoreError:
            log.exception("could not store %d cache entries", len(batch))
            self._failed += len(batch)
        else:
            self._evicted += result.evicted
        self._batches += 1
        self._handled.value += len(batch)

    def close(self) -> None:
        """Accept no more entries; :meth:`serve` returns once the queue is written."""
        self._send.close()

    async def flush(self) -> None:
        """Wait until every entry submitted so far has been written (or has failed)."""
        target = self._submitted
        await self._handled.wait_value(lambda handled: handled >= target)

    def statistics(self) -> StoreWriterStatistics:
        handled = self._handled.value
        return StoreWriterStatistics(
            submitted=self._submitted,
            written=handled - self._failed,
            dropped=self._dropped,
            failed=self._failed,
            batches=self._batches,
            evicted=self._evicted,
        )
