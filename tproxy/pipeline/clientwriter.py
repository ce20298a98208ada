"""The client writer: one client's answer, from its flight's channel to ASGI ``send()``.

It tells the client's :class:`~tproxy.core.exchange.Exchange` the facts as they arrive: the
channel carries them already (``UpstreamRequested``, ``HeadersReceived``, ``UpstreamEnded``), with
the body's :class:`~tproxy.core.fanout.Chunk` values and a :class:`~tproxy.core.fanout.FlightFailed`
that becomes ``UpstreamFailed`` or ``TimedOut``, and an error answer before the response started.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from tproxy.asgi import ASGISend, send_whole
from tproxy.core.dialects import Dialect, dialect_for
from tproxy.core.errors import RequestRejected
from tproxy.core.events import (
    AnswerDelivered,
    FellBehind,
    HeadersReceived,
    ResponseFinished,
    UpstreamEnded,
    UpstreamFailed,
    UpstreamRequested,
)
from tproxy.core.exchange import Exchange
from tproxy.core.fanout import Chunk, Item
from tproxy.core.headers import Header, client_response_headers
from tproxy.core.replies import error_body, rejection_for
from tproxy.pipeline.live import ClientFeed
from tproxy.pipeline.request import ProxyRequest
from tproxy.telemetry import PayloadCapture

# A client writer joins chunks already queued for it into one body message up to this size.
JOIN_BYTES = 256 * 1024


def dialect_of(request: ProxyRequest) -> Dialect:
    """The API family of a request, by its path."""
    return dialect_for(request.target.partition("?")[0])


async def write_client(
    request: ProxyRequest,
    exchange: Exchange,
    feed: ClientFeed,
    send: ASGISend,
    cache_status: bytes | None,
    stop_watching: Callable[[], None],
    capture: PayloadCapture | None,
) -> None:
    """Hand the flight's items to one client, telling its exchange what happened.

    The exchange hears that the answer is whole (``AnswerDelivered``) before the message
    that completes it is sent, and the client's departure stops being watched
    (``stop_watching``) before the last message: a client may close as soon as it has those
    bytes (Hypercorn reports ``http.disconnect`` as soon as a response is complete, even while
    our final ``send()`` is still running), and that is the end of a finished answer, not a
    client leaving early. Once the departure has ended the exchange, this writer tells it
    nothing more.
    """
    started = False
    delivered = False
    async with feed.receive_channel as items:
        pending: Item | None = None
        while True:
            if pending is not None:
                item, pending = pending, None
            else:
                try:
                    item = await items.receive()
                except trio.EndOfChannel:
                    break
                feed.taken(1)
            if exchange.finished:
                return
            now = trio.current_time()
            if isinstance(item, Chunk | UpstreamEnded):
                # Bytes already queued behind this chunk go in the same message, and so does
                # the end: each ASGI message costs Hypercorn a write; nothing waits for bytes
                # not yet here.
                parts, pending = (
                    _take_queued_chunks(item, feed) if isinstance(item, Chunk) else ([], item)
                )
                data = b"".join(part.data for part in parts)
                for part in parts:
                    exchange.note_events(part.events)
                    if part.data:
                        exchange.note_upstream_chunk(len(part.data), now)
                if not delivered and any(part.whole for part in parts):
                    exchange.handle(AnswerDelivered(), now)
                    delivered = True
                last = isinstance(pending, UpstreamEnded)
                if last:
                    exchange.handle(UpstreamEnded(), now)
                    stop_watching()
                if data or last:
                    await send({"type": "http.response.body", "body": data, "more_body": not last})
                    feed.sent(len(data))
                    exchange.note_delivered(len(data))
                if capture is not None:
                    for part in parts:
                        capture.observe_chunk(part)
                if last:
                    if not exchange.finished:
                        exchange.handle(ResponseFinished(), trio.current_time())
                    return
            elif isinstance(item, UpstreamRequested):
                exchange.handle(item, now)
            elif isinstance(item, HeadersReceived):
                exchange.handle(item, now)
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
            else:
                answer = None if started else rejection_for(item.error)
                exchange.handle(item.fact(None if answer is None else answer.status), now)
                stop_watching()
                if answer is not None:
                    await send_error(send, answer, request.request_id, cache_status)
                # After the start, return without the final body message: the client sees
                # a truncated body, never a clean short one.
                return
    if exchange.finished:
        return
    if feed.fell_behind:
        exchange.handle(FellBehind(), trio.current_time())
    else:
        exchange.handle(UpstreamFailed("the flight ended without an answer"), trio.current_time())


def _take_queued_chunks(first: Chunk, feed: ClientFeed) -> tuple[list[Chunk], Item | None]:
    """``first`` and the chunks queued right behind it (up to ``JOIN_BYTES``), and the item
    that stopped the run if one was taken; never waits."""
    parts = [first]
    size = len(first.data)
    stop: Item | None = None
    while size < JOIN_BYTES:
        try:
            queued = feed.receive_channel.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if not isinstance(queued, Chunk):
            stop = queued
            break
        parts.append(queued)
        size += len(queued.data)
    feed.taken(len(parts) - 1 + (stop is not None))
    return parts, stop


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
    await send_whole(send, rejection.status, headers, body)
