"""A bounded queue that a request fills without waiting and one task drains in batches.

The store writer and each telemetry sink have the same shape: requests hand items over with
:meth:`BatchQueue.offer`, which never waits (a full queue drops the item and counts it, so a slow
disk or a dead log collector never slows a client); one task, :meth:`BatchQueue.serve`, takes
whatever has queued up, at most ``max_batch`` items, and delivers them in one call (one write
transaction, one POST, one hop to a worker thread). :meth:`BatchQueue.flush` waits until
everything offered so far was delivered; :meth:`BatchQueue.close` lets :meth:`serve` return once
the queue is empty. Items still queued when :meth:`serve` is cancelled are counted as abandoned.

Memory ceiling: ``capacity`` items queued plus one batch being delivered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio
from trio_util import AsyncValue

_T = TypeVar("_T")


def send_or_refuse(channel: trio.MemorySendChannel[_T], item: _T) -> bool:
    """Hand ``item`` over without waiting: False, and nothing sent, when the channel is full or
    either of its ends is closed."""
    try:
        channel.send_nowait(item)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class BatchQueueStatistics:
    """What became of the items offered: every offer is counted once, in ``accepted``,
    ``refused_full`` or ``refused_closed``; every accepted item ends delivered or abandoned."""

    accepted: int
    refused_full: int  # the queue was full
    refused_closed: int  # offered after close(), or once serve() had ended
    queued: int
    delivered: int  # handed to ``deliver`` (which decides what writing them means)
    batches: int
    abandoned: int  # still queued, or in a batch being delivered, when serve() was cancelled


class BatchQueue(Generic[_T]):
    """``capacity`` items at most, delivered ``max_batch`` at a time.

    A batch holds what was queued when its first item was taken; with ``linger`` > 0 it waits
    up to ``linger`` seconds for more (fewer, fuller batches when each delivery costs a hop).
    """

    def __init__(self, capacity: int, max_batch: int, *, linger: float = 0.0) -> None:
        self._max_batch = max_batch
        self._linger = linger
        self._send, self._receive = trio.open_memory_channel[_T](capacity)
        self._closed = False  # close() was called, or serve() ended: nothing more is taken
        self._accepted = 0
        self._refused_full = 0
        self._refused_closed = 0
        self._delivered = 0
        self._batches = 0
        self._abandoned = 0
        self._handled = AsyncValue(0)

    def offer(self, item: _T) -> bool:
        """Queue ``item`` without waiting; False when it was refused (and counted)."""
        if send_or_refuse(self._send, item):
            self._accepted += 1
            return True
        if self._closed:
            self._refused_closed += 1
        else:
            self._refused_full += 1
        return False

    def close(self) -> None:
        """Accept no more items; :meth:`serve` returns once the queue is delivered."""
        self._closed = True
        self._send.close()

    async def serve(self, deliver: Callable[[list[_T]], Awaitable[None]]) -> None:
        """Hand batches to ``deliver`` until the queue is closed and empty.

        ``deliver`` should raise nothing but ``Cancelled``: what it raises ends the queue, and
        the batch and what is still queued are counted as abandoned.
        """
        batch: list[_T] = []
        async with self._receive:
            try:
                async for first in self._receive:
                    batch = [first]
                    await self._fill(batch)
                    await deliver(batch)
                    self._delivered += len(batch)
                    self._batches += 1
                    self._handled.value += len(batch)
                    batch = []
            finally:
                self._closed = True
                left = len(batch) + self._discard_queued()
                self._abandoned += left
                self._handled.value += left

    async def _fill(self, batch: list[_T]) -> None:
        """Add what is queued now and, with a linger, what arrives within it."""
        while len(batch) < self._max_batch:
            try:
                batch.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                return
        if not self._linger:
            return
        with trio.move_on_after(self._linger):
            while len(batch) < self._max_batch:
                try:
                    batch.append(await self._receive.receive())
                except trio.EndOfChannel:
                    return

    def _discard_queued(self) -> int:
        count = 0
        while True:
            try:
                self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return count
            count += 1

    async def flush(self) -> None:
        """Wait until every item accepted so far was delivered or abandoned."""
        target = self._accepted
        await self._handled.wait_value(lambda handled: handled >= target)

    def statistics(self) -> BatchQueueStatistics:
        return BatchQueueStatistics(
            accepted=self._accepted,
            refused_full=self._refused_full,
            refused_closed=self._refused_closed,
            queued=self._receive.statistics().current_buffer_used,
            delivered=self._delivered,
            batches=self._batches,
            abandoned=self._abandoned,
        )
