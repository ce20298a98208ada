"""Header names are case-insensitive (RFC 9110 §5.1): whatever case an upstream writes them in,
its answers are cached, replayed with their Content-Type, and carry one Date and one Server.

llama.cpp's server and Ollama write ``Content-Type: text/event-stream``; before tproxy lowered the
names where upstream headers enter, their streams were never stored, their JSON answers were
replayed without a Content-Type, and every miss carried ``Date`` and ``date``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import h11
import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import RunningProxy, StartProxy, access_lines
from tests.fakeupstream import FakeUpstream
from tproxy.core.body import RequestBody
from tproxy.core.cachekey import decide, tenant_namespace
from tproxy.core.headers import (
    Header,
    client_request_id,
    client_response_headers,
    end_to_end,
    header_value,
    lowered_names,
)
from tproxy.pipeline import REPLAYED_HEADERS

REQUESTS = {
    "chat-stream": (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "one two"}], "stream": True},
        "text/event-stream; charset=utf-8",
    ),
    "chat-json": (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": "one two"}]},
        "application/json",
    ),
    "completions-stream": (
        "/v1/completions",
        {"model": "m", "prompt": "one two", "stream": True},
        "text/event-stream; charset=utf-8",
    ),
    "completions-json": (
        "/v1/completions",
        {"model": "m", "prompt": "one two"},
        "application/json",
    ),
    "embeddings": ("/v1/embeddings", {"model": "m", "input": "one two"}, "application/json"),
}


def names(response: httpx2.Response, name: bytes) -> list[bytes]:
    """Every header line of ``response`` named ``name``, whatever its case."""
    return [raw for raw, _ in response.headers.raw if raw.lower() == name]


@pytest.mark.parametrize("case", ["title", "mixed"])
@pytest.mark.parametrize("kind", list(REQUESTS))
async def test_answers_from_an_upstream_that_writes_any_case_are_stored_and_replayed(
    start_proxy: StartProxy,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
    case: str,
    kind: str,
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.access")
    upstream.header_case = case
    path, body, content_type = REQUESTS[kind]
    proxy: RunningProxy = await start_proxy()
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http:
        miss = await http.post(path, json=body)
        await proxy.flush()
        hit = await http.post(path, json=body)
        await proxy.flush()

    assert upstream.calls[path] == 1
    assert [line["cache"] for line in access_lines(caplog)] == ["stored", None]
    assert miss.headers["cache-status"] == "tproxy; fwd=miss"
    assert hit.headers["cache-status"].startswith("tproxy; hit; ttl=")
    assert hit.content == miss.content
    for response in (miss, hit):
        assert response.headers.get_list("content-type") == [content_type]
        assert len(names(response, b"date")) == 1
        assert len(names(response, b"server")) == 1
        assert len(names(response, b"transfer-encoding")) <= 1


async def test_the_fake_upstream_writes_title_case_by_default(upstream: FakeUpstream) -> None:
    """The premise of the tests above: the fake is no kinder than llama.cpp or Ollama."""
    async with httpx2.AsyncClient(timeout=10) as http:
        response = await http.post(upstream.url + "/v1/completions", json={"prompt": "x"})
    written = [name for name, _ in response.headers.raw]
    assert b"Content-Type" in written
    assert b"Date" in written
    assert b"Server" in written


# --- the property: the case of a header name changes nothing ---------------------------------

_NAMES = st.sampled_from(
    [
        "content-type",
        "content-language",
        "content-length",
        "date",
        "server",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "x-request-id",
        "cache-status",
        "x-custom",
        "proxy-thing",
    ]
)
_VALUES = st.sampled_from(
    [b"text/event-stream", b"application/json", b"close, X-Custom", b"chunked", b"v", b"Mixed"]
)


def _recased(draw: Callable[[st.SearchStrategy[str]], str], name: str) -> bytes:
    return "".join(draw(st.sampled_from([c.upper(), c.lower()])) for c in name).encode()


@st.composite
def headers_in_two_cases(draw: st.DrawFn) -> tuple[list[Header], list[Header]]:
    """One list of upstream headers, written in lower case and in a case drawn per character."""
    pairs = draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=8))
    lower = [(name.encode(), value) for name, value in pairs]
    return lower, [(_recased(draw, name), value) for name, value in pairs]


@given(headers_in_two_cases())
def test_the_case_of_upstream_header_names_never_changes_what_is_kept_or_replayed(
    pair: tuple[list[Header], list[Header]],
) -> None:
    lower, recased = (lowered_names(headers) for headers in pair)
    assert lower == pair[0]
    assert end_to_end(recased) == end_to_end(lower)
    assert client_response_headers(
        recased, request_id=b"r", cache_status=b"tproxy; fwd=miss"
    ) == client_response_headers(lower, request_id=b"r", cache_status=b"tproxy; fwd=miss")
    for name in REPLAYED_HEADERS | {b"content-length", b"date"}:
        assert header_value(recased, name) == header_value(lower, name)


_REQUEST_HEADERS = {
    "cache-control": st.sampled_from([b"no-cache", b"no-store", b"max-age=5", b"only-if-cached"]),
    "pragma": st.just(b"no-cache"),
    "authorization": st.sampled_from([b"Bearer sk-one", b"Bearer sk-two"]),
    "x-api-key": st.just(b"sk-three"),
    "x-request-id": st.sampled_from([b"abc-1", b"bad id"]),
}


def _as_hypercorn_hands_it_over(headers: list[Header], body: bytes) -> list[Header]:
    """The request's headers after h11, Hypercorn's HTTP/1.1 parser, read them off the wire."""
    connection = h11.Connection(h11.SERVER)
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    connection.receive_data(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: tproxy\r\n"
        + lines
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    request = connection.next_event()
    assert isinstance(request, h11.Request)
    return list(request.headers)


@given(st.data())
def test_the_case_of_request_header_names_never_changes_a_cache_decision_or_a_log_field(
    data: st.DataObject,
) -> None:
    chosen = data.draw(st.lists(st.sampled_from(sorted(_REQUEST_HEADERS)), unique=True))
    pairs = [(name, data.draw(_REQUEST_HEADERS[name])) for name in chosen]
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    lower = [(name.encode(), value) for name, value in pairs]
    recased = [(_recased(data.draw, name), value) for name, value in pairs]
    seen = [_as_hypercorn_hands_it_over(headers, body) for headers in (lower, recased)]
    decisions = [
        decide(
            enabled=True,
            method="POST",
            route="default",
            path="/v1/chat/completions",
            query="",
            cacheable_paths={"/v1/chat/completions"},
            headers=headers,
            body=RequestBody("/v1/chat/completions", body),
            tenant=tenant_namespace(headers, shared=False),
            shared=False,
        )
        for headers in seen
    ]
    assert decisions[0] == decisions[1]
    assert client_request_id(seen[0]) == client_request_id(seen[1])
    assert tenant_namespace(seen[0], shared=False) == tenant_namespace(seen[1], shared=False)
