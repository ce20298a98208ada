"""The errors clients receive, as the status line, the body and the access line say them.

When the upstream gives no answer the proxy answers 502 or 504 itself: the access line records
that status (it said ``null``), the body says what happened in a sentence (it showed an
exception's repr), and every status line carries its reason phrase (Hypercorn wrote
``HTTP/1.1 200 ``).
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

import httpx2
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy, access_lines
from tests.fakeupstream import FakeUpstream
from tests.security.rawhttp import address

CHAT = "/v1/chat/completions"
PYTHON_REPR = re.compile(r"[A-Za-z]+(Error|Exception|Timeout)\(")


def chat(content: str, **extra: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


async def ask(
    proxy: RunningProxy, body: dict[str, object], headers: dict[str, str] | None = None
) -> httpx2.Response:
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        response = await http.post(CHAT, json=body, headers=headers)
    await proxy.flush()
    return response


async def upstream_errors(proxy: RunningProxy, kind: str) -> float:
    async with httpx2.AsyncClient(base_url=proxy.admin_url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    found = re.search(rf'^tproxy_upstream_errors_total{{kind="{kind}",[^}}]*}} (\S+)$', text, re.M)
    return 0.0 if found is None else float(found.group(1))


async def assert_answered_by_the_proxy(
    proxy: RunningProxy,
    caplog: pytest.LogCaptureFixture,
    response: httpx2.Response,
    answer: tuple[int, str],
    state: str,
    kind: str,
) -> dict[str, object]:
    """The client received ``answer`` (status, code) in a sentence, the access line says that
    status and ``state``, and the upstream error was counted as ``kind``; returns the line."""
    status, code = answer
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    message = error["message"]
    assert not PYTHON_REPR.search(message), message
    assert message[0].isupper(), message
    assert message.endswith("."), message
    [line] = access_lines(caplog)
    assert (line["status"], line["state"]) == (status, state)
    assert await upstream_errors(proxy, kind) == 1
    return line


async def test_an_upstream_that_hangs_up_is_a_502_in_words_and_in_the_access_line(
    proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.access")
    response = await ask(proxy, chat("hang up"), {"x-fake-hang-up": "1"})

    line = await assert_answered_by_the_proxy(
        proxy, caplog, response, (502, "upstream_unavailable"), "upstream_failed", "connect"
    )
    assert "disconnected" in str(line["reason"])  # the detail stays in the log
    assert not PYTHON_REPR.search(str(line["reason"]))


async def test_a_refused_connection_is_a_502_in_words_and_in_the_access_line(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.access")
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        proxy = await start_proxy(upstream_url=f"http://127.0.0.1:{sock.getsockname()[1]}")
        response = await ask(proxy, chat("refused"))

    await assert_answered_by_the_proxy(
        proxy, caplog, response, (502, "upstream_unavailable"), "upstream_failed", "connect"
    )


async def test_an_upstream_that_never_answers_is_a_504_in_words_and_in_the_access_line(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.access")
    proxy = await start_proxy("[upstreams.default]\nfirst_byte_timeout = 0.2\n")
    response = await ask(proxy, chat("silence"), {"x-fake-stall-headers": "1"})

    answer = (504, "upstream_timeout_first_byte")
    await assert_answered_by_the_proxy(
        proxy, caplog, response, answer, "timed_out", "timeout_first_byte"
    )


async def test_a_body_that_breaks_keeps_the_status_the_client_received(
    proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.access")
    with pytest.raises(httpx2.RemoteProtocolError):
        await ask(proxy, chat("one two three", stream=True), {"x-fake-break-after": "2"})
    await proxy.flush()

    [line] = access_lines(caplog)
    assert (line["status"], line["state"]) == (200, "upstream_failed")
    assert await upstream_errors(proxy, "broken") == 1


async def status_line(url: str, request: bytes) -> bytes:
    """The first line of the answer to ``request``, read off a raw socket."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(*address(url))
        async with stream:
            await stream.send_all(request)
            received = b""
            while b"\r\n" not in received:
                data = await stream.receive_some()
                assert data, received
                received += data
    return received.partition(b"\r\n")[0]


def post(path: str, body: bytes, *extra: bytes) -> bytes:
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: tproxy", *extra]
    head.append(b"Content-Type: application/json")
    head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (post(CHAT, b'{"model": "m", "messages": []}'), b"HTTP/1.1 200 OK"),
        (post(CHAT, b"{}", b"X-Fake-Hang-Up: 1"), b"HTTP/1.1 502 Bad Gateway"),
        (post(CHAT, b"{}", b"X-Fake-Status: 429"), b"HTTP/1.1 429 Too Many Requests"),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n",
            b"HTTP/1.1 413 " + HTTPStatus(413).phrase.encode(),
        ),
        (
            b"GET / HTTP/1.1\r\nHost: tproxy\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 400 Bad Request",
        ),
    ],
    ids=["200", "502", "429-from-upstream", "413-from-tproxy", "400-from-hypercorn"],
)
async def test_every_status_line_carries_its_reason_phrase(
    proxy: RunningProxy, upstream: FakeUpstream, request_bytes: bytes, expected: bytes
) -> None:
    assert await status_line(proxy.url, request_bytes) == expected


async def test_a_replayed_answer_and_the_admin_listener_carry_reason_phrases(
    proxy: RunningProxy,
) -> None:
    request = post(CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "again"}]}')
    assert await status_line(proxy.url, request) == b"HTTP/1.1 200 OK"
    await proxy.flush()
    assert await status_line(proxy.url, request) == b"HTTP/1.1 200 OK"
    healthz = b"GET /healthz HTTP/1.1\r\nHost: tproxy\r\n\r\n"
    assert await status_line(proxy.admin_url, healthz) == b"HTTP/1.1 200 OK"
