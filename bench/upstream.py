"""A fast fake model server for the benchmarks: plain Trio + h11, one process, 127.0.0.1 only.

``POST /v1/chat/completions`` answers a fixed ~300-byte JSON completion when the body's
``"stream"`` is false, and a stream of ``EVENTS`` chat-completion chunks followed by
``data: [DONE]`` when it is true. Every event is its own socket write, so a proxy sees the
chunking a real model server produces. Each chunk carries ``"t"``, the upstream's
``time.time_ns()`` just before its write: the load generator subtracts it from its own receive
time to measure what a proxy adds to every event. ``x-bench-interval-ms`` sets the gap between
two events (default 0: as fast as the socket takes them).

It is deliberately cheaper than any proxy under test (no framework, bodies prebuilt), so that the
proxies, not the upstream, are what the numbers show.

    python bench/upstream.py --port 8101
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import h11
import trio

EVENTS = 50
MAX_BODY_BYTES = 1 << 20

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! This is the benchmark upstream's fixed answer.",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21},
    },
    separators=(",", ":"),
).encode()

_CHUNK_HEAD = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench","choices":[{"index":0,"delta":{"content":" tok'
)
_DONE = b"data: [DONE]\n\n"

_JSON_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(COMPLETION)).encode()),
]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def chunk_event(index: int, last: bool) -> bytes:
    """One SSE event in OpenAI's chunk shape, stamped with the time it is written."""
    finish = b'"stop"' if last else b"null"
    return b'%s%d"},"finish_reason":%s}],"t":%d}\n\n' % (
        _CHUNK_HEAD,
        index,
        finish,
        time.time_ns(),
    )


def stream_body() -> bytes:
    """The whole stream's body in one piece, for servers that answer it in one write."""
    events = [chunk_event(index, index == EVENTS - 1) for index in range(EVENTS)]
    return b"".join(events) + _DONE


class ClientGoneError(Exception):
    """The client closed the connection or sent something h11 refuses (soak.py uses this too)."""


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError as error:
            raise ClientGoneError from error
        conn.receive_data(data)


async def read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes] | None:
    """The next request and its body, or None when the client closed the connection."""
    event = await _next_event(conn, stream)
    if isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):
        raise ClientGoneError
    parts: list[bytes] = []
    size = 0
    while True:
        part = await _next_event(conn, stream)
        if isinstance(part, h11.Data):
            size += len(part.data)
            if size > MAX_BODY_BYTES:
                raise ClientGoneError
            parts.append(part.data)
        elif isinstance(part, h11.EndOfMessage):
            return event, b"".join(parts)
        else:
            raise ClientGoneError


def _interval(request: h11.Request) -> float:
    for name, value in request.headers:
        if name == b"x-bench-interval-ms":
            return max(0.0, float(value)) / 1000
    return 0.0


def wants_stream(body: bytes) -> bool:
    """Whether a request body asks for a stream (``"stream": true``)."""
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("stream") is True


async def _answer(
    conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, body: bytes
) -> None:
    if request.method != b"POST" or request.target != b"/v1/chat/completions":
        head = conn.send(h11.Response(status_code=404, headers=[(b"content-length", b"0")]))
        await stream.send_all(head + conn.send(h11.EndOfMessage()))
        return
    if not wants_stream(body):
        head = conn.send(h11.Response(status_code=200, headers=_JSON_HEADERS))
        await stream.send_all(
            head + conn.send(h11.Data(data=COMPLETION)) + conn.send(h11.EndOfMessage())
        )
        return
    interval = _interval(request)
    await stream.send_all(conn.send(h11.Response(status_code=200, headers=_SSE_HEADERS)))
    for index in range(EVENTS):
        if index and interval:
            await trio.sleep(interval)
        await stream.send_all(conn.send(h11.Data(data=chunk_event(index, index == EVENTS - 1))))
    await stream.send_all(conn.send(h11.Data(data=_DONE)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def serve_connection(stream: trio.SocketStream) -> None:
    """Answer requests on one keep-alive connection until the client leaves."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)
    try:
        while True:
            received = await read_request(conn, stream)
            if received is None:
                return
            await _answer(conn, stream, *received)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (ClientGoneError, h11.RemoteProtocolError, trio.BrokenResourceError):
        return
    finally:
        await stream.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    trio.run(partial(trio.serve_tcp, serve_connection, args.port, host=args.host))


if __name__ == "__main__":
    main()
