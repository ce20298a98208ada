"""The fakes' HTTP/1.1 peer (``tests/h11peer.py``): what every fake upstream, sink and collector
relies on, checked with raw bytes from a raw socket."""

from __future__ import annotations

from functools import partial

import trio

from tests.h11peer import Peer, SeenRequest, connection_handler, serve_connection, serve_on_loopback


async def echo_target(peer: Peer, request: SeenRequest) -> None:
    """Answer with the target, header names in two cases, as llama.cpp and uvicorn write them."""
    body = request.target.encode()
    headers = [(b"Content-Type", b"text/plain"), (b"x-lower", b"1")]
    await peer.respond(200, [*headers, (b"Content-Length", b"%d" % len(body))], body)


async def exchange(port: int, sent: bytes) -> bytes:
    """Send ``sent`` on a new connection; all that comes back until the fake closes it."""
    received = bytearray()
    async with await trio.open_tcp_stream("127.0.0.1", port) as client:
        await client.send_all(sent)
        with trio.fail_after(10):
            while data := await client.receive_some():
                received += data
    return bytes(received)


async def test_requests_on_one_connection_are_answered_in_turn_with_names_as_written(
    nursery: trio.Nursery,
) -> None:
    port = await nursery.start(serve_on_loopback, connection_handler(echo_target))
    received = await exchange(
        port,
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    answers = received.split(b"HTTP/1.1 200 \r\n")[1:]
    assert [answer.rpartition(b"\r\n\r\n")[2] for answer in answers] == [b"/one", b"/two"]
    assert all(b"Content-Type: text/plain\r\nx-lower: 1\r\n" in answer for answer in answers)


async def test_a_request_not_whole_by_the_deadline_closes_the_connection(
    nursery: trio.Nursery,
) -> None:
    handler = partial(serve_connection, echo_target, request_timeout=0.05)
    port = await nursery.start(serve_on_loopback, handler)
    assert await exchange(port, b"GET /half HTTP/1.1\r\nHost:") == b""


async def test_a_body_over_the_limit_closes_the_connection_unanswered(
    nursery: trio.Nursery,
) -> None:
    answered: list[SeenRequest] = []

    async def keep(peer: Peer, request: SeenRequest) -> None:
        answered.append(request)

    port = await nursery.start(serve_on_loopback, connection_handler(keep, max_body=10))
    sent = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n" + b"x" * 11
    assert await exchange(port, sent) == b""
    assert answered == []
