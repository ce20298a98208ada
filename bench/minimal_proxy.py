"""The baseline of issue 8: the naive pass-through proxy, Hypercorn (trio worker) + httpx2.

It forwards the method, path, headers and body, and streams the answer back one ``aiter_raw()``
chunk per ASGI body message. No cache, no routing, no timeouts, no disconnect watcher, no logs:
what a proxy costs before it does anything useful. Its pool is sized like tproxy's (512 by
default, ``--max-connections``), so the two differ in what they do, not in how many upstream
connections they may keep.

    python bench/minimal_proxy.py --upstream http://127.0.0.1:8101 --listen 127.0.0.1:8102
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx2
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"host"}


async def request_body(scope: dict[str, Any], receive: Any, send: Any) -> bytes | None:
    """The request's whole body; None for the lifespan scope, which this answers itself."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return None
    body: bytes = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


class PassThrough:
    """An ASGI app sending every request to one upstream through one pooled client."""

    def __init__(self, client: httpx2.AsyncClient) -> None:
        self.client = client

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await request_body(scope, receive, send)
        if body is None:
            return
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k not in HOP_BY_HOP]
        request = self.client.build_request(scope["method"], target, headers=headers, content=body)
        response = await self.client.send(request, stream=True)
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": out}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def main(upstream: str, listen: str, max_connections: int) -> None:
    limits = httpx2.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    async with httpx2.AsyncClient(base_url=upstream, limits=limits, timeout=None) as client:
        config = Config()
        config.bind = [listen]
        await serve(PassThrough(client), config, mode="asgi")  # type: ignore[arg-type]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="minimal Hypercorn+Trio+httpx2 pass-through")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument(
        "--max-connections", type=int, default=512, help="upstream pool size (tproxy's default)"
    )
    args = parser.parse_args()
    trio.run(main, args.upstream, args.listen, args.max_connections)
