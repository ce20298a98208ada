"""One request's tasks and channels: the only place that spawns per-request work.

Each proxied request runs in its own nursery with three tasks joined by bounded channels:

    upstream reader ──(to_client, N chunks)──▶ client writer ──▶ ASGI send
           └────────(to_cache, send_nowait)──▶ cache writer  ──▶ StoreWriter (shared)

plus a watcher on ASGI ``receive()``: Hypercorn reports a client that left only as
``http.disconnect`` there (``send()`` never raises), so the watcher is how a departure cancels
the request's work and closes the upstream connection.

Memory ceiling per request: ``stream_buffer_chunks`` × the largest upstream read on the client
channel, plus ``max_entry_bytes`` accumulated by the cache writer. The cache channel is fed with
``send_nowait``: if the cache writer ever falls behind, caching of that answer is abandoned and
the client never waits for it.

The tasks report facts to the :class:`~tproxy.core.exchange.Exchange`; it decides the state, and
it is finished exactly once: by the client writer (completed), the reader (upstream failed or
timed out), the watcher (client gone) or the pipeline itself when the server cancels the work
(shut down).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass

import trio

from tproxy.asgi import ASGIReceive, ASGISend
from tproxy.config import Settings
from tproxy.core.completion import StreamCompletion, StreamOutcome, json_answer_verdict
from tproxy.core.entry import StoredEntry
from tproxy.core.errors import RequestRejected, UpstreamConnectError, UpstreamError, UpstreamTimeout
from tproxy.core.events import (
    ClientGone,
    HeadersReceived,
    ResponseFinished,
    ShutDown,
    TimedOut,
    UpstreamEnded,
    UpstreamFailed,
    UpstreamRequested,
)
from tproxy.core.exchange import Exchange
from tproxy.core.headers import (
    Header,
    client_response_headers,
    header_value,
    upstream_request_headers,
)
from tproxy.core.replies import error_body, rejection_for
from tproxy.core.sse import Frame, SSEDecoder
from tproxy.storewriter import StoreWriter
from tproxy.upstream import UpstreamPool

# Response headers kept with a cached answer and replayed with it.
REPLAYED_HEADERS = frozenset({b"content-type", b"content-language"})


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


@dataclass(frozen=True, slots=True)
class CachePlan:
    """How to store this request's answer if it completes cleanly."""

    key: str
    ttl: float
    max_entry_bytes: int
    model: str | None


@dataclass(slots=True)
class CacheReport:
    """What became of caching for one exchange, for logs and metrics."""

    stored: bool = False
    reason: str = "not attempted"


@dataclass(frozen=True, slots=True)
class _Start:
    status: int
    headers: list[Header]


@dataclass(frozen=True, slots=True)
class _Failure:
    """The upstream failed; before the response started this becomes an error answer."""

    rejection: RequestRejected


@dataclass(frozen=True, slots=True)
class _CleanEnd:
    """The upstream body ended cleanly (sent to both the client writer and the cache writer)."""


_ClientItem = _Start | bytes | _Failure | _CleanEnd


@dataclass(frozen=True, slots=True)
class _CacheStart:
    headers: list[Header]
    streamed: bool


@dataclass(frozen=True, slots=True)
class _CacheAbandoned:
    reason: str


@dataclass(frozen=True, slots=True)
class _CacheChunk:
    frames: list[Frame] | None  # None for a body that is not an event stream
    data: bytes
    offset: float


_CacheItem = _CacheStart | _CacheChunk | _CacheAbandoned | _CleanEnd


@dataclass(slots=True)
class Exchanger:
    """Runs exchanges against the upstreams; shared by every request of one server."""

    pool: UpstreamPool
    store_writer: StoreWriter | None
    buffer_chunks: int
    max_line_bytes: int

    async def run(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        receive: ASGIReceive,
        send: ASGISend,
        cache: CachePlan | None,
        deadline_after: float,
        cache_status: bytes | None,
    ) -> CacheReport:
        """Proxy one request to completion, failure, departure or shutdown.

        Never raises for upstream or client trouble: that is recorded on ``exchange``.
        ``trio.Cancelled`` from outside (server shutdown) is recorded as ``shut_down`` and
        re-raised.
        """
        report = CacheReport()
        deadline = trio.current_time() + deadline_after
        to_client_send, to_client_receive = trio.open_memory_channel[_ClientItem](
            self.buffer_chunks
        )
        to_cache_send, to_cache_receive = trio.open_memory_channel[_CacheItem](
            self.buffer_chunks if cache is not None else 0
        )
        if cache is None:
            to_cache_send.close()
            to_cache_receive.close()
        try:
            async with trio.open_nursery() as request_nursery:
                watcher = trio.CancelScope()
                request_nursery.start_soon(
                    self._watch_client, receive, exchange, watcher, request_nursery.cancel_scope
                )
                with trio.CancelScope(deadline=deadline + 1.0) as overall:
                    async with trio.open_nursery() as work:
                        work.start_soon(
                            self._read_upstream,
                            request,
                            exchange,
                            deadline,
                            to_client_send,
                            to_cache_send,
                            cache is not None,
                        )
                        if cache is not None:
                            work.start_soon(self._write_cache, cache, to_cache_receive, report)
                        await self._write_client(
                            request, exchange, to_client_receive, send, cache_status
                        )
                if overall.cancelled_caught and not exchange.finished:
                    exchange.handle(TimedOut("total"), trio.current_time())
                watcher.cancel()
        except trio.Cancelled:
            if not exchange.finished:
                exchange.handle(ShutDown(), trio.current_time())
            raise
        if report.reason == "not attempted" and cache is not None:
            report.reason = exchange.state.value
        return report

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
        self,
        request: ProxyRequest,
        exchange: Exchange,
        deadline: float,
        to_client: trio.MemorySendChannel[_ClientItem],
        to_cache: trio.MemorySendChannel[_CacheItem],
        caching: bool,
    ) -> None:
        async with to_client, to_cache:
            try:
                await self._stream_upstream(
                    request, exchange, deadline, to_client, to_cache if caching else None
                )
            except UpstreamError as error:
                fact = (
                    TimedOut(error.phase)
                    if isinstance(error, UpstreamTimeout)
                    else UpstreamFailed(str(error))
                )
                exchange.handle(fact, trio.current_time())
                await to_client.send(_Failure(rejection_for(error)))

    async def _stream_upstream(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        deadline: float,
        to_client: trio.MemorySendChannel[_ClientItem],
        to_cache: trio.MemorySendChannel[_CacheItem] | None,
    ) -> None:
        attempts = 1 + request.retries
        candidates = request.upstreams
        for attempt in range(1, attempts + 1):
            name = candidates[(attempt - 1) % len(candidates)]
            exchange.handle(UpstreamRequested(name, attempt), trio.current_time())
            headers = upstream_request_headers(
                request.headers,
                client_host=request.client_host,
                scheme=request.scheme,
                request_id=request.request_id,
                extra=self.pool.extra_headers(name),
                authorization=self.pool.authorization(name),
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
                    async with aclosing(response.chunks()) as chunks:
                        await self._relay(
                            exchange, response.status, response.headers, chunks, to_client, to_cache
                        )
                    return
            except UpstreamConnectError:
                if attempt == attempts:
                    raise

    async def _relay(
        self,
        exchange: Exchange,
        status: int,
        headers: list[Header],
        chunks: AsyncIterator[bytes],
        to_client: trio.MemorySendChannel[_ClientItem],
        to_cache: trio.MemorySendChannel[_CacheItem] | None,
    ) -> None:
        """Forward every chunk to the client at once; offer it to the cache writer after."""
        started = trio.current_time()
        exchange.handle(HeadersReceived(status), started)
        await to_client.send(_Start(status, headers))
        content_type = header_value(headers, b"content-type") or b""
        streamed = content_type.split(b";")[0].strip().lower() == b"text/event-stream"
        decoder = SSEDecoder(self.max_line_bytes) if streamed else None
        cache = to_cache
        if cache is not None:
            if status == 200:
                cache = _offer(cache, _CacheStart(headers, streamed))
            else:
                _abandon(cache, f"status {status}")
                cache = None
        async for chunk in chunks:
            now = trio.current_time()
            exchange.note_upstream_chunk(len(chunk), now)
            await to_client.send(chunk)
            frames: list[Frame] | None = None
            if decoder is not None:
                frames = decoder.feed(chunk)
                exchange.note_events(sum(1 for frame in frames if frame.event is not None))
                if decoder.failed is not None and cache is not None:
                    _abandon(cache, decoder.failed)
                    cache = None
            if cache is not None:
                cache = _offer(cache, _CacheChunk(frames, chunk, now - started))
        exchange.handle(UpstreamEnded(), trio.current_time())
        if decoder is not None:
            frames = decoder.close()
            if frames:
                exchange.note_events(sum(1 for frame in frames if frame.event is not None))
                if cache is not None:
                    raw = b"".join(frame.raw for frame in frames)
                    offset = trio.current_time() - started
                    cache = _offer(cache, _CacheChunk(frames, raw, offset))
        if cache is not None:
            _offer(cache, _CleanEnd())
        await to_client.send(_CleanEnd())

    async def _write_client(
        self,
        request: ProxyRequest,
        exchange: Exchange,
        items: trio.MemoryReceiveChannel[_ClientItem],
        send: ASGISend,
        cache_status: bytes | None,
    ) -> None:
        started = False
        async with items:
            async for item in items:
                if isinstance(item, bytes):
                    exchange.note_delivered(len(item))
                    await send({"type": "http.response.body", "body": item, "more_body": True})
                elif isinstance(item, _Start):
                    started = True
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
                elif isinstance(item, _CleanEnd):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    exchange.handle(ResponseFinished(), trio.current_time())
                    return
                elif not started:
                    await send_error(send, item.rejection, request.request_id, cache_status)
                    return
                else:
                    # The upstream broke after the response started: return without the final
                    # body message, so the client sees a truncated body, never a clean short one.
                    return

    async def _write_cache(
        self,
        plan: CachePlan,
        items: trio.MemoryReceiveChannel[_CacheItem],
        report: CacheReport,
    ) -> None:
        async with items:
            outcome = await _collect(plan, items)
        if isinstance(outcome, str):
            report.reason = outcome
            return
        if self.store_writer is None:
            report.reason = "no store"
            return
        report.stored = self.store_writer.submit(plan.key, outcome)
        report.reason = "stored" if report.stored else "store writer busy"


@asynccontextmanager
async def open_exchanger(
    settings: Settings, pool: UpstreamPool, store_writer: StoreWriter | None
) -> AsyncIterator[Exchanger]:
    """The exchanger of one server, open for as long as the server serves."""
    yield Exchanger(
        pool=pool,
        store_writer=store_writer,
        buffer_chunks=settings.server.stream_buffer_chunks,
        max_line_bytes=settings.cache.max_line_bytes,
    )


async def _collect(
    plan: CachePlan, items: trio.MemoryReceiveChannel[_CacheItem]
) -> StoredEntry | str:
    """Accumulate one answer for the cache; return the entry, or why it cannot be stored."""
    start: _CacheStart | None = None
    chunks: list[bytes] = []
    offsets: list[float] = []
    size = 0
    completion = StreamCompletion()
    async for item in items:
        if isinstance(item, _CacheStart):
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
                if frame.event is not None:
                    completion.observe(frame.event)
        elif start is not None:
            return _entry_if_complete(plan, start, chunks, offsets, completion)
    return "the answer did not end cleanly"


def _entry_if_complete(
    plan: CachePlan,
    start: _CacheStart,
    chunks: list[bytes],
    offsets: list[float],
    completion: StreamCompletion,
) -> StoredEntry | str:
    if start.streamed:
        outcome, reason = completion.verdict(clean_end=True)
    else:
        body = b"".join(chunks)
        outcome, reason, _usage = json_answer_verdict(200, body)
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
    """Answer with an OpenAI-style JSON error."""
    body = error_body(rejection.status, rejection.code, rejection.message)
    headers: list[Header] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id),
    ]
    if cache_status is not None:
        headers.append((b"cache-status", cache_status))
    await send({"type": "http.response.start", "status": rejection.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
