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
(64 KiB). Shared flight: the history kept for joiners and the backlog of each client are the same
``bytes`` objects, bounded by ``cache.max_entry_bytes``; a flight that outgrows it stops taking
joiners and drops its history. The cache writer is fed with ``send_nowait`` on a channel bounded
in bytes, not items: the reader stops feeding it (and the answer is not stored) once the answer
passes ``max_entry_bytes``, so a cache writer that lags holds at most that, and never slows the
client.

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
from tproxy.core.dialects.base import Completion, Decoder, UsageWatch
from tproxy.core.entry import StoredEntry
from tproxy.core.errors import (
    RequestRejected,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from tproxy.core.events import (
    ClientGone,
    FellBehind,
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

# Seconds a client of a shared flight, its answer complete, waits for the flight's cache outcome.
SETTLE_TIMEOUT = 1.0

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
    streamed: bool
    dialect: Dialect


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
    """One client's channel from a flight, and how far behind that client is."""

    def __init__(self, capacity: int, max_lag_bytes: float) -> None:
        self.send_channel, self.receive_channel = trio.open_memory_channel[_ClientItem](capacity)
        self._max_lag_bytes = max_lag_bytes
        self._lag_bytes = 0
        self.fell_behind = False

    def offer(self, item: _ClientItem) -> None:
        """Queue ``item`` without waiting; a client too far behind is cut off instead."""
        if self.fell_behind:
            return
        size = len(item.data) if isinstance(item, _Chunk) else 0
        if self._lag_bytes + size > self._max_lag_bytes or not self._send_nowait(item):
            self.fell_behind = True
            self.send_channel.close()
            return
        self._lag_bytes += size

    def _send_nowait(self, item: _ClientItem) -> bool:
        try:
            self.send_channel.send_nowait(item)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def taken(self, item: _ClientItem) -> None:
        """The client writer took ``item`` off the channel."""
        if isinstance(item, _Chunk):
            self._lag_bytes -= len(item.data)


@dataclass(eq=False)
class _LiveFlight:
    """The I/O side of one flight: its clients' channels, its history, its cancel scope."""

    request: ProxyRequest
    plan: CachePlan | None
    book: Flight | None  # None for a private flight
    buffer_chunks: int
    subscribers: list[_Subscriber] = field(default_factory=list)
    history: list[_ClientItem] = field(default_factory=list)
    history_bytes: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    report: CacheReport = field(default_factory=CacheReport)
    usage: UsageWatch = field(init=False)  # the request's API family reads it
    ended: bool = False
    settled: trio.Event = field(default_factory=trio.Event)  # the cache outcome is known

    def __post_init__(self) -> None:
        self.usage = _dialect_of(self.request).usage_watch()

    @property
    def shared(self) -> bool:
        return self.book is not None

    def subscribe(self) -> _Subscriber:
        """Attach a client: it first receives what the flight produced so far, compacted."""
        if self.plan is None or not self.shared:
            subscriber = _Subscriber(self.buffer_chunks, math.inf)
        else:
            subscriber = _Subscriber(SHARED_CHANNEL_ITEMS, self.plan.max_entry_bytes)
        for item in _compact(self.history):
            subscriber.offer(item)
        if self.ended:
            subscriber.send_channel.close()
        else:
            self.subscribers.append(subscriber)
        return subscriber

    def observe(self, frames: list[Frame]) -> int:
        """Note the usage the frames' events report; return how many events they hold."""
        events = 0
        for frame in frames:
            if frame.event is not None:
                events += 1
                self.usage.observe(frame.event)
        return events

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)

    async def publish(self, item: _ClientItem) -> None:
        """Hand ``item`` to every client: awaiting the only one of a private flight, never
        waiting for any client of a shared one."""
        if not self.shared:
            for subscriber in list(self.subscribers):
                await subscriber.send_channel.send(item)
            return
        self._remember(item)
        for subscriber in self.subscribers:
            subscriber.offer(item)

    def _remember(self, item: _ClientItem) -> None:
        assert self.book is not None
        assert self.plan is not None
        if not self.book.joinable:
            return
        if isinstance(item, _Chunk):
            self.history_bytes += len(item.data)
            if self.history_bytes > self.plan.max_entry_bytes:
                self.book.close_to_joiners("answer larger than max_entry_bytes")
                self.history.clear()
                return
        self.history.append(item)

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
    first: _Chunk, items: trio.MemoryReceiveChannel[_ClientItem], subscriber: _Subscriber
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
        subscriber.taken(queued)
        if not isinstance(queued, _Chunk):
            return parts, queued
        parts.append(queued)
        size += len(queued.data)
    return parts, None


def _dialect_of(request: ProxyRequest) -> Dialect:
    """The API family of a request, by its path."""
    return dialect_for(request.target.partition("?")[0])


def _compact(history: list[_ClientItem]) -> list[_ClientItem]:
    """What a joiner needs of the history: the last attempt, the start, all bytes in one chunk,
    and the end if there was one."""
    attempts = [item for item in history if isinstance(item, _Attempt)]
    chunks = [item for item in history if isinstance(item, _Chunk)]
    compact: list[_ClientItem] = list(attempts[-1:])
    compact.extend(item for item in history if isinstance(item, _Start))
    if chunks:
        compact.append(_Chunk(b"".join(c.data for c in chunks), sum(c.events for c in chunks)))
    compact.extend(item for item in history if isinstance(item, (_Failure, _CleanEnd)))
    return compact


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
                request_nursery.start_soon(
                    self._watch_client, receive, exchange, watcher, request_nursery.cancel_scope
                )
                if not flight.shared:
                    request_nursery.start_soon(self._fly, flight)
                deadline = trio.current_time() + request.total_timeout + 1.0
                with trio.CancelScope(deadline=deadline) as overall:
                    await self._write_client(
                        request, exchange, subscriber, send, status, watcher, capture
                    )
                if overall.cancelled_caught and not exchange.finished:
                    exchange.handle(TimedOut("total"), trio.current_time())
                watcher.cancel()
                if flight.shared and exchange.state is State.COMPLETED:
                    # The client has its whole answer; what became of storing it follows within
                    # moments, and belongs in this request's access line.
                    with trio.move_on_after(SETTLE_TIMEOUT):
                        await flight.settled.wait()
        finally:
            self._leave(flight, subscriber)
        return flight.report

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
            flight = _LiveFlight(request, plan, book, self.buffer_chunks)
            self.live[id(book)] = flight
            self.flying.value += 1
            self.background.start_soon(self._fly, flight)
            return flight, encoded
        exchange.handle(JoinedFlight(), trio.current_time())
        leader = self.live[id(book)]
        return leader, (cache_status + "; collapsed").encode() if cache_status else None

    def _leave(self, flight: _LiveFlight, subscriber: _Subscriber) -> None:
        flight.unsubscribe(subscriber)
        if flight.book is None:
            return
        verdict = self.registry.leave(flight.book)
        if verdict is Verdict.CANCEL:
            flight.scope.cancel()
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
                    await flight.publish(final)
            if flight.report.usage is None:
                flight.report.usage = flight.usage.usage
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
        watcher: trio.CancelScope,
        request_scope: trio.CancelScope,
    ) -> None:
        with watcher:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not exchange.finished:
                        exchange.handle(ClientGone(), trio.current_time())
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
            await flight.publish(_Attempt(name, attempt))
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
        await flight.publish(_Start(status, headers))
        dialect = _dialect_of(flight.request)
        decoder = dialect.decoder(headers, self.max_line_bytes)
        streamed = decoder is not None
        cache = to_cache
        cache_limit = flight.plan.max_entry_bytes if flight.plan is not None else 0
        cached_bytes = 0
        if cache is not None:
            if status == 200:
                cache = _offer(cache, _CacheStart(headers, streamed, dialect))
            else:
                _abandon(cache, f"status {status}")
                cache = None
        async for data in chunks:
            frames: list[Frame] | None = None
            events = 0
            if decoder is not None:
                frames = decoder.feed(data)
                events = flight.observe(frames)
            await flight.publish(_Chunk(data, events))
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
                    await flight.publish(_Chunk(b"", events))
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

        The watcher is stopped before the last message: Hypercorn reports ``http.disconnect``
        as soon as a response is complete, even while our final ``send()`` is still running,
        and that is the end of a finished answer, not a client leaving.
        """
        started = False
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
                    subscriber.taken(item)
                now = trio.current_time()
                if isinstance(item, _Chunk | _CleanEnd):
                    # Bytes already queued behind this chunk go in the same message, and so does
                    # the end: each ASGI message costs Hypercorn a write; nothing waits for bytes
                    # not yet here.
                    parts, pending = (
                        _take_queued_chunks(item, items, subscriber)
                        if isinstance(item, _Chunk)
                        else ([], item)
                    )
                    data = b"".join(part.data for part in parts)
                    for part in parts:
                        exchange.note_events(part.events)
                        if part.data:
                            exchange.note_upstream_chunk(len(part.data), now)
                    last = isinstance(pending, _CleanEnd)
                    if last:
                        exchange.handle(UpstreamEnded(), now)
                        watcher.cancel()
                    if data or last:
                        await send(
                            {"type": "http.response.body", "body": data, "more_body": not last}
                        )
                        exchange.note_delivered(len(data))
                        if payload is not None and data:
                            payload.feed(data)
                    if last:
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
    completion: Completion | None = None
    async for item in items:
        if isinstance(item, _CacheStart):
            refusal = response_store_refusal(item.headers)
            if refusal is not None and not plan.ignore_upstream_no_store:
                return refusal
            start = item
            if item.streamed and item.dialect.completion is not None:
                completion = item.dialect.completion()
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
                if frame.event is not None and completion is not None:
                    completion.observe(frame.event)
        elif start is not None:
            return _entry_if_complete(plan, start, chunks, offsets, completion, report)
    return "the answer did not end cleanly"


def _entry_if_complete(
    plan: CachePlan,
    start: _CacheStart,
    chunks: list[bytes],
    offsets: list[float],
    completion: Completion | None,
    report: CacheReport,
) -> StoredEntry | str:
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
        streamed=start.streamed,
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
