"""The framework floor of issue 8's goal 3: Hypercorn (trio worker) answering a constant.

Every POST gets the bytes the benchmark upstream would send: the fixed JSON completion, or, when
the body asks for a stream, the whole 51-event SSE body in ONE ASGI body message (as a cache hit
should be replayed). There is no upstream, no cache and no routing, so its requests per second
are the most any app on this server layer can reach here: tproxy's cache hits are measured
against it.

    python bench/constant_app.py --listen 127.0.0.1:8103
"""

from __future__ import annotations

import argparse
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from minimal_proxy import request_body
from upstream import COMPLETION, stream_body, wants_stream

JSON_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(COMPLETION)).encode()),
]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class Constant:
    """An ASGI app answering every request with one of two prebuilt bodies."""

    def __init__(self) -> None:
        self.stream = stream_body()  # built once: its "t" stamps are the start time

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await request_body(scope, receive, send)
        if body is None:
            return
        streamed = wants_stream(body)
        headers = SSE_HEADERS if streamed else JSON_HEADERS
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.stream if streamed else COMPLETION})


async def main(listen: str) -> None:
    config = Config()
    config.bind = [listen]
    await serve(Constant(), config, mode="asgi")  # type: ignore[arg-type]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Hypercorn+Trio answering a constant")
    parser.add_argument("--listen", required=True)
    args = parser.parse_args()
    trio.run(main, args.listen)
