"""``UpstreamResponse.chunks``: the body of an upstream answer, and the request as it leaves.

The body's deadlines are its reader's (``tests/test_reader.py``; end to end, over real sockets, in
``tests/faults``): the body itself is read as it comes, on an in-memory body here, with Trio's
virtual clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpcore2
import trio
import trio.testing

from tests.h11peer import Peer, SeenRequest, connection_handler, serve_on_loopback
from tproxy.config import Overrides, load_settings
from tproxy.upstream import UpstreamResponse, open_upstream_pool


class PausingBody:
    """Two chunks with ``pause`` seconds between them."""

    def __init__(self, pause: float) -> None:
        self.pause = pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"first"
        await trio.sleep(self.pause)
        yield b"second"


def answer(pause: float) -> UpstreamResponse:
    response = httpcore2.Response(200, content=PausingBody(pause))
    return UpstreamResponse(200, [], _response=response)


async def test_the_body_is_read_as_it_comes_with_no_deadline_of_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No read timeout, no scope per chunk: the reader's one idle deadline times the body."""
    assert [chunk async for chunk in answer(pause=600.0).chunks()] == [b"first", b"second"]


# --- the request as it leaves, over a real socket ----------------------------------------------


async def test_the_request_carries_the_callers_headers_host_and_length_and_no_cookie(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Nothing is added but Host and Content-Length: no client defaults, and no cookie jar (a
    cookie one client's answer set must never ride on another client's request)."""
    requests: list[SeenRequest] = []

    async def answer_with_a_cookie(peer: Peer, request: SeenRequest) -> None:
        requests.append(request)
        cookie = [("Content-Length", "2"), ("Set-Cookie", "session=upstream-secret")]
        await peer.respond(200, cookie, b"ok")

    port = await nursery.start(serve_on_loopback, connection_handler(answer_with_a_cookie))
    url = f"http://127.0.0.1:{port}/base"
    settings = load_settings(None, Overrides(upstream=url, cache_dir=tmp_path))
    async with open_upstream_pool(settings, environ={}) as pool:
        for client in (b"first", b"second"):
            async with pool.open_response(
                "default",
                method="POST",
                target="/v1/chat/completions?x=1",
                headers=[(b"x-client", client)],
                body=b"{}",
                deadline=trio.current_time() + 10,
            ) as response:
                assert [chunk async for chunk in response.chunks()] == [b"ok"]
                assert (b"set-cookie", b"session=upstream-secret") in response.headers
    assert [(request.method, request.target) for request in requests] == [
        ("POST", "/base/v1/chat/completions?x=1")
    ] * 2
    assert [list(request.header_lines) for request in requests] == [
        [(b"host", b"127.0.0.1:%d" % port), (b"content-length", b"2"), (b"x-client", client)]
        for client in (b"first", b"second")
    ]
