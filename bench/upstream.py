"""A fast fake model server for the benchmarks: plain Trio + h11, one process, 127.0.0.1 only.

``POST /v1/chat/completions`` answers a fixed ~300-byte JSON completion when the body's
``"stream"`` is false, and a stream of ``EVENTS`` chat-completion chunks followed by
``data: [DONE]`` when it is true. Every event is its own socket write, so a proxy sees the
chunking a real model server produces. Each chunk carries ``"t"``, the upstream's
``time.time_ns()`` just before its write: the load generator subtracts it from its own receive
time to measure what a proxy adds to every event. ``x-bench-interval-ms`` sets the gap between
two events (default 0: as fast as the socket takes them).

It is deliberately cheaper than any proxy under test (no framework, bodies prebuilt; the
connection loop is ``tests/h11peer.py``'s, as every fake's), so that the proxies, not the
upstream, are what the numbers show.

    python bench/upstream.py --port 8101
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fakes' HTTP/1.1 peer is the tests' (tests/h11peer.py)

from tests.h11peer import Peer, SeenRequest, connection_handler  # noqa: E402

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


def _interval(request: SeenRequest) -> float:
    return max(0.0, float(request.headers.get("x-bench-interval-ms", "0"))) / 1000


def wants_stream(body: bytes) -> bool:
    """Whether a request body asks for a stream (``"stream": true``)."""
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("stream") is True


async def answer(peer: Peer, request: SeenRequest) -> None:
    """Answer one request: the completion, the stream, or a 404."""
    if request.method != "POST" or request.target != "/v1/chat/completions":
        await peer.respond(404, [(b"content-length", b"0")])
        return
    if not wants_stream(request.body):
        await peer.respond(200, _JSON_HEADERS, COMPLETION)
        return
    interval = _interval(request)
    await peer.send_head(200, _SSE_HEADERS)
    for index in range(EVENTS):
        if index and interval:
            await trio.sleep(interval)
        await peer.send_data(chunk_event(index, index == EVENTS - 1))
    await peer.send_data(_DONE)
    await peer.send_end()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    handler = connection_handler(answer, max_body=MAX_BODY_BYTES)
    trio.run(partial(trio.serve_tcp, handler, args.port, host=args.host))


if __name__ == "__main__":
    main()
