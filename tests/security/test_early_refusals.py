"""Refusals sent before a request's body was read close the connection, and reach the client.

A refusal decided from the head (ambiguous framing, a declared body over the limit, a missing
client key, a target tproxy never serves) leaves the body unread. Whatever follows on the
connection might be that body or a next request, depending on which framing one believes: a
front end that trusts ``Content-Length`` counts as body what a ``Transfer-Encoding`` reader takes
for a second request. So the answer carries ``Connection: close`` and nothing after the refused
head is parsed (RFC 9112 §6.3, §9.6). Each test hides a request behind the refused one and checks
that it never reaches the upstream.

The connection then lingers: it reads and discards what the client still sends for a short
while, so a client that writes its whole body before reading (Python's ``urllib``) receives the
answer instead of a reset.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import trio

from tests.conftest import RunningProxy, StartProxy
from tests.fakeupstream import FakeUpstream
from tests.security.rawhttp import RawReply, address, raw_request, read_reply
from tests.security.test_client_auth import auth_toml

SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: tproxy\r\ncontent-type: application/json\r\n"
BODY = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def refused_and_closed(proxy: RunningProxy, data: bytes) -> RawReply:
    """Send ``data``, read one answer, and check the connection then ends."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address(proxy.url))
        async with stream:
            await stream.send_all(data)
            reply = await read_reply(stream)
            assert await stream.receive_some() == b""
    return reply


def chunked_with_length(body: bytes) -> bytes:
    """A request framed both ways: chunked says the body ends at ``0``; the length says later."""
    return HEAD + b"transfer-encoding: chunked\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


async def test_content_length_with_chunked_is_refused_and_what_follows_never_reaches_upstream(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    """The desync: for a Content-Length front end, the hidden GET is body; for a chunked reader
    it is the next request. Neither reading gets it to the upstream."""
    reply = await refused_and_closed(proxy, chunked_with_length(b"0\r\n\r\n" + SMUGGLED))
    assert reply.status == 400
    assert json.loads(reply.body)["error"]["code"] == "ambiguous_framing"
    assert reply.headers["connection"] == "close"
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("config", "request_bytes", "status"),
    [
        pytest.param(
            "[server]\nmax_body_bytes = 100\n",
            HEAD + b"content-length: 1000\r\n\r\n" + SMUGGLED,
            413,
            id="declared-too-large",
        ),
        pytest.param(
            "[server]\nmax_body_bytes = 100\n",
            HEAD
            + b"transfer-encoding: chunked\r\n\r\n80\r\n"
            + b"x" * 128
            + b"\r\n0\r\n\r\n"
            + SMUGGLED,
            413,
            id="chunked-too-large",
        ),
        pytest.param(
            auth_toml("sk-good"),
            HEAD + b"content-length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
            401,
            id="no-client-key",
        ),
        pytest.param(
            "",
            HEAD.replace(b"/v1/chat", b"/v1/../chat")
            + b"content-length: %d\r\n\r\n" % len(SMUGGLED)
            + SMUGGLED,
            400,
            id="dot-segment",
        ),
    ],
)
async def test_every_refusal_before_the_body_is_read_closes_the_connection(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    config: str,
    request_bytes: bytes,
    status: int,
) -> None:
    proxy = await start_proxy(config)
    reply = await refused_and_closed(proxy, request_bytes)
    assert reply.status == status
    assert reply.headers["connection"] == "close"
    assert upstream.requests == []


async def test_a_body_that_never_arrives_is_refused_with_408_and_the_connection_closed(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy("[server]\nbody_timeout = 0.3\n")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address(proxy.url))
        async with stream:
            await stream.send_all(HEAD + b"content-length: 100\r\n\r\n{")
            reply = await read_reply(stream)
            await stream.send_all(b"x" * 99 + SMUGGLED)  # read and discarded while lingering
            assert await stream.receive_some() == b""
    assert reply.status == 408
    assert reply.headers["connection"] == "close"
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("framing", "status"),
    [
        pytest.param(b"content-length: 3\r\ncontent-length: 5\r\n", 400, id="two-lengths"),
        pytest.param(b"transfer-encoding: gzip, chunked\r\n", 501, id="te-gzip"),
        pytest.param(b"transfer-encoding: identity\r\n", 501, id="te-identity"),
        pytest.param(
            b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n", 501, id="te-twice"
        ),
        pytest.param(b"transfer-encoding : chunked\r\n", 400, id="space-before-colon"),
        pytest.param(b"transfer-encoding: chunked\r\n\x0bx: y\r\n", 400, id="vertical-tab"),
    ],
)
async def test_framings_the_http_layer_refuses_close_the_connection_too(
    proxy: RunningProxy, upstream: FakeUpstream, framing: bytes, status: int
) -> None:
    """The siblings Hypercorn's parser (h11) refuses before tproxy sees them: its answer closes
    the connection as well, and the request behind never arrives."""
    reply = await refused_and_closed(proxy, HEAD + framing + b"\r\n0\r\n\r\n" + SMUGGLED)
    assert reply.status == status
    assert reply.headers["connection"] == "close"
    assert upstream.requests == []


async def test_a_folded_transfer_encoding_is_one_header_and_smuggles_nothing(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    """h11 unfolds obs-fold lines: ``Transfer-Encoding:`` folded onto ``chunked`` is chunked,
    and with a Content-Length beside it the request is refused like any CL+TE."""
    folded = HEAD + b"transfer-encoding:\r\n chunked\r\ncontent-length: %d\r\n\r\n"
    body = b"0\r\n\r\n" + SMUGGLED
    reply = await refused_and_closed(proxy, folded % len(body) + body)
    assert reply.status == 400
    assert upstream.requests == []


async def test_a_client_that_writes_its_whole_body_before_reading_receives_the_413(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """urllib sends the whole body, then reads: the refusal must still be there to read."""
    proxy = await start_proxy("[server]\nmax_body_bytes = 1000\n")
    request = urllib.request.Request(
        proxy.url + "/v1/chat/completions",
        data=b"x" * (4 << 20),
        headers={"content-type": "application/json"},
    )

    def post() -> int:
        try:
            with urllib.request.urlopen(request, timeout=10):
                return 200
        except urllib.error.HTTPError as error:
            return error.code

    assert await trio.to_thread.run_sync(post) == 413
    assert upstream.requests == []


async def test_a_refusal_after_the_whole_body_was_read_keeps_the_connection(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    """A cache-only request with nothing stored is refused once its body is in: the framing was
    unambiguous, so the connection serves the next request."""
    proxy = await start_proxy()
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address(proxy.url))
        async with stream:
            only_cached = HEAD + b"cache-control: only-if-cached\r\ncontent-length: %d\r\n\r\n%s"
            await stream.send_all(only_cached % (len(BODY), BODY))
            assert (await read_reply(stream)).status == 504
            await stream.send_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await read_reply(stream)).status == 200


# --- Expect: 100-continue ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "status"),
    [
        pytest.param("[server]\nmax_body_bytes = 100\n", 413, id="declared-too-large"),
        pytest.param(auth_toml("sk-good"), 401, id="no-client-key"),
    ],
)
async def test_a_refusal_decided_from_the_head_comes_without_100_continue(
    start_proxy: StartProxy, upstream: FakeUpstream, config: str, status: int
) -> None:
    """A client that waits for ``100 Continue`` gets the refusal instead, and never sends the
    body it would have been told to send."""
    proxy = await start_proxy(config)
    head = HEAD + b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(BODY * 4)
    reply = await refused_and_closed(proxy, head)
    assert reply.status == status
    assert upstream.requests == []


async def test_a_request_that_may_go_on_gets_100_continue_then_its_answer(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address(proxy.url))
        async with stream:
            expect = b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % len(BODY)
            await stream.send_all(HEAD + expect)
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += await stream.receive_some(1)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(BODY)
            assert (await read_reply(stream)).status == 200
    assert upstream.requests[-1].body == BODY


# --- upgrades --------------------------------------------------------------------------------


async def test_a_websocket_handshake_is_refused_with_400_and_a_reason(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    handshake = (
        b"GET /v1/realtime HTTP/1.1\r\nhost: tproxy\r\n"
        b"connection: Upgrade\r\nupgrade: websocket\r\n"
        b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    reply = await refused_and_closed(proxy, handshake)
    assert reply.status == 400
    assert json.loads(reply.body)["error"]["code"] == "websocket_refused"
    assert upstream.requests == []


async def test_an_h2c_upgrade_is_answered_in_http_1_1_and_never_switches(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    """Refused so that a front end passing ``Upgrade`` through cannot be tunnelled past."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*address(proxy.url))
        async with stream:
            await stream.send_all(
                b"GET /v1/models HTTP/1.1\r\nhost: tproxy\r\n"
                b"connection: Upgrade, HTTP2-Settings\r\n"
                b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            )
            reply = await read_reply(stream)
            assert reply.status == 200
            await stream.send_all(b"GET /v1/models HTTP/1.1\r\nhost: tproxy\r\n\r\n")
            assert (await read_reply(stream)).status == 200
    assert [seen.target for seen in upstream.requests] == ["/v1/models"] * 2
    assert "upgrade" not in upstream.requests[0].headers


# --- the head's size ---------------------------------------------------------------------------


@pytest.mark.parametrize("over", [0, 1, 30000], ids=["at-the-limit", "one-byte-over", "far-over"])
async def test_the_head_is_bounded_by_max_header_bytes_exactly(
    start_proxy: StartProxy, upstream: FakeUpstream, over: int
) -> None:
    """Heads that arrive in one read were accepted up to about twice the limit."""
    limit = 40000
    proxy = await start_proxy(f"[server]\nmax_header_bytes = {limit}\n")
    start = b"GET /v1/models HTTP/1.1\r\nhost: tproxy\r\nx-pad: "
    padding = limit - len(start) - len(b"\r\n\r\n") + over
    head = start + b"p" * padding + b"\r\n\r\n"
    assert len(head) == limit + over
    if over:
        reply = await refused_and_closed(proxy, head)
        assert reply.status == 431
        assert upstream.requests == []
    else:
        assert (await raw_request(proxy.url, head)).status == 200
