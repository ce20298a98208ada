"""Bad input from clients: refused where it must be, passed on untouched where it may be, and
never a way to reach another host, another path space, or the cache.

Requests no HTTP library would write go over raw sockets (``rawhttp``). Each test ends with a
normal request, so a bad input that broke the server would show.
"""

from __future__ import annotations

import json

import httpx2
import pytest

from tests.conftest import RunningProxy, StartProxy
from tests.fakeupstream import FakeUpstream
from tests.faults.conftest import StartScripted
from tests.faults.scripted import ScriptedUpstream, no_faults_here
from tests.security.rawhttp import RawReply, post, raw_request

CHAT = b"/v1/chat/completions"
BODY = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def assert_serving(proxy: RunningProxy) -> None:
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        response = await http.get("/v1/models")
    assert response.status_code == 200


async def send(proxy: RunningProxy, data: bytes) -> RawReply:
    return await raw_request(proxy.url, data)


# --- bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json at all", id="not-json"),
        pytest.param(b'{"model": "fake", "messages": [', id="truncated"),
        pytest.param(b'{"model": "fake", "content": "\xff\xfe"}', id="invalid-utf8"),
        pytest.param(b'{"model": "fake", "temperature": NaN}', id="nan"),
        pytest.param(b'{"model": "a", "model": "b"}', id="duplicate-name"),
        pytest.param(b'{"a":' * 65 + b"1" + b"}" * 65, id="65-levels"),
    ],
)
async def test_a_body_without_one_json_reading_passes_through_uncached(
    proxy: RunningProxy, upstream: FakeUpstream, body: bytes
) -> None:
    replies = [await send(proxy, post(CHAT, body)) for _ in range(2)]
    for reply in replies:
        assert reply.status == 200
        assert reply.headers["cache-status"] == "tproxy; fwd=miss; detail=not-json"
    assert [seen.body for seen in upstream.requests] == [body, body]
    await assert_serving(proxy)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"hello"', b"42", b"null", b"true"])
async def test_json_that_is_not_an_object_is_forwarded_and_its_refusal_not_stored(
    start_proxy: StartProxy, start_scripted: StartScripted, body: bytes
) -> None:
    """Any JSON has a canonical form, so it is cacheable by design; the upstream's 400 is not
    stored, and the next identical request asks the upstream again."""
    scripted = await start_scripted(no_faults_here)
    proxy = await start_proxy(upstream_url=scripted.url)
    replies = [await send(proxy, post(CHAT, body)) for _ in range(2)]
    for reply in replies:
        assert reply.status == 400
        assert reply.headers["cache-status"] == "tproxy; fwd=miss"
    assert [seen.body for seen in scripted.requests] == [body, body]
    await assert_serving(proxy)


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy("[server]\nmax_body_bytes = 1000\n")
    head_only = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: tproxy\r\ncontent-length: 1000000000000\r\n"
        b"\r\n"
    )
    reply = await send(proxy, head_only)  # no body byte is ever sent: the 413 comes anyway
    assert reply.status == 413
    assert json.loads(reply.body)["error"]["code"] == "request_too_large"
    assert upstream.requests == []
    await assert_serving(proxy)


async def test_a_chunked_body_over_the_limit_is_refused(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy("[server]\nmax_body_bytes = 1000\n")
    piece = b"%x\r\n%s\r\n" % (600, b"x" * 600)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: tproxy\r\ntransfer-encoding: chunked\r\n\r\n"
        + piece * 2
        + b"0\r\n\r\n"
    )
    reply = await send(proxy, request)
    assert reply.status == 413
    assert upstream.requests == []
    await assert_serving(proxy)


# --- framing -----------------------------------------------------------------------------------

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: tproxy\r\ncontent-type: application/json\r\n"


@pytest.mark.parametrize(
    ("framing", "status"),
    [
        pytest.param(b"content-length: %d\r\ncontent-length: 5\r\n", 400, id="two-lengths"),
        pytest.param(b"content-length: %d, 5\r\n", 400, id="length-list"),
        pytest.param(b"content-length: -%d\r\n", 400, id="negative-length"),
        pytest.param(b"content-length: +%d\r\n", 400, id="signed-length"),
        pytest.param(b"content-length: 9%d99999999999999999999\r\n", 400, id="length-too-long"),
        pytest.param(b"transfer-encoding: gzip, chunked\r\nx-len: %d\r\n", 501, id="te-gzip"),
        pytest.param(
            b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\nx-len: %d\r\n",
            501,
            id="te-twice",
        ),
    ],
)
async def test_ambiguous_framing_is_refused_by_the_http_layer(
    proxy: RunningProxy, upstream: FakeUpstream, framing: bytes, status: int
) -> None:
    reply = await send(proxy, HEAD + framing % len(BODY) + b"\r\n" + BODY)
    assert reply.status == status
    assert upstream.requests == []
    await assert_serving(proxy)


async def test_two_equal_content_lengths_are_one(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    """RFC 9110 §8.6 lets a recipient accept a repeated identical length; h11 does."""
    framing = b"content-length: %d\r\ncontent-length: %d\r\n" % (len(BODY), len(BODY))
    reply = await send(proxy, HEAD + framing + b"\r\n" + BODY)
    assert reply.status == 200
    assert upstream.requests[-1].body == BODY
    assert upstream.requests[-1].headers["content-length"] == str(len(BODY))


async def test_transfer_encoding_with_content_length_is_refused(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    framing = b"transfer-encoding: chunked\r\ncontent-length: 3\r\n"
    chunked_body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    reply = await send(proxy, HEAD + framing + b"\r\n" + chunked_body)
    assert reply.status == 400
    assert upstream.requests == []


async def test_what_reaches_the_upstream_is_framed_once_by_the_proxy(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    """Whatever framing the client used, the upstream sees one Content-Length of its own and no
    Transfer-Encoding: nothing of the client's framing crosses the proxy."""
    framing = b"transfer-encoding: chunked\r\n"
    chunked_body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    await send(proxy, HEAD + framing + b"\r\n" + chunked_body)
    seen = upstream.requests[-1]
    assert seen.body == BODY
    assert seen.headers["content-length"] == str(len(BODY))
    assert "transfer-encoding" not in seen.headers


# --- headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-a: a\rx-b: b\r\n\r\n", id="cr"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-a: a\x00b\r\n\r\n", id="nul"),
        pytest.param(b"GET /v1/models\rx HTTP/1.1\r\nhost: x\r\n\r\n", id="cr-in-target"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx a: b\r\n\r\n", id="space-in-name"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n: b\r\n\r\n", id="empty-name"),
    ],
)
async def test_control_characters_in_the_head_are_refused(
    proxy: RunningProxy, upstream: FakeUpstream, request_bytes: bytes
) -> None:
    reply = await send(proxy, request_bytes)
    assert reply.status == 400
    assert upstream.requests == []
    await assert_serving(proxy)


async def test_a_bare_lf_ends_a_header_line_and_smuggles_nothing(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    reply = await send(proxy, b"GET /v1/models HTTP/1.1\nhost: x\nx-a: a\nx-b: b\n\n")
    assert reply.status == 200
    seen = upstream.requests[-1].headers
    assert (seen["x-a"], seen["x-b"]) == ("a", "b")
    assert len(upstream.requests) == 1


async def test_a_folded_header_line_is_unfolded(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    reply = await send(proxy, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-a: a\r\n b\r\n\r\n")
    assert reply.status == 200
    assert upstream.requests[-1].headers["x-a"] == "a b"


async def test_an_unsafe_request_id_is_replaced_not_echoed(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        response = await http.get("/v1/models", headers={"x-request-id": "<script>alert(1)"})
    ours = response.headers["x-request-id"]
    assert ours != "<script>alert(1)"
    assert len(ours) == 32
    assert upstream.requests[-1].headers["x-request-id"] == ours


# --- targets and methods -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        pytest.param(b"GET http://127.0.0.1:{port}/v1/models HTTP/1.1", id="absolute-to-upstream"),
        pytest.param(b"GET http://example.com/v1/models HTTP/1.1", id="absolute-elsewhere"),
        pytest.param(b"CONNECT example.com:443 HTTP/1.1", id="connect-authority"),
        pytest.param(b"CONNECT 127.0.0.1:{port} HTTP/1.1", id="connect-to-upstream"),
        pytest.param(b"CONNECT /v1/models HTTP/1.1", id="connect-origin-form"),
        pytest.param(b"OPTIONS * HTTP/1.1", id="asterisk-form"),
    ],
)
async def test_tproxy_is_never_an_open_proxy(
    proxy: RunningProxy, upstream: FakeUpstream, request_line: bytes
) -> None:
    line = request_line.replace(b"{port}", str(upstream.port).encode())
    reply = await send(proxy, line + b"\r\nhost: example.com\r\n\r\n")
    assert reply.status == 400
    assert json.loads(reply.body)["error"]["code"] == "absolute_form_refused"
    assert upstream.requests == []
    await assert_serving(proxy)


async def test_the_clients_host_header_never_chooses_the_upstream(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    reply = await send(proxy, b"GET /v1/models HTTP/1.1\r\nhost: evil.example:80\r\n\r\n")
    assert reply.status == 200
    assert upstream.requests[-1].headers["host"] == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize("method", [b"FROB", b"TRACE", b"PROPFIND"])
async def test_unknown_methods_are_forwarded_as_they_are_and_never_cached(
    proxy: RunningProxy, upstream: FakeUpstream, method: bytes
) -> None:
    """tproxy does not judge methods: the upstream does. Only GET and POST are cacheable."""
    for _ in range(2):
        reply = await send(proxy, post(CHAT, BODY).replace(b"POST", method, 1))
        assert reply.status == 200
        assert reply.headers["cache-status"] == "tproxy; fwd=bypass"
    assert [seen.method for seen in upstream.requests] == [method.decode()] * 2


async def test_a_lower_case_method_is_upper_cased(
    proxy: RunningProxy, upstream: FakeUpstream
) -> None:
    """Hypercorn upper-cases the method before tproxy sees it."""
    reply = await send(proxy, b"get /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
    assert reply.status == 200
    assert upstream.requests[-1].method == "GET"


# --- paths: only the route's own path space on the upstream ------------------------------------

BASE_ROUTE = (
    '[upstreams.api]\nurl = "{upstream}/base"\n'
    '[[routes]]\npath_prefix = "/v1/"\nupstreams = ["api"]\n'
    "[cache]\nenabled = false\n"
)


@pytest.fixture
async def based(start_proxy: StartProxy) -> RunningProxy:
    """A proxy whose one route sends /v1/... to the upstream under the base path /base."""
    return await start_proxy(BASE_ROUTE, upstream_flag=False)


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        pytest.param(b"/v1/models", "/base/v1/models", id="plain"),
        pytest.param(b"/v1/%2F..%2Fsecret", "/base/v1/%2F..%2Fsecret", id="encoded-slashes"),
        pytest.param(b"/v1/..%2f..%2fsecret", "/base/v1/..%2f..%2fsecret", id="mixed"),
        pytest.param(b"/v1//evil.example/x", "/base/v1//evil.example/x", id="double-slash"),
        pytest.param(b"/v1/@evil.example/x", "/base/v1/@evil.example/x", id="at-sign"),
        pytest.param(b"/v1/x?next=../../y", "/base/v1/x?next=../../y", id="dots-in-query"),
    ],
)
async def test_odd_paths_reach_the_upstream_untouched_under_its_base(
    based: RunningProxy, upstream: FakeUpstream, target: bytes, forwarded: str
) -> None:
    reply = await send(based, b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % target)
    assert reply.status == 200
    seen = upstream.requests[-1]
    assert seen.target == forwarded
    assert seen.headers["host"] == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(b"/v1/./models", id="dot"),
        pytest.param(b"/v1/../admin", id="out-of-the-route"),
        pytest.param(b"/v1/../../admin", id="out-of-the-base"),
        pytest.param(b"/v1/%2e%2e/admin", id="encoded-dots"),
    ],
)
async def test_dot_segments_never_leave_the_routes_path_space(
    based: RunningProxy, upstream: FakeUpstream, target: bytes
) -> None:
    """Refused, or forwarded to a path under the route's prefix on the upstream's base."""
    reply = await send(based, b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % target)
    if reply.status == 400:
        assert upstream.requests == []
    else:
        assert upstream.requests[-1].target.startswith("/base/v1/")


async def test_a_body_that_is_not_json_reaches_the_upstream_byte_for_byte(
    start_proxy: StartProxy, start_scripted: StartScripted
) -> None:
    """Bytes that are not JSON, or not UTF-8, are forwarded exactly, not re-encoded."""
    scripted: ScriptedUpstream = await start_scripted(no_faults_here)
    proxy = await start_proxy("[cache]\nenabled = false\n", upstream_url=scripted.url)
    body = bytes(range(256))
    reply = await send(proxy, post(b"/v1/files", body))
    assert reply.status == 400  # the scripted upstream refuses a body that is not an object
    assert scripted.requests[-1].body == body
