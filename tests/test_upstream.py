"""``UpstreamResponse.chunks``: the body of an upstream answer, and its idle deadline.

End to end, over real sockets, the deadlines are tested in ``tests/faults``; an HTTP/1.1 upstream
there gets its idle deadline from httpcore2's read timeout. An HTTP/2 answer keeps the deadline as a
cancel scope per chunk (a read timeout would fail every stream of its connection); no HTTP/2
upstream runs in the suite, so that path is tested here on an in-memory body, with Trio's
virtual clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpcore2
import pytest
import trio
import trio.testing

from tests.h11peer import Peer, SeenRequest, connection_handler, serve_on_loopback
from tproxy.config import Overrides, load_settings
from tproxy.core.errors import UpstreamTimeout
from tproxy.upstream import UpstreamResponse, open_upstream_pool


class PausingBody:
    """Two chunks with ``pause`` seconds between them."""

    def __init__(self, pause: float) -> None:
        self.pause = pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"first"
        await trio.sleep(self.pause)
        yield b"second"


def answer(pause: float, idle_scope: float | None) -> UpstreamResponse:
    response = httpcore2.Response(200, content=PausingBody(pause))
    return UpstreamResponse(200, [], _response=response, _idle_scope=idle_scope)


async def read_all(upstream_response: UpstreamResponse) -> list[bytes]:
    return [chunk async for chunk in upstream_response.chunks()]


async def test_a_pause_longer_than_the_idle_scope_is_an_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    received: list[bytes] = []

    async def read_into_received() -> None:
        async for chunk in answer(pause=5.0, idle_scope=1.0).chunks():
            received.append(chunk)

    with pytest.raises(UpstreamTimeout) as raised:
        await read_into_received()
    assert (received, raised.value.phase) == ([b"first"], "idle")


async def test_a_pause_shorter_than_the_idle_scope_is_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert await read_all(answer(pause=0.5, idle_scope=1.0)) == [b"first", b"second"]


async def test_without_an_idle_scope_the_body_is_read_as_it_comes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """HTTP/1.1: the deadline is httpcore2's read timeout, on the socket, not here."""
    assert await read_all(answer(pause=60.0, idle_scope=None)) == [b"first", b"second"]


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
