"""The plain-HTTP/1.1 client (``tproxy.h11upstream``): its pool, its chunks and its errors.

Each test runs a raw upstream on 127.0.0.1 that answers with the bytes the test scripts, so the
framing, the pauses and the hang-ups are exactly those written here. End to end, through the
proxy, the same client is exercised by ``tests/faults`` and ``tests/security`` (their upstreams
are ``http://``).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
import trustme

from tests.tlsfiles import server_context, write_ca, write_pair
from tproxy.config import Overrides, load_settings
from tproxy.core.errors import UpstreamBroken, UpstreamConnectError, UpstreamTimeout
from tproxy.core.headers import Header
from tproxy.h11upstream import PlainPool, PlainResponse, _Connection
from tproxy.upstream import UpstreamResponse, open_upstream_pool

JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
REQUEST = (b"POST", b"/v1/chat/completions", [(b"host", b"upstream"), (b"content-length", b"2")])


def json_answer(body: bytes) -> bytes:
    return JSON_HEAD % len(body) + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"

# A script piece: bytes to write, or an event to wait for before the next write.
Piece = bytes | trio.Event


@dataclass
class Reply:
    pieces: Sequence[Piece]
    close: bool = False  # close the connection after the pieces


@dataclass
class RawUpstream:
    """Reads each request with h11, answers the n-th (from 1, over all connections) with
    ``script(n)``; counts the connections it accepted and the closes it saw from the client."""

    script: Callable[[int], Reply]
    requests: list[h11.Request] = field(default_factory=list)
    body_sizes: list[int] = field(default_factory=list)
    connections: int = 0
    closes_seen: int = 0
    closed_by_us: trio.Event = field(default_factory=trio.Event)
    port: int = 0

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        async with stream:
            protocol = h11.Connection(h11.SERVER)
            while True:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some()
                    except trio.BrokenResourceError:
                        data = b""
                    if not data:
                        self.closes_seen += 1
                        return
                    protocol.receive_data(bytes(data))
                elif isinstance(event, h11.Request):
                    self.requests.append(event)
                    self.body_sizes.append(0)
                elif isinstance(event, h11.Data):
                    self.body_sizes[-1] += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    reply = self.script(len(self.requests))
                    for piece in reply.pieces:
                        if isinstance(piece, trio.Event):
                            await piece.wait()
                        else:
                            await stream.send_all(piece)
                    if reply.close:
                        await stream.aclose()
                        self.closed_by_us.set()
                        return
                    protocol = h11.Connection(h11.SERVER)  # the answer was written raw


@asynccontextmanager
async def running(
    script: Callable[[int], Reply], max_connections: int = 4
) -> AsyncIterator[tuple[RawUpstream, PlainPool]]:
    """The scripted upstream, and a pool of connections to it, closed on exit."""
    upstream = RawUpstream(script)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"), upstream.serve, 0
        )
        upstream.port = listeners[0].socket.getsockname()[1]
        pool = PlainPool("127.0.0.1", upstream.port, max_connections)
        try:
            yield upstream, pool
        finally:
            pool.close()
            nursery.cancel_scope.cancel()


def always(*pieces: Piece, close: bool = False) -> Callable[[int], Reply]:
    return lambda _: Reply(pieces, close)


async def ask(
    pool: PlainPool,
    *,
    request: tuple[bytes, bytes, list[Header]] = REQUEST,
    body: bytes = b"{}",
    read: int | None = None,
) -> tuple[PlainResponse, list[bytes]]:
    """One exchange: the answer and the chunks read (all of them, or the first ``read``)."""
    with trio.fail_after(5):
        response = await pool.send("local", request, body, connect_timeout=5.0)
        chunks: list[bytes] = []
        try:
            async with aclosing(response.chunks()) as answer:
                async for data in answer:
                    chunks.append(data)
                    if read is not None and len(chunks) == read:
                        break
        finally:
            pool.release(response)
    return response, chunks


# --- the pool ----------------------------------------------------------------------------------


async def test_a_whole_answer_leaves_its_connection_for_the_next_request() -> None:
    async with running(always(json_answer(b'{"ok":1}'))) as (upstream, pool):
        for _ in range(3):
            response, chunks = await ask(pool)
            assert (response.status, chunks) == (200, [b'{"ok":1}'])
        pool.close()
        await trio.testing.wait_all_tasks_blocked()
    assert (upstream.connections, len(upstream.requests)) == (1, 3)


async def test_the_answers_header_names_arrive_lower_cased() -> None:
    async with running(always(json_answer(b"{}"))) as (_, pool):
        response, _ = await ask(pool)
    assert response.headers == [(b"content-type", b"application/json"), (b"content-length", b"2")]


async def test_a_body_left_unread_closes_its_connection() -> None:
    """The client that leaves mid-stream: the upstream sees the close (that is how generation
    stops on vLLM and llama.cpp), and the next request opens a new connection."""
    never = trio.Event()
    script = always(CHUNKED_HEAD + chunk(b"data: 1\n\n"), never)
    async with running(script) as (upstream, pool):
        _, chunks = await ask(pool, read=1)
        assert chunks == [b"data: 1\n\n"]
        await trio.testing.wait_all_tasks_blocked()
        assert upstream.closes_seen == 0  # the upstream's task still waits to write
        never.set()
        _, again = await ask(pool, read=1)
        assert again == [b"data: 1\n\n"]
    assert upstream.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        # The server says it will close.
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        # HTTP/1.0 without keep-alive.
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        # Bytes past the end of the answer: never the next request's answer.
        json_answer(b"{}") + json_answer(b'{"smuggled":1}'),
    ],
    ids=["connection-close", "http-1.0", "leftover-bytes"],
)
async def test_a_connection_that_must_not_carry_another_request_is_closed(answer: bytes) -> None:
    async with running(always(answer)) as (upstream, pool):
        answers = [(await ask(pool))[1] for _ in range(2)]
    assert answers == [[b"{}"], [b"{}"]]
    assert upstream.connections == 2


async def test_an_idle_connection_the_server_closed_is_not_reused() -> None:
    async with running(always(json_answer(b"{}"), close=True)) as (upstream, pool):
        await ask(pool)
        await upstream.closed_by_us.wait()  # loopback delivers the FIN with the close
        upstream.closed_by_us = trio.Event()
        _, chunks = await ask(pool)
    assert (chunks, upstream.connections) == ([b"{}"], 2)


async def test_the_pool_never_holds_more_connections_than_its_bound() -> None:
    """With one connection allowed, a second request waits for the first to be released."""
    release_first = trio.Event()

    def script(n: int) -> Reply:
        answer = json_answer(b"%d" % n)
        return Reply([release_first, answer] if n == 1 else [answer])

    async with running(script, max_connections=1) as (upstream, pool):
        answers: list[list[bytes]] = []

        async def one() -> None:
            answers.append((await ask(pool))[1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            assert len(upstream.requests) == 1  # the second waits for the one connection
            release_first.set()
    assert (answers, upstream.connections) == ([[b"1"], [b"2"]], 1)


async def until_a_close_is_seen(upstream: RawUpstream) -> None:
    """Let the upstream's tasks run until one has seen the proxy's close (a loopback close
    arrives at once; the bound is in scheduler passes, as the clock may be a mock)."""
    for _ in range(1000):
        if upstream.closes_seen:
            return
        await trio.testing.wait_all_tasks_blocked()
        await trio.lowlevel.checkpoint()
    raise AssertionError("the upstream never saw the connection close")


async def read_whole(pool: PlainPool) -> PlainResponse:
    """An answer read to its end, its connection not yet released."""
    response = await pool.send("local", REQUEST, b"{}", connect_timeout=5)
    async with aclosing(response.chunks()) as body:
        assert [data async for data in body] == [b"{}"]
    return response


async def test_the_longest_idle_connection_is_closed_once_expired_though_another_is_used(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with running(always(json_answer(b"{}"))) as (upstream, pool):
        older, newer = await read_whole(pool), await read_whole(pool)  # two connections
        pool.release(older)
        mock_clock.jump(20)
        pool.release(newer)
        mock_clock.jump(15)  # the older has been idle 35 s, past KEEPALIVE_EXPIRY; the newer 15
        await ask(pool)  # on the newer
        await until_a_close_is_seen(upstream)
    assert (upstream.connections, len(upstream.requests)) == (2, 3)


async def test_a_large_request_body_arrives_whole() -> None:
    body = b"x" * (3 << 20)
    async with running(always(json_answer(b"{}"))) as (upstream, pool):
        headers = [(b"host", b"upstream"), (b"content-length", b"%d" % len(body))]
        request = (b"POST", b"/v1/embeddings", headers)
        await ask(pool, request=request, body=body)
    assert upstream.body_sizes == [len(body)]


async def test_closing_the_pool_closes_its_idle_connections() -> None:
    async with running(always(json_answer(b"{}"))) as (upstream, pool):
        await ask(pool)
        pool.close()
        await until_a_close_is_seen(upstream)


# --- chunks ------------------------------------------------------------------------------------


async def test_events_that_arrive_in_one_read_are_one_chunk_and_paced_ones_are_not() -> None:
    after_first = trio.Event()
    script = always(
        CHUNKED_HEAD + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n"),
        after_first,
        chunk(b"data: 3\n\n") + LAST_CHUNK,
    )
    async with running(script) as (_, pool):
        with trio.fail_after(5):
            response = await pool.send("local", REQUEST, b"{}", connect_timeout=5)
            chunks = []
            async for data in response.chunks():
                chunks.append(data)
                after_first.set()
            pool.release(response)
    assert chunks == [b"data: 1\n\ndata: 2\n\n", b"data: 3\n\n"]


def arrived_by_then(wire: bytes) -> bytes:
    """What h11 makes of the chunked body bytes ``wire``: every data byte it can give yet."""
    protocol = h11.Connection(h11.CLIENT)
    protocol.send(h11.Request(method="POST", target="/", headers=[(b"host", b"x")]))
    protocol.send(h11.EndOfMessage())
    protocol.receive_data(CHUNKED_HEAD + wire)
    data = b""
    while (event := protocol.next_event()) is not h11.NEED_DATA:
        if type(event) is h11.Data:
            data += event.data
        if type(event) is h11.EndOfMessage:
            break
    return data


CHUNKED_BODY = chunk(b"data: 1\n\n") + chunk(b"data: 22\n\n") + b"a;ext=1\r\n" + b"0123456789"
CHUNKED_BODY += b"\r\n" + LAST_CHUNK
# One chunk, then a last chunk with an extension and trailers: a cut may leave the read with the
# chunk and the start of the last chunk, or end it inside a trailer.
WITH_TRAILERS = chunk(b"data: 1\n\n") + b"0;e=1\r\nX-Trailer: yes\r\n\r\n"


@pytest.mark.parametrize(
    ("body", "cut"),
    [(CHUNKED_BODY, cut) for cut in range(1, len(CHUNKED_BODY))]
    + [(WITH_TRAILERS, cut) for cut in range(1, len(WITH_TRAILERS))],
)
async def test_a_chunked_body_split_anywhere_gives_each_reads_data_at_once(
    body: bytes, cut: int
) -> None:
    """Whatever the first read holds (part of a size line, of a chunk, of the CRLF after it),
    its data is given before the next read, and the body ends whole: h11 is asked for events
    only while it may have one to give. Over a socket pair, so the test decides the reads."""
    ours, theirs = socket.socketpair()
    protocol = h11.Connection(h11.CLIENT)
    protocol.send(h11.Request(method="POST", target="/", headers=[(b"host", b"x")]))
    protocol.send(h11.EndOfMessage())
    protocol.receive_data(CHUNKED_HEAD)
    head = protocol.next_event()
    assert isinstance(head, h11.Response)
    connection = _Connection(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    connection.protocol = protocol
    response = PlainResponse(200, list(head.headers), connection, True)
    received: list[bytes] = []

    async def read() -> None:
        async with aclosing(response.chunks()) as chunks:
            async for data in chunks:
                received.append(data)

    with theirs, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            theirs.sendall(body[:cut])
            await trio.testing.wait_all_tasks_blocked()
            assert b"".join(received) == arrived_by_then(body[:cut])
            theirs.sendall(body[cut:])
    assert b"".join(received) == arrived_by_then(body)
    assert connection.reusable()
    connection.close()


async def test_reading_a_closed_connection_fails_each_time_as_closed() -> None:
    """A closed socket's descriptor is -1, which is never waited for: Trio would keep it
    registered to the waiting task, and every later wait on it anywhere would fail as busy."""
    ours, theirs = trio.socket.socketpair()
    connection = _Connection(trio.SocketStream(ours))
    connection.close()
    with trio.fail_after(5):
        for _ in range(3):
            with pytest.raises(trio.ClosedResourceError):
                await connection.receive()
    theirs.close()


async def test_informational_answers_are_skipped() -> None:
    script = always(b"HTTP/1.1 100 Continue\r\n\r\n" + json_answer(b"{}"))
    async with running(script) as (_, pool):
        response, chunks = await ask(pool)
    assert (response.status, chunks) == (200, [b"{}"])


async def test_an_answer_without_a_body_has_no_chunks() -> None:
    async with running(always(b"HTTP/1.1 204 No Content\r\n\r\n")) as (upstream, pool):
        answers = [await ask(pool) for _ in range(2)]
    assert [(response.status, chunks) for response, chunks in answers] == [(204, [])] * 2
    assert upstream.connections == 1


async def test_a_body_delimited_by_the_close_ends_at_the_close() -> None:
    script = always(b"HTTP/1.1 200 OK\r\n\r\nall of it", close=True)
    async with running(script) as (_, pool):
        _, chunks = await ask(pool)
    assert b"".join(chunks) == b"all of it"


# --- errors ------------------------------------------------------------------------------------


async def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        pool = PlainPool("127.0.0.1", bound.getsockname()[1], max_connections=1)
        with pytest.raises(UpstreamConnectError, match="cannot connect to local"):
            await ask(pool)
        # The slot was given back: a second attempt fails the same way rather than waiting.
        with pytest.raises(UpstreamConnectError):
            await ask(pool)
        pool.close()


async def test_a_hang_up_before_the_answer_is_broken_and_says_disconnected() -> None:
    async with running(always(close=True)) as (_, pool):
        with pytest.raises(
            UpstreamBroken, match=r"local failed before its response: .*disconnected"
        ):
            await ask(pool)


async def test_a_garbled_answer_head_is_broken() -> None:
    async with running(always(b"SMTP ready\r\n\r\n")) as (_, pool):
        with pytest.raises(UpstreamBroken, match="local failed before its response"):
            await ask(pool)


@pytest.mark.parametrize(
    "pieces",
    [
        [JSON_HEAD % 100 + b"only this"],
        [CHUNKED_HEAD + chunk(b"data: 1\n\n") + b"ff\r\npartial"],
    ],
    ids=["content-length", "chunked"],
)
async def test_a_close_before_the_framings_end_is_broken_after_what_arrived(
    pieces: list[bytes],
) -> None:
    arrived: list[bytes] = []

    def script(n: int) -> Reply:
        return Reply(pieces, close=True) if n == 1 else Reply([json_answer(b"{}")])

    async with running(script) as (upstream, pool):
        response = await pool.send("local", REQUEST, b"{}", connect_timeout=5)

        async def read_all() -> None:
            async for data in response.chunks():
                arrived.append(data)

        with pytest.raises(UpstreamBroken, match="upstream body broke"):
            await read_all()
        pool.release(response)
        await ask(pool)
    assert arrived  # what arrived before the close was passed on
    assert upstream.connections == 2  # the broken connection was not reused


async def test_a_body_that_stalls_until_its_readers_deadline_is_not_reused() -> None:
    """The body's idle deadline is its reader's cancel scope; cancelled mid-body, the
    connection is closed."""
    never = trio.Event()

    def script(n: int) -> Reply:
        stalled: list[Piece] = [CHUNKED_HEAD + chunk(b"data: 1\n\n"), never]
        return Reply(stalled) if n == 1 else Reply([json_answer(b"{}")])

    async with running(script) as (upstream, pool):
        with trio.move_on_after(0.05) as idle:
            await ask(pool)
        assert idle.cancelled_caught
        await ask(pool)
    assert upstream.connections == 2


async def test_an_invalid_request_header_is_refused_without_quoting_it() -> None:
    """h11's own message quotes the refused value, which may be a credential."""
    secret = b"sk-secret-1234\x00"
    request = (b"POST", b"/v1/chat", [(b"host", b"upstream"), (b"authorization", secret)])
    async with running(always(json_answer(b"{}"))) as (upstream, pool):
        with pytest.raises(UpstreamBroken) as raised:
            await ask(pool, request=request)
        await ask(pool)  # the slot was given back
    assert "sk-secret" not in str(raised.value)
    assert "sk-secret" not in repr(raised.value.__cause__ and raised.value.args)
    assert len(upstream.requests) == 1


# --- through tproxy.upstream -------------------------------------------------------------------


async def test_an_http_upstream_goes_through_the_h11_client_with_its_deadlines(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tproxy.toml"
    config.write_text("[upstreams.default]\nfirst_byte_timeout = 0.2\n")
    never = trio.Event()

    def script(n: int) -> Reply:
        return Reply([json_answer(b"{}")] if n == 1 else [never])

    async with running(script) as (upstream, _):
        url = f"http://127.0.0.1:{upstream.port}"
        settings = load_settings(config, Overrides(upstream=url, cache_dir=tmp_path))
        async with open_upstream_pool(settings, environ={}) as pool:
            ask_upstream = partial(
                pool.open_response,
                "default",
                method="POST",
                target="/v1/chat/completions",
                headers=[],
                body=b"{}",
            )
            async with ask_upstream(deadline=trio.current_time() + 10) as response:
                assert isinstance(response, PlainResponse)
                assert [data async for data in response.chunks()] == [b"{}"]
            with pytest.raises(UpstreamTimeout) as raised:
                async with ask_upstream(deadline=trio.current_time() + 10):
                    pass
            assert raised.value.phase == "first_byte"
            with pytest.raises(UpstreamTimeout) as raised:
                async with ask_upstream(deadline=trio.current_time() + 0.1):
                    pass
            assert raised.value.phase == "total"
            never.set()


async def test_an_https_upstream_stays_on_httpcore2_whose_pool_guard_still_holds(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Bytes past an answer close httpcore2's connection too (``upstream.py``'s pool guard):
    the faults test of it runs over ``http://``, now this client's, so it is checked here."""
    ca = trustme.CA()
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path / "upstream")

    def script(n: int) -> Reply:
        smuggled = json_answer(b'{"smuggled":1}') if n == 1 else b""
        return Reply([json_answer(b'{"n":%d}' % n) + smuggled])

    upstream = RawUpstream(script)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    secured = [trio.SSLListener(listener, server_context(cert, key)) for listener in listeners]
    nursery.start_soon(trio.serve_listeners, upstream.serve, secured)
    config = tmp_path / "tproxy.toml"
    config.write_text(f'[upstreams.default]\nca_file = "{write_ca(ca, tmp_path / "ca.pem")}"\n')
    url = f"https://127.0.0.1:{port}"
    settings = load_settings(config, Overrides(upstream=url, cache_dir=tmp_path))
    answers = []
    async with open_upstream_pool(settings, environ={}) as pool:
        for _ in range(3):
            async with pool.open_response(
                "default",
                method="GET",
                target="/v1/models",
                headers=[],
                body=b"",
                deadline=trio.current_time() + 10,
            ) as response:
                assert isinstance(response, UpstreamResponse)
                answers.append(b"".join([data async for data in response.chunks()]))
    assert answers == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert upstream.connections == 2
