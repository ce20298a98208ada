"""Upstream faults: whatever an upstream does wrong, the client sees the right status or a broken
body, nothing of the bad answer is stored, and the proxy goes on serving.

Every test here ends the same way (``assert_recovered``): the same request again reaches the
upstream and gets its whole answer, then it is a cache hit with the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
from contextlib import aclosing

import httpx2
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy, access_lines
from tests.fakeupstream import FakeUpstream, stream_events
from tests.faults.conftest import CHAT, FAULT, StartScripted, assert_recovered, chat
from tests.faults.scripted import (
    JSON,
    LAST_CHUNK,
    ScriptedUpstream,
    chunked,
    no_faults_here,
    read_request,
    reset,
    response_head,
    sse_body,
)
from tests.h11peer import SeenRequest

FAST_TIMEOUTS = "[upstreams.default]\nfirst_byte_timeout = 0.3\nidle_timeout = 0.3\n"


def events_of(request: SeenRequest) -> list[bytes]:
    """The framed SSE events of the whole answer to ``request``."""
    return [event + b"\n\n" for event in stream_events(json.loads(request.body))]


async def scripted_proxy(
    start_proxy: StartProxy, upstream: ScriptedUpstream, toml: str = ""
) -> RunningProxy:
    return await start_proxy(toml, upstream_url=upstream.url)


async def post_fault(proxy: RunningProxy, body: dict[str, object]) -> httpx2.Response:
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        return await http.post(CHAT, json=body, headers=FAULT)


async def received_before_break(proxy: RunningProxy, body: dict[str, object]) -> bytes:
    """Stream a faulty answer; assert that it looks broken, and return what arrived first."""
    received = bytearray()

    async def read_all(http: httpx2.AsyncClient) -> None:
        async with http.stream("POST", CHAT, json=body, headers=FAULT) as response:
            assert response.status_code == 200
            async for data in response.aiter_raw():
                received.extend(data)

    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        with pytest.raises(httpx2.RemoteProtocolError):
            await read_all(http)
    return bytes(received)


# --- before any response -----------------------------------------------------------------------


async def test_a_refused_connection_is_a_502_and_another_upstream_is_tried_first(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        toml = (
            f'[upstreams.dead]\nurl = "{dead}"\n[upstreams.live]\nurl = "{{upstream}}"\n'
            '[[routes]]\nmodels = ["dead-*"]\nupstreams = ["dead"]\n'
            '[[routes]]\nmodels = ["fallback-*"]\nupstreams = ["dead", "live"]\n'
            '[[routes]]\nupstreams = ["live"]\n'
        )
        proxy = await start_proxy(toml, upstream_flag=False)
        dead_body = {**chat("nobody home"), "model": "dead-1"}
        fallback_body = {**chat("try the next one"), "model": "fallback-1"}
        async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
            refused = [await http.post(CHAT, json=dead_body) for _ in range(2)]
            fallback = await http.post(CHAT, json=fallback_body)
    for response in refused:
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_unavailable"
        assert response.headers["cache-status"] == "tproxy; fwd=miss"
    assert fallback.status_code == 200
    assert fallback.content == sse_body(fallback_body)
    await assert_recovered(proxy, chat("still serving"))


async def test_an_upstream_that_accepts_and_never_answers_is_a_504(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    scripted = await start_scripted(no_faults_here, silent=1)
    proxy = await scripted_proxy(start_proxy, scripted, FAST_TIMEOUTS)
    body = chat("hello?")
    response = await post_fault(proxy, body)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout_first_byte"
    with trio.fail_after(5):
        await scripted.peer_closed_event.wait()  # the proxy hung up on it
    await assert_recovered(proxy, body, expected=sse_body(body))


async def test_a_reset_before_the_response_is_a_502(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        reset(stream)

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted)
    body = chat("reset at once")
    response = await post_fault(proxy, body)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"
    await assert_recovered(proxy, body, expected=sse_body(body))


# --- after the response started ----------------------------------------------------------------


async def test_headers_then_a_stall_is_a_truncated_body_after_the_idle_timeout(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        await stream.send_all(response_head() + chunked(events_of(request)[0]))
        await scripted.wait_for_close(stream)

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted, FAST_TIMEOUTS)
    body = chat("stall after one word")
    received = await received_before_break(proxy, body)
    assert received == sse_body(body)[: len(received)]
    assert scripted.peer_closed == 1
    await assert_recovered(proxy, body, expected=sse_body(body))


async def test_a_json_body_that_stalls_is_truncated_not_shortened(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        await stream.send_all(response_head(200, JSON, length=100) + b'{"id": "chat')
        await scripted.wait_for_close(stream)

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted, FAST_TIMEOUTS)
    body = chat("json that stalls", stream=False)
    with pytest.raises(httpx2.RemoteProtocolError):
        await post_fault(proxy, body)
    await assert_recovered(proxy, body)


async def test_a_reset_mid_stream_is_a_truncated_body(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        events = events_of(request)
        await stream.send_all(response_head() + chunked(events[0]) + chunked(events[1]))
        reset(stream)

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted)
    body = chat("reset in the middle of it")
    received = await received_before_break(proxy, body)
    assert received == sse_body(body)[: len(received)]
    await assert_recovered(proxy, body, expected=sse_body(body))


async def test_a_clean_close_mid_event_of_a_chunked_body_is_a_truncated_body(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        whole = sse_body(json.loads(request.body))
        await stream.send_all(response_head() + chunked(whole[: len(whole) // 2]))

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted)
    body = chat("closed half way through an event")
    received = await received_before_break(proxy, body)
    assert received == sse_body(body)[: len(received)]
    await assert_recovered(proxy, body, expected=sse_body(body))


async def test_a_body_delimited_by_close_that_stops_mid_event_is_passed_on_but_not_stored(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    """Without framing, the end of the connection is the end of the body: the proxy cannot tell
    a cut from an end, so the client gets the same bytes with a clean end. The unfinished event
    keeps it out of the cache."""

    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        whole = sse_body(json.loads(request.body))
        await stream.send_all(response_head(delimited_by_close=True) + whole[: len(whole) // 2])

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted)
    body = chat("no framing and cut short")
    response = await post_fault(proxy, body)
    whole = sse_body(body)
    assert response.content == whole[: len(whole) // 2]
    await assert_recovered(proxy, body, expected=whole)


async def test_a_content_length_longer_than_the_body_is_a_truncated_body(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        answer = json.dumps({"id": "x", "choices": []}).encode()
        await stream.send_all(response_head(200, JSON, length=len(answer) + 500) + answer)

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted)
    body = chat("claims more than it sends", stream=False)
    with pytest.raises(httpx2.RemoteProtocolError):
        await post_fault(proxy, body)
    await assert_recovered(proxy, body)


# --- strange bytes -----------------------------------------------------------------------------


async def test_invalid_utf8_in_events_passes_through_byte_for_byte(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    """The decoder reads invalid UTF-8 as U+FFFD for its own bookkeeping; the bytes forwarded and
    stored are the upstream's, so the replay is byte-exact too."""
    odd = b'data: {"choices":[{"delta":{"content":"\xff\xfe\xc3("},"finish_reason":null}]}\n\n'
    end = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'

    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        await stream.send_all(response_head() + chunked(odd) + chunked(end) + LAST_CHUNK)

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted)
    body = chat("say something odd")
    first = await post_fault(proxy, body)
    await proxy.flush()
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        replayed = await http.post(CHAT, json=body)
    assert first.content == odd + end
    assert replayed.headers["cache-status"].startswith("tproxy; hit")
    assert replayed.content == odd + end
    assert scripted.calls(CHAT) == 1


async def test_a_10_mb_line_passes_through_intact_and_is_not_stored(
    start_proxy: StartProxy, start_scripted: StartScripted, caplog: pytest.LogCaptureFixture
) -> None:
    """Over ``cache.max_line_bytes`` the decoder stops and caching is abandoned; the bytes go on.
    (``max_entry_bytes`` is raised so that the line is the only reason not to store.)"""
    caplog.set_level(logging.INFO, logger="tproxy.access")
    line = b'data: {"choices":[{"delta":{"content":"' + b"a" * (10 << 20) + b'"}}]}\n\n'
    end = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'

    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        await stream.send_all(response_head())
        for start in range(0, len(line), 1 << 20):
            await stream.send_all(chunked(line[start : start + (1 << 20)]))
        await stream.send_all(chunked(end) + LAST_CHUNK)

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted, "[cache]\nmax_entry_bytes = 67108864\n")
    body = chat("one very long line")
    response = await post_fault(proxy, body)
    assert len(response.content) == len(line) + len(end)
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(line + end).digest()
    await proxy.flush()
    [logged] = access_lines(caplog)
    assert logged["cache"] == "line longer than 1048576 bytes"
    await assert_recovered(proxy, body, expected=sse_body(body))


async def test_garbage_under_an_event_stream_content_type_passes_through_and_is_not_stored(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    garbage = random.Random(7).randbytes(256 * 1024)

    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        await stream.send_all(response_head() + chunked(garbage) + LAST_CHUNK)

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted)
    body = chat("answer in noise")
    response = await post_fault(proxy, body)
    assert response.status_code == 200
    assert response.content == garbage
    await assert_recovered(proxy, body, expected=sse_body(body))


# --- size --------------------------------------------------------------------------------------

BIG = 200 << 20
PIECE = bytes(range(256)) * 256  # 64 KiB


def _peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


@pytest.mark.slow
async def test_a_200_mb_body_streams_through_intact_with_bounded_memory(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    async def script(stream: trio.SocketStream, request: SeenRequest) -> None:
        await stream.send_all(response_head(200, b"application/octet-stream", length=BIG))
        for _ in range(BIG // len(PIECE)):
            await stream.send_all(PIECE)

    scripted = await start_scripted(script)
    proxy = await scripted_proxy(start_proxy, scripted)
    expected = hashlib.sha256()
    for _ in range(BIG // len(PIECE)):
        expected.update(PIECE)
    measured = _peak_rss_reset()
    before = _peak_rss()
    digest = hashlib.sha256()
    size = 0
    with trio.fail_after(30):
        async with (
            httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http,
            http.stream("GET", "/v1/files/big", headers=FAULT) as response,
            aclosing(response.aiter_raw()) as chunks,
        ):
            assert response.headers["cache-status"] == "tproxy; fwd=bypass"
            async for data in chunks:
                digest.update(data)
                size += len(data)
    assert size == BIG
    assert digest.digest() == expected.digest()
    if measured:
        assert _peak_rss() - before < 64 << 20


# --- the connection pool -----------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_bytes_past_the_end_of_an_answer_never_become_the_next_requests_answer(
    start_proxy: StartProxy, nursery: trio.Nursery, framing: str
) -> None:
    """The upstream's pooled connection is closed, not recycled, when bytes follow an answer."""

    def answer_to(target: str) -> bytes:
        body = json.dumps({"answer_to": target}).encode()
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        if framing == "chunked":
            return head + b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                len(body),
                body,
            )
        return head + b"content-length: %d\r\n\r\n%s" % (len(body), body)

    async def keep_alive_upstream(stream: trio.SocketStream) -> None:
        """Answers every request on one connection; the first answer carries a second one."""
        with contextlib.suppress(trio.BrokenResourceError):
            for index in range(3):
                request = await read_request(stream)
                if request is None:
                    return
                extra = answer_to("/smuggled") if index == 0 else b""
                await stream.send_all(answer_to(request.target) + extra)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, keep_alive_upstream, listeners)
    port = listeners[0].socket.getsockname()[1]
    proxy = await start_proxy("[cache]\nenabled = false\n", upstream_url=f"http://127.0.0.1:{port}")
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=5) as http:
        with trio.fail_after(10):
            answers = [(await http.get(f"/v1/models/{i}")).json() for i in range(3)]
    assert answers == [{"answer_to": f"/v1/models/{i}"} for i in range(3)]
