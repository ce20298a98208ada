"""Pass-through: tproxy in front of a real HTTP upstream, seen from real clients.

These tests run the proxy without caching in the way (``cache.enabled = false`` where the cache
could answer), so every request reaches the upstream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing

import httpx2
import openai
import pytest
import trio

from tests.conftest import RunningProxy, StartProxy, tolerate_sdk_generators
from tests.fakeupstream import FakeUpstream, stream_events

NO_CACHE = "[cache]\nenabled = false\n"


def chat(content: str, *, stream: bool = False, **extra: object) -> dict[str, object]:
    return {
        "model": "fake",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
        **extra,
    }


def expected_stream(content: str, eol: bytes = b"\n") -> bytes:
    events = stream_events(chat(content, stream=True))
    return b"".join(e.replace(b"\n", eol) + eol + eol for e in events)


@pytest.fixture
async def uncached(start_proxy: StartProxy) -> RunningProxy:
    return await start_proxy(NO_CACHE)


@pytest.fixture
async def http(uncached: RunningProxy) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=uncached.url, timeout=10.0) as client:
        yield client


async def test_a_json_answer_passes_through_with_its_status_and_headers(
    http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    response = await http.post("/v1/chat/completions", json=chat("hello there"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["choices"][0]["message"]["content"] == "hello there"
    assert len(response.headers["x-request-id"]) == 32
    seen = upstream.requests[-1]
    assert seen.headers["x-request-id"] == response.headers["x-request-id"]
    assert seen.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    assert seen.headers["x-forwarded-proto"] == "http"


async def test_the_clients_request_id_is_kept_and_hop_by_hop_headers_are_dropped(
    http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json=chat("hi"),
        headers={
            "x-request-id": "abc-123",
            "connection": "keep-alive, x-secret-hop",
            "x-secret-hop": "1",
            "keep-alive": "timeout=5",
            "proxy-authorization": "Basic Zm9vOmJhcg==",
            "x-forwarded-for": "10.0.0.9",
        },
    )
    assert response.headers["x-request-id"] == "abc-123"
    seen = upstream.requests[-1].headers
    assert seen["x-request-id"] == "abc-123"
    for hop in ("x-secret-hop", "keep-alive", "proxy-authorization"):
        assert hop not in seen
    assert seen["x-forwarded-for"] == "10.0.0.9, 127.0.0.1"


async def test_any_method_and_path_is_forwarded_with_its_query(
    http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    response = await http.get("/v1/models?limit=2&x=%2F")
    assert response.status_code == 200
    seen = upstream.requests[-1]
    assert (seen.method, seen.target) == ("GET", "/v1/models?limit=2&x=%2F")


@pytest.mark.parametrize("framing", ["lf", "crlf", "cr"])
async def test_a_stream_arrives_byte_for_byte(http: httpx2.AsyncClient, framing: str) -> None:
    eol = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}[framing]
    async with http.stream(
        "POST",
        "/v1/chat/completions",
        json=chat("one two three", stream=True),
        headers={"x-fake-framing": framing},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    assert body == expected_stream("one two three", eol)


async def test_each_upstream_chunk_reaches_the_client_before_the_next_is_sent(
    http: httpx2.AsyncClient,
) -> None:
    """A paced stream: the first event is readable while the upstream still waits to send more."""
    async with (
        http.stream(
            "POST",
            "/v1/chat/completions",
            json=chat("alpha beta gamma delta", stream=True),
            headers={"x-fake-delay": "0.2"},
        ) as response,
        aclosing(response.aiter_raw()) as chunks,
    ):
        first = await anext(chunks)
        assert first.startswith(b'data: {"id": "chatcmpl-fake"')
        assert b"alpha" in first
        assert b"beta" not in first
        rest = b"".join([chunk async for chunk in chunks])
    assert first + rest == expected_stream("alpha beta gamma delta")


@tolerate_sdk_generators
async def test_the_openai_sdk_streams_through_the_proxy(uncached: RunningProxy) -> None:
    client = openai.AsyncOpenAI(base_url=uncached.url + "/v1", api_key="sk-test", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": "streamed via sdk"}], stream=True
        )
        async with stream:
            pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
    assert "".join(pieces) == "streamed via sdk"


async def test_ten_back_to_back_streams_each_get_their_own_bytes(http: httpx2.AsyncClient) -> None:
    for index in range(10):
        prompt = f"request number {index} only"
        response = await http.post("/v1/chat/completions", json=chat(prompt, stream=True))
        assert response.content == expected_stream(prompt)


async def test_fifty_concurrent_streams_each_get_their_own_bytes(http: httpx2.AsyncClient) -> None:
    bodies: dict[int, bytes] = {}

    async def one(index: int) -> None:
        response = await http.post(
            "/v1/chat/completions",
            json=chat(f"distinct prompt {index} {index * 7}", stream=True),
            headers={"x-fake-delay": "0.01"},
        )
        bodies[index] = response.content

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for index in range(50):
                nursery.start_soon(one, index)
    for index in range(50):
        assert bodies[index] == expected_stream(f"distinct prompt {index} {index * 7}")


async def test_a_stream_that_breaks_upstream_looks_broken_to_the_client(
    http: httpx2.AsyncClient,
) -> None:
    with pytest.raises(httpx2.RemoteProtocolError):
        await http.post(
            "/v1/chat/completions",
            json=chat("a b c d e", stream=True),
            headers={"x-fake-break-after": "2"},
        )


@tolerate_sdk_generators
async def test_the_openai_sdk_raises_on_a_broken_stream(uncached: RunningProxy) -> None:
    client = openai.AsyncOpenAI(base_url=uncached.url + "/v1", api_key="sk-test", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "a b c d e"}],
            stream=True,
            extra_headers={"x-fake-break-after": "3"},
        )
        with pytest.raises(openai.APIError):
            async for _chunk in stream:
                pass


async def test_an_unreachable_upstream_is_a_502_with_a_json_error(
    start_proxy: StartProxy,
) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]  # bound, never listening: connections are refused
        proxy = await start_proxy(NO_CACHE, upstream_url=f"http://127.0.0.1:{dead_port}")
        async with httpx2.AsyncClient(base_url=proxy.url) as http:
            response = await http.post("/v1/chat/completions", json=chat("x"))
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert {"message", "type", "code"} <= error.keys()


async def test_no_response_headers_in_time_is_a_504(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(NO_CACHE + "[upstreams.default]\nfirst_byte_timeout = 0.3\n")
    async with httpx2.AsyncClient(base_url=proxy.url) as http:
        response = await http.post(
            "/v1/chat/completions", json=chat("x"), headers={"x-fake-stall-headers": "1"}
        )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout_first_byte"


async def test_a_stall_mid_stream_ends_in_a_truncated_body(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(NO_CACHE + "[upstreams.default]\nidle_timeout = 0.3\n")
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        with pytest.raises(httpx2.RemoteProtocolError):
            await http.post(
                "/v1/chat/completions",
                json=chat("a b c d", stream=True),
                headers={"x-fake-stall-after": "2"},
            )


async def test_a_client_that_leaves_closes_the_upstream_connection(
    http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    async with (
        http.stream(
            "POST",
            "/v1/chat/completions",
            json=chat(words, stream=True),
            headers={"x-fake-delay": "0.05"},
        ) as response,
        aclosing(response.aiter_raw()) as chunks,
    ):
        await anext(chunks)
    with trio.fail_after(5):
        await upstream.disconnected.wait()
    assert upstream.active_streams == 0


async def test_a_body_over_the_limit_is_refused_with_413(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(NO_CACHE + "[server]\nmax_body_bytes = 1000\n")
    async with httpx2.AsyncClient(base_url=proxy.url) as http:
        declared = await http.post("/v1/chat/completions", content=b"x" * 5000)

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"y" * 500

        streamed = await http.post("/v1/chat/completions", content=chunked())
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"


async def test_an_absolute_form_target_is_refused(uncached: RunningProxy) -> None:
    host, port = uncached.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            b"GET http://example.com/v1/models HTTP/1.1\r\nHost: example.com\r\n"
            b"Connection: close\r\n\r\n"
        )
        reply = b""
        with trio.fail_after(5):
            while data := await stream.receive_some():
                reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "absolute_form_refused"


async def test_a_route_without_a_match_is_a_404(start_proxy: StartProxy) -> None:
    toml = (
        NO_CACHE
        + '[upstreams.local]\nurl = "{upstream}"\n'
        + '[[routes]]\npath_prefix = "/v1/"\nmodels = ["llama-*"]\nupstreams = ["local"]\n'
    )
    proxy = await start_proxy(toml, upstream_flag=False)
    async with httpx2.AsyncClient(base_url=proxy.url) as http:
        refused = await http.post("/v1/chat/completions", json=chat("x"))
        accepted = await http.post(
            "/v1/chat/completions", json={**chat("x"), "model": "llama-3-8b"}
        )
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "no_route"
    assert accepted.status_code == 200


async def test_upstream_errors_pass_through_with_their_status(http: httpx2.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions", json=chat("x"), headers={"x-fake-status": "429"}
    )
    assert response.status_code == 429
    assert response.json()["error"]["message"] == "fake failure"
