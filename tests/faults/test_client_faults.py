"""Client faults: clients that leave at any moment, read slowly or not at all, idle, or dribble
their requests. Each costs the proxy bounded memory and time, never another client's answer.

Slow clients are raw sockets with a tiny receive buffer that never read; their pacing (when they
send) is the only use of ``trio.sleep`` here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import socket
import struct
from contextlib import aclosing

import httpx2
import pytest
import trio
from trio_util import AsyncValue

from tests.conftest import RunningProxy, StartProxy, access_lines
from tests.faults.conftest import CHAT, FAULT, StartScripted, assert_recovered, chat
from tests.faults.scripted import (
    ScriptedUpstream,
    chunked,
    no_faults_here,
    response_head,
    sse_body,
)
from tests.h11peer import SeenRequest
from tests.security.rawhttp import address, post, read_reply
from tproxy.pipeline import exchanger as exchanger_module
from tproxy.pipeline.live import LiveFlight

NO_STORE = {"cache-control": "no-store"}
ENDLESS = 1 << 30  # the nominal length of an answer that is never sent whole
PIECE = b"x" * 65536


def words(count: int) -> str:
    return " ".join(f"w{index}" for index in range(count))


def raw_chat(body: dict[str, object], headers: dict[str, str]) -> bytes:
    extra = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in headers.items())
    return post(CHAT.encode(), json.dumps(body).encode(), extra=extra)


async def stalled_client(proxy: RunningProxy, request: bytes) -> trio.socket.SocketType:
    """A client that sends ``request`` and then never reads: a 4 KiB receive buffer, unread."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(address(proxy.url))
    await sock.send(request)
    return sock


class EndlessUpstream:
    """A scripted answer that streams forever, counting what the proxy has taken so far and the
    calls the proxy cut."""

    def __init__(self) -> None:
        self.sent = AsyncValue(0)
        self.cuts = 0
        self.cut = trio.Event()

    async def script(self, stream: trio.SocketStream, request: SeenRequest) -> None:
        await stream.send_all(response_head(200, b"application/octet-stream", length=ENDLESS))
        try:
            while self.sent.value < ENDLESS:
                await stream.send_all(PIECE)
                self.sent.value += len(PIECE)
        except trio.BrokenResourceError:
            self.cuts += 1
            self.cut.set()


# --- clients that leave ------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [FAULT, {**FAULT, **NO_STORE}], ids=["shared", "private"])
async def test_a_client_leaving_before_the_upstream_answers_ends_the_upstream_call(
    start_proxy: StartProxy, start_scripted: StartScripted, headers: dict[str, str]
) -> None:
    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        await scripted.wait_for_close(stream)

    scripted = await start_scripted(script)
    proxy = await start_proxy(upstream_url=scripted.url)
    body = chat("an answer nobody waits for")
    client = await trio.open_tcp_stream(*address(proxy.url))
    await client.send_all(raw_chat(body, headers))
    await scripted.received.wait_value(1)
    await client.aclose()
    with trio.fail_after(5):
        await scripted.peer_closed_event.wait()
    await assert_recovered(proxy, body, expected=sse_body(body))


@pytest.mark.parametrize("headers", [FAULT, {**FAULT, **NO_STORE}], ids=["shared", "private"])
async def test_a_client_leaving_mid_stream_ends_the_upstream_call_and_stores_nothing(
    start_proxy: StartProxy, start_scripted: StartScripted, headers: dict[str, str]
) -> None:
    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        whole = sse_body(json.loads(request.body))
        await stream.send_all(response_head() + chunked(whole[:100]))
        await scripted.wait_for_close(stream)

    scripted = await start_scripted(script)
    proxy = await start_proxy(upstream_url=scripted.url)
    body = chat(words(50))
    async with (
        httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http,
        http.stream("POST", CHAT, json=body, headers=headers) as response,
        aclosing(response.aiter_raw()) as chunks,
    ):
        assert await anext(chunks) == sse_body(body)[:100]
    with trio.fail_after(5):
        await scripted.peer_closed_event.wait()
    await assert_recovered(proxy, body, expected=sse_body(body))


async def test_a_client_leaving_during_a_replay_harms_neither_the_entry_nor_the_proxy(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    scripted = await start_scripted(no_faults_here)
    proxy = await start_proxy(upstream_url=scripted.url)
    body = chat(words(20000))  # an answer of about 3 MB: its replay cannot fit in socket buffers
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        stored = await http.post(CHAT, json=body)
        await proxy.flush()
        with trio.socket.socket() as leaver:
            leaver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await leaver.connect(address(proxy.url))
            await leaver.send(raw_chat(body, {}))
            assert (await leaver.recv(1024)).startswith(b"HTTP/1.1 200")
            # leaving with unread data: the kernel resets the connection mid-replay
        with trio.fail_after(5):
            await proxy.flush()
        replayed = await http.post(CHAT, json=body)
    assert len(stored.content) > 2 << 20
    assert replayed.headers["cache-status"].startswith("tproxy; hit")
    assert replayed.content == stored.content
    assert scripted.calls(CHAT) == 1


async def test_a_client_leaving_with_a_request_pipelined_behind_its_stream_frees_its_connection(
    start_proxy: StartProxy,
) -> None:
    """A request pipelined behind a streamed answer pauses the connection's reading until that
    answer is over; the client then leaves (a reset), and the answer's next write fails. That
    failure ends the exchange, and must end the connection too: its reading task stayed paused
    for good, holding its socket, and a drain waited for it until ``graceful_timeout``."""
    proxy = await start_proxy("[server]\ngraceful_timeout = 60\n")
    body = json.dumps(chat(words(200))).encode()
    request = post(CHAT.encode(), body, extra=b"x-fake-delay: 0.02\r\ncache-control: no-store\r\n")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address(proxy.url))
        await stream.send_all(request + request)
        assert await stream.receive_some()  # the first answer is flowing
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        await proxy.inflight.wait_idle()
        proxy.stop.set()
        await proxy.stopped.wait()


# --- clients that do not read ------------------------------------------------------------------


async def test_a_client_that_never_reads_holds_bounded_memory_and_others_are_served(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    """A private flight waits for its client: TCP backpressure reaches the upstream, which can
    hand the proxy no more than socket buffers and ``stream_buffer_chunks`` hold."""
    endless = EndlessUpstream()
    scripted = await start_scripted(endless.script)
    proxy = await start_proxy(upstream_url=scripted.url)
    stalled = await stalled_client(proxy, raw_chat(chat("flood me"), {**FAULT, **NO_STORE}))
    with stalled:
        await endless.sent.wait_value(lambda sent: sent >= 1 << 20)
        answers: dict[int, bytes] = {}

        async def ask(index: int) -> None:
            response = await http.post(CHAT, json=chat(f"client {index} asks"))
            answers[index] = response.content

        with trio.fail_after(10):
            async with (
                httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http,
                trio.open_nursery() as nursery,
            ):
                for index in range(20):
                    nursery.start_soon(ask, index)
        assert answers == {i: sse_body(chat(f"client {i} asks")) for i in range(20)}
        assert endless.sent.value < 64 << 20
    with trio.fail_after(5):  # the client left at last: the upstream call ends with it
        await endless.cut.wait()


@pytest.mark.slow
async def test_a_client_that_never_reads_is_cut_off_by_the_total_timeout(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    """Only ``total_timeout`` can end this upstream call in time: the stalled client's own limit
    (``client_stall_timeout``) is a minute away."""
    endless = EndlessUpstream()
    scripted = await start_scripted(endless.script)
    proxy = await start_proxy(
        "[upstreams.default]\ntotal_timeout = 0.5\n[server]\nclient_stall_timeout = 60\n",
        upstream_url=scripted.url,
    )
    stalled = await stalled_client(proxy, raw_chat(chat("flood me"), {**FAULT, **NO_STORE}))
    with stalled:
        await scripted.received.wait_value(1)
        with trio.fail_after(2.5):
            await endless.cut.wait()


@pytest.mark.slow
async def test_a_client_that_never_reads_does_not_hold_up_shutdown(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    endless = EndlessUpstream()
    scripted = await start_scripted(endless.script)
    proxy = await start_proxy(
        "[server]\ngraceful_timeout = 0.3\nclient_stall_timeout = 0.5\n", upstream_url=scripted.url
    )
    stalled = await stalled_client(proxy, raw_chat(chat("flood me"), {**FAULT, **NO_STORE}))
    with stalled:
        await endless.sent.wait_value(lambda sent: sent >= 1 << 20)
        proxy.stop.set()
        with trio.fail_after(2):
            await proxy.stopped.wait()


# --- idle and dribbling clients ----------------------------------------------------------------


def idle_connection_count() -> int:
    """2,000 (issue 7), or what the file descriptor limit leaves room for: each idle connection
    costs two descriptors here, the client's and the server's."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return min(2000, (soft - 256) // 2)


@pytest.mark.slow
async def test_thousands_of_idle_connections_do_not_stop_normal_requests(
    proxy: RunningProxy,
) -> None:
    count = idle_connection_count()
    assert count >= 100, "the file descriptor limit is too low for this test"
    idle: list[trio.SocketStream] = []
    try:
        with trio.fail_after(20):
            for index in range(count):
                idle.append(await trio.open_tcp_stream(*address(proxy.url)))
                if index % 2:  # half of them start a request and never finish its head
                    await idle[-1].send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
            with trio.fail_after(10):
                answers = [await http.post(CHAT, json=chat(f"still here {i}")) for i in range(5)]
    finally:
        for stream in idle:
            await stream.aclose()
    assert [answer.content for answer in answers] == [
        sse_body(chat(f"still here {i}")) for i in range(5)
    ]


async def ends_within(stream: trio.SocketStream, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection, which must be soon."""
    received = b""
    with trio.fail_after(seconds):
        try:
            while data := await stream.receive_some():
                received += data
        except trio.BrokenResourceError:
            pass
    return received


async def test_a_client_sending_its_head_slowly_is_closed_after_keep_alive_timeout(
    start_proxy: StartProxy,
) -> None:
    """Hypercorn's idle timer runs until a request head is complete: a head dribbled one byte at
    a time is closed at ``server.keep_alive_timeout`` with no answer, however busy it looks."""
    proxy = await start_proxy("[server]\nkeep_alive_timeout = 0.3\n")
    head = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 300 + b"\r\n\r\n"
    sent = 0
    stream = await trio.open_tcp_stream(*address(proxy.url))
    async with stream, trio.open_nursery() as nursery:

        async def dribble() -> None:
            nonlocal sent
            with contextlib.suppress(trio.BrokenResourceError):
                for index in range(len(head)):
                    await stream.send_all(head[index : index + 1])
                    sent += 1
                    await trio.sleep(0.01)

        nursery.start_soon(dribble)
        assert await ends_within(stream, 3) == b""
        nursery.cancel_scope.cancel()
    assert sent < len(head)


@pytest.mark.slow
async def test_a_client_that_stalls_its_body_is_cut_off(start_proxy: StartProxy) -> None:
    proxy = await start_proxy("[server]\nbody_timeout = 0.3\n")
    stream = await trio.open_tcp_stream(*address(proxy.url))
    async with stream:
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{"
        )
        reply = await ends_within(stream, 2)
    assert reply.startswith(b"HTTP/1.1 408")


# --- what happens to a connection after its answer ---------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        "hit",
        "refused",
        pytest.param("shared-flight", marks=pytest.mark.slow),
        pytest.param("private-flight", marks=pytest.mark.slow),
    ],
)
async def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_timeout(
    start_proxy: StartProxy, kind: str
) -> None:
    proxy = await start_proxy("[server]\nkeep_alive_timeout = 0.3\nmax_body_bytes = 100000\n")
    body = chat("keep me alive", stream=False)
    headers = {"refused": {"x-pad": "a"}, "private-flight": NO_STORE}.get(kind, {})
    if kind == "hit":
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
            await http.post(CHAT, json=body)
        await proxy.flush()
    if kind == "refused":
        body = chat("x" * 200000, stream=False)
    stream = await trio.open_tcp_stream(*address(proxy.url))
    async with stream:
        await stream.send_all(raw_chat(body, headers))
        reply = await read_reply(stream)
        assert reply.status == (413 if kind == "refused" else 200)
        assert await ends_within(stream, 1.5) == b""


@pytest.mark.parametrize("kind", ["hit", "flight"])
async def test_a_client_that_closes_after_its_answer_has_its_connection_closed_at_once(
    start_proxy: StartProxy, kind: str
) -> None:
    """The client's close ends the connection now, not when its idle timer (60 s) runs out.

    The client half-closes (FIN, still reading) so that the proxy's own close is seen as end of
    file; a socket left open would sit in CLOSE_WAIT on the proxy's side.
    """
    proxy = await start_proxy("[server]\nkeep_alive_timeout = 60\n")
    body = chat(f"then leave ({kind})", stream=False)
    if kind == "hit":
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
            await http.post(CHAT, json=body)
        await proxy.flush()
    stream = await trio.open_tcp_stream(*address(proxy.url))
    async with stream:
        await stream.send_all(raw_chat(body, {}))
        reply = await read_reply(stream)
        assert reply.status == 200
        await proxy.flush()  # the answer is over: the connection waits, idle, for a next request
        await stream.send_eof()
        assert await ends_within(stream, 5) == b""


@pytest.mark.slow
async def test_connection_close_is_honoured_after_an_answer_from_a_flight(
    proxy: RunningProxy,
) -> None:
    stream = await trio.open_tcp_stream(*address(proxy.url))
    async with stream:
        await stream.send_all(raw_chat(chat("then close", stream=False), {"connection": "close"}))
        reply = await read_reply(stream)
        assert reply.status == 200
        assert await ends_within(stream, 1.5) == b""


@pytest.mark.parametrize("reading", [True, False], ids=["reading", "not-reading"])
async def test_bytes_after_a_closing_request_while_its_answer_is_written_end_only_that_client(
    start_proxy: StartProxy,
    start_scripted: StartScripted,
    caplog: pytest.LogCaptureFixture,
    reading: bool,
) -> None:
    """A client that asked for ``Connection: close`` and then sends more commits a protocol
    error, and Hypercorn closes its connection from the reading task while the answer is being
    written. That close once raced the writes (``BusyResourceError`` in the answer's task, a
    traceback in the log). Now the writes fail as on a closed connection: each such exchange ends
    ``client_gone``, nothing is logged as an error, and the proxy goes on serving.
    """
    caplog.set_level(logging.INFO, logger="tproxy.access")
    endless = EndlessUpstream()
    scripted: ScriptedUpstream = await start_scripted(endless.script)
    proxy = await start_proxy(upstream_url=scripted.url)
    request = raw_chat(chat("close, then more"), {**FAULT, **NO_STORE, "connection": "close"})
    attempts = 10 if reading else 1
    with trio.fail_after(30):
        for attempt in range(attempts):
            if reading:
                stream = await trio.open_tcp_stream(*address(proxy.url))
                async with stream:
                    await stream.send_all(request)
                    await stream.receive_some()  # the answer is flowing
                    await stream.send_all(b"GET /more HTTP/1.1\r\nhost: x\r\n\r\n")
                    with contextlib.suppress(trio.BrokenResourceError):
                        while await stream.receive_some():
                            pass
            else:
                client = await stalled_client(proxy, request)
                with client:
                    await endless.sent.wait_value(lambda sent: sent >= 8 * len(PIECE))
                    await client.send(b"GET /more HTTP/1.1\r\nhost: x\r\n\r\n")
            while endless.cuts <= attempt:
                await endless.cut.wait()
                endless.cut = trio.Event()
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        answer = await http.post(CHAT, json=chat("still serving"))
    assert answer.content == sse_body(chat("still serving"))
    await proxy.flush()
    states = [line["state"] for line in access_lines(caplog)]
    assert states == ["client_gone"] * attempts + ["completed"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_upstream_of_a_client_that_never_reads_is_the_only_one_held(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    """Two clients that never read hold two upstream calls; nobody else's is touched."""
    endless = EndlessUpstream()
    scripted: ScriptedUpstream = await start_scripted(endless.script)
    proxy = await start_proxy(upstream_url=scripted.url)
    request = raw_chat(chat("flood me"), {**FAULT, **NO_STORE})
    first = await stalled_client(proxy, request)
    second = await stalled_client(proxy, request)
    with first, second:
        await scripted.received.wait_value(2)
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
            answer = await http.post(CHAT, json=chat("unaffected"))
        assert answer.content == sse_body(chat("unaffected"))
        assert endless.cuts == 0
    with trio.fail_after(5):
        while endless.cuts < 2:
            await endless.cut.wait()
            endless.cut = trio.Event()


async def test_followers_that_never_read_are_cut_off_and_the_shared_call_ends_with_them(
    start_proxy: StartProxy, start_scripted: StartScripted, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that never read, on one shared flight of an answer longer than max_entry_bytes:
    each is cut off once it holds max_entry_bytes (queued or in its writer's hands), leaves the
    flight then and there, and when none is left the upstream call ends (policy ``cancel``),
    long before their own stall timeout."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    endless = EndlessUpstream()
    scripted = await start_scripted(endless.script)
    proxy = await start_proxy(
        "[cache]\nmax_entry_bytes = 1048576\n[server]\nclient_stall_timeout = 60\n",
        upstream_url=scripted.url,
    )
    request = raw_chat(chat("flood us all"), FAULT)
    stalled = [await stalled_client(proxy, request) for _ in range(4)]
    try:
        with trio.fail_after(10):
            await endless.cut.wait()
        assert scripted.calls(CHAT) == 1  # they all followed one flight
        assert endless.sent.value < 64 << 20
    finally:
        for sock in stalled:
            sock.close()
    with trio.fail_after(10):
        await proxy.flush()
    assert len(access_lines(caplog)) == 4


async def test_an_answer_finished_during_a_drain_is_completed_though_its_client_keeps_the_socket(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """During a drain, a connection closes after its answer, and lingers to read what its client
    still sends. A pooled client (httpx's) keeps its socket until its next use, so the linger
    lasts its whole ``LINGER_SECONDS``: that is the connection's own business, not the
    answer's. The answer's last write used to wait for it, and the exchange, whole at the
    client, was cut at ``graceful_timeout`` and recorded as shut down."""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    proxy = await start_proxy("[server]\ngraceful_timeout = 2\n")
    body = chat(words(20))
    headers = {"x-fake-delay": "0.02", **NO_STORE}
    with trio.fail_after(20):
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
            async with http.stream("POST", CHAT, json=body, headers=headers) as answer:
                chunks = aiter(answer.aiter_bytes())
                received = await anext(chunks)
                proxy.stop.set()
                async for chunk in chunks:
                    received += chunk
            await proxy.stopped.wait()
    assert received.endswith(b"data: [DONE]\n\n")
    await proxy.exchanger.telemetry.flush()
    assert [line["state"] for line in access_lines(caplog)] == ["completed"]


async def test_an_http_1_0_answer_ends_when_its_last_byte_is_out_not_when_its_request_ends(
    proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP/1.0 client's streamed answer has no framing: it ends when the proxy shuts its
    side of the connection. That goes out with the answer's last bytes, not once the request's
    task has ended: here it waits (for good) to learn what became of storing the answer."""
    monkeypatch.setattr(exchanger_module, "SETTLE_TIMEOUT", math.inf)
    monkeypatch.setattr(LiveFlight, "settled", property(lambda _: trio.Event()))  # never set
    body = chat("an old client")
    request = raw_chat(body, {}).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    received = b""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address(proxy.url))
        async with stream:
            await stream.send_all(request)
            while data := await stream.receive_some():
                received += data
    assert received.endswith(b"data: [DONE]\n\n")
    assert len(proxy.inflight) == 1  # the request itself still waits
