"""The upstream reader: one flight's upstream call, with its retries, relayed as it arrives.

It publishes the answer to the flight's clients in the core vocabulary (see
:mod:`tproxy.core.fanout`) and offers it to the cache writer, never waiting for either when the
flight is shared; it runs the cache writer in its own nursery, under the flight's cancel scope.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import trio

from tproxy.core.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from tproxy.core.events import HeadersReceived, UpstreamEnded, UpstreamRequested
from tproxy.core.fanout import Chunk, FlightFailed
from tproxy.core.flight import FlightRegistry
from tproxy.core.headers import Header, header_value, upstream_request_headers
from tproxy.core.sse import Frame
from tproxy.pipeline.cachewriter import (
    CacheChunk,
    CacheItem,
    CacheStart,
    abandon,
    offer,
    write_cache,
)
from tproxy.pipeline.clientwriter import dialect_of
from tproxy.pipeline.live import LiveFlight
from tproxy.storewriter import StoreWriter
from tproxy.upstream import UpstreamPool

# The most a body's idle deadline may pass its ``idle_timeout`` by (see :class:`_IdleDeadline`).
MAX_IDLE_SLACK = 1.0


@dataclass(frozen=True, slots=True)
class Reader:
    """What every flight of one server reads with.

    ``frames_to_clients``: each :class:`~tproxy.core.fanout.Chunk` carries the frames decoded
    from it, for the clients' payload capture (the payload log is on), so that a stream is
    decoded once per flight, not once more per client. Off, the chunks carry bytes only: a
    shared flight's history would otherwise hold every decoded frame (about 2.5 times the
    bytes) for nobody.
    """

    pool: UpstreamPool
    store_writer: StoreWriter | None
    registry: FlightRegistry
    max_line_bytes: int
    drop_client_credentials: bool
    frames_to_clients: bool = True

    async def read(self, flight: LiveFlight) -> None:
        """Read the upstream answer into the flight and its cache writer, then end the flight."""
        final: UpstreamEnded | FlightFailed | None = None
        try:
            with flight.scope:
                if flight.plan is None:
                    # Nothing to store: no cache writer, nor a nursery and a channel for it.
                    final = await self._read_upstream(flight, None)
                    await self._publish_end(flight, final)
                else:
                    # Bounded in bytes, not items: the reader stops feeding it past
                    # max_entry_bytes.
                    to_cache, to_cache_receive = trio.open_memory_channel[CacheItem](math.inf)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(
                            write_cache,
                            self.store_writer,
                            flight.plan,
                            to_cache_receive,
                            flight.report,
                        )
                        async with to_cache:
                            final = await self._read_upstream(flight, to_cache)
                        await self._publish_end(flight, final)
            if flight.report.usage is None and flight.completion is not None:
                flight.report.usage = flight.completion.usage
        finally:
            flight.end(interrupted=final is None)
            flight.settled.set()
            book = flight.book
            if book is not None and book.state.reading:
                clean = isinstance(final, UpstreamEnded)
                reason = None if clean else flight.report.reason
                self.registry.finish(book, clean=clean, reason=reason)

    async def _publish_end(self, flight: LiveFlight, final: UpstreamEnded | FlightFailed) -> None:
        if isinstance(final, UpstreamEnded) and flight.book is not None:
            # The registry hears of the end before the clients do: a client that has its whole
            # answer and leaves is done, not gone, and must not cancel the store write still
            # running.
            self.registry.finish(flight.book, clean=True)
        await flight.publish(final)

    async def _read_upstream(
        self, flight: LiveFlight, to_cache: trio.MemorySendChannel[CacheItem] | None
    ) -> UpstreamEnded | FlightFailed:
        """Read the upstream answer into the flight; return the item that ends it."""
        try:
            await self._stream_upstream(flight, to_cache)
        except UpstreamError as error:
            return FlightFailed(error)
        return UpstreamEnded()

    async def _stream_upstream(
        self, flight: LiveFlight, to_cache: trio.MemorySendChannel[CacheItem] | None
    ) -> None:
        request = flight.request
        attempts = 1 + request.retries
        candidates = request.upstreams
        deadline = trio.current_time() + request.total_timeout
        for attempt in range(1, attempts + 1):
            name = candidates[(attempt - 1) % len(candidates)]
            await flight.publish(UpstreamRequested(name, attempt))
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
                    idle_timeout = self.pool.settings(name).idle_timeout
                    with trio.CancelScope(deadline=deadline) as whole:
                        async with aclosing(response.chunks()) as chunks:
                            await self._relay(
                                flight,
                                response.status,
                                response.headers,
                                chunks,
                                to_cache,
                                idle_timeout,
                            )
                    if whole.cancelled_caught:
                        raise UpstreamTimeout("total")
                    return
            except UpstreamConnectError:
                if attempt == attempts:
                    raise

    async def _relay(
        self,
        flight: LiveFlight,
        status: int,
        headers: list[Header],
        chunks: AsyncIterator[bytes],
        to_cache: trio.MemorySendChannel[CacheItem] | None,
        idle_timeout: float,
    ) -> None:
        """Forward every chunk to the clients at once; offer it to the cache writer after.

        Raises :class:`UpstreamTimeout` (``idle``) when no chunk came for ``idle_timeout``."""
        started = trio.current_time()
        await flight.publish(HeadersReceived(status, tuple(headers)))
        dialect = dialect_of(flight.request)
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
                cache = offer(cache, CacheStart(headers, flight.completion, dialect))
            else:
                abandon(cache, f"status {status}")
                cache = None
        to_clients = self.frames_to_clients
        idle = _IdleDeadline(idle_timeout)
        with idle.scope:
            async for data in chunks:
                frames: list[Frame] | None = None
                events = 0
                received += len(data)
                if decoder is not None:
                    frames = decoder.feed(data)
                    events = flight.observe(frames)
                whole = flight.is_whole(received, length)
                await flight.publish(
                    Chunk(data, events, whole, frames if to_clients else None), idle
                )
                if decoder is not None and decoder.failed is not None and cache is not None:
                    abandon(cache, decoder.failed)
                    cache = None
                if cache is not None:
                    cached_bytes += len(data)
                    if cached_bytes > cache_limit:
                        abandon(cache, f"larger than max_entry_bytes ({cache_limit})")
                        cache = None
                    else:
                        offset = trio.current_time() - started
                        cache = offer(cache, CacheChunk(frames, data, offset))
                idle.extend()
        if idle.scope.cancelled_caught:
            raise UpstreamTimeout("idle")
        if decoder is not None:
            frames = decoder.close()
            if frames:
                events = flight.observe(frames)
                if events:
                    whole = flight.is_whole(received, length)
                    await flight.publish(Chunk(b"", events, whole, frames if to_clients else None))
                if cache is not None:
                    raw = b"".join(frame.raw for frame in frames)
                    offset = trio.current_time() - started
                    cache = offer(cache, CacheChunk(frames, raw, offset))
        if cache is not None:
            offer(cache, UpstreamEnded())


def _content_length(headers: list[Header]) -> int | None:
    value = header_value(headers, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


class _IdleDeadline:
    """The upstream's idle deadline over a whole body: one cancel scope for every read.

    A scope per read (enter, exit, a deadline registered and dropped) was the largest single
    cost of a paced event (docs/benchmarks.md). This scope's deadline is moved only once the
    time left to it is under ``timeout``, and then ``slack`` past that, so a paced stream moves
    it about once a second; a body is cut ``timeout`` to ``timeout + slack`` after its last
    chunk, never sooner. While a client's channel is full (used as a context manager, by
    :meth:`LiveFlight.publish`) there is no deadline: a slow client is not an idle upstream.
    """

    __slots__ = ("_slack", "_timeout", "scope")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._slack = min(MAX_IDLE_SLACK, timeout / 8)
        self.scope = trio.CancelScope(deadline=trio.current_time() + timeout + self._slack)

    def extend(self) -> None:
        """A chunk was taken: the next read may wait ``timeout`` from now."""
        now = trio.current_time()
        if self.scope.deadline < now + self._timeout:
            self.scope.deadline = now + self._timeout + self._slack

    def __enter__(self) -> None:
        self.scope.deadline = math.inf

    def __exit__(self, *exc_info: object) -> None:
        self.scope.deadline = trio.current_time() + self._timeout + self._slack
