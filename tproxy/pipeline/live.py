"""The I/O side of one flight: its clients' channels, its cancel scope, its cache report.

What each client is owed (deliveries, cut-offs, the history a joiner gets, the byte accounting)
is decided by :class:`~tproxy.core.fanout.Fanout`; a :class:`LiveFlight` performs it: it queues
items into the clients' channels, closes the channels of clients cut off, and tells the flight's
book (:mod:`tproxy.core.flight`) when a client leaves, acting on its verdict.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import trio

from tproxy.core.dialects.base import Completion
from tproxy.core.exchange import Exchange
from tproxy.core.fanout import Fanout, Item
from tproxy.core.flight import Flight, FlightRegistry, Verdict
from tproxy.core.sse import Frame
from tproxy.pipeline.request import CachePlan, CacheReport, ProxyRequest

# Item bound of a shared flight's per-client channel (the byte bound is max_entry_bytes).
SHARED_CHANNEL_ITEMS = 4096

# Seconds a flight whose answer is whole (end marker or Content-Length reached) may still spend
# reading the upstream's end of body once its last client has left.
END_TIMEOUT = 1.0

_UNTIMED: AbstractContextManager[object] = nullcontext()


class ClientFeed:
    """One client's channel from a flight. Its writer reports what it took off the channel and
    what it sent, for the fan-out's accounting (a shared flight's only: a private flight's
    channel is bounded by Trio, and its reader awaits it)."""

    __slots__ = ("_fanout", "fell_behind", "left", "receive_channel", "send_channel")

    def __init__(self, fanout: Fanout[ClientFeed], capacity: float) -> None:
        self.send_channel, self.receive_channel = trio.open_memory_channel[Item](capacity)
        self._fanout = fanout if fanout.shared else None
        self.fell_behind = False
        self.left = False  # it has left the flight's book

    def taken(self, items: int) -> None:
        if self._fanout is not None:
            self._fanout.taken(self, items)

    def sent(self, size: int) -> None:
        if self._fanout is not None:
            self._fanout.sent(self, size)

    def cut_off(self) -> None:
        self.fell_behind = True
        self.send_channel.close()


@dataclass(eq=False)
class LiveFlight:
    """One flight's clients and upstream call, as I/O."""

    request: ProxyRequest
    plan: CachePlan | None
    book: Flight | None  # None for a private flight
    registry: FlightRegistry
    buffer_chunks: int
    finish_timeout: float
    opener: Exchange | None = None  # the exchange of the request that opened a shared flight
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    report: CacheReport = field(default_factory=CacheReport)
    completion: Completion | None = None  # set once the answer streams in its family's framing
    _settled: trio.Event | None = field(default=None, init=False)
    fanout: Fanout[ClientFeed] = field(init=False)

    def __post_init__(self) -> None:
        if self.book is None or self.plan is None:
            self.fanout = Fanout(shared=False)
        else:
            bound = self.plan.max_entry_bytes
            self.fanout = Fanout(
                shared=True,
                max_lag_bytes=bound,
                max_history_bytes=bound,
                max_items=SHARED_CHANNEL_ITEMS,
            )

    @property
    def settled(self) -> trio.Event:
        """Set once the cache outcome is known. Made when first asked for: a private flight's
        is only set, at its end, and waited for by nobody."""
        if self._settled is None:
            self._settled = trio.Event()
        return self._settled

    @property
    def shared(self) -> bool:
        return self.book is not None

    def subscribe(self) -> ClientFeed:
        """Attach a client: it first receives what the flight produced so far."""
        # A shared client's bound is the fan-out's, in items and bytes, not the channel's.
        feed = ClientFeed(self.fanout, math.inf if self.shared else self.buffer_chunks)
        joined = self.fanout.join(feed)
        for item in joined.history:
            feed.send_channel.send_nowait(item)
        if joined.cut_off:
            feed.cut_off()
        elif not joined.attached:
            feed.send_channel.close()
        return feed

    def observe(self, frames: list[Frame]) -> int:
        """Hand the frames' events to the completion; return how many events they hold."""
        assert self.completion is not None
        events = 0
        for frame in frames:
            if frame.event is not None:
                events += 1
                self.completion.observe(frame.event)
        return events

    def is_whole(self, received: int, length: int | None) -> bool:
        """Whether a client has the whole answer once it has the ``received`` bytes read so far:
        the family's end marker arrived, or the ``Content-Length`` is reached. The flight's book
        hears it first: a client that leaves with its whole answer must not cancel the flight."""
        whole = received == length or (self.completion is not None and self.completion.ended)
        if whole and self.book is not None:
            self.book.answer_whole()
        return whole

    def read_end(self) -> None:
        """The answer is whole and nobody waits for the rest: the upstream's end of body may
        take ``END_TIMEOUT`` more, no longer."""
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + END_TIMEOUT)

    async def publish(self, item: Item, waiting: AbstractContextManager[object] = _UNTIMED) -> None:
        """Hand ``item`` to every client: awaiting the only one of a private flight when its
        channel is full (within ``waiting``: the reader lifts its upstream idle deadline
        there), never waiting for any client of a shared one. A client it cuts off
        leaves the flight at once: one that can no longer be served must not keep the upstream
        call going (once none is left, the policy decides), even while Hypercorn still holds its
        last write to a socket nobody reads."""
        delivery = self.fanout.publish(item)
        if not self.shared:
            for feed in delivery.to:
                try:
                    try:
                        # Queued without a checkpoint when there is room: the reader's next
                        # read checkpoints anyway, and a yield here is one more task step
                        # per chunk.
                        feed.send_channel.send_nowait(item)
                    except trio.WouldBlock:
                        with waiting:
                            await feed.send_channel.send(item)
                except trio.BrokenResourceError:  # it left with its whole answer
                    self.fanout.leave(feed)
            return
        if delivery.closed_to_joiners:
            assert self.book is not None
            self.book.close_to_joiners("answer larger than max_entry_bytes")
        gone = list(delivery.cut_off)
        for feed in delivery.to:
            if not _queue(feed, item):
                self.fanout.leave(feed)
                gone.append(feed)
        for feed in gone:
            feed.cut_off()
            self.leave(feed)

    def leave(self, feed: ClientFeed) -> None:
        """A client leaves: the flight's book decides what becomes of the upstream call."""
        if feed.left:
            return
        feed.left = True
        self.fanout.leave(feed)
        if self.book is None:
            return
        verdict = self.registry.leave(self.book)
        if verdict is Verdict.CANCEL:
            self.scope.cancel()
        elif verdict is Verdict.READ_END:
            self.read_end()
        elif verdict is Verdict.FINISH_IN_BACKGROUND:
            self.scope.deadline = min(
                self.scope.deadline, trio.current_time() + self.finish_timeout
            )

    def end(self, *, interrupted: bool) -> None:
        """No more items: close every client's channel. An interrupted shared flight (cancelled
        before its last item was published) tells its clients first, without waiting."""
        ending = self.fanout.end(interrupted=interrupted)
        for feed in ending.to:
            assert ending.item is not None
            if not _queue(feed, ending.item):
                feed.cut_off()
        for feed in ending.cut_off:
            feed.cut_off()
        for feed in ending.closing:
            feed.send_channel.close()


def _queue(feed: ClientFeed, item: Item) -> bool:
    """Queue ``item`` for a client of a shared flight; False when its writer is gone."""
    try:
        feed.send_channel.send_nowait(item)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True
