"""The accept loop of ``tproxy/serving/``: what it adds to Hypercorn's connection code.

Prompt closing after a client's FIN and closes that never race a write are tested with the other
client faults (``tests/faults/test_client_faults.py``); this file holds the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
import h11
import httpx2
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.events import Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ConnectionState,
    HTTPRequestEvent,
    Scope,
)
from hypercorn.utils import wrap_app

from tests.conftest import RunningProxy, StartProxy
from tests.security.rawhttp import address, post, read_reply
from tproxy.serving.connection import Connection, Connections, FailureLog
from tproxy.serving.protocols import RepairedH11Protocol
from tproxy.serving.requests import RequestEnds


async def test_a_connection_that_fails_is_closed_and_the_server_goes_on(
    proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in one connection's code (injected: Hypercorn's HTTP/1.1 handler raising on one
    connection's bytes) closes that connection and is logged; it never ends the server, which
    Hypercorn's own loop would let it do."""
    handle = H11Protocol.handle

    async def failing(self: H11Protocol, event: Event) -> None:
        if isinstance(event, RawData) and event.data.startswith(b"BOOM"):
            raise RuntimeError("injected")
        await handle(self, event)

    monkeypatch.setattr(H11Protocol, "handle", failing)
    stream = await trio.open_tcp_stream(*address(proxy.url))
    async with stream:
        await stream.send_all(b"BOOM / HTTP/1.1\r\n\r\n")
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        assert (await http.get("/v1/models")).status_code == 200
    failures = [r for r in caplog.records if r.name == "tproxy.serving"]
    assert [r.levelno for r in failures] == [logging.ERROR]
    assert "RuntimeError at " in failures[0].getMessage()


async def test_a_failing_connection_logs_no_request_bytes_and_a_flood_logs_one_line(
    proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Exception messages can quote what the client sent (an authorization header, decoded):
    the log names the exception and where it was raised, never its message or traceback. Many
    failures in a row log one line, so a client cannot flood the error log."""
    handle = H11Protocol.handle

    async def failing(self: H11Protocol, event: Event) -> None:
        if isinstance(event, RawData) and event.data.startswith(b"BOOM"):
            raise ValueError(f"cannot parse {event.data!r}")
        await handle(self, event)

    monkeypatch.setattr(H11Protocol, "handle", failing)
    for _ in range(20):
        stream = await trio.open_tcp_stream(*address(proxy.url))
        async with stream:
            await stream.send_all(b"BOOM / HTTP/1.1\r\nauthorization: Bearer sk-secret\r\n\r\n")
            with trio.fail_after(5):
                assert await stream.receive_some() == b""
    failures = [r for r in caplog.records if r.name == "tproxy.serving"]
    assert len(failures) == 1
    assert failures[0].exc_info is None
    assert "ValueError at " in failures[0].getMessage()
    assert "sk-secret" not in caplog.text


# --- HTTP/2 clients that stop reading ------------------------------------------------------------

STREAMS = 5


def big_chat(stream: int) -> bytes:
    """A request whose answer, one JSON body of about 100 KB, is larger than HTTP/2's initial
    window (64 KiB): Hypercorn holds the whole answer while it waits for the window."""
    words = " ".join(f"s{stream}w{index}" for index in range(12000))
    return json.dumps({"model": "fake", "messages": [{"role": "user", "content": words}]}).encode()


async def open_h2(proxy: RunningProxy) -> tuple[trio.SocketStream, h2.connection.H2Connection]:
    """A prior-knowledge HTTP/2 connection that never opens its flow-control window."""
    stream = await trio.open_tcp_stream(*address(proxy.url))
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    await stream.send_all(connection.data_to_send())
    return stream, connection


async def post_h2(
    stream: trio.SocketStream, connection: h2.connection.H2Connection, stream_id: int
) -> None:
    body = big_chat(stream_id)
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "tproxy"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
    ]
    connection.send_headers(stream_id, headers)
    while body:
        window = min(
            connection.local_flow_control_window(stream_id), connection.max_outbound_frame_size
        )
        if window:
            piece, body = body[:window], body[window:]
            connection.send_data(stream_id, piece, end_stream=not body)
        else:  # wait for the server's WINDOW_UPDATE (it acknowledges what it read at once)
            data = await stream.receive_some()
            assert data
            connection.receive_data(data)
        await stream.send_all(connection.data_to_send())


async def read_until_window_shut(
    stream: trio.SocketStream, connection: h2.connection.H2Connection
) -> None:
    """Read what the server sends until the connection's window (64 KiB) is used up."""
    while connection.inbound_flow_control_window > 0:
        data = await stream.receive_some()
        assert data
        connection.receive_data(data)
        await stream.send_all(connection.data_to_send())  # settings acks, never a window


async def test_an_h2_connection_closed_with_answers_stuck_on_flow_control_ends_them_all(
    proxy: RunningProxy,
) -> None:
    """Streams whose answers wait for a window the client never opens end as soon as the
    connection closes, not at their total deadline (an hour): nothing of them stays in flight,
    and the proxy closes its side at once rather than after its idle timer (the client
    half-closes, so the proxy's close is seen as the end of the stream)."""
    stream, connection = await open_h2(proxy)
    with trio.fail_after(20):
        async with stream:
            for stream_id in range(1, 2 * STREAMS, 2):
                await post_h2(stream, connection, stream_id)
            await read_until_window_shut(stream, connection)
            assert len(proxy.inflight) > 0
            await stream.send_eof()
            while await stream.receive_some():
                pass
        await proxy.inflight.wait_idle()


async def test_an_h2_stream_stalled_on_flow_control_is_reset_after_client_stall_timeout(
    start_proxy: StartProxy,
) -> None:
    """A client that keeps its connection and reads it, but never opens its window, is bounded
    like a TCP client that stops reading: its streams are reset, their exchanges end."""
    proxy = await start_proxy("[server]\nclient_stall_timeout = 0.5\n")
    stream, connection = await open_h2(proxy)
    reset: set[int] = set()
    with trio.fail_after(20):
        async with stream:
            for stream_id in range(1, 2 * STREAMS, 2):
                await post_h2(stream, connection, stream_id)
            while len(reset) < STREAMS:
                data = await stream.receive_some()
                assert data
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.StreamReset):
                        reset.add(event.stream_id)
                await stream.send_all(connection.data_to_send())
            await proxy.inflight.wait_idle()
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        assert (await http.get("/v1/models")).status_code == 200


async def test_an_h2_request_whose_path_is_not_ascii_resets_its_stream_alone(
    proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Such a request is malformed (RFC 9113, 8.1.1): its stream is reset with PROTOCOL_ERROR,
    the request beside it on the same connection is answered, and its headers (here an
    authorization) appear in no log line, even at DEBUG. Hypercorn's decoding of the path used
    to fail the whole connection."""
    caplog.set_level(logging.DEBUG)
    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    connection = h2.connection.H2Connection(config)
    bad = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"tproxy"),
        (b":path", b"/v1/\xff\xfe"),
        (b"authorization", b"Bearer sk-secret-key"),
    ]
    good = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"x"),
        (b":path", b"/v1/models"),
    ]
    reset: dict[int, int] = {}
    statuses: dict[int, int] = {}
    stream = await trio.open_tcp_stream(*address(proxy.url))
    with trio.fail_after(10):
        async with stream:
            connection.initiate_connection()
            connection.send_headers(1, bad, end_stream=True)
            connection.send_headers(3, good, end_stream=True)
            await stream.send_all(connection.data_to_send())
            while 3 not in statuses or 1 not in reset:
                data = await stream.receive_some()
                assert data, "the connection closed"
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.StreamReset):
                        reset[event.stream_id] = event.error_code
                    elif isinstance(event, h2.events.ResponseReceived):
                        statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                await stream.send_all(connection.data_to_send())
    assert reset == {1: h2.errors.ErrorCodes.PROTOCOL_ERROR}
    assert statuses == {3: 200}
    assert "sk-secret-key" not in caplog.text
    assert not [record for record in caplog.records if record.name == "tproxy.serving"]


async def test_repeated_connection_failures_log_one_line_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where the failure was and what it was, never the request's bytes; while failures repeat,
    one line an interval, which counts the ones held back."""
    failures = FailureLog(60.0)
    for _ in range(10):
        try:
            b"\xff".decode("ascii")
        except UnicodeDecodeError as error:
            failures.failed(error)
    clock_moved = trio.current_time() + 61
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trio, "current_time", lambda: clock_moved)
        failures.failed(ValueError("again"))
    lines = [r.getMessage() for r in caplog.records if r.name == "tproxy.serving"]
    assert [line.split(" at ")[0] for line in lines] == [
        "a connection failed (UnicodeDecodeError",
        "a connection failed (ValueError) and was closed; serving goes on; 9 more in the last 60s",
    ]
    assert "test_serving.py" in lines[0]


# An HTTP/2 request whose declared length is over ``max_body_bytes = 1000``, and one beside it.
DECLARED_TOO_LARGE = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "tproxy"),
    (":path", "/v1/chat/completions"),
    ("content-length", "30000"),
]
MODELS = [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/v1/models")]


async def test_an_h2_stream_refused_early_leaves_its_connection_serving(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A 413 decided from the declared length, while the client still sends the body: the rest
    of that stream's DATA is discarded, and the connection's other streams are served."""
    proxy = await start_proxy("[server]\nmax_body_bytes = 1000\n")
    stream, connection = await open_h2(proxy)
    statuses: dict[int, int] = {}
    ended: set[int] = set()

    async def read_until(done: Callable[[], bool]) -> None:
        while not done():
            data = await stream.receive_some()
            assert data
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
            await stream.send_all(connection.data_to_send())

    with trio.fail_after(10):
        async with stream:
            connection.send_headers(1, DECLARED_TOO_LARGE)
            connection.send_data(1, b"x" * 10000)
            await stream.send_all(connection.data_to_send())
            await read_until(lambda: 1 in ended)
            connection.send_data(1, b"x" * 10000)  # the client has not noticed yet
            connection.send_headers(3, MODELS, end_stream=True)
            await stream.send_all(connection.data_to_send())
            await read_until(lambda: 3 in ended)
    assert statuses == {1: 413, 3: 200}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_h2_stream_refused_early_with_its_body_queued_frees_its_connection(
    start_proxy: StartProxy,
) -> None:
    """A 413 decided from the declared length, while the client sends more DATA frames than a
    request's queue holds and keeps its window small: the queue fills (the app never reads
    it), and the connection's reading task waits for room. The stream is then reset at
    ``client_stall_timeout`` (its answer cannot go out), and its departure must free that
    reading task: it used to wait for room in the same queue, and the connection hung for good,
    every stream on it, its socket and its exchange."""
    proxy = await start_proxy("[server]\nmax_body_bytes = 1000\nclient_stall_timeout = 0.5\n")
    stream, connection = await open_h2(proxy)
    connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
    statuses: dict[int, int] = {}
    ended: set[int] = set()
    reset: set[int] = set()
    with trio.fail_after(10):
        async with stream:
            connection.send_headers(1, DECLARED_TOO_LARGE)
            for _ in range(30):
                connection.send_data(1, b"x" * 100)
            connection.send_headers(3, MODELS, end_stream=True)
            await stream.send_all(connection.data_to_send())
            while 3 not in ended or 1 not in ended | reset:
                data = await stream.receive_some()
                assert data, "the connection closed"
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        connection.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        ended.add(event.stream_id)
                    elif isinstance(event, h2.events.StreamReset):
                        reset.add(event.stream_id)
                await stream.send_all(connection.data_to_send())
        await proxy.inflight.wait_idle()
    assert statuses == {1: 413, 3: 200}


# --- writes and the idle timer -------------------------------------------------------------------


async def writes_of(
    app: ASGIFramework, then: Callable[[], None] | None = None
) -> list[list[bytes]]:
    """What Hypercorn's HTTP/1.1 protocol, as tproxy runs it, writes to the socket for one
    request answered by ``app``: the writes done by the time every task waits, then (after
    ``then()``) the writes done by the time every task waits again."""
    writes: list[bytes] = []

    async def write(event: Event) -> None:
        if isinstance(event, RawData):
            writes.append(event.data)

    rounds: list[list[bytes]] = []
    async with TaskGroup() as task_group:
        protocol = RepairedH11Protocol(
            wrap_app(app, 0, "asgi"),
            Config(),
            WorkerContext(None),
            task_group,
            ConnectionState({}),
            False,
            ("127.0.0.1", 40000),
            ("127.0.0.1", 8080),
            write,
        )
        await protocol.handle(RawData(post(b"/v1/chat/completions", b"{}")))
        await trio.testing.wait_all_tasks_blocked()
        rounds.append(list(writes))
        if then is not None:
            then()
            await trio.testing.wait_all_tasks_blocked()
            rounds.append(writes[len(rounds[0]) :])
    return rounds


async def test_an_answer_with_a_length_is_written_once_head_and_body_together() -> None:
    """A cache hit's answer (a Content-Length, one body message) costs one write: Hypercorn
    wrote the head, then the body, then an empty end, each under its lock."""

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await receive()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
        )
        await send({"type": "http.response.body", "body": b"hello", "more_body": False})

    [writes] = await writes_of(app)
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert writes[0].endswith(b"\r\n\r\nhello")


async def test_a_streamed_answer_has_its_head_written_before_its_first_event() -> None:
    """A stream's head (chunked: no Content-Length) is not held back for its first event, which
    may be seconds away."""
    first_event = trio.Event()

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send(
            {"type": "http.response.start", "status": 200, "headers": headers, "trailers": False}
        )
        await first_event.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": False})

    before, after = await writes_of(app, first_event.set)
    assert len(before) == 1
    assert before[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert before[0].endswith(b"\r\n\r\n")
    assert b"".join(after) == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"


async def read_chunked_to_its_end(stream: trio.SocketStream) -> bytes:
    received = b""
    while not received.endswith(b"\r\n0\r\n\r\n"):
        data = await stream.receive_some()
        assert data, received
        received += data
    return received


async def test_an_answer_longer_than_keep_alive_timeout_is_not_cut_and_the_timer_restarts(
    start_proxy: StartProxy,
) -> None:
    """The idle timer stops while an answer is under way (a stream of ~0.6 s against a 0.3 s
    keep-alive), runs again once the connection is idle, and closes it then."""
    proxy = await start_proxy("[server]\nkeep_alive_timeout = 0.3\n")
    stream = await trio.open_tcp_stream(*address(proxy.url))
    async with stream:
        for turn in range(2):  # the second request (another question) finds the connection open
            words = f"a b c d e {turn}"
            message = {
                "model": "fake",
                "stream": True,
                "messages": [{"role": "user", "content": words}],
            }
            body = json.dumps(message).encode()
            await stream.send_all(
                post(b"/v1/chat/completions", body, extra=b"x-fake-delay: 0.1\r\n")
            )
            with trio.fail_after(10):
                answer = await read_chunked_to_its_end(stream)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"data: [DONE]" in answer
        with trio.fail_after(5):
            assert await stream.receive_some() == b""


async def test_the_drain_closes_a_kept_alive_idle_connection_at_once(
    start_proxy: StartProxy,
) -> None:
    """When the server starts draining, a connection waiting idle for its next request is
    closed now, not at the end of its keep-alive (60 s) or of the drain."""
    proxy = await start_proxy("[server]\nkeep_alive_timeout = 60\ngraceful_timeout = 30\n")
    stream = await trio.open_tcp_stream(*address(proxy.url))
    async with stream:
        await stream.send_all(b"GET /v1/models HTTP/1.1\r\nhost: tproxy\r\n\r\n")
        assert (await read_reply(stream)).status == 200
        proxy.stop.set()
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
        with trio.fail_after(10):
            await proxy.stopped.wait()


async def streamed_words(proxy: RunningProxy, count: int, *, read_late: bool) -> list[str]:
    """The words of a streamed chat answer of ``count`` words, read by a client with a 4 KiB
    receive buffer; ``read_late``: it reads nothing until every task waits (the proxy's socket
    is full, its writes wait)."""
    message = {"role": "user", "content": " ".join(f"w{index}" for index in range(count))}
    body = json.dumps({"model": "fake", "stream": True, "messages": [message]}).encode()
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(address(proxy.url))
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="POST", target="/", headers=[("host", "tproxy")]))
    received = bytearray()
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(post(b"/v1/chat/completions", body))
        if read_late:
            await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(20):
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    parser.receive_data(await stream.receive_some())
                elif isinstance(event, h11.Data):
                    received += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
    words: list[str] = []
    for line in bytes(received).split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                words.extend(choice["delta"].get("content", "").split())
    return words


async def test_a_stream_larger_than_the_socket_buffers_arrives_whole_when_read_late(
    start_proxy: StartProxy,
) -> None:
    """Body writes go straight to the socket while it takes them at once, and through
    Hypercorn's locked write once it is full (the rest of a write it took in part, and every
    write after it while that one waits): the events arrive whole, in order, once."""
    proxy = await start_proxy("[cache]\nenabled = false\n")
    expected = [f"w{index}" for index in range(3000)]
    assert await streamed_words(proxy, 3000, read_late=False) == expected
    assert await streamed_words(proxy, 3000, read_late=True) == expected


async def test_a_cancelled_write_sends_all_of_its_bytes_or_none() -> None:
    """A write asked for by a cancelled task (a stream reset, a deadline) goes out whole or not
    at all: a part of an HTTP/2 frame on the wire would end the connection for every stream."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    message = b"x" * (1 << 20)  # far more than the socket takes at once

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        raise AssertionError("no request is read here")

    connection = Connection(
        Connections(),
        FailureLog(60.0),
        60.0,
        app,
        Config(),
        WorkerContext(None),
        {},
        trio.SocketStream(trio.socket.from_stdlib_socket(ours)),
    )
    with trio.CancelScope() as scope:
        scope.cancel()
        await connection.protocol_send(RawData(message))
    assert scope.cancelled_caught
    theirs.setblocking(False)
    received = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := theirs.recv(1 << 16):
            received += chunk
    assert received in (b"", message)
    ours.close()
    theirs.close()


# --- the app's task and the client's departure ----------------------------------------------


async def test_a_departure_is_told_to_the_listener_once_as_soon_as_it_is_queued() -> None:
    """The app learns that its client left from a listener, not from a task waiting on
    ``receive()`` for the whole answer; a listener that comes late is told at once."""
    ends = RequestEnds(trio.lowlevel.checkpoint, 10)
    told: list[str] = []
    ends.listen(lambda: told.append("first"))
    await ends.put({"type": "http.request", "body": b"{", "more_body": True})
    assert told == []
    await ends.put({"type": "http.disconnect"})
    assert told == ["first"]
    await ends.put({"type": "http.disconnect"})
    assert told == ["first"]
    ends.listen(lambda: told.append("late"))
    assert told == ["first", "late"]


async def test_the_app_receives_the_body_then_the_departure_before_or_after_it_is_queued() -> None:
    """``receive()`` gives the body's messages as Hypercorn queued them, then the departure,
    whether it was queued behind the body or comes later (the queue itself is let go once the
    body is whole)."""
    ends = RequestEnds(trio.lowlevel.checkpoint, 10)
    await ends.put({"type": "http.request", "body": b"{", "more_body": True})
    await ends.put({"type": "http.request", "body": b"}", "more_body": False})
    await ends.put({"type": "http.disconnect"})
    assert [await ends.receive() for _ in range(3)] == [
        {"type": "http.request", "body": b"{", "more_body": True},
        {"type": "http.request", "body": b"}", "more_body": False},
        {"type": "http.disconnect"},
    ]
    later = RequestEnds(trio.lowlevel.checkpoint, 10)
    await later.put({"type": "http.request", "body": b"{}", "more_body": False})
    assert await later.receive() == {"type": "http.request", "body": b"{}", "more_body": False}
    received: list[str] = []

    async def app_waits() -> None:
        received.append((await later.receive())["type"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(app_waits)
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        await later.put({"type": "http.disconnect"})
    assert received == ["http.disconnect"]


async def test_a_listener_that_stopped_or_a_cancelled_reader_hears_no_departure() -> None:
    """A request that stopped listening (its answer is whole) hears nothing; nor does one whose
    connection's reading task is cancelled (the drain's deadline closes the sockets): that
    request ends as shut down, not as a client gone. Before and after the body is whole."""
    told: list[str] = []
    for body_read in (False, True):
        ends = RequestEnds(trio.lowlevel.checkpoint, 10)
        if body_read:
            await ends.put({"type": "http.request", "body": b"{}", "more_body": False})
            await ends.receive()
        ends.listen(lambda: told.append("left"))
        with trio.CancelScope() as scope:
            scope.cancel()
            await ends.put({"type": "http.disconnect"})
        assert told == []
        ends.listen(None)
        await ends.put({"type": "http.disconnect"})
        assert told == []


async def test_a_departure_never_waits_for_room_in_a_full_queue() -> None:
    """A departure while the queue is full (an app that is not reading its body) is not queued
    behind the body: it closes the queue, a body message waiting for room is dropped, and the
    app reads what was queued, then the departure."""
    ends = RequestEnds(trio.lowlevel.checkpoint, 1)
    told: list[str] = []
    ends.listen(lambda: told.append("left"))
    first: HTTPRequestEvent = {"type": "http.request", "body": b"{", "more_body": True}
    second: HTTPRequestEvent = {"type": "http.request", "body": b"x", "more_body": True}
    with trio.fail_after(5):  # the departure used to wait, and the put before it, for good
        async with trio.open_nursery() as nursery:
            await ends.put(first)
            nursery.start_soon(ends.put, second)
            await trio.testing.wait_all_tasks_blocked()
            await ends.put({"type": "http.disconnect"})
    assert told == ["left"]
    assert [await ends.receive() for _ in range(3)] == [
        first,
        {"type": "http.disconnect"},
        {"type": "http.disconnect"},
    ]
