"""The exchanger: each request's flight, opened or joined by cache key; its client's departure.

A *flight* is one upstream call. Its tasks, joined by bounded channels:

    upstream reader ──(one channel per client)──▶ client writer ──▶ ASGI send   (one per client)
           └────────(to_cache, send_nowait)────▶ cache writer  ──▶ StoreWriter (shared)

Each client request runs in its own nursery: its client writer, and (a private flight) its
reader. Hypercorn reports a client that left only as ``http.disconnect`` on ASGI ``receive()``
(``send()`` never raises); tproxy's server also tells it to a listener the request registers
(:class:`tproxy.asgi.Departure`), so no task waits on ``receive()`` for the whole answer.

A request that cannot be shared (caching bypassed, ``no-cache``, coalescing off) has a *private*
flight that runs inside the request's own nursery: the reader awaits the client writer (a slow
client slows its own upstream read, never memory), and the client leaving cancels the upstream
call at once. A cacheable request opens or joins a *shared* flight (see
:mod:`tproxy.core.flight`), which runs in the exchanger's nursery, outliving any one client but
not the server. The reader never waits for a client of a shared flight: each client has its own
channel fed with ``send_nowait``, and a client that falls more than ``max_entry_bytes`` (or its
item bound) behind is cut off as ``fell_behind`` (:mod:`tproxy.core.fanout` decides), so one
slow reader stalls neither the upstream nor the other clients.

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
fell behind, client gone (the departure's listener), or shut down (the server cancelled the work).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from trio_util import AsyncValue

from tproxy.asgi import ASGISend, Departure
from tproxy.config import Settings
from tproxy.core.entry import StoredEntry
from tproxy.core.events import ClientGone, FollowerJoined, JoinedFlight, TimedOut
from tproxy.core.exchange import Exchange, State
from tproxy.core.flight import Flight, FlightRegistry, FlightState, Policy
from tproxy.pipeline.cachewriter import SETTLE_TIMEOUT
from tproxy.pipeline.clientwriter import write_client
from tproxy.pipeline.live import LiveFlight
from tproxy.pipeline.reader import Reader
from tproxy.pipeline.request import CachePlan, CacheReport, ProxyRequest
from tproxy.storewriter import StoreWriter
from tproxy.telemetry import PayloadCapture, Telemetry
from tproxy.upstream import UpstreamPool


@dataclass(slots=True)
class Exchanger:
    """Runs flights against the upstreams; shared by every request of one server."""

    reader: Reader
    buffer_chunks: int
    policy: Policy
    finish_timeout: float
    background: trio.Nursery
    telemetry: Telemetry
    live: dict[int, LiveFlight] = field(default_factory=dict)
    flying: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))

    @property
    def registry(self) -> FlightRegistry:
        return self.reader.registry

    @property
    def store_writer(self) -> StoreWriter | None:
        return self.reader.store_writer

    async def wait_landed(self) -> None:
        """Return once no shared flight is running (for a drain, and for tests)."""
        await self.flying.wait_value(0)

    async def run(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        departure: Departure,
        send: ASGISend,
        plan: CachePlan | None,
        capture: PayloadCapture | None,
    ) -> CacheReport:
        """Serve one client from a private flight, or from a shared one it opens or joins.

        The answer carries ``exchange``'s Cache-Status (``collapsed`` once it joined a flight).
        Never raises for upstream or client trouble: that is recorded on ``exchange``.
        ``trio.Cancelled`` from outside (server shutdown) goes on, for the caller to record.
        """
        flight = self._flight_for(request, exchange, plan)
        subscriber = flight.subscribe()
        status = None if exchange.cache_status is None else exchange.cache_status.header
        try:
            async with trio.open_nursery() as request_nursery:
                # The writing stops at the request's total deadline, or when the client leaves
                # after its whole answer (the exchange is finished then: no time-out recorded).
                writing = trio.CancelScope(
                    deadline=trio.current_time() + request.total_timeout + 1.0
                )
                watch = _ClientWatch(
                    exchange, flight, writing, request_nursery.cancel_scope, departure
                )
                departure.listen(watch)
                if not flight.shared:
                    # A private flight has no bookkeeping to do after it: the reader is its task.
                    request_nursery.start_soon(self.reader.read, flight)
                try:
                    with writing:
                        await write_client(
                            request, exchange, subscriber, send, status, watch.stop, capture
                        )
                finally:
                    watch.stop()
                if writing.cancelled_caught and not exchange.finished:
                    exchange.handle(TimedOut("total"), trio.current_time())
        finally:
            flight.leave(subscriber)
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
    ) -> LiveFlight:
        """A private flight, or the shared one for the plan's key (joined or newly opened)."""
        if plan is None or not plan.shared:
            return self._live_flight(request, plan, None)
        book, is_new = self.registry.join(plan.key, self.policy)
        if is_new:
            flight = self._live_flight(request, plan, book, opener=exchange)
            self.live[id(book)] = flight
            self.flying.value += 1
            self.background.start_soon(self._fly, flight)
            return flight
        now = trio.current_time()
        exchange.handle(JoinedFlight(), now)
        leader = self.live[id(book)]
        if leader.opener is not None and not leader.opener.finished:
            leader.opener.handle(FollowerJoined(), now)
        return leader

    def _live_flight(
        self,
        request: ProxyRequest,
        plan: CachePlan | None,
        book: Flight | None,
        opener: Exchange | None = None,
    ) -> LiveFlight:
        return LiveFlight(
            request,
            plan,
            book,
            self.registry,
            self.buffer_chunks,
            self.finish_timeout,
            opener=opener,
        )

    async def _fly(self, flight: LiveFlight) -> None:
        """Run one flight: read the upstream, feed the clients and the cache writer."""
        book = flight.book
        try:
            await self.reader.read(flight)
        finally:
            if book is not None:
                if FlightState.BACKGROUND in book.history:
                    outcome = "stored" if flight.report.stored else book.state.value
                    self.telemetry.note_background_completion(outcome)
                self.registry.discard(book)
                self.live.pop(id(book), None)
                self.flying.value -= 1


class _ClientWatch:
    """What a client's departure does to its request. Early, it cancels the request's work (a
    private flight's upstream call with it); after the whole answer (the exchange completes),
    only the writing stops, and a private flight reads the upstream's end, to store the answer.
    The client writer stops the watch before its last message: a client may close as soon as it
    has those bytes, which is the end of a finished answer, not a departure."""

    __slots__ = ("_departure", "_exchange", "_flight", "_request_scope", "_stopped", "_writing")

    def __init__(
        self,
        exchange: Exchange,
        flight: LiveFlight,
        writing: trio.CancelScope,
        request_scope: trio.CancelScope,
        departure: Departure,
    ) -> None:
        self._exchange = exchange
        self._flight = flight
        self._writing = writing
        self._request_scope = request_scope
        self._departure = departure
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._departure.listen(None)

    def __call__(self) -> None:
        """The client left (the server's reading task calls this)."""
        if self._stopped:
            return
        self._stopped = True
        exchange = self._exchange
        if not exchange.finished:
            exchange.handle(ClientGone(), trio.current_time())
        if exchange.state is State.COMPLETED:
            self._writing.cancel()
            if not self._flight.shared:
                self._flight.read_end()
        else:
            self._request_scope.cancel()


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
            reader=Reader(
                pool=pool,
                store_writer=store_writer,
                registry=FlightRegistry(max_background=settings.cache.max_background),
                max_line_bytes=settings.cache.max_line_bytes,
                drop_client_credentials=settings.auth.enabled,
                frames_to_clients=telemetry.wants_payloads,
            ),
            buffer_chunks=settings.server.stream_buffer_chunks,
            policy=Policy(settings.cache.on_disconnect),
            finish_timeout=settings.cache.finish_timeout,
            background=background,
            telemetry=telemetry,
        )
        background.cancel_scope.cancel()
