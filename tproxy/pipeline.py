"""Flights of upstream answers to clients: the only place that spawns per-request work.

A *flight* is one upstream call. Its tasks, joined by bounded channels:

    upstream reader ──(one channel per client)──▶ client writer ──▶ ASGI send   (one per client)
           └────────(to_cache, send_nowait)────▶ cache writer  ──▶ StoreWriter (shared)

Each client request runs in its own nursery: its client writer, and a watcher on ASGI
``receive()``: Hypercorn reports a client that left only as ``http.disconnect`` there
(``send()`` never raises), so the watcher is how a departure is noticed.

A request that cannot be shared (caching bypassed, ``no-cache``, coalescing off) has a *private*
flight that runs inside the request's own nursery: the reader awaits the client writer (a slow
client slows its own upstream read, never memory), and the client leaving cancels the upstream
call at once. A cacheable request opens or joins a *shared* flight (see
:mod:`tproxy.core.flight`), which runs in the exchanger's nursery, outliving any one client but
not the server. The reader never waits for a client of a shared flight: each client has its own
channel fed with ``send_nowait``, and a client that falls more than ``max_entry_bytes`` (or the
channel's item bound) behind is cut off as ``fell_behind``, so one slow reader stalls neither the
upstream nor the other clients.

Memory ceilings. Private flight: ``stream_buffer_chunks`` items × the largest upstream read
(64 KiB). Shared flight, with M = ``cache.max_entry_bytes``:

- each client holds at most M: what is queued for it *and* what its writer has taken but whose
  ``send()`` has not returned (a writer stuck on a client that does not read still holds it).
  Those are ``bytes`` objects shared with the history or with the other clients; its own copies
  are one body message (at most ``JOIN_BYTES`` and one upstream read) and Hypercorn's framed
  copy of it. A client past M is cut off and leaves the flight at once, so clients that cannot
  be served never keep the upstream call going;
- the history kept for joiners and the backlogs of its clients are the same ``bytes`` objects,
  at most M: a joiner gets the history's chunks themselves, never a copy of the whole history
  (which was a copy per joiner, and then one more in Hypercorn for a message that size). A
  flight whose answer outgrows M stops taking joiners and drops its history;
- the cache writer is fed with ``send_nowait`` on a channel bounded in bytes, not items: the
  reader stops feeding it (and the answer is not stored) once the answer passes M, so a cache
  writer that lags holds at most M, and never slows the client.

So a shared flight holds at most 2 M, and each of its clients at most about 2 × ``JOIN_BYTES``
of its own (bench/stalled_followers.py measures it).

Each client's :class:`~tproxy.core.exchange.Exchange` is told the facts by its own client writer,
from the items it receives; it is finished exactly once: completed, upstream failed or timed out,
fell behind, client gone (the watcher), or shut down (the server cancelled the work).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

import trio
from trio_util import AsyncValue

from tproxy.asgi import ASGIReceive, ASGISend
from tproxy.config import Settings
from tproxy.core.assemble import normalise_usage
from tproxy.core.cachekey import response_store_refusal
from tproxy.core.completion import StreamOutcome
from tproxy.core.dialects import Dialect, dialect_for
from tproxy.core.dialects.base import Completion, Decoder
from tproxy.core.entry import StoredEntry
from tproxy.core.errors import (
    RequestRejected,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from tproxy.core.events import (
    AnswerDelivered,
    ClientGone,
    FellBehind,
    FollowerJoined,
    HeadersReceived,
    JoinedFlight,
    ResponseFinished,
    TimedOut,
    UpstreamEnded,
    UpstreamFailed,
    UpstreamRequested,
)
from tproxy.core.exchange import Exchange, State
from tproxy.core.flight import Flight, FlightRegistry, FlightState, Policy, Verdict
from tproxy.core.headers import (
    Header,
    client_response_headers,
    header_value,
    upstream_request_headers,
)
from tproxy.core.replies import error_body, rejection_for
from tproxy.core.sse import Frame
from tproxy.store import PutOutcome
from tproxy.storewriter import StoreWriter
from tproxy.telemetry import PayloadCapture, Telemetry
from tproxy.upstream import UpstreamPool

# Response headers kept with a cached answer and replayed with it.
REPLAYED_HEADERS = frozenset({b"content-type", b"content-language"})

# Item bound of a shared flight's per-client channel (the byte bound is max_entry_bytes).
SHARED_CHANNEL_ITEMS = 4096

# Seconds a flight whose answer is whole (end marker or Content-Length reached) may still spend
# reading the upstream's end of body once its last client has left.
END_TIMEOUT = 1.0

# Seconds a client of a shared flight, its answer complete, waits for the flight's cache outcome:
# longer than END_TIMEOUT, so the access line of a client that left after the end says "stored".
SETTLE_TIMEOUT = 2.0

# A client writer joins chunks already queued for it into one body message up to this size.
JOIN_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """A client request, read whole and validated, ready to be sent upstream."""

    request_id: bytes
    method: str
    target: str
    headers: list[Header]
    body: bytes
    client_host: str | None
    scheme: str
    upstreams: tuple[str, ...]
    retries: int
    total_timeout: float


@dataclass(frozen=True, slots=True)
class CachePlan:
    """How to store this request's answer if it completes cleanly, and whether to share it."""

    key: str
    ttl: float
    max_entry_bytes: int
    model: str | None
    shared: bool
    ignore_upstream_no_store: bool = False  # the route stores what the upstream says not to


@dataclass(slots=True)
class CacheReport:
    """What became of caching for one flight, for logs and metrics."""

    stored: bool = False
    reason: str = "not attempted"
    usage: Mapping[str, object] | None = None
    entry: StoredEntry | None = None  # handed to the store writer, maybe not yet committed

    @property
    def attempted(self) -> bool:
        """Whether the answer was meant for the store at all."""
        return self.reason != "not attempted"


@dataclass(frozen=True, slots=True)
class _Attempt:
    upstream: str
    attempt: int


@dataclass(frozen=True, slots=True)
class _Start:
    status: int
    headers: list[Header]


@dataclass(frozen=True, slots=True)
class _Chunk:
    data: bytes
    events: int
    whole: bool = False  # with this chunk the client has the whole answer (end marker or length)


@dataclass(frozen=True, slots=True)
class _Failure:
    """The upstream failed; before the response started this becomes an error answer."""

    error: UpstreamError


@dataclass(frozen=True, slots=True)
class _CleanEnd:
    """The upstream body ended cleanly (sent to the client writers and the cache writer)."""


_ClientItem = _Attempt | _Start | _Chunk | _Failure | _CleanEnd


@dataclass(frozen=True, slots=True)
class _CacheStart:
    headers: list[Header]
    completion: Completion | None  # the reader's, for a stream in the family's framing
    dialect: Dialect  # judges a whole JSON answer


@dataclass(frozen=True, slots=True)
class _CacheAbandoned:
    reason: str


@dataclass(frozen=True, slots=True)
class _CacheChunk:
    frames: list[Frame] | None  # None for a body that is not an event stream
    data: bytes
    offset: float


_CacheItem = _CacheStart | _CacheChunk | _CacheAbandoned | _CleanEnd


class _Subscriber:
    """One client's channel from a flight, and how far behind that client is.

    A chunk counts as held from the moment it is queued until its client writer's ``send()`` of
    it returned (:meth:`sent`): a writer stuck in a send to a client that does not read still
    holds those bytes, so they count against ``max_lag_bytes`` too.
    """

    def __init__(self, capacity: int, max_lag_bytes: float) -> None:
        self.send_channel, self.receive_channel = trio.open_memory_channel[_ClientItem](capacity)
        self._max_lag_bytes = max_lag_bytes
        self.held_bytes = 0
        self.fell_behind = False
        self.left = False  # it has left the flight's book

    def offer(self, item: _ClientItem) -> None:
        """Queue ``item`` without waiting; a client too far behind is cut off instead."""
        if self.fell_behind:
            return
        size = len(item.data) if isinstance(item, _Chunk) else 0
        if self.held_bytes + size > self._max_lag_bytes or not self._send_nowait(item):
            self.fell_behind = True
            self.send_channel.close()
            return
        self.held_bytes += size

    def _send_nowait(self, item: _ClientItem) -> bool:
        try:
            self.send_channel.send_nowait(item)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def sent(self, size: int) -> None:
        """The client writer's ``send()`` of ``size`` bytes it took off the channel returned."""
        self.held_bytes -= size


class _History:
    """What a shared flight produced so far, for a client that joins it: the last attempt, the
    start, the body's chunks, and the end if there was one.

    The chunks are the very objects the flight published, which the queues of its clients hold
    too: a joiner gets them, not a copy of its own (joining them all into one chunk cost a copy
    of the whole history per joiner, and Hypercorn copied that one big message again to frame
    it); its client writer joins them into messages of about ``JOIN_BYTES``, as it does live ones.
    """

    def __init__(self) -> None:
        self.attempt: _Attempt | None = None
        self.start: _Start | None = None
        self.chunks: list[_Chunk] = []
        self.end: _Failure | _CleanEnd | None = None
        self.size = 0

    def add(self, item: _ClientItem) -> None:
        if isinstance(item, _Attempt):
            self.attempt = item
        elif isinstance(item, _Start):
            self.start = item
        elif isinstance(item, _Chunk):
            self.size += len(item.data)
            self.chunks.append(item)
        else:
            self.end = item

    def items(self) -> list[_ClientItem]:
        items: list[_ClientItem] = [item for item in (self.attempt, self.start) if item]
        items.extend(self.chunks)
        if self.end is not None:
            items.append(self.end)
        return items


@dataclass(eq=False)
class _LiveFlight:
    """The I/O side of one flight: its clients' channels, its history, its cancel scope."""

    request: ProxyRequest
    plan: CachePlan | None
    book: Flight | None  # None for a private flight
    buffer_chunks: int
    opener: Exchange | None = None  # the exchange of the request that opened a shared flight
    subscribers: list[_Subscriber] = field(default_factory=list)
    history: _History = field(default_factory=lambda: _History())
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    report: CacheReport = field(default_factory=CacheReport)
    completion: Completion | None = None  # set once the answer streams in its family's framing
    ended: bool = False
    settled: trio.Event = field(default_factory=trio.Event)  # the cache outcome is known

    @property
    def shared(self) -> bool:
        return self.book is not None

    def subscribe(self) -> _Subscriber:
        """Attach a client: it first receives what the flight produced so far."""
        history = self.history.items()
        if self.plan is None or not self.shared:
            subscriber = _Subscriber(self.buffer_chunks, math.inf)
        else:
            # Room for the history too: its items are the flight's own, not the joiner's.
            capacity = SHARED_CHANNEL_ITEMS + len(history)
            subscriber = _Subscriber(capacity, self.plan.max_entry_bytes)
        for item in history:
            subscriber.offer(item)
        if self.ended:
            subscriber.send_channel.close()
        else:
            self.subscribers.append(subscriber)
        return subscriber

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

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)

    async def publish(self, item: _ClientItem) -> list[_Subscriber]:
        """Hand ``item`` to every client: awaiting the only one of a private flight, never
        waiting for any client of a shared one. Returns the clients this item cut off (they
        fell behind): they are detached, and must leave the flight's book."""
        if not self.shared:
            for subscriber in list(self.subscribers):
                try:
                    await subscriber.send_channel.send(item)
                except trio.BrokenResourceError:  # it left with its whole answer
                    self.unsubscribe(subscriber)
            return []
        self._remember(item)
        for subscriber in self.subscribers:
            subscriber.offer(item)
        cut_off = [subscriber for subscriber in self.subscribers if subscriber.fell_behind]
        for subscriber in cut_off:
            self.subscribers.remove(subscriber)
        return cut_off

    def _remember(self, item: _ClientItem) -> None:
        assert self.book is not None
        assert self.plan is not None
        if not self.book.joinable:
            return
        size = len(item.data) if isinstance(item, _Chunk) else 0
        if self.history.size + size > self.plan.max_entry_bytes:
            self.book.close_to_joiners("answer larger than max_entry_bytes")
            self.history = _History()
            return
        self.history.add(item)

    def end(self, *, interrupted: bool) -> None:
        """No more items: close every client's channel. An interrupted shared flight (cancelled
        before its last item was published) tells its clients first, without waiting."""
        self.ended = True
        if interrupted and self.shared:
            failure = _Failure(UpstreamBroken("the answer was cancelled"))
            self._remember(failure)
            for subscriber in self.subscribers:
                subscriber.offer(failure)
        for subscriber in self.subscribers:
            subscriber.send_channel.close()


class _PayloadFeed:
    """Hands one client's answer to its payload capture: events for a stream, else bytes."""

    def __init__(self, capture: PayloadCapture, max_line_bytes: int, dialect: Dialect) -> None:
        self._capture = capture
        self._max_line_bytes = max_line_bytes
        self._dialect = dialect
        self._decoder: Decoder | None = None

    def start(self, headers: list[Header]) -> None:
        self._decoder = self._dialect.decoder(headers, self._max_line_bytes)

    def feed(self, data: bytes) -> None:
        if self._decoder is None:
            self._capture.observe_body(data)
            return
        for frame in self._decoder.feed(data):
            if frame.event is not None:
                self._capture.observe_event(frame.event)


def _take_queued_chunks(
    first: _Chunk, items: trio.MemoryReceiveChannel[_ClientItem]
) -> tuple[list[_Chunk], _ClientItem | None]:
    """``first`` and the chunks queued right behind it (up to ``JOIN_BYTES``), and the item
    that stopped the run if one was taken; never waits."""
    parts = [first]
    size = len(first.data)
    while size < JOIN_BYTES:
        try:
            queued = items.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if not isinstance(queued, _Chunk):
            return parts, queued
        parts.append(queued)
        size += len(queued.data)
    return parts, None


def _content_length(headers: list[Header]) -> int | None:
    value = header_value(headers, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _dialect_of(request: ProxyRequest) -> Dialect:
    """The API family of a request, by its path."""
    return dialect_for(request.target.partition("?")[0])


@dataclass(slots=True)
class Exchanger:
    """Runs flights against the upstreams; shared by every request of one server."""

    pool: UpstreamPool
    store_writer: StoreWriter | None
    buffer_chunks: int
    max_line_bytes: int
    policy: Policy
    finish_timeout: float
    background: trio.Nursery
    registry: FlightRegistry
    telemetry: Telemetry
    drop_client_credentials: bool
    live: dict[int, _LiveFlight] = field(default_factory=dict)
    flying: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))

    async def wait_landed(self) -> None:
        """Return once no shared flight is running (for a drain, and for tests)."""
        await self.flying.wait_value(0)

    async def run(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        receive: ASGIReceive,
        send: ASGISend,
        plan: CachePlan | None,
        cache_status: str | None,
        capture: PayloadCapture | None,
    ) -> CacheReport:
        """Serve one client from a private flight, or from a shared one it opens or joins.

        Never raises for upstream or client trouble: that is recorded on ``exchange``.
        ``trio.Cancelled`` from outside (server shutdown) goes on, for the caller to record.
        """
        flight, status = self._flight_for(request, exchange, plan, cache_status)
        subscriber = flight.subscribe()
        exchange.cache_status = None if status is None else status.decode()
        try:
            async with trio.open_nursery() as request_nursery:
                watcher = trio.CancelScope()
                writing = trio.CancelScope()
                request_nursery.start_soon(
                    self._watch_client,
                    receive,
                    exchange,
                    flight,
                    watcher,
                    writing,
                    request_nursery.cancel_scope,
                )
                if not flight.shared:
                    request_nursery.start_soon(self._fly, flight)
                deadline = trio.current_time() + request.total_timeout + 1.0
                with trio.CancelScope(deadline=deadline) as overall, writing:
                    await self._write_client(
                        request, exchange, subscriber, send, status, watcher, capture
                    )
                if overall.cancelled_caught and not exchange.finished:
                    exchange.handle(TimedOut("total"), trio.current_time())
                watcher.cancel()
        finally:
            self._leave(flight, subscriber)
        if flight.shared and exchange.state is State.COMPLETED:
            # The client has its whole answer; what became of storing it follows within
            # moments, and belongs in this request's access line.
            with trio.move_on_after(SETTLE_TIMEOUT):
                await flight.settled.wait()
        return flight.report

    async def landed_answer(self, key: str) -> StoredEntry | None:
        """The answer of the flight for ``key`` that has completed and is on its way into the
        store, or None: from the moment a flight completes until the store has its answer, a
        request for it is a cache hit served from memory. Waits (at most ``SETTLE_TIMEOUT``)
        only while a completed flight's answer is still being judged for the store."""
        book = self.registry.flights.get(key)
        if book is None or book.state is not FlightState.COMPLETED:
            return None
        flight = self.live[id(book)]
        with trio.move_on_after(SETTLE_TIMEOUT):
            await flight.settled.wait()
        return flight.report.entry

    def _flight_for(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        plan: CachePlan | None,
        cache_status: str | None,
    ) -> tuple[_LiveFlight, bytes | None]:
        """A private flight, or the shared one for the plan's key (joined or newly opened)."""
        encoded = None if cache_status is None else cache_status.encode()
        if plan is None or not plan.shared:
            return _LiveFlight(request, plan, None, self.buffer_chunks), encoded
        book, is_new = self.registry.join(plan.key, self.policy)
        if is_new:
            flight = _LiveFlight(request, plan, book, self.buffer_chunks, opener=exchange)
            self.live[id(book)] = flight
            self.flying.value += 1
            self.background.start_soon(self._fly, flight)
            return flight, encoded
        now = trio.current_time()
        exchange.handle(JoinedFlight(), now)
        leader = self.live[id(book)]
        if leader.opener is not None and not leader.opener.finished:
            leader.opener.handle(FollowerJoined(), now)
        return leader, (cache_status + "; collapsed").encode() if cache_status else None

    async def _publish(self, flight: _LiveFlight, item: _ClientItem) -> None:
        """Publish ``item``; a client it cut off leaves the flight at once: one that can no
        longer be served must not keep the upstream call going (once none is left, the policy
        decides), even while Hypercorn still holds its last write to a socket nobody reads."""
        for subscriber in await flight.publish(item):
            self._leave(flight, subscriber)

    def _leave(self, flight: _LiveFlight, subscriber: _Subscriber) -> None:
        if subscriber.left:
            return
        subscriber.left = True
        flight.unsubscribe(subscriber)
        if flight.book is None:
            return
        verdict = self.registry.leave(flight.book)
        if verdict is Verdict.CANCEL:
            flight.scope.cancel()
        elif verdict is Verdict.READ_END:
            flight.read_end()
        elif verdict is Verdict.FINISH_IN_BACKGROUND:
            flight.scope.deadline = min(
                flight.scope.deadline, trio.current_time() + self.finish_timeout
            )

    async def _fly(self, flight: _LiveFlight) -> None:
        """Run one flight: read the upstream, feed the clients and the cache writer."""
        book = flight.book
        try:
            await self._read_into(flight)
        finally:
            if book is not None:
                if FlightState.BACKGROUND in book.history:
                    outcome = "stored" if flight.report.stored else book.state.value
                    self.telemetry.note_background_completion(outcome)
                self.registry.discard(book)
                self.live.pop(id(book), None)
                self.flying.value -= 1

    async def _read_into(self, flight: _LiveFlight) -> None:
        # Bounded in bytes, not items: the reader stops feeding it past max_entry_bytes.
        to_cache_send, to_cache_receive = trio.open_memory_channel[_CacheItem](
            math.inf if flight.plan is not None else 0
        )
        final: _ClientItem | None = None
        try:
            with flight.scope:
                async with trio.open_nursery() as nursery:
                    if flight.plan is not None:
                        nursery.start_soon(
                            self._write_cache, flight.plan, to_cache_receive, flight.report
                        )
                    else:
                        to_cache_receive.close()
                    final = await self._read_upstream(flight, to_cache_send)
                    if isinstance(final, _CleanEnd) and flight.book is not None:
                        # The registry hears of the end before the clients do: a client that
                        # has its whole answer and leaves is done, not gone, and must not cancel
                        # the store write still running here.
                        self.registry.finish(flight.book, clean=True)
                    await self._publish(flight, final)
            if flight.report.usage is None and flight.completion is not None:
                flight.report.usage = flight.completion.usage
        finally:
            flight.end(interrupted=final is None)
            flight.settled.set()
            book = flight.book
            if book is not None and book.state.reading:
                clean = isinstance(final, _CleanEnd)
                reason = None if clean else flight.report.reason
                self.registry.finish(book, clean=clean, reason=reason)

    async def _watch_client(
        self,
        receive: ASGIReceive,
        exchange: Exchange,
        flight: _LiveFlight,
        watcher: trio.CancelScope,
        writing: trio.CancelScope,
        request_scope: trio.CancelScope,
    ) -> None:
        """Record the client's departure. Early, it cancels the request's work (a private
        flight's upstream call with it); after the whole answer (the exchange completes), only
        the writing stops, and a private flight reads the upstream's end, to store the answer."""
        with watcher:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if watcher.cancel_called:
                        # The writer stopped us before its last message, after this arrived:
                        # the end of a finished answer (the writer records it), not a departure.
                        return
                    if not exchange.finished:
                        exchange.handle(ClientGone(), trio.current_time())
                    if exchange.state is State.COMPLETED:
                        writing.cancel()
                        if not flight.shared:
                            flight.read_end()
                    else:
                        request_scope.cancel()
                    return

    async def _read_upstream(
        self, flight: _LiveFlight, to_cache: trio.MemorySendChannel[_CacheItem]
    ) -> _ClientItem:
        """Read the upstream answer into the flight; return the item that ends it."""
        async with to_cache:
            try:
                await self._stream_upstream(flight, to_cache if flight.plan is not None else None)
            except UpstreamError as error:
                return _Failure(error)
        return _CleanEnd()

    async def _stream_upstream(
        self, flight: _LiveFlight, to_cache: trio.MemorySendChannel[_CacheItem] | None
    ) -> None:
        request = flight.request
        attempts = 1 + request.retries
        candidates = request.upstreams
        deadline = trio.current_time() + request.total_timeout
        for attempt in range(1, attempts + 1):
            name = candidates[(attempt - 1) % len(candidates)]
            await self._publish(flight, _Attempt(name, attempt))
            headers = upstream_request_headers(
                request.headers,
                client_host=request.client_host,
                scheme=request.scheme,
                request_id=request.request_id,
                extra=self.pool.extra_headers(name),
                authorization=self.pool.authorization(name),
                drop_credentials=self.drop_client_credentials,
            )
            try:
                async with self.pool.open_response(
                    name,
                    method=request.method,
                    target=request.target,
                    headers=headers,
                    body=request.body,
                    deadline=deadline,
                ) as response:
                    with trio.CancelScope(deadline=deadline) as whole:
                        async with aclosing(response.chunks()) as chunks:
                            await self._relay(
                                flight, response.status, response.headers, chunks, to_cache
                            )
                    if whole.cancelled_caught:
                        raise UpstreamTimeout("total")
                    return
            except UpstreamConnectError:
                if attempt == attempts:
                    raise

    async def _relay(
        self,
        flight: _LiveFlight,
        status: int,
        headers: list[Header],
        chunks: AsyncIterator[bytes],
        to_cache: trio.MemorySendChannel[_CacheItem] | None,
    ) -> None:
        """Forward every chunk to the clients at once; offer it to the cache writer after."""
        started = trio.current_time()
        await self._publish(flight, _Start(status, headers))
        dialect = _dialect_of(flight.request)
        decoder = dialect.decoder(headers, self.max_line_bytes)
        if decoder is not None and dialect.completion is not None:
            flight.completion = dialect.completion()
        length = _content_length(headers)
        received = 0
        cache = to_cache
        cache_limit = flight.plan.max_entry_bytes if flight.plan is not None else 0
        cached_bytes = 0
        if cache is not None:
            if status == 200:
                cache = _offer(cache, _CacheStart(headers, flight.completion, dialect))
            else:
                _abandon(cache, f"status {status}")
                cache = None
        async for data in chunks:
            frames: list[Frame] | None = None
            events = 0
            received += len(data)
            if decoder is not None:
                frames = decoder.feed(data)
                events = flight.observe(frames)
            await self._publish(flight, _Chunk(data, events, flight.is_whole(received, length)))
            if decoder is not None and decoder.failed is not None and cache is not None:
                _abandon(cache, decoder.failed)
                cache = None
            if cache is not None:
                cached_bytes += len(data)
                if cached_bytes > cache_limit:
                    _abandon(cache, f"larger than max_entry_bytes ({cache_limit})")
                    cache = None
                else:
                    offset = trio.current_time() - started
                    cache = _offer(cache, _CacheChunk(frames, data, offset))
        if decoder is not None:
            frames = decoder.close()
            if frames:
                events = flight.observe(frames)
                if events:
                    whole = flight.is_whole(received, length)
                    await self._publish(flight, _Chunk(b"", events, whole))
                if cache is not None:
                    raw = b"".join(frame.raw for frame in frames)
                    offset = trio.current_time() - started
                    cache = _offer(cache, _CacheChunk(frames, raw, offset))
        if cache is not None:
            _offer(cache, _CleanEnd())

    async def _write_client(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        subscriber: _Subscriber,
        send: ASGISend,
        cache_status: bytes | None,
        watcher: trio.CancelScope,
        capture: PayloadCapture | None,
    ) -> None:
        """Hand the flight's items to one client, telling its exchange what happened.

        The exchange hears that the answer is whole (``AnswerDelivered``) before the message
        that completes it is sent, and the watcher is stopped before the last message: a client
        may close as soon as it has those bytes (Hypercorn reports ``http.disconnect`` as soon as
        a response is complete, even while our final ``send()`` is still running), and that is
        the end of a finished answer, not a client leaving early. Once the watcher has ended the
        exchange, this writer tells it nothing more.
        """
        started = False
        delivered = False
        payload = (
            _PayloadFeed(capture, self.max_line_bytes, _dialect_of(request))
            if capture is not None
            else None
        )
        async with subscriber.receive_channel as items:
            pending: _ClientItem | None = None
            while True:
                if pending is not None:
                    item, pending = pending, None
                else:
                    try:
                        item = await items.receive()
                    except trio.EndOfChannel:
                        break
                if exchange.finished:
                    return
                now = trio.current_time()
                if isinstance(item, _Chunk | _CleanEnd):
                    # Bytes already queued behind this chunk go in the same message, and so does
                    # the end: each ASGI message costs Hypercorn a write; nothing waits for bytes
                    # not yet here.
                    parts, pending = (
                        _take_queued_chunks(item, items) if isinstance(item, _Chunk) else ([], item)
                    )
                    data = b"".join(part.data for part in parts)
                    for part in parts:
                        exchange.note_events(part.events)
                        if part.data:
                            exchange.note_upstream_chunk(len(part.data), now)
                    if not delivered and any(part.whole for part in parts):
                        exchange.handle(AnswerDelivered(), now)
                        delivered = True
                    last = isinstance(pending, _CleanEnd)
                    if last:
                        exchange.handle(UpstreamEnded(), now)
                        watcher.cancel()
                    if data or last:
                        await send(
                            {"type": "http.response.body", "body": data, "more_body": not last}
                        )
                        subscriber.sent(len(data))
                        exchange.note_delivered(len(data))
                        if payload is not None and data:
                            payload.feed(data)
                    if last:
                        if not exchange.finished:
                            exchange.handle(ResponseFinished(), trio.current_time())
                        return
                elif isinstance(item, _Attempt):
                    exchange.handle(UpstreamRequested(item.upstream, item.attempt), now)
                elif isinstance(item, _Start):
                    exchange.handle(HeadersReceived(item.status), now)
                    started = True
                    if payload is not None:
                        payload.start(item.headers)
                    await send(
                        {
                            "type": "http.response.start",
                            "status": item.status,
                            "headers": client_response_headers(
                                item.headers,
                                request_id=request.request_id,
                                cache_status=cache_status,
                            ),
                        }
                    )
                else:
                    error = item.error
                    answer = None if started else rejection_for(error)
                    answered = None if answer is None else answer.status
                    fact = (
                        TimedOut(error.phase, answered)
                        if isinstance(error, UpstreamTimeout)
                        else UpstreamFailed(str(error), answered)
                    )
                    exchange.handle(fact, now)
                    watcher.cancel()
                    if answer is not None:
                        await send_error(send, answer, request.request_id, cache_status)
                    # After the start, return without the final body message: the client sees
                    # a truncated body, never a clean short one.
                    return
        if exchange.finished:
            return
        if subscriber.fell_behind:
            exchange.handle(FellBehind(), trio.current_time())
        else:
            exchange.handle(
                UpstreamFailed("the flight ended without an answer"), trio.current_time()
            )

    async def _write_cache(
        self,
        plan: CachePlan,
        items: trio.MemoryReceiveChannel[_CacheItem],
        report: CacheReport,
    ) -> None:
        async with items:
            outcome = await _collect(plan, items, report)
        if isinstance(outcome, str):
            report.reason = outcome
            return
        if self.store_writer is None:
            report.reason = "no store"
            return
        pending = self.store_writer.submit(plan.key, outcome)
        if pending is None:
            report.reason = "store writer busy"
            return
        # Until the commit lands, a request for this answer is served it from memory as a hit.
        report.entry = outcome
        # The flight stays joinable, and its clients' access lines wait, until the commit says
        # what it did: "stored" is the commit's word, not the hand-over's. A disk slower than
        # SETTLE_TIMEOUT leaves the line saying so; the entry is still written.
        report.reason = "commit pending"
        with trio.move_on_after(SETTLE_TIMEOUT):
            written = await pending.wait()
            report.stored = written is PutOutcome.WRITTEN
            report.reason = "stored" if report.stored else f"not stored: {written.value}"


@asynccontextmanager
async def open_exchanger(
    settings: Settings,
    pool: UpstreamPool,
    store_writer: StoreWriter | None,
    telemetry: Telemetry,
) -> AsyncIterator[Exchanger]:
    """The exchanger of one server. Shared flights run in its nursery: they outlive the client
    that opened them, not the server; leaving the block cancels those still running."""
    async with trio.open_nursery() as background:
        yield Exchanger(
            pool=pool,
            store_writer=store_writer,
            buffer_chunks=settings.server.stream_buffer_chunks,
            max_line_bytes=settings.cache.max_line_bytes,
            policy=Policy(settings.cache.on_disconnect),
            finish_timeout=settings.cache.finish_timeout,
            background=background,
            registry=FlightRegistry(max_background=settings.cache.max_background),
            telemetry=telemetry,
            drop_client_credentials=settings.auth.enabled,
        )
        background.cancel_scope.cancel()


async def _collect(
    plan: CachePlan, items: trio.MemoryReceiveChannel[_CacheItem], report: CacheReport
) -> StoredEntry | str:
    """Accumulate one answer for the cache; return the entry, or why it cannot be stored."""
    start: _CacheStart | None = None
    chunks: list[bytes] = []
    offsets: list[float] = []
    size = 0
    async for item in items:
        if isinstance(item, _CacheStart):
            refusal = response_store_refusal(item.headers)
            if refusal is not None and not plan.ignore_upstream_no_store:
                return refusal
            start = item
        elif isinstance(item, _CacheAbandoned):
            return item.reason
        elif isinstance(item, _CacheChunk):
            size += len(item.data)
            if size > plan.max_entry_bytes:
                return f"larger than max_entry_bytes ({plan.max_entry_bytes})"
            if item.frames is None:
                chunks.append(item.data)
                offsets.append(item.offset)
                continue
            for frame in item.frames:
                chunks.append(frame.raw)
                offsets.append(item.offset)
        elif start is not None:
            return _entry_if_complete(plan, start, chunks, offsets, report)
    return "the answer did not end cleanly"


def _entry_if_complete(
    plan: CachePlan,
    start: _CacheStart,
    chunks: list[bytes],
    offsets: list[float],
    report: CacheReport,
) -> StoredEntry | str:
    """The entry to store, or why not. The reader has shown every event to ``start.completion``
    by the time the clean end reaches the cache writer."""
    completion = start.completion
    if completion is not None:
        outcome, reason = completion.verdict(clean_end=True)
        report.usage = completion.usage
    else:
        body = b"".join(chunks)
        outcome, reason, report.usage = start.dialect.judge_json(200, body)
        chunks, offsets = [body], [offsets[-1] if offsets else 0.0]
    if outcome is not StreamOutcome.COMPLETE:
        return reason
    now = time.time()
    return StoredEntry(
        status=200,
        headers=tuple((n, v) for n, v in start.headers if n in REPLAYED_HEADERS),
        chunks=tuple(chunks),
        offsets=tuple(offsets),
        streamed=completion is not None,
        created_at=now,
        expires_at=now + plan.ttl if math.isfinite(plan.ttl) else math.inf,
        model=plan.model,
        usage=normalise_usage(report.usage),
    )


def _offer(
    channel: trio.MemorySendChannel[_CacheItem], item: _CacheItem
) -> trio.MemorySendChannel[_CacheItem] | None:
    """Hand an item to the cache writer without waiting.

    Returns the channel, or None once caching is abandoned: the cache writer fell behind or
    left, and the client must not wait for it.
    """
    try:
        channel.send_nowait(item)
    except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        channel.close()
        return None
    return channel


def _abandon(channel: trio.MemorySendChannel[_CacheItem], reason: str) -> None:
    """Tell the cache writer why this answer will not be stored, and stop feeding it."""
    _offer(channel, _CacheAbandoned(reason))
    channel.close()


async def send_error(
    send: ASGISend, rejection: RequestRejected, request_id: bytes, cache_status: bytes | None
) -> None:
    """Answer with an OpenAI-style JSON error (a 401 says how to authenticate, RFC 9110)."""
    body = error_body(rejection.status, rejection.code, rejection.message)
    headers: list[Header] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id),
    ]
    if rejection.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if cache_status is not None:
        headers.append((b"cache-status", cache_status))
    await send({"type": "http.response.start", "status": rejection.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
